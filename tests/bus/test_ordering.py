"""Order and concurrency: one key in publish order, different keys in parallel, a failing key holds up no
other, and at most `max_in_flight` handlers at once."""

from __future__ import annotations

import asyncio
import random

from eventrelay import Context, MemoryBroker, RetryPolicy
from eventrelay.testing import wait_until_idle
from tests.bus.helpers import OrderPlaced, eventually, make_bus


async def test_events_of_one_key_are_handled_in_publish_order(database: str | None) -> None:
    handled: dict[str, list[int]] = {"a": [], "b": []}
    failed_once: set[int] = set()

    async def record(event: OrderPlaced, context: Context) -> None:
        await asyncio.sleep(random.random() / 500)  # unordered handlers would overtake each other here
        if event.order_id % 7 == 3 and event.order_id not in failed_once:
            failed_once.add(event.order_id)
            raise RuntimeError("a retry must not let the next event of the key overtake")
        assert context.key is not None
        handled[context.key].append(event.order_id)

    bus = make_bus("Orders", MemoryBroker(), database, max_in_flight=20)
    await bus.subscribe(record)
    async with bus:
        for order_id in range(40):
            key = "a" if order_id % 3 else "b"
            if order_id % 2:
                await bus.publish(OrderPlaced(order_id=order_id), key=key)
            else:
                async with bus.unit_of_work():
                    await bus.publish(OrderPlaced(order_id=order_id), key=key)
        await wait_until_idle(bus, timeout=20)
    assert handled["a"] == [n for n in range(40) if n % 3]
    assert handled["b"] == [n for n in range(40) if not n % 3]
    assert failed_once


async def test_events_of_different_keys_are_handled_in_parallel(concurrent_database: str | None) -> None:
    second_key_ran = asyncio.Event()
    outcome: list[str] = []

    async def handle(event: OrderPlaced, context: Context) -> None:
        if context.key == "first":
            # Deadlocks unless the handler of the other key runs while this one waits.
            async with asyncio.timeout(5):
                await second_key_ran.wait()
            outcome.append("first")
        else:
            second_key_ran.set()
            outcome.append("second")

    bus = make_bus("Orders", MemoryBroker(), concurrent_database, retry=RetryPolicy(max_attempts=1))
    await bus.subscribe(handle, batch=False)  # batched handlers run one after another
    async with bus:
        await bus.publish(OrderPlaced(order_id=1), key="first")
        await bus.publish(OrderPlaced(order_id=2), key="second")
        await wait_until_idle(bus, timeout=10)
        assert await bus.dead_letters() == []
    assert outcome == ["second", "first"]


async def test_a_failing_key_does_not_hold_up_another_key(database: str | None) -> None:
    bad_may_succeed = False
    bad_failures = 0
    successes: list[str] = []

    async def handle(event: OrderPlaced, context: Context) -> None:
        nonlocal bad_failures
        if context.key == "bad" and not bad_may_succeed:
            bad_failures += 1
            raise RuntimeError("keeps failing")
        successes.append(f"{context.key}:{event.order_id}")

    policy = RetryPolicy(max_attempts=10_000, initial_delay=0.01, max_delay=0.02)
    bus = make_bus("Orders", MemoryBroker(), database)
    await bus.subscribe(handle, retry=policy)
    async with bus:
        await bus.publish(OrderPlaced(order_id=1), key="bad")
        await bus.publish(OrderPlaced(order_id=2), key="bad")
        for order_id in range(3, 8):
            await bus.publish(OrderPlaced(order_id=order_id), key="good")
        # All of "good" is handled while "bad" keeps failing (on SQLite "bad" may get its first try only
        # after "good" is through: handlers there take the write lock in turn).
        await eventually(lambda: len(successes) == 5 and bad_failures >= 1, timeout=10)
        bad_may_succeed = True
        await wait_until_idle(bus, timeout=10)
    assert successes == [*(f"good:{n}" for n in range(3, 8)), "bad:1", "bad:2"]


async def test_a_poison_message_of_a_key_is_dead_lettered_and_the_key_goes_on(database: str | None) -> None:
    handled: list[int] = []

    async def handle(event: OrderPlaced) -> None:
        if event.order_id == 1:
            raise RuntimeError("poison")
        handled.append(event.order_id)

    bus = make_bus("Orders", MemoryBroker(), database)
    await bus.subscribe(handle, retry=RetryPolicy(max_attempts=3, initial_delay=0.01, max_delay=0.02))
    async with bus:
        for order_id in (1, 2, 3):
            await bus.publish(OrderPlaced(order_id=order_id), key="k")
        await wait_until_idle(bus, timeout=10)
        letters = await bus.dead_letters()
    assert handled == [2, 3]
    assert [(letter.attempts, letter.message.key) for letter in letters] == [(3, "k")]
    assert "poison" in letters[0].reason


async def test_at_most_max_in_flight_handlers_run_at_once(concurrent_database: str | None) -> None:
    release = asyncio.Event()
    running = 0
    peak = 0
    handled: list[int] = []

    async def handle(event: OrderPlaced) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        try:
            async with asyncio.timeout(10):
                await release.wait()
        finally:
            running -= 1
        handled.append(event.order_id)

    broker = MemoryBroker()
    bus = make_bus("Orders", broker, concurrent_database, max_in_flight=3)
    await bus.subscribe(handle, batch=False)
    async with bus:
        for order_id in range(10):
            await bus.publish(OrderPlaced(order_id=order_id))
        await eventually(lambda: running == 3)
        await asyncio.sleep(0.2)  # room for a fourth handler to start, if the limit leaked
        assert peak == 3
        assert bus.consumer.in_flight == 3
        assert await broker.pending_count("Orders") == 10  # the rest wait at the broker, not in memory
        release.set()
        await wait_until_idle(bus, timeout=10)
    assert peak == 3
    assert sorted(handled) == list(range(10))
