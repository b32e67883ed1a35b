"""The broker contract on the in-process memory broker."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from eventrelay.brokers.base import Broker
from eventrelay.brokers.memory import MemoryBroker
from tests.brokers.contract import BrokerContract


class TestMemoryBroker(BrokerContract):
    @pytest.fixture
    async def broker(self) -> AsyncIterator[Broker]:
        async with MemoryBroker() as broker:
            yield broker
