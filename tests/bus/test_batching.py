"""The default subscription: the messages of one fetch share one unit of work, each handler in a savepoint of
its own, and every promise of the one-by-one path (`batch=False`) holds: effects once, retries and dead
letters as usual, order per key, and no handler runs again because another one failed."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

from sqlalchemy import String, insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from eventrelay import Context, MemoryBroker, Message, Reject, Retry, RetryPolicy, event_name
from eventrelay.codec import encode_body
from eventrelay.envelope import new_message_id
from eventrelay.events import DynamicEvent
from eventrelay.testing import wait_until_idle
from tests.bus.helpers import OrderPlaced, business_table, count_rows, create_table, make_bus

SERVICE = "Orders"


def order_message(order_id: int, key: str | None = None) -> Message:
    event = OrderPlaced(order_id=order_id)
    return Message(new_message_id(), event_name(event), encode_body(event), {"x-correlation-id": "c"}, key)


async def queued(broker: MemoryBroker, messages: list[Message]) -> None:
    """Queue `messages` for the service before its bus starts, so that its first fetch takes them all."""
    await broker.bind(SERVICE, event_name(OrderPlaced))
    await broker.publish(messages)


async def test_a_fetched_batch_is_handled_in_one_unit_of_work(database: str | None) -> None:
    sessions: list[AsyncSession | None] = []
    handled: list[int] = []

    async def record(event: OrderPlaced, context: Context) -> None:
        sessions.append(context.session if database else None)
        handled.append(event.order_id)

    broker = MemoryBroker()
    await queued(broker, [order_message(n) for n in range(10)])
    bus = make_bus(SERVICE, broker, database)
    await bus.subscribe(record)
    async with bus:
        await wait_until_idle(bus)
        assert await broker.pending_count(SERVICE) == 0
        assert await bus.dead_letters() == []
        assert await bus.store.inbox_count(SERVICE) == 10
    assert handled == list(range(10))
    if database:
        assert len({id(s) for s in sessions}) == 1


async def test_a_handler_with_batch_false_gets_a_unit_of_work_per_message(database_url: str) -> None:
    sessions: list[AsyncSession] = []  # held, so that no id is reused

    async def record(event: OrderPlaced, context: Context) -> None:
        sessions.append(context.session)

    async def alongside(event: OrderPlaced) -> None:
        pass

    broker = MemoryBroker()
    await queued(broker, [order_message(n) for n in range(5)])
    bus = make_bus(SERVICE, broker, database_url)
    await bus.subscribe(record)
    await bus.subscribe(alongside, batch=False)  # not batched: so neither is the event
    async with bus:
        await wait_until_idle(bus)
    assert len({id(s) for s in sessions}) == 5


async def test_a_failure_in_a_batch_rolls_back_only_its_own_handler(database_url: str) -> None:
    """One message fails once, another always, a third is rejected: each rolls back only its own writes and
    events and goes the usual way (retried, dead); the others commit once, and no handler runs twice in an
    attempt."""
    table = business_table()
    await create_table(database_url, table)
    attempts: dict[int, list[int]] = {}
    committed: list[int] = []

    async def record(event: OrderPlaced, context: Context) -> None:
        attempts.setdefault(event.order_id, []).append(context.attempt)
        await context.session.execute(insert(table).values(id=event.order_id, note="placed"))
        context.unit_of_work.after_commit(lambda: committed.append(event.order_id))
        if event.order_id == 3 and context.attempt == 1:
            raise RuntimeError("a passing failure")
        if event.order_id == 6:
            raise RuntimeError("always")
        if event.order_id == 8:
            raise Reject("not ours")

    broker = MemoryBroker()
    messages = [order_message(n) for n in range(10)]
    await queued(broker, messages)
    bus = make_bus(SERVICE, broker, database_url, retry=RetryPolicy(max_attempts=3, initial_delay=0.01))
    await bus.subscribe(record)
    async with bus:
        await wait_until_idle(bus)
        letters = {letter.message.id: letter for letter in await bus.dead_letters()}
        assert await broker.pending_count(SERVICE) == 0
        assert await bus.store.inbox_count(SERVICE) == 10  # 8 handled, 2 marked done with their letters
    # Each row once (a second insert of an id would have failed on its primary key), none of the dead.
    assert await count_rows(database_url, table) == 8
    assert sorted(committed) == [0, 1, 2, 3, 4, 5, 7, 9]
    assert set(letters) == {messages[6].id, messages[8].id}
    assert letters[messages[6].id].attempts == 3
    assert letters[messages[6].id].reason == "failed 3 times; last error: RuntimeError: always"
    assert letters[messages[8].id].attempts == 1
    assert letters[messages[8].id].reason == "rejected by handler: not ours"
    assert attempts == {n: [1, 2] if n == 3 else [1, 2, 3] if n == 6 else [1] for n in range(10)}


async def test_a_handler_failing_in_a_batch_does_not_run_the_other_handlers_again(
    database: str | None,
) -> None:
    runs: list[str] = []

    async def steady(event: OrderPlaced) -> None:
        runs.append(f"steady {event.order_id}")

    async def flaky(event: OrderPlaced, context: Context) -> None:
        runs.append(f"flaky {event.order_id}")
        if event.order_id == 1 and context.attempt == 1:
            raise Retry(after=0.01)

    broker = MemoryBroker()
    await queued(broker, [order_message(n) for n in range(3)])
    bus = make_bus(SERVICE, broker, database)
    await bus.subscribe(steady)
    await bus.subscribe(flaky)
    async with bus:
        await wait_until_idle(bus)
        assert await broker.pending_count(SERVICE) == 0
        assert await bus.dead_letters() == []
    assert sorted(runs) == sorted([f"steady {n}" for n in range(3)] + [f"flaky {n}" for n in (0, 1, 1, 2)])


async def test_a_message_fetched_twice_in_one_batch_takes_effect_once(database: str | None) -> None:
    handled: list[int] = []

    async def record(event: OrderPlaced, context: Context) -> None:
        context.unit_of_work.after_commit(lambda: handled.append(event.order_id))

    broker = MemoryBroker()
    twice = order_message(1)
    await queued(broker, [order_message(0), twice, order_message(2), twice])
    bus = make_bus(SERVICE, broker, database)
    await bus.subscribe(record)
    async with bus:
        await wait_until_idle(bus)
        assert await broker.pending_count(SERVICE) == 0
        assert await bus.dead_letters() == []
    assert handled == [0, 1, 2]


async def test_a_batch_keeps_key_order_through_a_retry(database: str | None) -> None:
    handled: list[tuple[str, int]] = []
    failed = False

    async def record(event: OrderPlaced, context: Context) -> None:
        nonlocal failed
        if event.order_id == 1 and not failed:
            failed = True
            raise RuntimeError("once")
        context.unit_of_work.after_commit(lambda: handled.append((context.key or "", event.order_id)))

    broker = MemoryBroker()
    await queued(broker, [order_message(n, key="ab"[n % 2]) for n in range(8)])
    bus = make_bus(SERVICE, broker, database)
    await bus.subscribe(record)
    async with bus:
        await wait_until_idle(bus)
        await broker.publish([order_message(n, key="ab"[n % 2]) for n in range(8, 12)])
        await wait_until_idle(bus)
    for key in "ab":
        assert [n for k, n in handled if k == key] == [n for n in range(12) if "ab"[n % 2] == key]


async def test_an_undecodable_message_in_a_batch_is_dead_and_the_others_are_handled(
    database: str | None,
) -> None:
    handled: list[int] = []

    async def record(event: OrderPlaced) -> None:
        handled.append(event.order_id)

    broker = MemoryBroker()
    name = event_name(OrderPlaced)
    bad = Message(new_message_id(), name, encode_body(DynamicEvent(name, {"order_id": "x"})), {}, "k")
    await queued(broker, [order_message(0, "k"), bad, order_message(2, "k"), order_message(3)])
    bus = make_bus(SERVICE, broker, database)
    await bus.subscribe(record)
    async with bus:
        await wait_until_idle(bus)
        [letter] = await bus.dead_letters()
    assert letter.message.id == bad.id
    assert letter.reason.startswith("cannot decode")
    assert sorted(handled) == [0, 2, 3]
    assert handled.index(0) < handled.index(2)


async def test_events_published_by_a_failed_handler_in_a_batch_never_leave(database: str | None) -> None:
    async def ship(event: OrderPlaced, context: Context) -> None:
        await bus.publish(SHIPPED, {"order_id": event.order_id})
        if event.order_id == 1 and context.attempt == 1:
            raise RuntimeError("once")

    broker = MemoryBroker()
    await broker.bind("Shipping", SHIPPED)
    await queued(broker, [order_message(n) for n in range(3)])
    bus = make_bus(SERVICE, broker, database, retry=RetryPolicy(initial_delay=0.01))
    await bus.subscribe(ship)
    async with bus:
        await wait_until_idle(bus)
        assert await bus.dead_letters() == []
    shipped = await broker.fetch("Shipping", 10, 0.1)
    assert sorted(json.loads(d.message.body)["order_id"] for d in shipped) == [0, 1, 2]


SHIPPED = "BusTests.Shipped"


async def test_a_key_keeps_its_order_across_batched_and_one_by_one_events(database: str | None) -> None:
    """Key k: a batched event, one whose handler has batch=False, a batched one: handled in that order."""
    handled: list[str] = []

    async def batched(event: OrderPlaced) -> None:
        handled.append(f"placed {event.order_id}")

    async def alone(event: DynamicEvent) -> None:
        handled.append("paid")

    broker = MemoryBroker()
    await broker.bind(SERVICE, "BusTests.OrderPaid")
    await queued(broker, [order_message(1, key="k")])
    paid = Message(new_message_id(), "BusTests.OrderPaid", b"{}", {}, "k")
    await broker.publish([paid, order_message(2, key="k")])
    bus = make_bus(SERVICE, broker, database)
    await bus.subscribe(batched)
    await bus.subscribe(alone, event="BusTests.OrderPaid", batch=False)
    async with bus:
        await wait_until_idle(bus)
    assert handled == ["placed 1", "paid", "placed 2"]


class SlowReleaseBroker(MemoryBroker):
    async def release(self, delivery):  # type: ignore[no-untyped-def]
        await asyncio.sleep(0.01)  # a real broker's release is a round trip
        await super().release(delivery)


async def test_stopping_during_a_batch_gives_its_keyed_deliveries_not_started_back() -> None:
    started = asyncio.Event()

    async def slow(event: OrderPlaced) -> None:
        if event.order_id == 0:
            started.set()
            await asyncio.sleep(0.2)

    broker = SlowReleaseBroker()
    await queued(broker, [order_message(n, key="k") for n in range(4)])
    bus = make_bus(SERVICE, broker, None)
    await bus.subscribe(slow)
    await bus.start()
    await started.wait()
    consumer = bus.consumer
    await bus.stop()
    assert consumer.in_flight == 0
    assert len(broker._queues[SERVICE]) == 3
    assert not broker._leased[SERVICE]


async def test_a_batch_cancelled_at_the_shutdown_timeout_finishes_every_delivery() -> None:
    started = asyncio.Event()

    async def stuck(event: OrderPlaced) -> None:
        started.set()
        await asyncio.sleep(5)

    broker = MemoryBroker()
    await queued(broker, [order_message(n, key="k" if n % 2 else None) for n in range(4)])
    bus = make_bus(SERVICE, broker, None, shutdown_timeout=0.1)
    await bus.subscribe(stuck)
    await bus.start()
    await started.wait()
    consumer = bus.consumer
    await bus.stop()
    assert consumer.in_flight == 0


async def test_a_before_commit_callback_failing_in_a_batch_runs_no_sibling_again(
    database: str | None,
) -> None:
    runs: list[tuple[int, int]] = []

    async def record(event: OrderPlaced, context: Context) -> None:
        runs.append((event.order_id, context.attempt))
        if event.order_id == 1 and context.attempt == 1:

            async def check() -> None:
                raise RuntimeError("deferred check failed")

            context.unit_of_work.before_commit(check)

    broker = MemoryBroker()
    await queued(broker, [order_message(n) for n in range(3)])
    bus = make_bus(SERVICE, broker, database)
    await bus.subscribe(record)
    async with bus:
        await wait_until_idle(bus)
    assert sorted(runs) == [(0, 1), (1, 1), (1, 2), (2, 1)]


def orm_model() -> type[Any]:
    """An ORM class on a table of the test's own (a service's entities)."""

    class Base(DeclarativeBase):
        pass

    class Order(Base):
        __tablename__ = f"orm_orders_{uuid.uuid4().hex[:10]}"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        note: Mapped[str] = mapped_column(String(100))

    return Order


async def test_a_handler_adding_orm_objects_in_a_batch_rolls_back_only_its_own(database_url: str) -> None:
    """A failing handler's added objects are forgotten, not flushed with a sibling's; the others commit."""
    order = orm_model()
    await create_table(database_url, order.__table__)

    async def record(event: OrderPlaced, context: Context) -> None:
        context.session.add(order(id=event.order_id, note="placed"))
        if event.order_id in (2, 5):
            raise Reject("not ours")

    broker = MemoryBroker()
    await queued(broker, [order_message(n) for n in range(8)])
    bus = make_bus(SERVICE, broker, database_url)
    await bus.subscribe(record)
    async with bus:
        await wait_until_idle(bus)
        assert len(await bus.dead_letters()) == 2
    ids = (
        await count_rows(database_url, order.__table__),
        await count_rows(database_url, order.__table__, order.__table__.c.id.in_([2, 5])),
    )
    assert ids == (6, 0)


async def test_a_core_handler_that_turns_to_the_orm_and_fails_its_flush_loses_and_repeats_nothing(
    database_url: str,
) -> None:
    """Its first messages write with plain statements (the store then takes cheaper savepoints for it); a
    later one adds an object whose flush fails. That handler is retried as usual and every other message
    takes effect once."""
    order, table = orm_model(), business_table()
    await create_table(database_url, order.__table__)
    await create_table(database_url, table)
    committed: list[int] = []

    async def record(event: OrderPlaced, context: Context) -> None:
        await context.session.execute(insert(table).values(id=event.order_id, note="placed"))
        context.unit_of_work.after_commit(lambda: committed.append(event.order_id))
        if event.order_id in (5, 6):
            # Attempt 1 adds id 0, which is there already: its flush fails.
            context.session.add(order(id=0 if context.attempt == 1 else event.order_id, note="late"))

    broker = MemoryBroker()
    await broker.bind(SERVICE, event_name(OrderPlaced))
    bus = make_bus(SERVICE, broker, database_url, retry=RetryPolicy(max_attempts=3, initial_delay=0.01))
    await bus.subscribe(record)
    async with bus:
        await broker.publish([order_message(0)])  # the first batch: id 0 in the ORM table too, below
        await wait_until_idle(bus)
        async with bus.unit_of_work() as uow:
            uow.session.add(order(id=0, note="first"))
        await broker.publish([order_message(n) for n in range(1, 10)])
        await wait_until_idle(bus)
        assert await bus.dead_letters() == []
        assert await bus.store.inbox_count(SERVICE) == 10
    assert await count_rows(database_url, table) == 10
    assert sorted(committed) == list(range(10))
    assert await count_rows(database_url, order.__table__) == 3  # 0, 5 and 6 (each on its second attempt)
