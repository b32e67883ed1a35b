"""Settings: the tunables of a bus, as one frozen dataclass."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

from eventrelay.errors import ConfigurationError
from eventrelay.handlers import RetryPolicy


@dataclass(frozen=True, kw_only=True)
class Settings:
    """How a bus consumes, relays and cleans up. Every field has a production default."""

    retry: RetryPolicy = field(default_factory=RetryPolicy)
    """Retry policy of handlers subscribed without one."""
    max_in_flight: int = 100
    """Messages fetched but not finished, per bus: the bound on memory and concurrency."""
    max_message_bytes: int = 1024 * 1024
    """Bodies larger than this are dead-lettered before decoding."""
    fetch_timeout: float = 1.0
    """How long one fetch waits for messages; bounds how fast a stop is noticed by brokers that poll."""
    relay_batch_size: int = 100
    relay_poll_interval: float = 1.0
    """The relay wakes at once after a local commit; this is only the fallback poll."""
    inbox_retention: timedelta = timedelta(days=7)
    """How long inbox records are kept: a duplicate older than this is no longer recognised."""
    inbox_cleanup_interval: timedelta = timedelta(hours=1)
    create_tables: bool = True
    """Create the outbox, inbox and dead-letter tables at start (turn off when migrations own them)."""
    shutdown_timeout: float = 30.0
    """On stop, how long in-flight handlers may take to finish, and the outbox to drain."""

    def __post_init__(self) -> None:
        for name in ("max_in_flight", "max_message_bytes", "relay_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigurationError(f"Settings.{name} must be at least 1")
        for name in ("fetch_timeout", "relay_poll_interval", "shutdown_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigurationError(f"Settings.{name} must be more than 0 seconds")


def redact_url(url: str) -> str:
    """`url` with its password replaced by `***`, for messages and logs."""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not at or ":" not in creds:
        return url
    return f"{scheme}{sep}{creds.partition(':')[0]}:***@{host}"
