"""The broker contract: what every `Broker` promises, specified once and inherited by one class per adapter.

A subclass provides the `broker` fixture: a started broker, closed afterwards. The tests use only the Broker
port, and unique subscriber and event names (uuid) so that tests on a shared server never see each other's
messages. Every wait is bounded, so a hang fails the test instead of blocking the run; no test asserts a
wall-clock time except "not before the retry delay".
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Sequence
from typing import ClassVar

import pytest

from eventrelay.brokers.base import Broker
from eventrelay.envelope import (
    CAUSATION_ID,
    CORRELATION_ID,
    TENANT_ID,
    TRACEPARENT,
    Delivery,
    Message,
    new_message_id,
)

# The upper bound of a wait for something that should come: generous, only there so that a hang fails.
PATIENCE = 10.0
# How long to listen for something that should not come.
QUIET = 0.5
# A short retry delay; the tests only check that a redelivery does not come before it.
DELAY = 0.2
# Scheduling slack allowed when checking "not before the delay" (timers may fire a tick early).
EARLY = 0.01


def subscriber_name() -> str:
    return f"svc-{uuid.uuid4().hex[:12]}"


def event_name() -> str:
    return f"test.{uuid.uuid4().hex[:12]}.happened"


def message(name: str, body: bytes = b'{"n": 0}') -> Message:
    return Message(new_message_id(), name, body)


async def collect(
    broker: Broker, subscriber: str, count: int, *, max_count: int = 10, ack: bool = True
) -> list[Delivery]:
    """Fetch until `count` deliveries came or `PATIENCE` ran out (acking each unless `ack=False`)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + PATIENCE
    got: list[Delivery] = []
    async with asyncio.timeout(PATIENCE + 5):  # in case a fetch ignores its own timeout
        while len(got) < count and (remaining := deadline - loop.time()) > 0:
            batch = await broker.fetch(subscriber, min(max_count, count - len(got)), remaining)
            assert len(batch) <= max_count
            for delivery in batch:
                if ack:
                    await broker.ack(delivery)
            got.extend(batch)
    return got


def by_id(items: Sequence[Message | Delivery]) -> list[Message]:
    """The messages of `items` sorted by id: compares as a multiset where no order is promised."""
    messages = [item.message if isinstance(item, Delivery) else item for item in items]
    return sorted(messages, key=lambda m: m.id)


async def nothing_for(broker: Broker, subscriber: str) -> bool:
    """Whether no delivery comes for `subscriber` within `QUIET` seconds (one that does is released)."""
    async with asyncio.timeout(QUIET + 5):
        batch = await broker.fetch(subscriber, 10, QUIET)
    for delivery in batch:
        await broker.release(delivery)
    return not batch


class BrokerContract:
    """Behaviour every broker adapter inherits. Subclasses provide the `broker` fixture.

    Order (docs/brokers.md, "Order"): one fetcher of a subscriber gets the messages of one event name in
    publish order, on every broker. Across names it is up to the broker: `orders_across_names` says whether
    one fetcher gets all of a subscriber's messages in publish order (one queue or stream per subscriber), or
    whether each name comes on its own (a consumer or topic per name: NATS, Kafka).
    """

    orders_across_names: ClassVar[bool] = True

    @pytest.fixture
    def broker(self) -> Broker:
        raise NotImplementedError("a broker contract subclass provides the `broker` fixture")

    # --- routing ------------------------------------------------------------------------------------

    async def test_each_subscriber_gets_every_message_once(self, broker: Broker) -> None:
        name, orders, audit = event_name(), subscriber_name(), subscriber_name()
        await broker.bind(orders, name)
        await broker.bind(audit, name)
        messages = [message(name, f'{{"n": {n}}}'.encode()) for n in range(3)]

        await broker.publish(messages)

        for subscriber in (orders, audit):
            got = await collect(broker, subscriber, len(messages))
            assert [d.message for d in got] == messages
            assert [d.attempt for d in got] == [1, 1, 1]
            assert await nothing_for(broker, subscriber)

    async def test_fetchers_of_one_subscriber_share_its_messages(self, broker: Broker) -> None:
        name, subscriber = event_name(), subscriber_name()
        await broker.bind(subscriber, name)
        messages = [message(name, f'{{"n": {n}}}'.encode()) for n in range(20)]
        await broker.publish(messages)
        taken: list[list[str]] = [[], []]

        async def fetcher(ids: list[str]) -> None:
            while sum(map(len, taken)) < len(messages):
                for delivery in await broker.fetch(subscriber, 1, 0.2):
                    ids.append(delivery.message.id)
                    await broker.ack(delivery)
                await asyncio.sleep(0)  # let the other fetcher have a turn

        async with asyncio.timeout(PATIENCE), asyncio.TaskGroup() as group:
            for ids in taken:
                group.create_task(fetcher(ids))

        everything = taken[0] + taken[1]
        assert len(everything) == len(messages), "a message was delivered to both fetchers"
        assert set(everything) == {m.id for m in messages}
        assert await nothing_for(broker, subscriber)

    async def test_one_subscriber_gets_messages_in_publish_order(self, broker: Broker) -> None:
        name, subscriber = event_name(), subscriber_name()
        await broker.bind(subscriber, name)
        messages = [message(name, f'{{"n": {n}}}'.encode()) for n in range(30)]

        await broker.publish(messages[:20])
        for one in messages[20:]:
            await broker.publish([one])

        got = await collect(broker, subscriber, len(messages), max_count=3)
        assert [d.message.id for d in got] == [m.id for m in messages]

    async def test_only_bound_names_are_routed(self, broker: Broker) -> None:
        placed, shipped, cancelled = event_name(), event_name(), event_name()
        orders, shipping = subscriber_name(), subscriber_name()
        await broker.bind(orders, placed)
        await broker.bind(shipping, shipped)
        messages = [message(cancelled), message(shipped), message(placed)]

        await broker.publish(messages)

        assert [d.message for d in await collect(broker, orders, 1)] == [messages[2]]
        assert [d.message for d in await collect(broker, shipping, 1)] == [messages[1]]
        assert await nothing_for(broker, orders)
        assert await nothing_for(broker, shipping)

    async def test_binding_twice_delivers_once(self, broker: Broker) -> None:
        name, subscriber = event_name(), subscriber_name()
        await broker.bind(subscriber, name)
        await broker.bind(subscriber, name)
        sent = message(name)

        await broker.publish([sent])

        assert [d.message for d in await collect(broker, subscriber, 1)] == [sent]
        assert await nothing_for(broker, subscriber)

    async def test_unbind_stops_new_messages_but_queued_ones_stay(self, broker: Broker) -> None:
        placed, shipped, subscriber = event_name(), event_name(), subscriber_name()
        await broker.bind(subscriber, placed)
        await broker.bind(subscriber, shipped)
        queued = message(placed)
        await broker.publish([queued])

        await broker.unbind(subscriber, placed)
        await broker.unbind(subscriber, placed)  # idempotent
        await broker.unbind(subscriber, event_name())  # never bound: nothing to do
        later, other = message(placed), message(shipped)
        await broker.publish([later, other])

        # Two names: no order between them is promised (see `orders_across_names`).
        assert by_id(await collect(broker, subscriber, 2)) == by_id([queued, other])
        assert await nothing_for(broker, subscriber)

    async def test_one_subscriber_gets_each_names_messages_in_publish_order(self, broker: Broker) -> None:
        placed, shipped, subscriber = event_name(), event_name(), subscriber_name()
        await broker.bind(subscriber, placed)
        await broker.bind(subscriber, shipped)
        messages = [message(placed if n % 3 else shipped, f'{{"n": {n}}}'.encode()) for n in range(30)]

        await broker.publish(messages[:20])
        for one in messages[20:]:
            await broker.publish([one])

        got = [d.message for d in await collect(broker, subscriber, len(messages), max_count=4)]
        for name in (placed, shipped):
            assert [m.id for m in got if m.name == name] == [m.id for m in messages if m.name == name]
        if self.orders_across_names:
            assert [m.id for m in got] == [m.id for m in messages]
        else:
            assert by_id(got) == by_id(messages)
        assert await nothing_for(broker, subscriber)

    # --- fetch --------------------------------------------------------------------------------------

    async def test_fetch_returns_nothing_after_its_timeout_when_empty(self, broker: Broker) -> None:
        name, subscriber = event_name(), subscriber_name()
        await broker.bind(subscriber, name)
        loop = asyncio.get_running_loop()

        start = loop.time()
        async with asyncio.timeout(PATIENCE):
            got = await broker.fetch(subscriber, 10, 0.3)

        assert got == []
        assert loop.time() - start >= 0.3 - EARLY, "fetch gave up before its timeout"

    async def test_a_waiting_fetch_wakes_when_a_message_arrives(self, broker: Broker) -> None:
        name, subscriber = event_name(), subscriber_name()
        await broker.bind(subscriber, name)
        sent = message(name)
        # Its own timeout is far beyond PATIENCE: only a wake-up on arrival makes it return in time.
        fetching = asyncio.create_task(broker.fetch(subscriber, 10, 6 * PATIENCE))
        try:
            # Give the fetch time to start waiting; the test is right whether or not it has.
            await asyncio.sleep(0.2)
            await broker.publish([sent])
            async with asyncio.timeout(PATIENCE):
                got = await fetching
        finally:
            fetching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await fetching

        assert [d.message for d in got] == [sent]

    async def test_fetch_returns_at_most_max_count(self, broker: Broker) -> None:
        name, subscriber = event_name(), subscriber_name()
        await broker.bind(subscriber, name)
        messages = [message(name, f'{{"n": {n}}}'.encode()) for n in range(5)]
        await broker.publish(messages)

        async with asyncio.timeout(PATIENCE):
            first = await broker.fetch(subscriber, 2, PATIENCE)
        assert 1 <= len(first) <= 2
        for delivery in first:
            await broker.ack(delivery)
        rest = await collect(broker, subscriber, len(messages) - len(first), max_count=2)

        assert [d.message for d in first + rest] == messages

    async def test_a_fetched_message_is_leased_to_its_fetcher(self, broker: Broker) -> None:
        name, subscriber = event_name(), subscriber_name()
        await broker.bind(subscriber, name)
        await broker.publish([message(name)])

        [delivery] = await collect(broker, subscriber, 1, ack=False)

        assert await nothing_for(broker, subscriber), "a leased message was handed out again"
        await broker.ack(delivery)

    # --- outcomes -----------------------------------------------------------------------------------

    async def test_an_acked_message_never_comes_again(self, broker: Broker) -> None:
        name, subscriber = event_name(), subscriber_name()
        await broker.bind(subscriber, name)
        await broker.publish([message(name)])
        [delivery] = await collect(broker, subscriber, 1, ack=False)

        await broker.ack(delivery)

        assert await nothing_for(broker, subscriber)
        assert await nothing_for(broker, subscriber)

    async def test_ack_many_acks_each_and_leaves_the_others(self, broker: Broker) -> None:
        name, subscriber = event_name(), subscriber_name()
        await broker.bind(subscriber, name)
        messages = [message(name, f'{{"n": {n}}}'.encode()) for n in range(5)]
        await broker.publish(messages)
        got = await collect(broker, subscriber, len(messages), ack=False)

        await broker.ack_many([got[0], got[2], got[4]])
        await broker.ack_many([])
        for delivery in (got[1], got[3]):
            await broker.release(delivery)

        again = await collect(broker, subscriber, 2)
        assert {d.message.id for d in again} == {messages[1].id, messages[3].id}
        assert await nothing_for(broker, subscriber)

    async def test_ack_many_of_a_run_leaves_the_ones_held_between_and_after(self, broker: Broker) -> None:
        """A broker that acks a run with one call (RabbitMQ's `multiple`) must stop below a delivery still
        held, and must not take the ones fetched later."""
        name, subscriber = event_name(), subscriber_name()
        await broker.bind(subscriber, name)
        messages = [message(name, f'{{"n": {n}}}'.encode()) for n in range(8)]
        await broker.publish(messages)
        got = await collect(broker, subscriber, 6, ack=False)  # in the order they came
        acked = [got[0], got[1], got[2], got[4]]

        await broker.ack_many(acked)
        for delivery in (got[3], got[5]):
            await broker.release(delivery)

        again = await collect(broker, subscriber, 4)
        assert {d.message.id for d in again} == {m.id for m in messages} - {d.message.id for d in acked}
        assert await nothing_for(broker, subscriber)

    async def test_retry_redelivers_after_the_delay_with_the_next_attempt(self, broker: Broker) -> None:
        name, subscriber = event_name(), subscriber_name()
        await broker.bind(subscriber, name)
        sent = message(name)
        await broker.publish([sent])
        [delivery] = await collect(broker, subscriber, 1, ack=False)
        assert delivery.attempt == 1
        loop = asyncio.get_running_loop()

        for attempt in (2, 3):
            retried_at = loop.time()
            await broker.retry(delivery, DELAY)
            # Fetching from right after the retry: the redelivery must not come before the delay...
            got = await collect(broker, subscriber, 1, ack=False)
            waited = loop.time() - retried_at
            # ...and comes well within PATIENCE after it.
            assert [d.message for d in got] == [sent]
            assert waited >= DELAY - EARLY, f"redelivered after {waited:.3f}s, before its {DELAY}s delay"
            [delivery] = got
            assert delivery.attempt == attempt

        await broker.ack(delivery)
        assert await nothing_for(broker, subscriber)

    async def test_release_gives_the_message_back_at_once_with_the_same_attempt(self, broker: Broker) -> None:
        name, subscriber = event_name(), subscriber_name()
        await broker.bind(subscriber, name)
        sent = message(name)
        await broker.publish([sent])
        [delivery] = await collect(broker, subscriber, 1, ack=False)

        await broker.release(delivery)

        [again] = await collect(broker, subscriber, 1)
        assert again.message == sent
        assert again.attempt == 1
        assert await nothing_for(broker, subscriber)

    async def test_headers_key_and_body_survive_delivery_and_retry(self, broker: Broker) -> None:
        name, subscriber = event_name(), subscriber_name()
        await broker.bind(subscriber, name)
        sent = Message(
            new_message_id(),
            name,
            "prix réduit ✓ 🎉 ".encode() + bytes(range(256)),
            {
                CORRELATION_ID: new_message_id(),
                CAUSATION_ID: new_message_id(),
                TENANT_ID: "Zürich ☃",
                TRACEPARENT: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                "x-custom": 'quotes " and \\ and spaces',
            },
            key="customer-42-Ω",
        )
        await broker.publish([sent])

        [delivery] = await collect(broker, subscriber, 1, ack=False)
        assert delivery.message == sent
        assert delivery.message.key == "customer-42-Ω"
        assert dict(delivery.message.headers) == dict(sent.headers)

        await broker.retry(delivery, 0.0)
        [again] = await collect(broker, subscriber, 1)
        assert again.message == sent
        assert again.attempt == 2
