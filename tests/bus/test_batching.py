"""Handlers subscribed with `batch=True`: the messages of one fetch share one unit of work, and every promise
of the one-by-one path holds: effects once, retries and dead letters as usual, order per key."""

from __future__ import annotations

from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncSession

from eventrelay import Context, MemoryBroker, Message, RetryPolicy, event_name
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
    await bus.subscribe(record, batch=True)
    async with bus:
        await wait_until_idle(bus)
        assert await broker.pending_count(SERVICE) == 0
        assert await bus.dead_letters() == []
        assert await bus.store.inbox_count(SERVICE) == 10
    assert handled == list(range(10))
    if database:
        assert len({id(s) for s in sessions}) == 1


async def test_a_handler_without_batch_gets_a_unit_of_work_per_message(database_url: str) -> None:
    sessions: list[AsyncSession] = []  # held, so that no id is reused

    async def record(event: OrderPlaced, context: Context) -> None:
        sessions.append(context.session)

    async def alongside(event: OrderPlaced) -> None:
        pass

    broker = MemoryBroker()
    await queued(broker, [order_message(n) for n in range(5)])
    bus = make_bus(SERVICE, broker, database_url)
    await bus.subscribe(record, batch=True)
    await bus.subscribe(alongside)  # not batched: so neither is the event
    async with bus:
        await wait_until_idle(bus)
    assert len({id(s) for s in sessions}) == 5


async def test_a_failure_in_a_batch_changes_no_outcome(database_url: str) -> None:
    """One message fails once, another always: the batch is rolled back and each message is handled one by
    one: the others take effect exactly once, the first succeeds on its retry, the second ends dead."""
    table = business_table()
    await create_table(database_url, table)
    attempts: dict[int, list[int]] = {}

    async def record(event: OrderPlaced, context: Context) -> None:
        attempts.setdefault(event.order_id, []).append(context.attempt)
        await context.session.execute(insert(table).values(id=event.order_id, note="placed"))
        if event.order_id == 3 and context.attempt == 1:
            raise RuntimeError("a passing failure")
        if event.order_id == 6:
            raise RuntimeError("always")

    broker = MemoryBroker()
    messages = [order_message(n) for n in range(10)]
    await queued(broker, messages)
    bus = make_bus(SERVICE, broker, database_url, retry=RetryPolicy(max_attempts=3, initial_delay=0.01))
    await bus.subscribe(record, batch=True)
    async with bus:
        await wait_until_idle(bus)
        [letter] = await bus.dead_letters()
        assert await broker.pending_count(SERVICE) == 0
        assert await bus.store.inbox_count(SERVICE) == 10  # 9 handled, 1 marked done with its dead letter
    # Each row once (a second insert of an id would have failed on its primary key).
    assert await count_rows(database_url, table) == 9
    assert letter.message.id == messages[6].id
    assert letter.attempts == 3
    assert letter.reason == "failed 3 times; last error: RuntimeError: always"
    # A handler may run twice in an attempt: in the batch rolled back, then on its own.
    assert attempts[3][-1] == 2
    assert sorted(set(attempts[6])) == [1, 2, 3]


async def test_a_message_fetched_twice_in_one_batch_takes_effect_once(database: str | None) -> None:
    handled: list[int] = []

    async def record(event: OrderPlaced, context: Context) -> None:
        context.unit_of_work.after_commit(lambda: handled.append(event.order_id))

    broker = MemoryBroker()
    twice = order_message(1)
    await queued(broker, [order_message(0), twice, order_message(2), twice])
    bus = make_bus(SERVICE, broker, database)
    await bus.subscribe(record, batch=True)
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
    await bus.subscribe(record, batch=True)
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
    await bus.subscribe(record, batch=True)
    async with bus:
        await wait_until_idle(bus)
        [letter] = await bus.dead_letters()
    assert letter.message.id == bad.id
    assert letter.reason.startswith("cannot decode")
    assert sorted(handled) == [0, 2, 3]
    assert handled.index(0) < handled.index(2)
