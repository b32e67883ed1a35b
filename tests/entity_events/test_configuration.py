"""Configuration mistakes are refused early, with a message that says what to do."""

from __future__ import annotations

import pytest

from eventrelay import ConfigurationError, DistributedEventBus
from eventrelay.entity_events import EntityEvents
from eventrelay.stores.memory import MemoryStore
from tests.entity_events.support import User, UserEto


def test_entity_events_need_a_database() -> None:
    with pytest.raises(ConfigurationError, match="database="):
        DistributedEventBus("IdentityService", entity_events=EntityEvents().select(User).map(User, UserEto))


def test_entity_events_need_a_database_not_a_memory_store() -> None:
    events = EntityEvents().select_all()
    with pytest.raises(ConfigurationError, match="database="):
        DistributedEventBus("IdentityService", database=MemoryStore(), entity_events=events)


def test_entity_events_with_a_database_are_accepted(sqlite_url: str) -> None:
    events = EntityEvents().select(User)
    bus = DistributedEventBus("IdentityService", database=sqlite_url, entity_events=events)
    assert bus.entity_events is events
