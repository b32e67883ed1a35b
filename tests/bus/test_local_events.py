"""Local events (`bus.local`): handlers run in the publisher's unit of work just before it commits; their
writes commit with it, and one that raises rolls it back, the distributed events published in it included."""

from __future__ import annotations

import pytest
from sqlalchemy import func, insert, select

from eventrelay import Context, DistributedEventHandler, Event, MemoryBroker, Reject
from eventrelay.testing import RecordingBroker, wait_until_idle
from tests.bus.helpers import OrderPlaced, business_table, make_bus


class StockLow(Event, name="LocalTests.StockLow"):
    product_id: int
    left: int


class ReorderPlaced(Event, name="LocalTests.ReorderPlaced"):
    product_id: int


calls: list[str] = []


class Reorder(DistributedEventHandler[StockLow]):
    async def handle_event(self, event: StockLow) -> None:
        calls.append(f"reorder {event.product_id} in {self.context.unit_of_work is not None}")
        if event.left < 0:
            raise ValueError("stock below zero")
        await self.context.unit_of_work.owner.local.publish(ReorderPlaced(product_id=event.product_id))  # type: ignore[attr-defined]


async def audit(event: StockLow, context: Context) -> None:
    calls.append(f"audit {event.product_id}")


async def reordered(event: ReorderPlaced) -> None:
    calls.append(f"reordered {event.product_id}")


@pytest.fixture(autouse=True)
def _forget() -> None:
    calls.clear()


async def test_handlers_run_before_the_commit_and_write_in_the_same_transaction(sqlite_url: str) -> None:
    broker = RecordingBroker()
    table = business_table()

    async def record(event: StockLow, context: Context) -> None:
        # The publisher's row is there, not yet committed: the same transaction.
        mine = await context.session.scalar(select(func.count()).select_from(table))
        await context.session.execute(insert(table).values(id=100 + event.product_id, note=f"saw {mine}"))

    async with make_bus("Stock", broker, sqlite_url) as bus:
        await bus.store.create_tables_of(table.metadata)
        for handler in (Reorder, audit, record):
            bus.local.subscribe(handler)
        bus.local.subscribe(reordered)
        async with bus.unit_of_work() as uow:
            await uow.session.execute(insert(table).values(id=1, note="stock taken"))
            await bus.local.publish(StockLow(product_id=1, left=2))
            assert calls == []  # not yet: just before the commit
        assert calls == ["reorder 1 in True", "audit 1", "reordered 1"]  # in order, nested ones too
        async with bus.unit_of_work() as uow:
            notes = (await uow.session.execute(select(table.c.note).order_by(table.c.id))).scalars().all()
        assert notes == ["stock taken", "saw 1"]
        assert broker.published == []  # local events never reach the broker


async def test_a_handler_that_raises_rolls_the_unit_of_work_back(sqlite_url: str) -> None:
    broker = RecordingBroker()
    table = business_table()
    async with make_bus("Stock", broker, sqlite_url) as bus:
        await bus.store.create_tables_of(table.metadata)
        bus.local.subscribe(Reorder)

        async def take_stock() -> None:
            async with bus.unit_of_work() as uow:
                await uow.session.execute(insert(table).values(id=1, note="stock taken"))
                await bus.publish(OrderPlaced(order_id=1))
                await bus.local.publish(StockLow(product_id=1, left=-1))

        with pytest.raises(ValueError, match="stock below zero"):
            await take_stock()
        async with bus.unit_of_work() as uow:
            assert await uow.session.scalar(select(func.count()).select_from(table)) == 0
        await wait_until_idle(bus)
        assert broker.events(OrderPlaced) == []  # the distributed event went with the rollback


async def test_outside_a_unit_of_work_the_handlers_run_now_in_one_of_their_own() -> None:
    async with make_bus("Stock", MemoryBroker(), None) as bus:
        bus.local.subscribe(audit)
        await bus.local.publish(StockLow(product_id=3, left=1))
        assert calls == ["audit 3"]
        bus.local.subscribe(Reorder)
        with pytest.raises(ValueError, match="stock below zero"):
            await bus.local.publish(StockLow(product_id=4, left=-1))
        bus.local.unsubscribe(Reorder)
        bus.local.unsubscribe(audit)
        await bus.local.publish(StockLow(product_id=5, left=1))  # no handler: nothing happens
        assert calls == ["audit 3", "audit 4", "reorder 4 in True"]


async def test_a_local_event_from_a_distributed_handler_shares_its_savepoint(sqlite_url: str) -> None:
    broker = MemoryBroker()
    async with make_bus("Stock", broker, sqlite_url) as bus:
        bus.local.subscribe(Reorder)

        async def placed(event: OrderPlaced) -> None:
            await bus.local.publish(StockLow(product_id=event.order_id, left=1 if event.order_id else -1))

        await bus.subscribe(placed, retry=None)
        await bus.publish(OrderPlaced(order_id=7))
        await bus.publish(OrderPlaced(order_id=0))  # its local handler raises: the distributed one failed
        await wait_until_idle(bus, timeout=30)
        assert "reorder 7 in True" in calls
        letters = await bus.dead_letters()
        assert [letter.message.name for letter in letters] == ["BusTests.OrderPlaced"]
        assert "stock below zero" in letters[0].reason


async def test_local_publish_takes_an_event() -> None:
    async with make_bus("Stock", MemoryBroker(), None) as bus:
        with pytest.raises(Exception, match="takes an Event"):
            await bus.local.publish("LocalTests.StockLow")  # type: ignore[arg-type]
        bus.local.subscribe(_rejecting)
        with pytest.raises(Reject):  # a control signal of distributed handlers is just an exception here
            await bus.local.publish(StockLow(product_id=1, left=1))


async def _rejecting(event: StockLow) -> None:
    raise Reject("no")
