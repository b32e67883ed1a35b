"""Correlation id, causation id, tenant id and custom headers travel from the publisher, through the outbox
and the broker, to the handler's context; a handler's own publications inherit them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import pytest

from eventrelay import ConfigurationError, Context, DistributedEventHandler, Event, MemoryBroker
from eventrelay.testing import RecordingBroker, wait_until_idle
from tests.bus.helpers import OrderPlaced, make_bus, not_started, outbox_size


class InvoiceRequested(Event, name="BusTests.InvoiceRequested"):
    order_id: int


async def test_correlation_tenant_and_headers_reach_the_handler(database: str | None) -> None:
    contexts: list[Context] = []

    class Remember(DistributedEventHandler[OrderPlaced]):
        async def handle_event(self, event: OrderPlaced) -> None:
            contexts.append(self.context)

    bus = make_bus("Orders", MemoryBroker(), database)
    await bus.subscribe(Remember)
    async with bus:
        message_id = await bus.publish(
            OrderPlaced(order_id=1),
            correlation_id="corr-1",
            tenant_id="tenant-1",
            headers={"x-request-path": "/orders", "x-empty": ""},
            key="order-1",
        )
        await wait_until_idle(bus)
    (context,) = contexts
    assert context.message_id == message_id
    assert context.correlation_id == "corr-1"
    assert context.tenant_id == "tenant-1"
    assert context.causation_id is None
    assert context.headers["x-request-path"] == "/orders"
    assert context.headers["x-empty"] == ""
    assert context.key == "order-1"
    assert context.attempt == 1
    assert context.event_name == "BusTests.OrderPlaced"
    assert context.subscriber == "Orders"


async def test_a_handlers_publication_inherits_correlation_and_tenant(database: str | None) -> None:
    first: list[Context] = []
    second: list[Context] = []

    async def place(event: OrderPlaced, context: Context) -> None:
        first.append(context)
        await bus.publish(InvoiceRequested(order_id=event.order_id))

    async def invoice(event: InvoiceRequested, context: Context) -> None:
        second.append(context)

    bus = make_bus("Orders", MemoryBroker(), database)
    await bus.subscribe(place)
    await bus.subscribe(invoice)
    async with bus:
        await bus.publish(OrderPlaced(order_id=1), correlation_id="corr-1", tenant_id="tenant-1")
        await wait_until_idle(bus)
    assert len(first) == len(second) == 1
    assert second[0].correlation_id == first[0].correlation_id == "corr-1"
    assert second[0].tenant_id == first[0].tenant_id == "tenant-1"
    assert second[0].causation_id == first[0].message_id
    assert second[0].message_id != first[0].message_id


async def test_without_a_correlation_id_the_first_message_starts_one(database: str | None) -> None:
    first: list[Context] = []
    second: list[Context] = []

    async def place(event: OrderPlaced, context: Context) -> None:
        first.append(context)
        # Sent right after this handler's commit, still inheriting.
        await bus.publish(InvoiceRequested(order_id=event.order_id), use_outbox=False)

    async def invoice(event: InvoiceRequested, context: Context) -> None:
        second.append(context)

    broker = RecordingBroker()
    bus = make_bus("Orders", broker, database)
    await bus.subscribe(place)
    await bus.subscribe(invoice)
    async with bus:
        message_id = await bus.publish(OrderPlaced(order_id=1))
        await wait_until_idle(bus)
    assert first[0].message_id == message_id
    assert first[0].correlation_id == message_id
    assert first[0].causation_id is None
    assert first[0].tenant_id is None
    assert second[0].correlation_id == message_id
    assert second[0].causation_id == message_id
    assert second[0].tenant_id is None
    assert [m.correlation_id for m in broker.published] == [message_id, message_id]


async def test_an_explicit_correlation_id_in_a_handler_wins_and_keeps_the_causation() -> None:
    second: list[Context] = []

    async def place(event: OrderPlaced, context: Context) -> None:
        await bus.publish(InvoiceRequested(order_id=1), correlation_id="own", tenant_id="other")

    async def invoice(event: InvoiceRequested, context: Context) -> None:
        second.append(context)

    bus = make_bus("Orders", MemoryBroker(), None)
    await bus.subscribe(place)
    await bus.subscribe(invoice)
    async with bus:
        first_id = await bus.publish(OrderPlaced(order_id=1), tenant_id="tenant-1")
        await wait_until_idle(bus)
    assert (second[0].correlation_id, second[0].tenant_id, second[0].causation_id) == (
        "own",
        "other",
        first_id,
    )


@pytest.mark.parametrize(
    "headers",
    [
        {"x-count": 1},
        {"x-flag": None},
        {"x-list": ["a"]},
        {"x-bytes": b"a"},
        {1: "one"},
    ],
    ids=["int", "none", "list", "bytes", "non-string-name"],
)
async def test_non_string_headers_are_refused_at_publish(headers: dict[Any, Any]) -> None:
    broker = RecordingBroker()
    async with not_started(make_bus("Orders", broker, None)) as bus:
        with pytest.raises(ConfigurationError):
            await bus.publish(OrderPlaced(order_id=1), headers=cast(Mapping[str, str], headers))
        with pytest.raises(ConfigurationError):
            await bus.publish(
                OrderPlaced(order_id=1), headers=cast(Mapping[str, str], headers), use_outbox=False
            )
        assert await outbox_size(bus) == 0
    assert broker.published == []


@pytest.mark.parametrize("name", ["x-correlation-id", "x-causation-id", "x-tenant-id"])
async def test_reserved_headers_are_set_with_their_own_arguments(name: str) -> None:
    async with not_started(make_bus("Orders", RecordingBroker(), None)) as bus:
        with pytest.raises(ConfigurationError, match="correlation_id="):
            await bus.publish(OrderPlaced(order_id=1), headers={name: "x"})
