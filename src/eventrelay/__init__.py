"""eventrelay: a distributed event bus for Python microservices, after ABP's.

Typed events, handler classes, a unit of work with a transactional outbox and an inbox, dead letters with
replay, and brokers chosen by URL.
"""

from __future__ import annotations

from eventrelay.brokers.base import Broker
from eventrelay.brokers.memory import MemoryBroker
from eventrelay.bus import DistributedEventBus, Subscription
from eventrelay.config import Settings, redact_url
from eventrelay.entity_events import (
    Change,
    EntityChanged,
    EntityCreated,
    EntityCreatedEto,
    EntityDeleted,
    EntityDeletedEto,
    EntityEto,
    EntityEvents,
    EntityUpdated,
    EntityUpdatedEto,
)
from eventrelay.envelope import Delivery, Message
from eventrelay.errors import (
    BrokerError,
    BrokerUnavailable,
    ConfigurationError,
    DecodeError,
    EventRelayError,
    HandlerTimeout,
    PublishFailed,
    RemoteError,
    RequestTimeout,
    StoreError,
    UnitOfWorkError,
)
from eventrelay.events import DynamicEvent, Event, event_name, event_version
from eventrelay.handlers import Context, DistributedEventHandler, Reject, Retry, RetryPolicy
from eventrelay.metrics import scrape
from eventrelay.saga import Saga, SagaRecord, step
from eventrelay.service import Service
from eventrelay.stores.base import DeadLetter, Store
from eventrelay.synchronizer import EntitySynchronizer
from eventrelay.tenancy import TenantDatabases
from eventrelay.tenant_scope import current_tenant
from eventrelay.uow import UnitOfWork
from eventrelay.upcasting import upcaster

__all__ = [
    "Broker",
    "BrokerError",
    "BrokerUnavailable",
    "Change",
    "ConfigurationError",
    "Context",
    "DeadLetter",
    "DecodeError",
    "Delivery",
    "DistributedEventBus",
    "DistributedEventHandler",
    "DynamicEvent",
    "EntityChanged",
    "EntityCreated",
    "EntityCreatedEto",
    "EntityDeleted",
    "EntityDeletedEto",
    "EntityEto",
    "EntityEvents",
    "EntitySynchronizer",
    "EntityUpdated",
    "EntityUpdatedEto",
    "Event",
    "EventRelayError",
    "HandlerTimeout",
    "MemoryBroker",
    "Message",
    "PublishFailed",
    "Reject",
    "RemoteError",
    "RequestTimeout",
    "Retry",
    "RetryPolicy",
    "Saga",
    "SagaRecord",
    "Service",
    "Settings",
    "Store",
    "StoreError",
    "Subscription",
    "TenantDatabases",
    "UnitOfWork",
    "UnitOfWorkError",
    "current_tenant",
    "event_name",
    "event_version",
    "redact_url",
    "scrape",
    "step",
    "upcaster",
]
