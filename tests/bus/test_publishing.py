"""Publishing in a unit of work, and ABP's precedence of `on_unit_of_work_complete` and `use_outbox`.

Inside a unit of work the event is stored in the outbox in the same transaction as the business data:
commit => it will be delivered; rollback => it never existed.
"""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import func, insert, select

from eventrelay import ConfigurationError, Context, DynamicEvent, Event, UnitOfWorkError
from eventrelay.testing import RecordingBroker, capture, wait_until_idle
from tests.bus.helpers import (
    OrderPlaced,
    business_table,
    count_rows,
    create_table,
    make_bus,
    not_started,
    outbox_size,
    rolled_back,
    sql_store,
)


async def test_event_leaves_only_after_commit(database: str | None) -> None:
    broker = RecordingBroker()
    async with make_bus("Orders", broker, database) as bus:
        handled = await capture(bus, OrderPlaced)
        async with bus.unit_of_work():
            await bus.publish(OrderPlaced(order_id=1))
            await asyncio.sleep(0.2)  # several relay polls: nothing may leave before the commit
            assert broker.published == []
            assert await outbox_size(bus) == 0
        await wait_until_idle(bus)
    assert [m.name for m in broker.published] == ["BusTests.OrderPlaced"]
    assert handled == [OrderPlaced(order_id=1)]


async def test_rollback_discards_the_business_row_and_the_event(database_url: str) -> None:
    table = business_table()
    await create_table(database_url, table)
    broker = RecordingBroker()
    async with make_bus("Orders", broker, database_url) as bus:
        handled = await capture(bus, OrderPlaced)
        async with rolled_back(bus) as uow:
            await uow.session.execute(insert(table).values(id=1, note="placed"))
            await bus.publish(OrderPlaced(order_id=1))
        await wait_until_idle(bus)
        assert await outbox_size(bus) == 0
    assert broker.published == []
    assert handled == []
    assert await count_rows(database_url, table) == 0


async def test_rollback_publishes_nothing_without_a_database() -> None:
    broker = RecordingBroker()
    async with make_bus("Orders", broker, None) as bus:
        handled = await capture(bus, OrderPlaced)
        async with rolled_back(bus):
            await bus.publish(OrderPlaced(order_id=1))
            await bus.publish(OrderPlaced(order_id=2), on_unit_of_work_complete=False)
        await wait_until_idle(bus)
        assert await outbox_size(bus) == 0
    assert broker.published == []
    assert handled == []


async def test_a_unit_of_work_without_a_database_has_no_session() -> None:
    async with make_bus("Orders", RecordingBroker(), None) as bus, bus.unit_of_work() as uow:
        with pytest.raises(UnitOfWorkError):
            _ = uow.session


async def test_the_event_and_the_business_row_commit_together(database_url: str) -> None:
    table = business_table()
    await create_table(database_url, table)
    broker = RecordingBroker()
    async with not_started(make_bus("Orders", broker, database_url)) as bus:
        outbox = sql_store(bus).tables.outbox
        async with bus.unit_of_work() as uow:
            await uow.session.execute(insert(table).values(id=1, note="placed"))
            await bus.publish(OrderPlaced(order_id=1), on_unit_of_work_complete=False)
            # Written in this transaction, and invisible outside it until the commit.
            assert await count_rows(database_url, table) == 0
            assert await count_rows(database_url, outbox) == 0
        assert await count_rows(database_url, table) == 1
        assert await outbox_size(bus) == 1
    async with make_bus("Orders", broker, database_url) as bus:
        handled = await capture(bus, OrderPlaced)
        await wait_until_idle(bus)
    assert handled == [OrderPlaced(order_id=1)]


async def test_commit_delivers_the_event_and_keeps_the_row(database_url: str) -> None:
    table = business_table()
    await create_table(database_url, table)
    broker = RecordingBroker()
    async with make_bus("Orders", broker, database_url) as bus:
        handled = await capture(bus, OrderPlaced)
        async with bus.unit_of_work() as uow:
            await uow.session.execute(insert(table).values(id=7, note="placed"))
            await bus.publish(OrderPlaced(order_id=7))
        await wait_until_idle(bus)
    assert handled == [OrderPlaced(order_id=7)]
    assert await count_rows(database_url, table) == 1


async def test_nested_unit_of_work_joins_the_outer_one(database_url: str) -> None:
    table = business_table()
    await create_table(database_url, table)
    broker = RecordingBroker()
    async with not_started(make_bus("Orders", broker, database_url)) as bus:
        async with rolled_back(bus) as outer, bus.unit_of_work() as inner:
            assert inner is outer
            await inner.session.execute(insert(table).values(id=1, note="inner"))
            await bus.publish(OrderPlaced(order_id=1))
        assert await count_rows(database_url, table) == 0
        assert await outbox_size(bus) == 0


# --- ABP's precedence ------------------------------------------------------------------------------


async def test_not_waiting_for_the_commit_writes_the_outbox_in_the_transaction(database_url: str) -> None:
    broker = RecordingBroker()
    async with not_started(make_bus("Orders", broker, database_url)) as bus:
        outbox = sql_store(bus).tables.outbox
        for outcome in ("rollback", "commit"):
            async with rolled_back(bus) if outcome == "rollback" else bus.unit_of_work() as uow:
                in_transaction = select(func.count()).select_from(outbox)
                await bus.publish(OrderPlaced(order_id=1))  # buffered until the commit
                assert (await uow.session.execute(in_transaction)).scalar_one() == 0
                await bus.publish(OrderPlaced(order_id=2), on_unit_of_work_complete=False)
                assert (await uow.session.execute(in_transaction)).scalar_one() == 1
            assert await outbox_size(bus) == (0 if outcome == "rollback" else 2)
        assert broker.published == []


async def test_not_waiting_for_the_commit_is_discarded_on_rollback_without_a_database() -> None:
    broker = RecordingBroker()
    async with not_started(make_bus("Orders", broker, None)) as bus:
        async with rolled_back(bus):
            await bus.publish(OrderPlaced(order_id=1), on_unit_of_work_complete=False)
        assert await outbox_size(bus) == 0
        async with bus.unit_of_work():
            await bus.publish(OrderPlaced(order_id=2), on_unit_of_work_complete=False)
        assert await outbox_size(bus) == 1
    assert broker.published == []


async def test_without_outbox_and_unit_of_work_the_event_is_sent_at_once(database: str | None) -> None:
    broker = RecordingBroker()
    async with not_started(make_bus("Orders", broker, database)) as bus:
        message_id = await bus.publish(OrderPlaced(order_id=1), use_outbox=False)
        assert [m.id for m in broker.published] == [message_id]
        assert await outbox_size(bus) == 0


async def test_without_outbox_in_a_unit_of_work_the_event_is_sent_after_the_commit(
    database: str | None,
) -> None:
    broker = RecordingBroker()
    async with not_started(make_bus("Orders", broker, database)) as bus:
        async with bus.unit_of_work():
            message_id = await bus.publish(OrderPlaced(order_id=1), use_outbox=False)
            assert broker.published == []
        assert [m.id for m in broker.published] == [message_id]
        assert await outbox_size(bus) == 0

        async with rolled_back(bus):
            await bus.publish(OrderPlaced(order_id=2), use_outbox=False)
        assert [m.id for m in broker.published] == [message_id]
        assert await outbox_size(bus) == 0


async def test_without_outbox_and_not_waiting_for_the_commit_the_event_is_sent_at_once(
    database: str | None,
) -> None:
    broker = RecordingBroker()
    async with not_started(make_bus("Orders", broker, database)) as bus:
        async with rolled_back(bus):
            message_id = await bus.publish(
                OrderPlaced(order_id=1), use_outbox=False, on_unit_of_work_complete=False
            )
            assert [m.id for m in broker.published] == [message_id]
        assert [m.id for m in broker.published] == [message_id]  # sent: a rollback cannot call it back


async def test_outside_a_unit_of_work_the_outbox_is_written_in_a_transaction_of_its_own(
    database: str | None,
) -> None:
    broker = RecordingBroker()
    async with not_started(make_bus("Orders", broker, database)) as bus:
        await bus.publish(OrderPlaced(order_id=1))
        assert await outbox_size(bus) == 1
    assert broker.published == []


# --- dynamic events --------------------------------------------------------------------------------


class PriceChanged(Event, name="BusTests.Product.PriceChanged"):
    product: str
    price: float


async def test_dynamic_event_is_handled_by_a_function_subscribed_by_name(database: str | None) -> None:
    received: list[DynamicEvent] = []

    async def on_anything(event: DynamicEvent) -> None:
        received.append(event)

    async with make_bus("Orders", RecordingBroker(), database) as bus:
        await bus.subscribe(on_anything, event="BusTests.Some.Name")
        await bus.publish("BusTests.Some.Name", {"a": 1, "b": ["x"]})
        await wait_until_idle(bus)
    assert received == [DynamicEvent("BusTests.Some.Name", {"a": 1, "b": ["x"]})]


async def test_typed_handler_receives_an_event_published_by_name(database: str | None) -> None:
    received: list[tuple[PriceChanged, str]] = []

    async def on_price(event: PriceChanged, context: Context) -> None:
        received.append((event, context.event_name))

    async with make_bus("Orders", RecordingBroker(), database) as bus:
        await bus.subscribe(on_price)
        await bus.publish("BusTests.Product.PriceChanged", {"product": "p1", "price": 9.5, "extra": True})
        await wait_until_idle(bus)
    assert received == [(PriceChanged(product="p1", price=9.5), "BusTests.Product.PriceChanged")]


async def test_publish_by_name_refuses_bad_input() -> None:
    async with not_started(make_bus("Orders", RecordingBroker(), None)) as bus:
        with pytest.raises(ConfigurationError):
            await bus.publish(" padded ", {"a": 1})
        with pytest.raises(ConfigurationError):
            await bus.publish("BusTests.Some.Name", {"not json": object()})
        with pytest.raises(ConfigurationError):
            await bus.publish(OrderPlaced(order_id=1), {"a": 1})
        assert await outbox_size(bus) == 0
