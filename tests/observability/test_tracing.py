"""Tracing: one trace from an HTTP request span in ProductService to the discount applied in OrderService,
over a real broker (PostgreSQL as the broker), recorded by the OpenTelemetry SDK's in-memory exporter.

Each bus gets a `TracerProvider` of its own test (`bus.tracing.provider`): no global OpenTelemetry state.
"""

from __future__ import annotations

import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from eventrelay import DistributedEventBus, DistributedEventHandler, Event, MemoryBroker, RetryPolicy
from eventrelay.testing import RecordingBroker, wait_until_idle
from eventrelay.tracing import trace_id
from tests.bus.helpers import eventually, settings

FAST = settings(retry=RetryPolicy(max_attempts=2, initial_delay=0.01, max_delay=0.01))


class PriceChangedEto(Event, name="TracingTests.Product.PriceChanged"):
    product_id: int
    old_price: Decimal
    new_price: Decimal


DISCOUNTS: list[int] = []


class ApplyDiscount(DistributedEventHandler[PriceChangedEto]):
    def __init__(self, tracer: trace.Tracer) -> None:
        self.tracer = tracer

    async def handle_event(self, event: PriceChangedEto) -> None:
        with self.tracer.start_as_current_span("apply discount"):  # a span of the handler's own
            DISCOUNTS.append(event.product_id)


class Exporter:
    def __init__(self) -> None:
        self.memory = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.memory))

    @property
    def spans(self) -> list[ReadableSpan]:
        return list(self.memory.get_finished_spans())

    def one(self, name: str) -> ReadableSpan:
        found = [s for s in self.spans if s.name == name]
        assert len(found) == 1, f"{name}: {[s.name for s in self.spans]}"
        return found[0]


def ids(span: ReadableSpan) -> tuple[int, int]:
    """(trace id, span id)."""
    assert span.context is not None
    return span.context.trace_id, span.context.span_id


def parent(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


@pytest.mark.postgresql
async def test_one_trace_runs_from_the_request_to_the_handler_over_a_real_broker(
    postgresql_url: str, tmp_path: Path
) -> None:
    exporter = Exporter()
    products = DistributedEventBus(
        "ProductService",
        broker=postgresql_url,
        database=f"sqlite+aiosqlite:///{tmp_path}/p.db",
        settings=FAST,
    )
    orders = DistributedEventBus(
        "OrderService", broker=postgresql_url, database=f"sqlite+aiosqlite:///{tmp_path}/o.db", settings=FAST
    )
    products.tracing.provider = orders.tracing.provider = exporter.provider
    await orders.subscribe(
        ApplyDiscount, factory=lambda: ApplyDiscount(exporter.provider.get_tracer("orders"))
    )
    async with products, orders:
        tracer = exporter.provider.get_tracer("product-service")
        with tracer.start_as_current_span("PUT /products/{id}/price", kind=SpanKind.SERVER):
            async with products.unit_of_work():
                message_id = await products.publish(
                    PriceChangedEto(product_id=7, old_price=Decimal(40), new_price=Decimal(30))
                )
        await wait_until_idle(products, orders, timeout=30)
        await eventually(lambda: any(s.name.startswith("process") for s in exporter.spans), timeout=30)

    request = exporter.one("PUT /products/{id}/price")
    create = exporter.one("create TracingTests.Product.PriceChanged")
    write = exporter.one("outbox write")
    send = exporter.one("send TracingTests.Product.PriceChanged")
    receive = exporter.one("receive OrderService")
    process = exporter.one("process TracingTests.Product.PriceChanged")
    inbox = exporter.one("inbox check")
    handle = exporter.one("handle tests.observability.test_tracing.ApplyDiscount")
    discount = exporter.one("apply discount")

    trace_id_ = ids(request)[0]
    spans = (create, write, send, receive, process, inbox, handle, discount)
    assert [ids(s)[0] == trace_id_ for s in spans] == [True] * 3 + [False] + [True] * 4  # receive: a batch
    assert {s.name: parent(s) for s in spans} == {
        create.name: ids(request)[1],
        write.name: ids(request)[1],
        send.name: ids(create)[1],  # the relay, in a task of its own, continues the message's trace
        receive.name: None,
        process.name: ids(create)[1],  # across the broker, from the traceparent header
        inbox.name: ids(handle)[1],
        handle.name: ids(process)[1],
        discount.name: ids(handle)[1],
    }
    assert process.parent is not None
    assert process.parent.is_remote
    assert [link.context.span_id for link in receive.links] == [ids(create)[1]]
    assert (create.kind, send.kind, receive.kind, process.kind) == (
        SpanKind.PRODUCER,
        SpanKind.PRODUCER,
        SpanKind.CLIENT,
        SpanKind.CONSUMER,
    )
    assert (
        dict(process.attributes or {}).items()
        >= {
            "messaging.system": "sql",
            "messaging.operation.type": "process",
            "messaging.destination.name": "TracingTests.Product.PriceChanged",
            "messaging.message.id": message_id,
            "messaging.consumer.group.name": "OrderService",
            "messaging.message.conversation_id": message_id,
            "eventrelay.attempt": 1,
        }.items()
    )
    assert (create.attributes or {})["messaging.operation.type"] == "create"
    assert (send.attributes or {})["messaging.operation.type"] == "send"
    assert (inbox.attributes or {})["eventrelay.duplicate"] is False
    assert DISCOUNTS == [7]


class Fails(Event, name="TracingTests.Fails"):
    n: int


async def test_a_failure_is_recorded_and_a_replay_joins_the_message_trace() -> None:
    exporter = Exporter()
    broker = MemoryBroker()
    calls: list[int] = []

    async def flaky(event: Fails) -> None:
        calls.append(event.n)
        if len(calls) <= 2:
            raise ValueError("stock service down")

    async with DistributedEventBus("Orders", broker=broker, settings=FAST) as bus:
        bus.tracing.provider = exporter.provider
        await bus.subscribe(flaky, name="flaky")
        await bus.publish(Fails(n=1))
        await eventually(lambda: len(calls) == 2, timeout=10)
        await wait_until_idle(bus)
        (letter,) = await bus.dead_letters()
        assert trace_id(letter.message.headers) is not None
        await bus.replay(letter.id)

    create = exporter.one("create TracingTests.Fails")
    assert create.context is not None
    processes = [s for s in exporter.spans if s.name == "process TracingTests.Fails"]
    assert len(processes) == 3  # two attempts, then the replay
    assert all(s.context is not None and s.context.trace_id == create.context.trace_id for s in processes)
    assert [dict(s.attributes or {}).get("eventrelay.replay", False) for s in processes] == [
        False,
        False,
        True,
    ]
    handles = [s for s in exporter.spans if s.name == "handle flaky"]
    assert [s.status.is_ok for s in handles] == [False, False, True]  # one span per run, the replay's too
    failed = handles[:2]
    assert any(e.name == "exception" for e in failed[0].events)
    assert trace_id(letter.message.headers) == f"{create.context.trace_id:032x}"


async def test_without_an_sdk_no_span_is_made_and_no_header_is_added() -> None:
    broker = RecordingBroker()
    handled: list[int] = []

    async def record(event: Fails) -> None:
        handled.append(event.n)

    async with DistributedEventBus("Quiet", broker=broker, settings=FAST) as bus:
        assert bus.tracing.tracer() is None  # the API's default provider: the no-op fast path
        await bus.subscribe(record)
        await bus.publish(Fails(n=1))
        await wait_until_idle(bus)
    assert handled == [1]
    assert "traceparent" not in broker.published[0].headers


def test_eventrelay_works_without_opentelemetry_installed() -> None:
    code = """
import sys
sys.modules["opentelemetry"] = None  # as if the package were not installed
import asyncio
from eventrelay import DistributedEventBus, Event
from eventrelay.testing import RecordingBroker, wait_until_idle
import eventrelay.tracing

class Ping(Event, name="TracingTests.Ping"):
    n: int

async def main() -> None:
    broker = RecordingBroker()
    got = []
    async def on_ping(event: Ping) -> None:
        got.append(event.n)
    async with DistributedEventBus("S", broker=broker) as bus:
        await bus.subscribe(on_ping)
        await bus.publish(Ping(n=1))
        await wait_until_idle(bus)
    assert got == [1], got
    assert "traceparent" not in broker.published[0].headers
    assert not eventrelay.tracing.INSTALLED
    assert not [m for m in sys.modules if m.startswith("opentelemetry.")]
    print("ok")

asyncio.run(main())
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_a_global_provider_set_after_the_bus_was_made_is_used() -> None:
    """In a process of its own: OpenTelemetry's global provider can be set once per process."""
    code = """
import asyncio
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from eventrelay import DistributedEventBus, Event
from eventrelay.testing import RecordingBroker, wait_until_idle

class Ping(Event, name="TracingTests.GlobalPing"):
    n: int

async def main() -> None:
    broker = RecordingBroker()
    async with DistributedEventBus("S", broker=broker) as bus:
        async def on_ping(event: Ping) -> None:
            pass
        await bus.subscribe(on_ping)
        await bus.publish(Ping(n=1))  # no provider yet: no span, no header
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        await bus.publish(Ping(n=2))
        await wait_until_idle(bus)
    assert ["traceparent" in m.headers for m in broker.published] == [False, True]
    names = {s.name for s in exporter.get_finished_spans()}
    assert {"create TracingTests.GlobalPing", "process TracingTests.GlobalPing"} <= names, names
    print("ok")

asyncio.run(main())
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
