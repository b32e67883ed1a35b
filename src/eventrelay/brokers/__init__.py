"""Broker adapters, chosen by URL scheme (`broker_from_url`)."""

from __future__ import annotations

import difflib
import importlib

from eventrelay.brokers.base import Broker
from eventrelay.config import redact_url
from eventrelay.errors import ConfigurationError

# scheme -> (module:class, extra needed). Imported lazily, so a missing client library only matters when used.
BROKERS: dict[str, tuple[str, str | None]] = {
    "memory": ("eventrelay.brokers.memory:MemoryBroker", None),
    "sqlite+aiosqlite": ("eventrelay.brokers.sql:SqlBroker", None),
    "postgresql+asyncpg": ("eventrelay.brokers.sql:SqlBroker", "postgresql"),
    "amqp": ("eventrelay.brokers.rabbitmq:RabbitMQBroker", "rabbitmq"),
    "amqps": ("eventrelay.brokers.rabbitmq:RabbitMQBroker", "rabbitmq"),
    "nats": ("eventrelay.brokers.nats:NatsBroker", "nats"),
    "tls": ("eventrelay.brokers.nats:NatsBroker", "nats"),
    "redis": ("eventrelay.brokers.redis:RedisBroker", "redis"),
    "rediss": ("eventrelay.brokers.redis:RedisBroker", "redis"),
    "kafka": ("eventrelay.brokers.kafka:KafkaBroker", "kafka"),
}


def broker_from_url(url: str) -> Broker:
    """Build the broker adapter a URL names, e.g. `memory://`."""
    scheme = url.partition("://")[0] if "://" in url else ""
    try:
        target, extra = BROKERS[scheme]
    except KeyError:
        guess = difflib.get_close_matches(scheme, BROKERS, n=1)
        hint = f" Did you mean {guess[0]!r}?" if guess else ""
        raise ConfigurationError(
            f"No broker for URL scheme {scheme!r} in {redact_url(url)!r}. Known: {', '.join(BROKERS)}.{hint}"
        ) from None
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(
            f"The {scheme}:// broker needs an extra: pip install 'eventrelay[{extra}]'"
        ) from exc
    broker: Broker = getattr(module, class_name)(url)
    return broker


__all__ = ["BROKERS", "Broker", "broker_from_url"]
