"""The inbox: delivery is at-least-once, the effect exactly once. The handler's writes and the inbox record
commit together; a duplicate is acknowledged without running the handler."""

from __future__ import annotations

from sqlalchemy import insert

from eventrelay import Context, DistributedEventHandler, MemoryBroker, Message, event_name
from eventrelay.codec import encode_body
from eventrelay.envelope import new_message_id
from eventrelay.testing import wait_until_idle
from tests.bus.helpers import (
    OrderPlaced,
    business_table,
    count_rows,
    create_table,
    make_bus,
    sql_store,
)


def order_message(order_id: int) -> Message:
    """A message as the relay would send it, built by hand so that it can be delivered twice."""
    event = OrderPlaced(order_id=order_id)
    return Message(new_message_id(), event_name(event), encode_body(event), {"x-correlation-id": "c"})


async def test_a_message_delivered_twice_runs_the_handler_once(database: str | None) -> None:
    calls: list[int] = []

    async def handle(event: OrderPlaced) -> None:
        calls.append(event.order_id)

    broker = MemoryBroker()
    bus = make_bus("Orders", broker, database)
    await bus.subscribe(handle)
    async with bus:
        message = order_message(1)
        await broker.publish([message])
        await broker.publish([message])  # both queued at once: two deliveries race for the inbox
        await wait_until_idle(bus)
        await broker.publish([message])  # and once more, long after the first was handled
        await wait_until_idle(bus)
        assert await bus.dead_letters() == []
    assert calls == [1]


async def test_a_duplicate_writes_the_handlers_row_once(database_url: str) -> None:
    table = business_table()
    await create_table(database_url, table)

    class RecordOrder(DistributedEventHandler[OrderPlaced]):
        async def handle_event(self, event: OrderPlaced) -> None:
            await self.context.session.execute(insert(table).values(id=event.order_id, note="placed"))

    broker = MemoryBroker()
    bus = make_bus("Orders", broker, database_url)
    await bus.subscribe(RecordOrder)
    async with bus:
        message = order_message(1)
        for _ in range(3):
            await broker.publish([message])
        await wait_until_idle(bus)
        assert await bus.dead_letters() == []
    assert await count_rows(database_url, table) == 1


async def test_each_subscribing_service_has_its_own_inbox(database_url: str) -> None:
    seen: list[str] = []

    async def in_orders(event: OrderPlaced) -> None:
        seen.append("orders")

    async def in_invoices(event: OrderPlaced) -> None:
        seen.append("invoices")

    broker = MemoryBroker()
    orders = make_bus("Orders", broker, database_url)
    invoices = make_bus("Invoices", broker, database_url)  # one database, two services
    await orders.subscribe(in_orders)
    await invoices.subscribe(in_invoices)
    async with orders, invoices:
        message = order_message(1)
        await broker.publish([message])
        await broker.publish([message])
        await wait_until_idle(orders, invoices)
    assert sorted(seen) == ["invoices", "orders"]


async def test_the_inbox_record_and_the_handlers_row_commit_together(database_url: str) -> None:
    table = business_table()
    await create_table(database_url, table)
    observed: list[tuple[int, int]] = []
    attempts: list[int] = []

    async def handle(event: OrderPlaced, context: Context) -> None:
        attempts.append(context.attempt)
        inbox = sql_store(bus).tables.inbox
        if context.attempt > 1:  # what the failed attempt left behind, as committed data
            observed.append(
                (
                    await count_rows(database_url, table),
                    await count_rows(database_url, inbox, inbox.c.message_id == context.message_id),
                )
            )
        await context.session.execute(insert(table).values(id=event.order_id, note="placed"))
        if context.attempt == 1:
            raise RuntimeError("fails after writing its row")

    broker = MemoryBroker()
    bus = make_bus("Orders", broker, database_url)
    await bus.subscribe(handle)
    async with bus:
        message = order_message(1)
        await broker.publish([message])
        await wait_until_idle(bus)
        assert attempts == [1, 2]
        assert observed == [(0, 0)]  # the failed attempt left neither its row nor an inbox record
        inbox = sql_store(bus).tables.inbox
        assert await count_rows(database_url, table) == 1
        assert await count_rows(database_url, inbox, inbox.c.message_id == message.id) == 1
        assert await bus.dead_letters() == []
        await broker.publish([message])  # redelivered after the success: acknowledged, not run
        await wait_until_idle(bus)
    assert attempts == [1, 2]
    assert await count_rows(database_url, table) == 1


async def test_a_failed_attempt_leaves_no_inbox_record_without_a_database() -> None:
    attempts: list[int] = []

    async def handle(event: OrderPlaced, context: Context) -> None:
        attempts.append(context.attempt)
        if context.attempt == 1:
            raise RuntimeError("first attempt fails")

    broker = MemoryBroker()
    bus = make_bus("Orders", broker, None)
    await bus.subscribe(handle)
    async with bus:
        message = order_message(1)
        await broker.publish([message])
        await wait_until_idle(bus)
        await broker.publish([message])
        await wait_until_idle(bus)
    assert attempts == [1, 2]
