"""Sagas on every database: a process across several events whose state, published events and inbox record
commit together, taking turns on one saga's row, with timeouts to itself and completion."""

from __future__ import annotations

import asyncio
from typing import TypeVar

import pytest
from pydantic import BaseModel
from sqlalchemy import MetaData, inspect

from eventrelay import ConfigurationError, DistributedEventBus, Event, MemoryBroker, Reject, Saga, step
from eventrelay.envelope import Message
from eventrelay.saga import define_saga_table
from eventrelay.testing import wait_until_idle
from tests.bus.helpers import make_bus


class Opened(Event, name="SagaTests.Opened"):
    order_id: int


class Added(Event, name="SagaTests.Added"):
    order_id: int
    amount: int = 1


class Expired(Event, name="SagaTests.Expired"):
    order_id: int


class Closed(Event, name="SagaTests.Closed"):
    order_id: int
    total: int
    expired: bool


class Tally(BaseModel):
    total: int = 0
    steps: list[str] = []


class Counting(Saga[Tally], table="saga_tests_counting"):
    @step(correlate="order_id", starts=True)
    async def opened(self, event: Opened) -> None:
        self.state = Tally(steps=["opened"])

    @step(correlate=lambda e: e.order_id)
    async def added(self, event: Added) -> None:
        if event.amount < 0:
            raise Reject("negative amount")
        self.state.total += event.amount

    @step(correlate="order_id")
    async def expired(self, event: Expired) -> None:
        self.state.steps.append("expired")
        await self.publish(Closed(order_id=int(self.key), total=self.state.total, expired=True))
        self.complete()


class Timed(Saga[Tally], table="saga_tests_timed", keep_completed=False):
    """Schedules its timeout at the start; `Added` with amount 0 reschedules it sooner, 99 completes it."""

    @step(correlate="order_id", starts=True)
    async def opened(self, event: Opened) -> None:
        self.state = Tally(steps=["opened"])
        await self.schedule(Expired(order_id=event.order_id), delay=3)

    @step(correlate="order_id")
    async def added(self, event: Added) -> None:
        if event.amount == 0:
            await self.schedule(Expired(order_id=event.order_id), delay=0.3)
        elif event.amount == 99:
            self.complete()
        self.state.steps.append(f"added {event.amount}")

    @step(correlate="order_id")
    async def expired(self, event: Expired) -> None:
        self.state.steps.append("expired")
        await self.publish(Closed(order_id=event.order_id, total=len(self.state.steps), expired=True))


async def _closed(bus: DistributedEventBus) -> list[Closed]:
    seen: list[Closed] = []

    async def record(event: Closed) -> None:
        seen.append(event)

    await bus.subscribe(record)
    return seen


async def _open_states(bus: DistributedEventBus, completed: bool = False) -> dict[str, dict[str, object]]:
    return {r.key: dict(r.state) for r in await bus.saga_records(completed=completed)}


async def test_a_saga_runs_its_steps_keeps_its_state_and_completes(database_url: str) -> None:
    broker = MemoryBroker()
    async with make_bus("Orders", broker, database_url) as bus:
        await bus.subscribe(Counting)
        closed = await _closed(bus)
        await bus.publish(Opened(order_id=1))
        for amount in (2, 3):
            await bus.publish(Added(order_id=1, amount=amount))
        await wait_until_idle(bus)
        records = await bus.saga_records()
        assert [(r.saga, r.key, r.state, r.completed) for r in records] == [
            ("Counting", "1", {"total": 5, "steps": ["opened"]}, False)
        ]
        await bus.publish(Expired(order_id=1))
        await wait_until_idle(bus)
        assert closed == [Closed(order_id=1, total=5, expired=True)]
        assert await bus.saga_records() == []
        assert await bus.saga_record(Counting, 2) is None
        assert await bus.saga_record(Counting, 1) == (await bus.saga_records(completed=True))[0]
        (done,) = await bus.saga_records(completed=True)
        assert done.completed
        assert done.state == {"total": 5, "steps": ["opened", "expired"]}

        # A late event for the completed saga is ignored: no dead letter, no change.
        await bus.publish(Added(order_id=1, amount=100))
        await wait_until_idle(bus)
        assert (await bus.saga_records(completed=True))[0].state["total"] == 5
        assert await bus.dead_letters() == []


async def test_an_event_for_a_saga_that_does_not_exist_is_a_dead_letter_with_the_reason(
    database_url: str,
) -> None:
    async with make_bus("Orders", MemoryBroker(), database_url) as bus:
        await bus.subscribe(Counting)
        await bus.publish(Added(order_id=7))
        await wait_until_idle(bus)
        (letter,) = await bus.dead_letters()
        assert letter.reason == "rejected by handler: no Counting saga has the key '7' and Added starts none"
        assert await bus.saga_records() == []


async def test_if_missing_ignore_ignores_an_event_without_its_saga(sqlite_url: str) -> None:
    class Lenient(Saga[Tally], table="saga_tests_lenient", if_missing="ignore"):
        @step(correlate="order_id", starts=True)
        async def opened(self, event: Opened) -> None:
            self.state = Tally()

        @step(correlate="order_id")
        async def added(self, event: Added) -> None:
            self.state.total += event.amount

    async with make_bus("Orders", MemoryBroker(), sqlite_url) as bus:
        await bus.subscribe(Lenient)
        await bus.publish(Added(order_id=7))
        await wait_until_idle(bus)
        assert await bus.dead_letters() == []
        assert await bus.saga_records(completed=True) == []


async def test_a_step_that_rejects_leaves_the_state_as_it_was(sqlite_url: str) -> None:
    async with make_bus("Orders", MemoryBroker(), sqlite_url) as bus:
        await bus.subscribe(Counting)
        await bus.publish(Opened(order_id=1))
        await bus.publish(Added(order_id=1, amount=4))
        await bus.publish(Added(order_id=1, amount=-1))
        await wait_until_idle(bus)
        assert await _open_states(bus) == {"1": {"total": 4, "steps": ["opened"]}}
        (letter,) = await bus.dead_letters()
        assert letter.reason == "rejected by handler: negative amount"


async def test_a_redelivered_event_never_advances_a_saga_twice(database_url: str) -> None:
    broker = MemoryBroker()
    async with make_bus("Orders", broker, database_url) as bus:
        await bus.subscribe(Counting)
        await bus.publish(Opened(order_id=1))
        await wait_until_idle(bus)
        duplicate = Message(
            "0123456789abcdef0123456789abcdef", "SagaTests.Added", b'{"order_id": 1, "amount": 5}'
        )
        for _ in range(3):  # what a broker redelivering after a lost ack hands over
            await broker.publish([duplicate])
        await wait_until_idle(bus)
        assert await _open_states(bus) == {"1": {"total": 5, "steps": ["opened"]}}


@pytest.mark.parametrize("batch", [True, False], ids=["batch", "one-by-one"])
async def test_fifty_concurrent_events_on_one_saga_lose_no_update(database_url: str, batch: bool) -> None:
    broker = MemoryBroker()
    # Two instances of the service, each running many handlers at once, all on the one saga's row.
    first, second = (make_bus("Orders", broker, database_url, max_in_flight=50) for _ in range(2))
    async with first, second:
        for bus in (first, second):
            await bus.subscribe(Counting, batch=batch)
        await first.publish(Opened(order_id=1))
        await wait_until_idle(first, second)
        await asyncio.gather(*(first.publish(Added(order_id=1, amount=n)) for n in range(1, 51)))

        async def total() -> object:
            return (await _open_states(first)).get("1", {}).get("total")

        await wait_until_idle(first, second, timeout=60)
        assert await total() == sum(range(1, 51))
        assert await first.dead_letters() == []


async def test_a_timeout_fires_once_and_rescheduling_replaces_it(database_url: str) -> None:
    async with make_bus("Orders", MemoryBroker(), database_url) as bus:
        await bus.subscribe(Timed)
        closed = await _closed(bus)
        await bus.publish(Opened(order_id=1))
        await bus.publish(Added(order_id=1, amount=0))  # reschedules, sooner: the first one is ignored
        await wait_until_idle(bus, timeout=10)  # until both timeouts came
        assert len(closed) == 1
        (record,) = await bus.saga_records()
        assert record.state["steps"] == ["opened", "added 0", "expired"]
        assert record.timeout_at is None
        assert await bus.dead_letters() == []


async def test_a_timeout_after_the_saga_completed_does_nothing(sqlite_url: str) -> None:
    async with make_bus("Orders", MemoryBroker(), sqlite_url) as bus:
        await bus.subscribe(Timed)
        closed = await _closed(bus)
        await bus.publish(Opened(order_id=1))
        await bus.publish(Added(order_id=1, amount=99))  # completes it; keep_completed=False deletes it
        await wait_until_idle(bus, timeout=10)  # until its timeout came
        assert closed == []
        assert await bus.saga_records(completed=True) == []
        assert await bus.dead_letters() == []


async def test_the_saga_table_is_created_at_start_and_can_join_your_metadata(sqlite_url: str) -> None:
    bus = make_bus("Orders", MemoryBroker(), sqlite_url)
    await bus.subscribe(Counting)
    async with bus:
        engine = bus.store.engine  # type: ignore[attr-defined]
        async with engine.connect() as conn:
            tables = await conn.run_sync(lambda c: inspect(c).get_table_names())
        assert "saga_tests_counting" in tables
    mine = MetaData()
    table = define_saga_table(Counting, mine)
    assert table.name == "saga_tests_counting"
    assert mine.tables["saga_tests_counting"] is table


async def test_a_saga_needs_a_database() -> None:
    bus = DistributedEventBus("Orders")
    with pytest.raises(ConfigurationError, match="keeps its state in the service's database: pass database="):
        await bus.subscribe(Counting)


def test_a_saga_declared_wrong_says_how_to_fix_it() -> None:
    with pytest.raises(ConfigurationError, match=r"must name its state: class NoState\(Saga\[MyState\]\)"):

        class NoState(Saga):  # type: ignore[type-arg]
            pass

    with pytest.raises(ConfigurationError, match="has no steps: mark its methods with @step"):

        class NoSteps(Saga[Tally]):
            pass

    with pytest.raises(ConfigurationError, match="takes \\(self, event\\) with the event's class annotated"):

        class Unannotated(Saga[Tally]):
            @step(correlate="order_id")
            async def added(self, event) -> None:  # type: ignore[no-untyped-def]
                pass

    with pytest.raises(ConfigurationError, match="has two steps for Added"):

        class Twice(Saga[Tally]):
            @step(correlate="order_id")
            async def one(self, event: Added) -> None:
                pass

            @step(correlate="order_id")
            async def two(self, event: Added) -> None:
                pass

    with pytest.raises(ConfigurationError, match="is not a plain SQL name"):

        class BadTable(Saga[Tally], table="orders; drop table x"):
            @step(correlate="order_id")
            async def one(self, event: Added) -> None:
                pass


S = TypeVar("S", bound=BaseModel)


class Audited(Saga[S]):
    """A generic base of sagas, with a dependency given by the factory and a step of its own."""

    def __init__(self, audit: list[str]) -> None:  # does not call Saga.__init__: it need not
        self.audit = audit

    @step(correlate="order_id")
    async def expired(self, event: Expired) -> None:
        self.audit.append(f"{type(self).__name__} {self.key} expired")
        self.complete()


class AuditedCounting(Audited[Tally], table="saga_tests_audited"):
    @step(correlate="order_id", starts=True)
    async def opened(self, event: Opened) -> None:
        if self.is_new:
            self.state = Tally()
        self.state.total += 1
        self.audit.append(f"opened {self.key}, new: {self.is_new}")


async def test_a_generic_base_of_sagas_and_a_factory_with_dependencies(sqlite_url: str) -> None:
    audit: list[str] = []
    async with make_bus("Orders", MemoryBroker(), sqlite_url) as bus:
        with pytest.raises(ConfigurationError, match="leaves its state open"):
            await bus.subscribe(Audited)
        await bus.subscribe(AuditedCounting, factory=lambda: AuditedCounting(audit))
        for event in (Opened(order_id=3), Opened(order_id=3), Expired(order_id=3)):
            await bus.publish(event)
        await wait_until_idle(bus)
        assert audit == ["opened 3, new: True", "opened 3, new: False", "AuditedCounting 3 expired"]
        (record,) = await bus.saga_records(completed=True)
        assert record.state == {"total": 2, "steps": []}
