"""Prometheus metrics of one bus, in a registry of its own (`pip install 'eventrelay[metrics]'`).

Turn them on with `Settings(metrics=True)` (or `{prefix}METRICS=true`); `Settings(metrics_port=9464)` also
makes `Service.run` (and `eventrelay run`) serve them at `http://127.0.0.1:9464/metrics`. Inside your own
web app, serve `await scrape(bus)` (see `docs/operations.md`). Labels: `service` (the subscriber), `event`
(the wire name) and, for what happens per handler, `handler`.

| metric | type | what |
| --- | --- | --- |
| `eventrelay_published_total` | counter | events written to the outbox or sent directly |
| `eventrelay_relayed_total` | counter | outbox rows the broker accepted |
| `eventrelay_handled_total` | counter | handler runs that committed (duplicates not counted) |
| `eventrelay_retried_total` | counter | failed attempts that will be tried again |
| `eventrelay_dead_lettered_total` | counter | messages given up on (`handler` is `-` when none took it) |
| `eventrelay_handler_duration_seconds` | histogram | a handler's unit of work: claim, run, commit |
| `eventrelay_commit_to_handle_seconds` | histogram | outbox write (`x-eventrelay-committed-at`) to handled |
| `eventrelay_outbox_backlog` | gauge | outbox rows waiting, at scrape time |
| `eventrelay_outbox_oldest_age_seconds` | gauge | age of the oldest outbox row (0 when empty) |
| `eventrelay_consumer_lag` | gauge | messages the broker still owes the service (`Broker.pending_count`) |
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

from eventrelay.envelope import COMMITTED_AT, Message
from eventrelay.errors import ConfigurationError
from eventrelay.stores.base import utcnow

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from eventrelay.brokers.base import Broker
    from eventrelay.stores.base import Store

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 3600)


class MetricsHooks(Protocol):
    """What the bus tells its metrics, as it happens."""

    enabled: bool

    def published(self, messages: Sequence[Message]) -> None:
        """Events written to the outbox or sent directly."""

    def relayed(self, messages: Sequence[Message]) -> None:
        """Outbox messages the broker accepted."""

    def handled(self, handler: str, message: Message, started: float) -> None:
        """A handler committed; `started` is its `time.perf_counter()` at the start."""

    def retried(self, handler: str, message: Message) -> None:
        """A failed attempt that will be tried again."""

    def dead_lettered(self, handler: str | None, message: Message) -> None:
        """A message given up on."""


class NoMetrics:
    """The hooks of a bus whose metrics are off: each does nothing."""

    enabled = False

    def published(self, messages: Sequence[Message]) -> None:
        pass

    def relayed(self, messages: Sequence[Message]) -> None:
        pass

    def handled(self, handler: str, message: Message, started: float) -> None:
        pass

    def retried(self, handler: str, message: Message) -> None:
        pass

    def dead_lettered(self, handler: str | None, message: Message) -> None:
        pass


class Metrics:
    """The metrics of one bus, in `registry` (a fresh `CollectorRegistry` unless given)."""

    enabled = True

    def __init__(self, service: str, registry: CollectorRegistry | None = None) -> None:
        try:
            import prometheus_client as prom
        except ImportError as exc:
            raise ConfigurationError(
                "Metrics need prometheus-client: pip install 'eventrelay[metrics]'"
            ) from exc
        self.service = service
        self.registry = registry if registry is not None else prom.CollectorRegistry()
        event, handler = ["service", "event"], ["service", "event", "handler"]
        r = self.registry
        self.published_total = prom.Counter(
            "eventrelay_published", "Events written to the outbox or sent directly.", event, registry=r
        )
        self.relayed_total = prom.Counter(
            "eventrelay_relayed", "Outbox messages the broker accepted.", event, registry=r
        )
        self.handled_total = prom.Counter(
            "eventrelay_handled", "Handler runs that committed.", handler, registry=r
        )
        self.retried_total = prom.Counter(
            "eventrelay_retried", "Failed attempts that will be tried again.", handler, registry=r
        )
        self.dead_lettered_total = prom.Counter(
            "eventrelay_dead_lettered", "Messages given up on.", handler, registry=r
        )
        self.handler_duration = prom.Histogram(
            "eventrelay_handler_duration_seconds",
            "A successful handler's unit of work: inbox claim, handler, commit.",
            handler,
            registry=r,
        )
        self.commit_to_handle = prom.Histogram(
            "eventrelay_commit_to_handle_seconds",
            "From the outbox write to the handler's commit.",
            handler,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.outbox_backlog = prom.Gauge(
            "eventrelay_outbox_backlog", "Outbox rows waiting.", ["service"], registry=r
        )
        self.outbox_oldest_age = prom.Gauge(
            "eventrelay_outbox_oldest_age_seconds", "Age of the oldest outbox row.", ["service"], registry=r
        )
        self.consumer_lag = prom.Gauge(
            "eventrelay_consumer_lag", "Messages the broker still owes the service.", ["service"], registry=r
        )
        self._event_children: dict[str, tuple[Any, Any]] = {}
        self._handler_children: dict[tuple[str, str], tuple[Any, Any, Any]] = {}

    def published(self, messages: Sequence[Message]) -> None:
        for message in messages:
            self._by_event(message.name)[0].inc()

    def relayed(self, messages: Sequence[Message]) -> None:
        for message in messages:
            self._by_event(message.name)[1].inc()

    def handled(self, handler: str, message: Message, started: float) -> None:
        total, duration, latency = self._by_handler(message.name, handler)
        total.inc()
        duration.observe(time.perf_counter() - started)
        committed = committed_at(message)
        if committed is not None:
            latency.observe(max(0.0, (utcnow() - committed).total_seconds()))

    def _by_event(self, event: str) -> tuple[Any, Any]:
        """The published and relayed counters of one event (looked up once: `labels()` takes a lock)."""
        found = self._event_children.get(event)
        if found is None:
            labels = (self.service, event)
            found = self._event_children[event] = (
                self.published_total.labels(*labels),
                self.relayed_total.labels(*labels),
            )
        return found

    def _by_handler(self, event: str, handler: str) -> tuple[Any, Any, Any]:
        found = self._handler_children.get((event, handler))
        if found is None:
            labels = (self.service, event, handler)
            found = self._handler_children[(event, handler)] = (
                self.handled_total.labels(*labels),
                self.handler_duration.labels(*labels),
                self.commit_to_handle.labels(*labels),
            )
        return found

    def retried(self, handler: str, message: Message) -> None:
        self.retried_total.labels(self.service, message.name, handler).inc()

    def dead_lettered(self, handler: str | None, message: Message) -> None:
        self.dead_lettered_total.labels(self.service, message.name, handler or "-").inc()

    async def refresh(self, store: Store, broker: Broker, service: str) -> None:
        """Read the gauges now: the outbox backlog and age, and the broker's lag (when it can count)."""
        count, oldest = await store.outbox_backlog()
        self.outbox_backlog.labels(self.service).set(count)
        age = (utcnow() - oldest).total_seconds() if oldest is not None else 0.0
        self.outbox_oldest_age.labels(self.service).set(max(0.0, age))
        with contextlib.suppress(NotImplementedError):  # a broker that cannot count has no lag gauge
            self.consumer_lag.labels(self.service).set(await broker.pending_count(service))


def committed_at(message: Message) -> datetime | None:
    """When the message was written to the outbox (naive UTC), from its header; None without one."""
    raw = message.headers.get(COMMITTED_AT)
    if raw is None:
        return None
    try:
        when = datetime.fromisoformat(raw)
    except ValueError:
        return None
    return when.astimezone(UTC).replace(tzinfo=None) if when.tzinfo else when


def committed_stamp() -> str:
    """The `x-eventrelay-committed-at` value for now: ISO 8601 UTC with microseconds."""
    return utcnow().isoformat(timespec="microseconds") + "Z"


class Scraped(Protocol):
    """What `scrape` reads: a bus (`DistributedEventBus` is one)."""

    service: str
    metrics: MetricsHooks

    @property
    def store(self) -> Store: ...

    @property
    def broker(self) -> Broker: ...


async def scrape(bus: Scraped) -> tuple[bytes, str]:
    """The bus's metrics in Prometheus' text format, gauges read now: (body, content type)."""
    metrics = bus.metrics
    if not isinstance(metrics, Metrics):
        raise ConfigurationError(f"Metrics are off in {bus.service}: create it with Settings(metrics=True)")
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    await metrics.refresh(bus.store, bus.broker, bus.service)
    return generate_latest(metrics.registry), CONTENT_TYPE_LATEST
