"""The relay when the broker refuses a message or is away, and the inbox's dedup window."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import datetime, timedelta

from eventrelay import BrokerUnavailable, DistributedEventBus, Message, PublishFailed
from eventrelay.stores.base import OutboxRecord, utcnow
from eventrelay.testing import RecordingBroker, capture, wait_until_idle
from tests.bus.helpers import OrderPlaced, eventually, make_bus, outbox_size


class RefusingBroker(RecordingBroker):
    """Refuses every message whose note is "refuse me"; is unreachable while `away`."""

    def __init__(self) -> None:
        super().__init__()
        self.away = False
        self.refused = 0

    async def publish(self, messages: Sequence[Message]) -> None:
        if self.away:
            raise BrokerUnavailable("the test broker is away")
        if any(b"refuse me" in m.body for m in messages):
            self.refused += 1
            raise PublishFailed("the test broker refuses this message")
        await super().publish(messages)


async def test_a_message_the_broker_refuses_is_deferred_and_the_rows_behind_it_go(
    database: str | None,
) -> None:
    broker = RefusingBroker()
    bus = make_bus("Shop", broker, database)
    async with bus:
        handled = await capture(bus, OrderPlaced)
        async with bus.unit_of_work():
            await bus.publish(OrderPlaced(order_id=1))
            await bus.publish(OrderPlaced(order_id=2, note="refuse me"))
            await bus.publish(OrderPlaced(order_id=3))
        await eventually(lambda: len(handled) == 2)
        assert sorted(e.order_id for e in handled) == [1, 3]  # no key: no order promised
        # The refused row stays in the outbox, its failure counted, due again only after a backoff.
        await eventually(lambda: bus.relay.sent == 2)  # (the rows sent are deleted once confirmed)
        assert await outbox_size(bus) == 1
        (record,) = await _outbox(bus)
        assert record.attempts >= 1
        assert record.last_error is not None
        assert "refuses" in record.last_error
        assert broker.refused >= 2  # the batch, then the row on its own


async def _outbox(bus: DistributedEventBus) -> list[OutboxRecord]:
    """Every outbox row, due or not (read in a transaction that is rolled back)."""
    tx = bus.store.begin()
    try:
        return await bus.store.claim_outbox(tx, 100, utcnow() + timedelta(days=1))
    finally:
        await tx.rollback()


async def test_rows_wait_in_the_outbox_while_the_broker_is_away(database: str | None) -> None:
    broker = RefusingBroker()
    broker.away = True
    bus = make_bus("Shop", broker, database)
    async with bus:
        handled = await capture(bus, OrderPlaced)
        for n in range(5):
            async with bus.unit_of_work():
                await bus.publish(OrderPlaced(order_id=n))
        await eventually(lambda: bus.relay.sent == 0 and broker.away)
        assert await outbox_size(bus) == 5  # kept: nothing was accepted
        broker.away = False
        bus.relay.wake()
        await wait_until_idle(bus, timeout=10)
        assert sorted(e.order_id for e in handled) == [0, 1, 2, 3, 4]


async def test_a_duplicate_within_the_retention_is_dropped_and_one_after_it_is_not(
    database: str | None,
) -> None:
    broker = RecordingBroker()
    bus = make_bus(
        "Shop",
        broker,
        database,
        inbox_retention=timedelta(seconds=0.3),
        inbox_cleanup_interval=timedelta(seconds=0.1),
    )
    async with bus:
        handled = await capture(bus, OrderPlaced)
        await bus.publish(OrderPlaced(order_id=7), use_outbox=False)
        await wait_until_idle(bus)
        (message,) = broker.published
        await broker.publish([message])  # a redelivery inside the window: dropped
        await wait_until_idle(bus)
        assert len(handled) == 1
        # Past the retention the cleanup has removed the record: the same message id takes effect again.
        # (That is the documented limit: keep the retention longer than a broker can hold a message.)
        started = utcnow()
        await eventually(lambda: utcnow() - started > timedelta(seconds=0.6), timeout=5)
        await broker.publish([message])
        await wait_until_idle(bus)
        assert len(handled) == 2


class HangingBroker(RecordingBroker):
    """Its publish waits until `resume` is set, as a broker behind a hung network does; notes when it sent."""

    def __init__(self) -> None:
        super().__init__()
        self.hanging = asyncio.Event()
        self.resume = asyncio.Event()
        self.sent_at: list[datetime] = []
        self.attempts = 0

    async def publish(self, messages: Sequence[Message]) -> None:
        self.hanging.set()
        self.attempts += 1
        await self.resume.wait()
        self.sent_at.append(utcnow())
        await super().publish(messages)


async def test_units_of_work_commit_while_the_relay_waits_for_a_hung_broker(database: str | None) -> None:
    broker = HangingBroker()
    async with make_bus("Shop", broker, database) as bus:
        await bus.publish(OrderPlaced(order_id=1))
        async with asyncio.timeout(10):
            await broker.hanging.wait()  # the relay has claimed the row and waits for the broker
        async with asyncio.timeout(10):  # (SQLite's busy timeout is 30 s: a held lock would fail this)
            async with bus.unit_of_work():
                await bus.publish(OrderPlaced(order_id=2))
            assert await outbox_size(bus) == 2
        broker.resume.set()
        await eventually(lambda: len(broker.published) == 2, timeout=10)
        await eventually(lambda: bus.relay.sent == 2, timeout=10)
        assert await outbox_size(bus) == 0


async def test_a_publish_not_confirmed_within_the_relay_lease_is_given_up_and_tried_again(
    database: str | None,
) -> None:
    broker = HangingBroker()
    async with make_bus("Shop", broker, database, relay_lease=0.3) as bus:
        await bus.publish(OrderPlaced(order_id=1))
        await eventually(lambda: broker.attempts >= 2, timeout=10)  # the first publish was given up
        assert await outbox_size(bus) == 1, "the row stays in the outbox until a publish is confirmed"
        broker.resume.set()
        await eventually(lambda: bus.relay.sent == 1, timeout=10)
        assert await outbox_size(bus) == 0


async def test_rows_a_crashed_relay_claimed_are_sent_once_its_lease_ran_out(database: str | None) -> None:
    broker = HangingBroker()
    broker.resume.set()
    bus = make_bus("Shop", broker, database)
    await bus.store.create_tables()
    async with bus.unit_of_work():
        published = [await bus.publish(OrderPlaced(order_id=n)) for n in range(3)]
    now = utcnow()
    lease_until = now + timedelta(seconds=0.5)
    tx = bus.store.begin()  # a relay that claims the rows and dies before it sends them
    assert len(await bus.store.claim_outbox(tx, 100, now, lease_until)) == 3
    await tx.commit()
    async with bus:
        await eventually(lambda: bus.relay.sent == 3, timeout=10)
        assert await outbox_size(bus) == 0
    assert [m.id for m in broker.published] == published
    assert min(broker.sent_at) >= lease_until
