"""Tracing with OpenTelemetry: one trace from the publisher's request to the subscriber's handler.

Optional: `pip install 'eventrelay[otel]'` and configure an SDK (`opentelemetry-sdk`, or
`opentelemetry-instrument`). Without the package nothing imports it; with the API but no SDK, every hook
returns at once. Otherwise the bus makes these spans, named and attributed after OpenTelemetry's messaging
semantic conventions (`messaging.system` is the broker: `rabbitmq`, `kafka`, `nats`, `redis`, `sql`, ...):

| span | kind | where |
| --- | --- | --- |
| `create {event}` | producer | `publish`: its context goes into the message's `traceparent` header |
| `outbox write` | internal | the event rows written in the unit of work's transaction |
| `send {event}` | producer | the relay (or a direct publish) hands the message to the broker |
| `receive {service}` | client | a fetch that brought messages, linked to each |
| `process {event}` | consumer | one delivery, child of the message's `create` span (through the broker) |
| `inbox check` | internal | the inbox claim that tells a duplicate |
| `handle {handler}` | internal | one handler's unit of work; spans your handler makes are its children |

The `traceparent` (and `tracestate`) header travels through the outbox and every broker, so a trace runs
from an HTTP request in one service to the handler in another; a replayed dead letter joins its trace again.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Awaitable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

from eventrelay.envelope import Delivery, Message

try:  # the optional extra; eventrelay works the same without it
    from opentelemetry import propagate, trace
    from opentelemetry.trace import Link, NoOpTracerProvider, ProxyTracerProvider, SpanKind, StatusCode

    INSTALLED = True
except ImportError:  # pragma: no cover - exercised in a subprocess by the tests
    INSTALLED = False

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer, TracerProvider

_OFF = contextlib.nullcontext()
_UNKNOWN = object()


class Tracing:
    """The spans of one bus. `provider` is a `TracerProvider`; None means OpenTelemetry's global one.

    `bus.tracing.provider = provider` traces one bus with a provider of its own (tests do that).
    """

    def __init__(self, service: str, system: str, provider: TracerProvider | None = None) -> None:
        self.service = service
        self.system = system
        self.provider = provider
        self._cached: tuple[object, Tracer] | None = None
        if INSTALLED:
            trace.get_tracer_provider()  # lets the API load a provider its environment names, once

    @staticmethod
    def system_of(broker: object) -> str:
        """`messaging.system` for a broker: `RabbitMQBroker` -> `rabbitmq`."""
        return type(broker).__name__.removesuffix("Broker").lower() or "eventrelay"

    def tracer(self) -> Tracer | None:
        """The tracer, or None when no SDK is configured (the no-op fast path)."""
        if not INSTALLED:
            return None
        provider = self.provider or _global_provider()
        if provider is None:
            return None
        cached = self._cached
        if cached is not None and cached[0] is provider:
            return cached[1]
        if isinstance(provider, ProxyTracerProvider | NoOpTracerProvider):
            return None
        tracer = provider.get_tracer("eventrelay")
        self._cached = (provider, tracer)
        return tracer

    def _attributes(self, operation: str, name: str, message: Message | None) -> dict[str, Any]:
        attributes: dict[str, Any] = {
            "messaging.system": self.system,
            "messaging.operation.type": operation,
            "messaging.operation.name": operation,
            "messaging.destination.name": name,
        }
        if message is not None:
            attributes["messaging.message.id"] = message.id
            attributes["messaging.message.body.size"] = len(message.body)
            if message.correlation_id is not None:
                attributes["messaging.message.conversation_id"] = message.correlation_id
        return attributes

    # --- publishing ----------------------------------------------------------------------------------

    def created(self, message: Message) -> Message:
        """Record a `create` span for a new message and return it with the span's `traceparent`."""
        tracer = self.tracer()
        if tracer is None:
            return message
        attributes = self._attributes("create", message.name, message)
        with tracer.start_as_current_span(
            f"create {message.name}", kind=SpanKind.PRODUCER, attributes=attributes
        ):
            headers = dict(message.headers)
            propagate.inject(headers)
        return dataclasses.replace(message, headers=headers)

    def outbox_write(self, messages: Sequence[Message]) -> contextlib.AbstractContextManager[object]:
        """A span around writing `messages` to the outbox."""
        tracer = self.tracer()
        if tracer is None:
            return _OFF
        return tracer.start_as_current_span(
            "outbox write",
            attributes={
                "messaging.system": self.system,
                "messaging.batch.message_count": len(messages),
                "eventrelay.service": self.service,
            },
            links=[Link(c) for c in map(_span_context, messages) if c is not None],
        )

    @contextlib.contextmanager
    def send(self, messages: Sequence[Message]) -> Iterator[None]:
        """`send` spans, one per message (child of its `create` span), around one broker publish."""
        tracer = self.tracer()
        if tracer is None:
            yield
            return
        spans = [
            tracer.start_span(
                f"send {m.name}",
                context=propagate.extract(m.headers),
                kind=SpanKind.PRODUCER,
                attributes=self._attributes("send", m.name, m),
            )
            for m in messages
        ]
        try:
            yield
        except BaseException as exc:
            for span in spans:
                span.record_exception(exc)
                span.set_status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}")
            raise
        finally:
            for span in spans:
                span.end()

    # --- receiving -----------------------------------------------------------------------------------

    def received(self, deliveries: Sequence[Delivery], started_ns: int) -> None:
        """Record a `receive` span for a fetch that brought `deliveries`, linked to each message."""
        tracer = self.tracer()
        if tracer is None or not deliveries:
            return
        attributes = self._attributes("receive", self.service, None)
        attributes["messaging.consumer.group.name"] = self.service
        attributes["messaging.batch.message_count"] = len(deliveries)
        links = [Link(c) for c in (_span_context(d.message) for d in deliveries) if c is not None]
        span = tracer.start_span(
            f"receive {self.service}",
            kind=SpanKind.CLIENT,
            attributes=attributes,
            links=links,
            start_time=started_ns,
        )
        span.end()

    def process(self, delivery: Delivery, replay: bool = False) -> contextlib.AbstractContextManager[object]:
        """The `process` span of one delivery, child of the message's creation context."""
        tracer = self.tracer()
        if tracer is None:
            return _OFF
        message = delivery.message
        attributes = self._attributes("process", message.name, message)
        attributes["messaging.consumer.group.name"] = self.service
        attributes["messaging.destination.subscription.name"] = self.service
        attributes["eventrelay.attempt"] = delivery.attempt
        if replay:
            attributes["eventrelay.replay"] = True
        return tracer.start_as_current_span(
            f"process {message.name}",
            context=propagate.extract(message.headers),
            kind=SpanKind.CONSUMER,
            attributes=attributes,
        )

    async def inbox_check(self, claim: Awaitable[bool]) -> bool:
        """Await the inbox claim inside an `inbox check` span; True when the message is new here."""
        tracer = self.tracer()
        if tracer is None:
            return await claim
        with tracer.start_as_current_span("inbox check") as span:
            new = await claim
            span.set_attribute("eventrelay.duplicate", not new)
            return new

    def inbox_checked(self, new: bool, started_ns: int, ended_ns: int) -> None:
        """Record the `inbox check` span of one handler whose claim was part of a batch's one statement
        (from `started_ns` to `ended_ns`), under the current `handle` span."""
        tracer = self.tracer()
        if tracer is None:
            return
        span = tracer.start_span(
            "inbox check",
            attributes={"eventrelay.duplicate": not new, "eventrelay.batched": True},
            start_time=started_ns,
        )
        span.end(end_time=ended_ns)

    def handle(
        self, handler: str, message: Message, attempt: int
    ) -> contextlib.AbstractContextManager[object]:
        """The `handle` span of one handler's unit of work."""
        tracer = self.tracer()
        if tracer is None:
            return _OFF
        return tracer.start_as_current_span(
            f"handle {handler}",
            attributes={
                "eventrelay.handler": handler,
                "eventrelay.attempt": attempt,
                "messaging.message.id": message.id,
                "messaging.destination.name": message.name,
                "messaging.consumer.group.name": self.service,
            },
        )


def _global_provider() -> TracerProvider | None:
    """OpenTelemetry's global provider, None while none is set: one attribute read, where the API's own
    `get_tracer_provider()` looks at `os.environ` on every call until a provider is set."""
    provider = getattr(trace, "_TRACER_PROVIDER", _UNKNOWN)
    if provider is _UNKNOWN:  # another version of the API: ask it
        return trace.get_tracer_provider()
    return cast("TracerProvider | None", provider)


def _span_context(message: Message) -> Any:
    """The span context in a message's headers, or None."""
    context = trace.get_current_span(propagate.extract(message.headers)).get_span_context()
    return context if context.is_valid else None


def trace_id(headers: Mapping[str, str]) -> str | None:
    """The 32-hex-digit trace id in a `traceparent` header, for finding a message's trace; None without."""
    parts = headers.get("traceparent", "").split("-")
    return parts[1] if len(parts) == 4 and len(parts[1]) == 32 else None


__all__ = ["Tracing", "trace_id"]
