"""The broker contract on RabbitMQ (classic and quorum queues), and what is RabbitMQ-only: unroutable
messages, retry queues, outages through a fault proxy, the ABP wire profile, two services and two instances.

Every test uses an exchange of its own; the fixture deletes the exchanges and queues it made afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from decimal import Decimal
from pathlib import Path
from typing import ClassVar
from uuid import UUID

import aio_pika
import aiormq.exceptions
import pamqp.frame
import pytest
from aiormq import spec
from pamqp.header import ContentHeader

from eventrelay import Context, DistributedEventBus, Event, RetryPolicy, Settings
from eventrelay.brokers import amqp_guard, broker_from_url
from eventrelay.brokers.base import Broker
from eventrelay.brokers.rabbitmq import RabbitMQBroker
from eventrelay.envelope import CORRELATION_ID, Delivery, Message, new_message_id
from eventrelay.errors import BrokerUnavailable, ConfigurationError, PublishFailed
from eventrelay.testing import wait_until_idle
from tests.brokers.abp_side import declare_as_abp_consumer, publish_as_abp
from tests.brokers.contract import (
    OUTAGES,
    PATIENCE,
    BrokerContract,
    MakeBroker,
    collect,
    event_name,
    message,
    nothing_for,
    publish_when_back,
    receive,
    subscriber_name,
)
from tests.brokers.contract_replies import ReplyContract
from tests.brokers.raw_amqp import content_header, nested_table, publish_raw, short_string
from tests.faultproxy import FaultProxy
from tests.servers import require_server

PORT = 5672
SERVER = f"amqp://guest:guest@127.0.0.1:{PORT}/"

pytestmark = pytest.mark.rabbitmq


def exchange_name() -> str:
    return f"er-test-{uuid.uuid4().hex[:12]}"


class TrackedBroker(RabbitMQBroker):
    """A RabbitMQBroker that remembers the subscribers it declared queues for, so a test can delete them."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.subscribers: set[str] = set()

    async def bind(self, subscriber: str, name: str) -> None:
        self.subscribers.add(subscriber)
        await super().bind(subscriber, name)

    async def unbind(self, subscriber: str, name: str) -> None:
        self.subscribers.add(subscriber)
        await super().unbind(subscriber, name)

    async def fetch(self, subscriber: str, max_count: int, timeout: float) -> list[Delivery]:
        self.subscribers.add(subscriber)
        return await super().fetch(subscriber, max_count, timeout)


class Topology:
    """Makes brokers on exchanges of their own and deletes every exchange and queue they made at the end."""

    def __init__(self) -> None:
        self.brokers: list[TrackedBroker] = []
        self.queues: set[str] = set()
        self.exchanges: set[str] = set()

    def broker(self, options: str = "", server: str = SERVER, exchange: str | None = None) -> TrackedBroker:
        exchange = exchange or exchange_name()
        broker = TrackedBroker(f"{server}?exchange={exchange}" + (f"&{options}" if options else ""))
        self.brokers.append(broker)
        return broker

    async def delete(self) -> None:
        for broker in self.brokers:
            self.exchanges |= {broker.exchange, broker.unrouted}
            self.queues.add(broker.unrouted)
            for subscriber in broker.subscribers:
                self.queues |= {subscriber, *broker.retry_queues(subscriber)}
        async with await aio_pika.connect(SERVER) as connection:
            channel = await connection.channel()
            for queue in self.queues:
                await channel.queue_delete(queue)
            for exchange in self.exchanges:
                await channel.exchange_delete(exchange)


@pytest.fixture
async def topology() -> AsyncIterator[Topology]:
    require_server("RabbitMQ", PORT)
    topology = Topology()
    yield topology
    await topology.delete()


async def reply_queue_exists(address: str) -> bool:
    """Whether the reply queue `address` is on the server (a passive declare on a connection of our own,
    which its owner's exclusive lock refuses)."""
    async with await aio_pika.connect(SERVER) as connection:
        channel = await connection.channel()
        try:
            await channel.declare_queue(address, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return False
        except aiormq.exceptions.ChannelLockedResource:
            return True
        raise AssertionError(f"{address} is not exclusive to its process")


class TestRabbitMQBroker(BrokerContract, ReplyContract):
    options = ""
    unreachable_urls = ("amqp://someone:secret@127.0.0.1:9/?exchange=x",)
    server_port = PORT
    outage_log = "Lost the connection to RabbitMQ"
    url_credentials = "guest:guest"
    short_lease = ""  # a lease goes with its connection

    @pytest.fixture
    def make_broker(self, topology: Topology) -> MakeBroker:
        exchange = exchange_name()

        def make(options: str = "", *, port: int | None = None) -> TrackedBroker:
            server = f"amqp://guest:guest@127.0.0.1:{port or PORT}/"
            both = "&".join(part for part in (self.options, options) if part)
            return topology.broker(both, server=server, exchange=exchange)

        return make

    async def reply_channel_exists(self, broker: Broker, address: str) -> bool:
        return await reply_queue_exists(address)


class TestRabbitMQQuorumBroker(TestRabbitMQBroker):
    options = "queue_type=quorum&retry_delays=0.2,1"
    cannot: ClassVar[Mapping[str, str]] = {
        OUTAGES: "TestRabbitMQBroker's cover it: the connection is lost and found alike, whatever the queues"
    }

    async def test_the_queues_are_quorum_queues(self, broker: Broker) -> None:
        subscriber = subscriber_name()
        await broker.bind(subscriber, event_name())
        async with await aio_pika.connect(SERVER) as connection:
            channel = await connection.channel()
            with pytest.raises(aio_pika.exceptions.ChannelPreconditionFailed, match="x-queue-type"):
                await channel.declare_queue(subscriber, durable=True)  # a classic one is refused


class TestRabbitMQAbpReplies(ReplyContract):
    """Request/reply with ABP's profile: an exchange without an alternate one, and ABP's JSON."""

    @pytest.fixture
    def make_broker(self, topology: Topology) -> MakeBroker:
        exchange = exchange_name()

        def make(options: str = "", *, port: int | None = None) -> TrackedBroker:
            return topology.broker(f"profile=abp&{options}".rstrip("&"), exchange=exchange)

        return make

    async def reply_channel_exists(self, broker: Broker, address: str) -> bool:
        return await reply_queue_exists(address)


# --- URLs and errors -------------------------------------------------------------------------------------


def test_urls_choose_the_rabbitmq_broker_and_options_are_checked() -> None:
    broker = broker_from_url("amqps://u:p@rabbit.example:5671/prod?exchange=BookStore&queue_type=quorum")
    assert isinstance(broker, RabbitMQBroker)
    assert (broker.exchange, broker.queue_type, broker.exchange_type) == ("BookStore", "quorum", "direct")
    with pytest.raises(ConfigurationError, match="Did you mean 'prefetch'"):
        RabbitMQBroker(f"{SERVER}?prefech=10")
    with pytest.raises(ConfigurationError, match="queue_type takes one of classic, quorum, not 'stream'"):
        RabbitMQBroker(f"{SERVER}?queue_type=stream")
    with pytest.raises(ConfigurationError, match="retry_delays takes numbers above 0"):
        RabbitMQBroker(f"{SERVER}?retry_delays=1,soon")


async def test_settings_that_contradict_the_server_are_configuration_errors(topology: Topology) -> None:
    exchange, subscriber = exchange_name(), subscriber_name()
    topology.exchanges.add(exchange)
    topology.queues.add(subscriber)
    async with await aio_pika.connect(SERVER) as connection:
        channel = await connection.channel()
        await channel.declare_exchange(exchange, "topic", durable=True)
        await channel.declare_queue(subscriber, durable=True)  # classic

    with pytest.raises(ConfigurationError, match="inequivalent arg 'type'"):
        await topology.broker(exchange=exchange, options="profile=abp").start()  # direct, not topic
    async with topology.broker(
        "exchange_type=topic&profile=abp&queue_type=quorum", exchange=exchange
    ) as broker:
        with pytest.raises(ConfigurationError, match="x-queue-type"):
            await broker.bind(subscriber, event_name())
        other, name = subscriber_name(), event_name()  # and the broker goes on working
        await broker.bind(other, name)
        await broker.publish([sent := message(name)])
        assert [d.message for d in await collect(broker, other, 1)] == [sent]


# --- routing keys nobody binds ----------------------------------------------------------------------------


async def test_replies_go_only_to_reply_queues_and_one_nobody_waits_for_is_dropped(
    topology: Topology,
) -> None:
    subscriber, name = subscriber_name(), event_name()
    async with topology.broker() as broker:
        await broker.bind(subscriber, name)
        for address in (subscriber, broker.unrouted, "amq.rabbitmq.reply-to"):
            with pytest.raises(PublishFailed, match="Not a RabbitMQ reply queue"):
                await broker.send_reply(address, message(name))
        replies = await broker.open_replies("x")
        await replies.close()
        await broker.send_reply(replies.address, message(name))  # its queue is gone: dropped, not kept
        assert await broker.pending_count(subscriber) == 0
        assert not await reply_queue_exists(replies.address)


async def test_a_reply_queue_the_server_still_holds_for_a_lost_connection_is_named_anew(
    topology: Topology,
) -> None:
    instance = uuid.uuid4().hex
    async with await aio_pika.connect(SERVER) as half_open, topology.broker() as broker:
        held = await (await half_open.channel()).declare_queue(
            f"eventrelay.replies.{instance}", exclusive=True, auto_delete=True
        )
        replies = await broker.open_replies(instance)
        try:
            assert replies.address == f"{held.name}.1"
            sent = message("Replies.Any")
            await broker.send_reply(replies.address, sent)
            async with asyncio.timeout(PATIENCE):
                while not (got := await replies.receive(1.0)):
                    pass
            assert [m.id for m in got] == [sent.id]
        finally:
            await replies.close()


async def test_a_message_nobody_binds_is_kept_in_the_unrouted_queue(topology: Topology) -> None:
    async with topology.broker() as broker:
        sent = message(event_name())
        await broker.publish([sent])  # accepted: the broker stored it

        async with await aio_pika.connect(SERVER) as connection:
            channel = await connection.channel()
            queue = await channel.declare_queue(broker.unrouted, passive=True)
            kept = await queue.get(timeout=5)
            assert kept is not None
            assert (kept.message_id, kept.routing_key, kept.body) == (sent.id, sent.name, sent.body)
            await kept.ack()


async def test_with_the_abp_profile_a_message_nobody_binds_fails_to_publish(topology: Topology) -> None:
    async with topology.broker("profile=abp") as broker:
        name, subscriber = event_name(), subscriber_name()
        await broker.bind(subscriber, name)
        bound, unbound = message(name), message(event_name())

        with pytest.raises(PublishFailed, match=r"1 of 2 refused.*no queue is bound") as refused:
            await broker.publish([bound, unbound])

        # It says which came back: the batch's other message went out.
        assert refused.value.refused is not None
        assert list(refused.value.refused) == [1]
        assert [d.message for d in await collect(broker, subscriber, 1)] == [bound]


class Watched(Event, name="RabbitMQTests.Watched"):
    n: int


class Unwatched(Event, name="RabbitMQTests.Unwatched"):
    n: int


async def test_the_relay_sends_again_only_the_message_rabbitmq_returned(topology: Topology) -> None:
    """ABP's consumers keep no inbox: a confirmed row sent twice is a duplicate effect there."""
    async with topology.broker("profile=abp") as broker:
        watcher = subscriber_name()
        await broker.bind(watcher, Watched.__event_name__)
        async with DistributedEventBus(subscriber_name(), broker=broker, settings=FAST) as bus:
            async with bus.unit_of_work():  # one batch: nobody binds its second message
                for event in (Watched(n=1), Unwatched(n=2), Watched(n=3)):
                    await bus.publish(event)
            copies = await collect(broker, watcher, 2)
            assert sorted(json.loads(d.message.body)["n"] for d in copies) == [1, 3]
            assert await nothing_for(broker, watcher)  # once each, on the wire
            assert (await bus.store.outbox_backlog())[0] == 1  # deferred, and sent once something binds it

            await broker.bind(watcher, Unwatched.__event_name__)
            late = await collect(broker, watcher, 1)
            assert [json.loads(d.message.body)["n"] for d in late] == [2]
            assert await nothing_for(broker, watcher)


# --- retry queues -----------------------------------------------------------------------------------------


async def test_a_short_retry_delay_is_not_held_up_behind_a_long_one(topology: Topology) -> None:
    async with topology.broker("retry_delays=0.2,5") as broker:
        name, subscriber = event_name(), subscriber_name()
        await broker.bind(subscriber, name)
        slow, quick = message(name), message(name)
        await broker.publish([slow, quick])
        first, second = await collect(broker, subscriber, 2, ack=False)

        await broker.retry(first, 3.0)  # waits in the 5 s retry queue
        await broker.retry(second, 0.1)  # waits in the 0.2 s one

        [again] = await collect(broker, subscriber, 1)
        assert (again.message, again.attempt) == (quick, 2)
        assert await broker.pending_count(subscriber) == 1  # the slow one, in its retry queue


async def test_a_retry_longer_than_the_longest_delay_goes_round_until_due(topology: Topology) -> None:
    async with topology.broker("retry_delays=0.1,0.2") as broker:
        name, subscriber = event_name(), subscriber_name()
        await broker.bind(subscriber, name)
        sent = Message(new_message_id(), name, b"{}", {"x-custom": "kept"}, key="k-1")
        await broker.publish([sent])
        [delivery] = await collect(broker, subscriber, 1, ack=False)
        loop = asyncio.get_running_loop()

        retried_at = loop.time()
        await broker.retry(delivery, 0.7)
        [again] = await collect(broker, subscriber, 1)

        assert loop.time() - retried_at >= 0.7 - 0.01
        assert (again.message, again.attempt) == (sent, 2)


async def test_services_with_classic_and_quorum_queues_share_one_exchange(topology: Topology) -> None:
    exchange, name, replicated, plain = exchange_name(), event_name(), subscriber_name(), subscriber_name()
    async with (
        topology.broker("queue_type=quorum", exchange=exchange) as quorum,
        topology.broker(exchange=exchange) as classic,  # declares the same exchange and unrouted queue
    ):
        await quorum.bind(replicated, name)
        await classic.bind(plain, name)
        sent = message(name)
        await classic.publish([sent])

        assert [d.message for d in await collect(quorum, replicated, 1)] == [sent]
        assert [d.message for d in await collect(classic, plain, 1)] == [sent]


# --- order across instances -------------------------------------------------------------------------------


async def test_with_a_single_active_consumer_one_instance_gets_a_keys_messages_in_order(
    topology: Topology,
) -> None:
    exchange, name, subscriber = exchange_name(), event_name(), subscriber_name()
    options = "single_active_consumer=1"
    async with (
        topology.broker(options, exchange=exchange) as first,
        topology.broker(options, exchange=exchange) as second,
    ):
        await first.bind(subscriber, name)
        assert await first.fetch(subscriber, 10, 0.1) == []  # first to consume: the active one
        assert await second.fetch(subscriber, 10, 0.1) == []  # consuming too, standing by
        messages = [
            Message(new_message_id(), name, f'{{"n": {n}}}'.encode(), key="order-7") for n in range(10)
        ]
        await first.publish(messages)

        assert [d.message for d in await collect(first, subscriber, 10, max_count=3)] == messages
        assert await nothing_for(second, subscriber)

        await first.close()  # the active instance goes: the one standing by takes over
        later = message(name)
        await second.publish([later])
        assert [d.message for d in await collect(second, subscriber, 1)] == [later]


# --- outages, through a fault proxy ------------------------------------------------------------------------


async def test_after_a_reset_it_reconnects_and_no_confirmed_message_is_lost(topology: Topology) -> None:
    async with FaultProxy(PORT) as proxy:
        server = f"amqp://guest:guest@127.0.0.1:{proxy.port}/"
        async with topology.broker(server=server) as broker:
            name, subscriber = event_name(), subscriber_name()
            await broker.bind(subscriber, name)
            first = message(name)
            await broker.publish([first])
            [leased] = await collect(broker, subscriber, 1, ack=False)
            confirmed = [first]

            async def keep_publishing() -> None:
                for n in range(40):
                    batch = [message(name, f'{{"n": {n}, "i": {i}}}'.encode()) for i in range(5)]
                    with contextlib.suppress(BrokerUnavailable):  # not confirmed: the relay keeps its rows
                        await broker.publish(batch)
                        confirmed.extend(batch)
                    await asyncio.sleep(0.01)

            publishing = asyncio.create_task(keep_publishing())
            await asyncio.sleep(0.1)
            proxy.reset()
            await publishing
            await publish_when_back(broker, [last := message(name)])
            confirmed.append(last)

            with pytest.raises(BrokerUnavailable):  # its lease went with the connection
                await broker.ack(leased)
            got = await receive(broker, subscriber, {m.id for m in confirmed})

        assert {m.id for m in confirmed} <= {d.message.id for d in got}, "a confirmed message was lost"
        [again] = [d for d in got if d.message.id == first.id]
        assert again.attempt == 2, "a lease lost with its connection counts as an attempt"
        assert proxy.connections >= 2


async def test_a_publish_just_after_a_reset_is_unavailable_not_refused(topology: Topology) -> None:
    # aiormq closes a reset connection some event-loop rounds before aio-pika calls back and the supervisor
    # forgets it. A publish in between opened a channel on the dead connection and got PublishFailed (a
    # refusal, which the relay defers row by row): the flake of the test above. One publish starts at each
    # round here.
    async with FaultProxy(PORT) as proxy:
        server = f"amqp://guest:guest@127.0.0.1:{proxy.port}/"
        async with topology.broker(server=server) as broker:
            name = event_name()
            await broker.bind(subscriber_name(), name)
            await broker.publish([message(name)])

            async def publish_after(rounds: int) -> None:
                for _ in range(rounds):
                    await asyncio.sleep(0)
                await broker.publish([message(name)])

            proxy.reset()
            outcomes = await asyncio.gather(*(publish_after(n) for n in range(40)), return_exceptions=True)

    # None: published once reconnected (a slow machine); anything else but BrokerUnavailable is a refusal.
    assert [o for o in outcomes if o is not None and not isinstance(o, BrokerUnavailable)] == []


async def test_consuming_resumes_after_a_stall_longer_than_the_heartbeat(topology: Topology) -> None:
    async with FaultProxy(PORT) as proxy:
        server = f"amqp://guest:guest@127.0.0.1:{proxy.port}/"
        async with topology.broker("heartbeat=1", server=server) as broker:
            name, subscriber = event_name(), subscriber_name()
            await broker.bind(subscriber, name)
            before, after = message(name), message(name)
            await broker.publish([before])
            assert [d.message for d in await receive(broker, subscriber, {before.id})] == [before]
            fetching = asyncio.create_task(receive(broker, subscriber, {after.id}))

            proxy.stall()
            await asyncio.sleep(3.0)
            proxy.resume()

            await publish_when_back(broker, [after])
            got = await fetching

        assert after.id in {d.message.id for d in got}
        # An ack sent just before the stall may have been lost with the connection: `before` may come again.
        assert {d.message.id for d in got} <= {before.id, after.id}
        assert proxy.connections >= 2


# --- the ABP wire profile ----------------------------------------------------------------------------------


class ProductPriceChangedEto(Event, name="BookStore.Products.ProductPriceChanged"):
    """The guide's event: no alias of its own, `profile=abp` gives it ABP's JSON names (camelCase)."""

    product_id: UUID
    product_name: str
    old_price: Decimal
    new_price: Decimal


async def test_a_python_service_handles_what_an_abp_service_publishes(topology: Topology) -> None:
    exchange, service = exchange_name(), f"BookStore_OrderService_{uuid.uuid4().hex[:8]}"
    handled: list[tuple[ProductPriceChangedEto, Context]] = []

    async def apply_discount(event: ProductPriceChangedEto, context: Context) -> None:
        handled.append((event, context))

    async with (
        topology.broker("profile=abp", exchange=exchange) as broker,
        DistributedEventBus(service, broker=broker) as orders,
    ):
        await orders.subscribe(apply_discount)
        message_id, correlation_id = uuid.uuid4(), uuid.uuid4().hex
        body = (
            b'{"productId":"3fa85f64-5717-4562-b3fc-2c963f66afa6","productName":"Dune",'
            b'"oldPrice":20.00,"newPrice":15.50}'
        )  # Utf8JsonRabbitMqSerializer: UTF-8 System.Text.Json, camelCase, not indented
        properties = spec.Basic.Properties(
            delivery_mode=2, message_id=message_id.hex, correlation_id=correlation_id
        )  # exactly the three ABP sets
        await publish_as_abp(SERVER, exchange, "BookStore.Products.ProductPriceChanged", body, properties)
        await wait_until_idle(orders, timeout=PATIENCE)

    [(event, context)] = handled
    assert event == ProductPriceChangedEto(
        product_id=UUID("3fa85f64-5717-4562-b3fc-2c963f66afa6"),
        product_name="Dune",
        old_price=Decimal("20.00"),
        new_price=Decimal("15.50"),
    )
    assert (context.message_id, context.correlation_id, context.attempt) == (
        message_id.hex,
        correlation_id,
        1,
    )
    assert context.event_name == "BookStore.Products.ProductPriceChanged"


async def test_an_abp_service_can_handle_what_a_python_service_publishes(
    topology: Topology, sqlite_url: str
) -> None:
    exchange, abp_queue = exchange_name(), f"BookStore_AbpService_{uuid.uuid4().hex[:8]}"
    topology.queues.add(abp_queue)
    product_id = uuid.uuid4()

    async with (
        topology.broker("profile=abp", exchange=exchange) as broker,
        DistributedEventBus("BookStore_ProductService", broker=broker, database=sqlite_url) as products,
        await aio_pika.connect(SERVER) as connection,
    ):
        name = "BookStore.Products.ProductPriceChanged"
        queue = await declare_as_abp_consumer(connection, exchange, abp_queue, name)

        sent_id = await products.publish(  # through the outbox and the relay
            ProductPriceChangedEto(
                product_id=product_id,
                product_name="Dune",
                old_price=Decimal("20.00"),
                new_price=Decimal("15.50"),
            )
        )
        await wait_until_idle(products, timeout=PATIENCE)
        received = await queue.get(timeout=5)
        assert received is not None
        await received.ack()

    assert received.routing_key == "BookStore.Products.ProductPriceChanged"  # ABP: the event name
    assert received.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert received.message_id == sent_id == UUID(hex=sent_id).hex  # ABP's inbox takes Guid "N"
    assert received.correlation_id == (received.headers or {})[CORRELATION_ID]
    assert json.loads(received.body, parse_float=Decimal) == {  # as System.Text.Json writes them
        "productId": str(product_id),
        "productName": "Dune",
        "oldPrice": Decimal("20.00"),  # a number, its scale kept
        "newPrice": Decimal("15.50"),
    }


# --- the bus on RabbitMQ: fan-out across services, competition between instances --------------------------


class OrderPlacedEto(Event, name="BookStore.Orders.OrderPlaced"):
    number: int


FAST = Settings(
    retry=RetryPolicy(initial_delay=0.01, max_delay=0.05),
    relay_poll_interval=0.05,
    fetch_timeout=0.2,
    shutdown_timeout=10.0,
)


async def test_every_service_gets_each_event_and_instances_of_one_service_share_them(
    topology: Topology, sqlite_url: str, tmp_path: Path
) -> None:
    exchange, suffix = exchange_name(), uuid.uuid4().hex[:8]
    orders_db = f"sqlite+aiosqlite:///{tmp_path}/orders.db"
    audit_db = f"sqlite+aiosqlite:///{tmp_path}/audit.db"
    order_instances: list[list[int]] = [[], []]
    audited: list[int] = []
    audit_attempts: dict[int, int] = {}

    async def audit_record(event: OrderPlacedEto, context: Context) -> None:
        # Fails once on every tenth event (a retry through a retry queue) and always on the last one.
        audit_attempts[event.number] = context.attempt
        if event.number == 29 or (event.number % 10 == 0 and context.attempt == 1):
            raise RuntimeError(f"audit store hiccup on {event.number}")
        audited.append(event.number)

    def recorder(into: list[int]) -> Callable[[OrderPlacedEto], Awaitable[None]]:
        async def record(event: OrderPlacedEto) -> None:
            into.append(event.number)
            await asyncio.sleep(0.01)

        return record

    async with contextlib.AsyncExitStack() as stack:

        async def bus(service: str, database: str) -> DistributedEventBus:
            broker = await stack.enter_async_context(topology.broker("prefetch=1", exchange=exchange))
            return await stack.enter_async_context(
                DistributedEventBus(service, broker=broker, database=database, settings=FAST)
            )

        products = await bus(f"ProductService_{suffix}", sqlite_url)
        orders = [await bus(f"OrderService_{suffix}", orders_db) for _ in order_instances]
        audit = await bus(f"AuditService_{suffix}", audit_db)
        for instance, seen in zip(orders, order_instances, strict=True):
            await instance.subscribe(recorder(seen))
        await audit.subscribe(audit_record)

        async with products.unit_of_work():
            for number in range(30):
                await products.publish(OrderPlacedEto(number=number))
        await wait_until_idle(products, *orders, audit, timeout=PATIENCE)
        [letter] = await audit.dead_letters()

    assert sorted(audited) == list(range(29))
    assert {n: a for n, a in audit_attempts.items() if a > 1} == {0: 2, 10: 2, 20: 2, 29: 5}
    assert (letter.message.name, letter.attempts) == ("BookStore.Orders.OrderPlaced", 5)
    assert "audit store hiccup on 29" in letter.reason
    assert sorted(order_instances[0] + order_instances[1]) == list(range(30)), "lost or handled twice"
    assert order_instances[0], "the other instance took everything"
    assert order_instances[1], "the other instance took everything"


# --- a message whose properties cannot be decoded ----------------------------------------------------------

# RabbitMQ takes each from a publisher (it does not decode properties it does not route on); pamqp cannot
# decode them, and before issue 15 each one closed the connection at every delivery: the next never came.
UNDECODABLE = {
    "headers nested 3,000 deep": {"headers": nested_table(3000), "message_id": short_string(b"deep-headers")},
    "message id not UTF-8": {"message_id": short_string(b"\xff\xfe")},
    "timestamp past the year 9999": {
        "timestamp": struct.pack(">Q", 2**63 - 1),
        "message_id": short_string(b"ts"),
    },
}


@pytest.mark.parametrize("options", ["", "queue_type=quorum&retry_delays=0.2"], ids=["classic", "quorum"])
async def test_a_message_whose_properties_cannot_be_decoded_is_dead_lettered_and_the_next_is_handled(
    topology: Topology, sqlite_url: str, caplog: pytest.LogCaptureFixture, options: str
) -> None:
    handled: list[int] = []

    async def record(event: OrderPlacedEto) -> None:
        handled.append(event.number)

    async with (
        topology.broker(options) as broker,
        DistributedEventBus(subscriber_name(), broker=broker, database=sqlite_url, settings=FAST) as bus,
    ):
        await bus.subscribe(record)
        name = "BookStore.Orders.OrderPlaced"
        for properties in UNDECODABLE.values():
            await publish_raw(PORT, broker.exchange, name, properties, b'{"number": 1}')
        await publish_when_back(broker, [Message(new_message_id(), name, b'{"number": 2}')])
        async with asyncio.timeout(PATIENCE):
            while True:
                if handled and len(letters := await bus.dead_letters()) == len(UNDECODABLE):
                    break
                await asyncio.sleep(0.05)
        await wait_until_idle(bus, timeout=PATIENCE)
        assert await broker.pending_count(bus.service) == 0  # acked, not coming again

    assert handled == [2]  # the one after them; they were never handled
    assert "Lost the connection" not in caplog.text  # the connection held
    assert [(letter.message.name, letter.message.body) for letter in letters] == [
        (name, b'{"number": 1}')
    ] * 3
    deep, not_utf8, late = (letter.reason for letter in letters)
    dropped = "cannot decode: AMQP properties that cannot be decoded were dropped: "
    assert (letters[0].message.id, deep) == ("deep-headers", f"{dropped}headers (nested too deeply)")
    assert not_utf8.startswith(f"{dropped}message_id (UnicodeDecodeError: ")
    assert letters[2].message.id == "ts"
    assert late.startswith(f"{dropped}timestamp (ValueError: ")


def test_near_the_recursion_limit_the_guard_decodes_headers_or_drops_them_never_raises() -> None:
    # pamqp recurses twice per level: where it fails depends on how deep the stack already is, and the guard
    # decodes again from a shallower one. At every depth around the limit the frame must come out decoded.
    assert amqp_guard.install()
    limit = sys.getrecursionlimit() // 2
    outcomes = set()
    for depth in range(limit - 40, limit + 10):
        properties = {"headers": nested_table(depth), "message_id": short_string(b"m")}
        _, channel, frame = pamqp.frame.unmarshal(content_header(3, 2, properties))
        assert isinstance(frame, ContentHeader), depth
        assert (channel, frame.body_size, frame.properties.message_id) == (3, 2, "m")
        headers = frame.properties.headers
        outcomes.add(type(headers))
        if isinstance(headers, amqp_guard.UndecodableHeaders):
            assert (dict(headers), headers.reason) == ({}, amqp_guard.REASON + "headers (nested too deeply)")
    assert outcomes == {dict, amqp_guard.UndecodableHeaders}  # both sides of the limit were tried
