"""Subscribing and unsubscribing at run time, and a graceful stop that loses nothing."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from sqlalchemy import insert

from eventrelay import Context, DistributedEventBus, DynamicEvent, MemoryBroker, StoreError
from eventrelay.testing import wait_until_idle
from tests.bus.helpers import (
    OrderPlaced,
    business_table,
    count_rows,
    create_table,
    eventually,
    make_bus,
    settings,
)
from tests.conftest import POSTGRESQL_PORT
from tests.faultproxy import FaultProxy


async def test_unsubscribe_stops_a_handler_and_resubscribe_brings_it_back(database: str | None) -> None:
    seen: list[tuple[str, int]] = []

    async def audit(event: OrderPlaced) -> None:
        seen.append(("audit", event.order_id))

    async def ship(event: OrderPlaced) -> None:
        seen.append(("ship", event.order_id))

    bus = make_bus("Orders", MemoryBroker(), database)
    audit_subscription = await bus.subscribe(audit)
    await bus.subscribe(ship)
    async with bus:
        await bus.publish(OrderPlaced(order_id=1))
        await wait_until_idle(bus)
        await audit_subscription.unsubscribe()
        await audit_subscription.unsubscribe()  # idempotent
        await bus.publish(OrderPlaced(order_id=2))
        await wait_until_idle(bus)
        await bus.subscribe(audit)
        await bus.publish(OrderPlaced(order_id=3))
        await wait_until_idle(bus)
    assert sorted(seen) == [("audit", 1), ("audit", 3), ("ship", 1), ("ship", 2), ("ship", 3)]


async def test_subscribing_while_running_binds_a_new_event(database: str | None) -> None:
    seen: list[int] = []

    async def late(event: OrderPlaced) -> None:
        seen.append(event.order_id)

    async with make_bus("Orders", MemoryBroker(), database) as bus:
        subscription = await bus.subscribe(late)
        await bus.publish(OrderPlaced(order_id=1))
        await wait_until_idle(bus)
        await subscription.unsubscribe()
        assert bus.event_names == []
        subscription = await bus.subscribe(late)
        await bus.publish(OrderPlaced(order_id=2))
        await wait_until_idle(bus)
    assert seen == [1, 2]


async def test_a_queued_message_whose_handler_left_becomes_a_dead_letter(database: str | None) -> None:
    gate_entered = asyncio.Event()
    gate_open = asyncio.Event()
    seen: list[int] = []

    async def gate(event: OrderPlaced, context: Context) -> None:
        if event.order_id == 0:  # holds the key's lane, so the next message of the key waits behind it
            gate_entered.set()
            async with asyncio.timeout(10):
                await gate_open.wait()

    async def record(event: OrderPlaced) -> None:
        if event.order_id != 0:
            seen.append(event.order_id)

    broker = MemoryBroker()
    bus = make_bus("Orders", broker, database)
    await bus.subscribe(gate)
    async with bus:
        recorder = await bus.subscribe(record)
        await bus.publish(OrderPlaced(order_id=0), key="k", use_outbox=False)
        queued = await bus.publish(OrderPlaced(order_id=1), key="k", use_outbox=False)
        await asyncio.wait_for(gate_entered.wait(), 5)
        await recorder.unsubscribe()
        await bus.unsubscribe(gate)  # no handler of OrderPlaced is left
        gate_open.set()
        await wait_until_idle(bus)
        (letter,) = await bus.dead_letters()
        assert letter.message.id == queued
        assert letter.handler is None
        assert "no handler" in letter.reason
        assert seen == []

        await bus.subscribe(record)  # back again: new events are handled, and the letter replays
        await bus.publish(OrderPlaced(order_id=2))
        await wait_until_idle(bus)
        await bus.replay(letter.id)
        assert await bus.dead_letters() == []
    assert seen == [2, 1]


async def test_stop_lets_running_handlers_finish_and_gives_back_the_rest(database: str | None) -> None:
    table = business_table()
    if database is not None:
        await create_table(database, table)
    first_started = asyncio.Event()
    release = asyncio.Event()
    handled: list[tuple[str, int]] = []

    async def handle(event: OrderPlaced, context: Context) -> None:
        if event.order_id == 0:
            first_started.set()
            async with asyncio.timeout(10):
                await release.wait()
        if database is not None:
            await context.session.execute(insert(table).values(id=event.order_id, note=context.subscriber))
        handled.append((bus_name(context), event.order_id))

    instances: dict[int, str] = {}

    def bus_name(context: Context) -> str:
        return instances[id(context.unit_of_work.owner)]

    broker = MemoryBroker()
    first = make_bus("Orders", broker, database)
    instances[id(first)] = "first"
    await first.subscribe(handle)
    await first.start()
    for order_id in range(5):
        await first.publish(OrderPlaced(order_id=order_id), key="k", use_outbox=False)
    await asyncio.wait_for(first_started.wait(), 5)
    await eventually(lambda: first.consumer.in_flight == 5)  # all fetched; 4 wait behind the first
    stopping = asyncio.create_task(first.stop())
    await eventually(lambda: not first.started)
    release.set()
    async with asyncio.timeout(15):
        await stopping
    assert handled == [("first", 0)]
    if database is not None:
        assert await count_rows(database, table) == 1  # the running handler's row was committed
    assert await broker.pending_count("Orders") == 4  # given back, not lost

    second = make_bus("Orders", broker, database)
    instances[id(second)] = "second"
    await second.subscribe(handle)
    async with second:
        await wait_until_idle(second)
    assert handled == [("first", 0), *(("second", n) for n in range(1, 5))]  # each once, in key order
    if database is not None:
        assert await count_rows(database, table) == 5


@pytest.mark.postgresql
async def test_a_bus_whose_database_fails_at_start_closes_its_broker_connections(postgresql_url: str) -> None:
    """`start()` raised, so the caller never calls `stop()`: the connections the bus opened must not leak."""

    async def ignore(event: DynamicEvent) -> None:
        raise AssertionError("never started, never handled")

    async with FaultProxy(POSTGRESQL_PORT) as proxy:
        broker = postgresql_url.replace(f":{POSTGRESQL_PORT}/", f":{proxy.port}/")
        unreachable = "postgresql+asyncpg://postgres@127.0.0.1:1/none"
        bus = DistributedEventBus("HalfStarted", broker=broker, database=unreachable)
        await bus.subscribe(ignore, event="Lifecycle.Any")
        with pytest.raises(StoreError):
            await bus.start()
        assert proxy.connections >= 1, "the broker was connected before the database failed"
        await eventually(lambda: proxy.idle, timeout=10)  # TimeoutError: a broker connection stayed open


async def test_stop_cancels_a_handler_still_running_after_the_shutdown_timeout_and_its_message_comes_again(
    tmp_path: Path,
) -> None:
    broker = f"sqlite+aiosqlite:///{tmp_path}/broker.db?lease=1"  # an unsettled delivery returns after 1 s
    database = f"sqlite+aiosqlite:///{tmp_path}/service.db"
    started, cancelled = asyncio.Event(), asyncio.Event()
    handled: list[int] = []

    async def hang(event: OrderPlaced) -> None:
        started.set()
        try:
            await asyncio.sleep(3600)  # a call that never answers
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def handle(event: OrderPlaced) -> None:
        handled.append(event.order_id)

    first = DistributedEventBus(
        "Orders", broker=broker, database=database, settings=settings(shutdown_timeout=0.2)
    )
    await first.subscribe(hang, name="Orders.Handle")
    async with first:
        await first.publish(OrderPlaced(order_id=7))
        await asyncio.wait_for(started.wait(), 10)
    assert cancelled.is_set(), "the stop left the handler running under a closed broker and store"

    second = DistributedEventBus("Orders", broker=broker, database=database, settings=settings())
    await second.subscribe(handle, name="Orders.Handle")
    async with second:
        await eventually(lambda: handled == [7])  # not lost: delivered again, once
        await wait_until_idle(second)
    assert handled == [7]
