"""The broker contract: what every `Broker` promises, specified once and inherited by one class per adapter.

A subclass provides the `make_broker` fixture (new brokers on the test's own namespace: exchange, stream, key
prefix, database) and a few class attributes: the hooks below. The `broker` fixture is one of them, started.
What an adapter cannot be tested for it names in `cannot`, with the reason, and those tests skip saying so.
The tests use only the Broker port, URLs and the bus, and unique subscriber and event names (uuid) so that
tests on a shared server never see each other's messages. Every wait is bounded, so a hang fails the test
instead of blocking the run; no test asserts a wall-clock time except "not before the retry delay".
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import ClassVar, Protocol

import pytest

from eventrelay import DistributedEventBus, Event
from eventrelay.brokers import broker_from_url
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
from eventrelay.errors import BrokerUnavailable
from eventrelay.testing import wait_until_idle
from tests.bus.helpers import settings
from tests.faultproxy import FaultProxy

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


async def receive(broker: Broker, subscriber: str, wanted: set[str]) -> list[Delivery]:
    """Fetch and ack until every id in `wanted` came (or PATIENCE ran out), riding out an outage as the bus
    consumer does: back off briefly on BrokerUnavailable."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + PATIENCE
    got: list[Delivery] = []
    while not wanted <= {d.message.id for d in got} and loop.time() < deadline:
        try:
            batch = await broker.fetch(subscriber, 10, 0.2)
        except BrokerUnavailable:
            await asyncio.sleep(0.05)
            continue
        for delivery in batch:
            await broker.ack(delivery)
        got.extend(batch)
    return got


async def publish_when_back(broker: Broker, messages: Sequence[Message], patience: float = PATIENCE) -> None:
    """Publish, trying again on BrokerUnavailable for up to `patience` seconds, as the relay does."""
    async with asyncio.timeout(patience):
        while True:
            try:
                return await broker.publish(messages)
            except BrokerUnavailable:
                await asyncio.sleep(0.05)


class MakeBroker(Protocol):
    """Makes a new, unstarted broker on the test's own namespace, with extra URL `options` ("a=1&b=2"),
    through 127.0.0.1:`port` (a fault proxy) instead of the server's own port."""

    def __call__(self, options: str = "", *, port: int | None = None) -> Broker: ...


class PriceChanged(Event, name="BrokerContract.Price Changed ✓"):  # a space and non-ASCII, on every wire
    product_id: int


# What an adapter may be unable to be tested for: the keys of `BrokerContract.cannot`.
SERVER = "a server: unreachable, with a password in its URL"
OUTAGES = "outages of its server through a fault proxy"
LEASES = "a lease that runs out once its holder is gone"
PROCESSES = "brokers in several processes sharing one server"


class BrokerContract:
    """Behaviour every broker adapter inherits. Subclasses provide `make_broker` and the hooks below.

    Order (docs/brokers.md, "Order"): one fetcher of a subscriber gets the messages of one event name in
    publish order, on every broker. Across names it is up to the broker: `orders_across_names` says whether
    one fetcher gets all of a subscriber's messages in publish order (one queue or stream per subscriber), or
    whether each name comes on its own (a consumer or topic per name: NATS, Kafka).
    """

    orders_across_names: ClassVar[bool] = True
    cannot: ClassVar[Mapping[str, str]] = {}
    """What the adapter cannot be tested for (SERVER, OUTAGES, LEASES, PROCESSES), each with the reason."""
    unreachable_urls: ClassVar[Sequence[str]] = ()
    """URLs of the adapter's server at 127.0.0.1:9, where nothing listens, with the credential `secret`."""
    server_port: ClassVar[int] = 0
    """The port of the server, which a fault proxy forwards to."""
    outage_log: ClassVar[str] = ""
    """What the adapter logs when it loses its server, if anything."""
    url_credentials: ClassVar[str] = ""
    """The `user:password` in the URLs `make_broker` makes, if any, which no log may show."""
    short_lease: ClassVar[str] = ""
    """URL options for a lease that runs out within a second of its holder going ("": at once)."""

    @pytest.fixture
    def make_broker(self) -> MakeBroker:
        raise NotImplementedError("a broker contract subclass provides the `make_broker` fixture")

    @pytest.fixture
    async def broker(self, make_broker: MakeBroker) -> AsyncIterator[Broker]:
        async with make_broker() as broker:
            yield broker

    def needs(self, what: str) -> None:
        """Skip the test, with the adapter's reason, if the adapter cannot be tested for `what`."""
        if what in self.cannot:
            pytest.skip(f"no test of {what}: {self.cannot[what]}")

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

    # --- the server -----------------------------------------------------------------------------------

    async def test_an_unreachable_server_is_unavailable_and_the_credentials_stay_secret(self) -> None:
        self.needs(SERVER)
        assert self.unreachable_urls, "give `unreachable_urls`, or say in `cannot` why there are none"
        for url in self.unreachable_urls:
            broker = broker_from_url(url)
            with pytest.raises(BrokerUnavailable) as caught:
                await broker.start()
            assert "secret" not in str(caught.value), url
            credentials = url.partition("://")[2].partition("@")[0]  # "someone:secret", or a token
            shown = f"{credentials.replace('secret', '***')}@127.0.0.1:9"
            assert shown in str(caught.value), "the error says which server, with the secret hidden"
            with pytest.raises(BrokerUnavailable):  # and it stays unavailable, not broken
                await broker.publish([message(event_name())])
            await broker.close()

    async def test_reconnects_after_a_reset_and_an_outage(
        self, make_broker: MakeBroker, caplog: pytest.LogCaptureFixture
    ) -> None:
        self.needs(OUTAGES)
        assert self.server_port, "give `server_port`, or say in `cannot` why there are no outages to test"
        name, subscriber = event_name(), subscriber_name()
        async with (
            FaultProxy(self.server_port) as proxy,
            make_broker() as direct,
            make_broker(port=proxy.port) as broker,
        ):
            await broker.bind(subscriber, name)
            first = message(name)
            await broker.publish([first])
            assert [d.message for d in await receive(broker, subscriber, {first.id})] == [first]
            assert await broker.fetch(subscriber, 10, 0.2) == []  # and its ack went out before the reset
            connections = proxy.connections

            proxy.reset()  # every connection gets a TCP RST
            second = message(name)
            await publish_when_back(broker, [second])
            assert [d.message for d in await receive(broker, subscriber, {second.id})] == [second]
            assert proxy.connections > connections, "no new connection after the reset"
            assert await broker.fetch(subscriber, 10, 0.2) == []  # its ack too, before the outage

            async with proxy.down():  # the server is gone for a while: the broker tries it again and again
                await asyncio.sleep(0.2)
                with pytest.raises(BrokerUnavailable):
                    await broker.publish([message(name)])
                with pytest.raises(BrokerUnavailable):
                    await broker.fetch(subscriber, 10, 0.5)
                during = message(name)
                await direct.publish([during])  # another service publishes meanwhile
                await asyncio.sleep(1.0)
            after = message(name)
            await publish_when_back(broker, [after])
            got = await receive(broker, subscriber, {during.id, after.id})
            assert [d.message for d in got] == [during, after]
            assert await nothing_for(broker, subscriber)
            assert await broker.pending_count(subscriber) == 0
        assert self.outage_log in caplog.text
        if self.url_credentials:
            assert self.url_credentials not in caplog.text, "a password reached a log"

    # --- processes ------------------------------------------------------------------------------------

    async def test_a_lease_that_runs_out_delivers_again_with_the_next_attempt(
        self, make_broker: MakeBroker
    ) -> None:
        self.needs(LEASES)
        name, subscriber = event_name(), subscriber_name()
        async with make_broker(self.short_lease) as dying:
            await dying.bind(subscriber, name)
            await dying.publish([message(name)])
            [taken] = await collect(dying, subscriber, 1, ack=False)
            assert taken.attempt == 1
        # Closed without settling what it held: as if its process had died mid-handler.
        async with make_broker(self.short_lease) as survivor:
            await survivor.bind(subscriber, name)  # as a service does when it starts
            [again] = await collect(survivor, subscriber, 1)
            assert again.message == taken.message
            assert again.attempt == 2
            assert await nothing_for(survivor, subscriber)
            assert await survivor.pending_count(subscriber) == 0

    async def test_services_on_a_bus_fan_out_and_instances_of_one_service_compete(
        self, make_broker: MakeBroker, sqlite_url: str, tmp_path: Path
    ) -> None:
        self.needs(PROCESSES)
        handled: dict[str, list[int]] = {"orders-1": [], "orders-2": [], "audit": []}

        def recorder(who: str) -> Callable[[PriceChanged], Awaitable[None]]:
            async def record(event: PriceChanged) -> None:
                await asyncio.sleep(0.005)  # a moment of work, so that the other instance gets a turn
                handled[who].append(event.product_id)

            return record

        async with contextlib.AsyncExitStack() as stack:

            async def bus(service: str, database: str, max_in_flight: int = 10) -> DistributedEventBus:
                # A broker of its own, as in a process of its own.
                broker = await stack.enter_async_context(make_broker())
                fast = settings(max_in_flight=max_in_flight)
                return DistributedEventBus(service, broker=broker, database=database, settings=fast)

            products = await bus("Products", sqlite_url)
            orders = [await bus("Orders", f"sqlite+aiosqlite:///{tmp_path}/orders.db", 1) for _ in range(2)]
            audit = await bus("Audit", f"sqlite+aiosqlite:///{tmp_path}/audit.db")
            await orders[0].subscribe(recorder("orders-1"))
            await orders[1].subscribe(recorder("orders-2"))
            await audit.subscribe(recorder("audit"))

            async with products, orders[0], orders[1], audit:
                sent = 0
                async with asyncio.timeout(PATIENCE):
                    # 20, and more until both instances had some: a group may take a moment to share out its
                    # partitions (Kafka). Keys spread them over the partitions.
                    while sent < 20 or not (handled["orders-1"] and handled["orders-2"]):
                        await products.publish(PriceChanged(product_id=sent), key=f"product-{sent}")
                        sent += 1
                        await asyncio.sleep(0.05 if sent >= 20 else 0)
                await wait_until_idle(products, *orders, audit, timeout=20)

        assert sorted(handled["audit"]) == list(range(sent)), "each service gets its own copy"
        assert sorted(handled["orders-1"] + handled["orders-2"]) == list(range(sent)), "one copy per service"
        assert handled["orders-1"], "instances of one service compete"
        assert handled["orders-2"], "instances of one service compete"
