"""The broker contract on Redis Streams, and what is Redis-only: leases a live consumer keeps, retries that
stay with their subscriber, bounded queues, order, what survives a reset through the fault proxy, and the
order of a key through a bus.

Every test works under a key prefix of its own and deletes its keys afterwards; the shared server is never
stopped or reconfigured (an outage is the fault proxy's, a lost dataset is this test's keys deleted).
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlencode

import pytest
from redis.asyncio import Redis

from eventrelay import Context, DistributedEventBus, Event
from eventrelay.brokers import broker_from_url
from eventrelay.brokers.base import Broker
from eventrelay.brokers.redis import RedisBroker
from eventrelay.envelope import Message, new_message_id
from eventrelay.errors import BrokerUnavailable, ConfigurationError, PublishFailed
from eventrelay.testing import wait_until_idle
from tests.brokers.contract import (
    PATIENCE,
    BrokerContract,
    MakeBroker,
    collect,
    event_name,
    message,
    nothing_for,
    subscriber_name,
)
from tests.brokers.contract_replies import ReplyContract
from tests.bus.helpers import settings
from tests.faultproxy import FaultProxy
from tests.servers import require_server

pytestmark = pytest.mark.redis

HOST = "127.0.0.1"
PORT = 6379


def redis_url(prefix: str, port: int = PORT, **options: object) -> str:
    return f"redis://{HOST}:{port}/0?{urlencode({'prefix': prefix, **options})}"


@asynccontextmanager
async def redis_client() -> AsyncIterator[Redis]:
    """A plain client of the test's own, to look at (or delete) the test's keys."""
    client = Redis(host=HOST, port=PORT)
    try:
        yield client
    finally:
        await client.aclose()


async def delete_keys(prefix: str) -> None:
    async with redis_client() as client:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=1000)]
        if keys:
            await client.delete(*keys)


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    """A key prefix of the test's own; its keys are deleted afterwards."""
    require_server("Redis", PORT, HOST)
    prefix = f"eventrelay-test:{uuid.uuid4().hex[:12]}:"
    try:
        yield prefix
    finally:
        await delete_keys(prefix)


class TestRedisBroker(BrokerContract, ReplyContract):
    unreachable_urls = ("redis://someone:secret@127.0.0.1:9/0",)
    server_port = PORT
    short_lease = "visibility_timeout=0.3"

    @pytest.fixture
    def make_broker(self, prefix: str) -> MakeBroker:
        def make(options: str = "", *, port: int | None = None) -> RedisBroker:
            url = redis_url(prefix, port or PORT, poll=0.2)
            return RedisBroker(f"{url}&{options}" if options else url)

        return make

    async def reply_channel_exists(self, broker: Broker, address: str) -> bool:
        async with redis_client() as client:
            [(_, subscribers)] = await client.pubsub_numsub(address)
        return bool(subscribers)


# --- configuration and errors ---------------------------------------------------------------------------


async def test_replies_go_only_to_reply_channels_under_the_prefix(prefix: str) -> None:
    async with RedisBroker(redis_url(prefix)) as broker:
        for address in ("other:replies:x", f"{prefix}queue:Orders", "Orders"):
            with pytest.raises(PublishFailed, match="Not a Redis reply channel"):
                await broker.send_reply(address, Message(new_message_id(), "Orders", b"{}"))
        replies = await broker.open_replies("x")
        await replies.close()
        await broker.send_reply(replies.address, Message(new_message_id(), "Orders", b"{}"))  # gone: dropped
    async with redis_client() as client:
        assert [key async for key in client.scan_iter(match=f"{prefix}*")] == [], "a reply leaves no key"


def test_urls_choose_the_redis_broker_and_its_options() -> None:
    broker = broker_from_url(
        "redis://127.0.0.1:6379/0?prefix=shop:&visibility_timeout=5&maxlen=1000&poll=0.5"
    )
    assert isinstance(broker, RedisBroker)
    assert (broker.prefix, broker.visibility_timeout, broker.maxlen, broker.poll) == ("shop:", 5.0, 1000, 0.5)
    assert broker.url == "redis://127.0.0.1:6379/0"  # our options do not reach redis-py
    assert isinstance(broker_from_url("rediss://127.0.0.1:6380/0"), RedisBroker)
    with pytest.raises(ConfigurationError, match="visibility_timeout takes a number above 0"):
        RedisBroker("redis://127.0.0.1/0?visibility_timeout=soon")
    with pytest.raises(ConfigurationError, match="maxlen takes a whole number of 0 or more"):
        RedisBroker("redis://127.0.0.1/0?maxlen=-1")


def test_an_unknown_url_option_is_refused_when_the_broker_is_made() -> None:
    with pytest.raises(ConfigurationError, match=r"'visiblity_timeout'.*Did you mean 'visibility_timeout'"):
        RedisBroker("redis://127.0.0.1:9/0?visiblity_timeout=3")
    with pytest.raises(ConfigurationError, match=r"'ssl_ca_certs'.*ssl_\* options need rediss://"):
        RedisBroker("redis://127.0.0.1:9/0?ssl_ca_certs=/ca.pem")
    assert RedisBroker("rediss://127.0.0.1:9/0?ssl_ca_certs=/ca.pem&socket_timeout=2").url.endswith(
        "?ssl_ca_certs=%2Fca.pem&socket_timeout=2"
    )  # redis-py's own options reach it


async def test_a_refused_password_is_not_repeated(prefix: str) -> None:
    broker = RedisBroker(f"redis://nobody:secret@{HOST}:{PORT}/0?prefix={prefix}")
    with pytest.raises(BrokerUnavailable) as caught:
        await broker.start()
    assert "secret" not in str(caught.value)
    await broker.close()


# --- topology and order ---------------------------------------------------------------------------------


async def test_a_subscriber_gets_only_what_was_published_after_it_bound(prefix: str) -> None:
    name, subscriber = event_name(), subscriber_name()
    async with RedisBroker(redis_url(prefix, poll=0.2)) as broker:
        await broker.bind(subscriber, event_name())  # its queue exists, but not bound to `name` yet
        await broker.publish([message(name)])
        await broker.bind(subscriber, name)
        later = message(name)
        await broker.publish([later])

        assert [d.message for d in await collect(broker, subscriber, 1)] == [later]
        assert await nothing_for(broker, subscriber)


async def test_more_concurrent_publishes_than_connections_wait_for_one(prefix: str) -> None:
    """redis-py's default pool fails past its 100 connections; a burst of publishes must wait instead."""
    name, subscriber = event_name(), subscriber_name()
    async with RedisBroker(redis_url(prefix, poll=0.2, max_connections=4)) as broker:
        await broker.bind(subscriber, name)
        sent = [message(name) for _ in range(200)]
        await asyncio.gather(*(broker.publish([m]) for m in sent))
        got = await collect(broker, subscriber, len(sent), max_count=100)
    assert sorted(d.message.id for d in got) == sorted(m.id for m in sent)


async def test_one_subscriber_gets_every_name_in_publish_order_with_keys(prefix: str) -> None:
    # What the per-key order of one instance rests on: one queue per subscriber, in publish order.
    names, subscriber = [event_name() for _ in range(3)], subscriber_name()
    async with RedisBroker(redis_url(prefix, poll=0.2)) as broker:
        for name in names:
            await broker.bind(subscriber, name)
        sent = [Message(new_message_id(), names[n % 3], b"{}", key=f"customer-{n % 2}") for n in range(30)]
        await broker.publish(sent[:10])
        for one in sent[10:]:
            await broker.publish([one])

        got = await collect(broker, subscriber, len(sent), max_count=4)

    assert [d.message for d in got] == sent


async def test_released_messages_come_back_before_newer_ones_in_their_order(prefix: str) -> None:
    name, subscriber = event_name(), subscriber_name()
    first = [message(name, f'{{"n": {n}}}'.encode()) for n in range(5)]
    later = [message(name) for _ in range(2)]
    async with RedisBroker(redis_url(prefix, poll=0.2)) as stopping:
        await stopping.bind(subscriber, name)
        await stopping.publish(first)
        taken = await collect(stopping, subscriber, 5, ack=False)
        for delivery in reversed(taken):  # the consumer gives back the last first
            await stopping.release(delivery)
        await stopping.publish(later)
    async with RedisBroker(redis_url(prefix, poll=0.2)) as starting:
        got = await collect(starting, subscriber, 7, max_count=3)

    assert [d.message for d in got] == first + later
    assert {d.attempt for d in got} == {1}


# --- leases ---------------------------------------------------------------------------------------------


async def test_a_live_consumer_keeps_what_it_holds_past_the_visibility_timeout(prefix: str) -> None:
    name, subscriber = event_name(), subscriber_name()
    url = redis_url(prefix, visibility_timeout=0.3, poll=0.1)
    async with RedisBroker(url) as slow, RedisBroker(url) as other:
        await slow.bind(subscriber, name)
        await slow.publish([message(name)])
        [held] = await collect(slow, subscriber, 1, ack=False)

        assert await other.fetch(subscriber, 10, 1.2) == [], "a renewed lease was reclaimed"

        await slow.ack(held)
        assert await nothing_for(other, subscriber)
        assert await other.pending_count(subscriber) == 0


async def test_what_a_cancelled_read_left_pending_is_given_back_at_close(prefix: str) -> None:
    name, subscriber = event_name(), subscriber_name()
    async with RedisBroker(redis_url(prefix, poll=0.2)) as broker:
        await broker.bind(subscriber, name)
        sent = message(name)
        await broker.publish([sent])
        # A read whose reply never reached the adapter (its fetch was cancelled): pending, never handed out.
        queue = f"{prefix}queue:{subscriber}"
        async with redis_client() as client:
            await client.xreadgroup(subscriber, broker._consumer, {queue: ">"}, count=10)
        assert await broker.fetch(subscriber, 10, 0.1) == []
    async with RedisBroker(redis_url(prefix, poll=0.2)) as other:
        [again] = await collect(other, subscriber, 1)
    assert again.message == sent
    assert again.attempt == 1  # it never reached a handler: no attempt counted


# --- retries, counting, trimming ------------------------------------------------------------------------


async def test_a_retry_stays_with_the_subscriber_that_asked_for_it(prefix: str) -> None:
    name, orders, audit = event_name(), subscriber_name(), subscriber_name()
    async with RedisBroker(redis_url(prefix, poll=0.1)) as broker:
        await broker.bind(orders, name)
        await broker.bind(audit, name)
        sent = message(name)
        await broker.publish([sent])
        [audited] = await collect(broker, audit, 1)
        [failed] = await collect(broker, orders, 1, ack=False)

        await broker.retry(failed, 0.3)
        assert await broker.pending_count(orders) == 1  # waiting in its delayed set
        assert await broker.pending_count(audit) == 0

        [again] = await collect(broker, orders, 1, ack=False)
        assert (again.message, again.attempt) == (sent, 2)
        await broker.retry(again, 0.0)  # no delay: straight back into its own queue
        [third] = await collect(broker, orders, 1)
        assert (third.message, third.attempt) == (sent, 3)
        assert await nothing_for(broker, audit), "a retry reached another subscriber"
        assert audited.attempt == 1
        assert await broker.pending_count(orders) == 0


async def test_pending_count_is_queued_plus_leased_plus_delayed(prefix: str) -> None:
    name, subscriber = event_name(), subscriber_name()
    async with RedisBroker(redis_url(prefix, poll=0.1)) as broker:
        await broker.bind(subscriber, name)
        await broker.publish([message(name) for _ in range(4)])
        assert await broker.pending_count(subscriber) == 4
        leased = await collect(broker, subscriber, 2, max_count=1, ack=False)
        assert await broker.pending_count(subscriber) == 4
        await broker.retry(leased[0], 30.0)
        await broker.ack(leased[1])
        assert await broker.pending_count(subscriber) == 3  # 2 queued, 1 delayed
        assert await broker.pending_count(subscriber_name()) == 0


async def test_acked_messages_leave_the_queue_so_memory_stays_bounded(prefix: str) -> None:
    name, subscriber = event_name(), subscriber_name()
    queue = f"{prefix}queue:{subscriber}"
    async with RedisBroker(redis_url(prefix, poll=0.1)) as broker:
        await broker.bind(subscriber, name)
        usage: list[int] = []
        for _ in range(4):  # 4 x 500 KiB of bodies pass through
            await broker.publish([message(name, b"x" * 1024) for _ in range(500)])
            assert len(await collect(broker, subscriber, 500, max_count=100)) == 500
            async with redis_client() as client:
                assert await client.xlen(queue) == 0
                usage.append(await client.memory_usage(queue) or 0)
    assert max(usage) < 16 * 1024, usage


async def test_maxlen_caps_a_queue_nobody_reads_keeping_the_newest(prefix: str) -> None:
    name, subscriber = event_name(), subscriber_name()
    async with RedisBroker(redis_url(prefix, poll=0.1, maxlen=100)) as broker:
        await broker.bind(subscriber, name)
        sent = [message(name) for _ in range(1000)]
        for start in range(0, len(sent), 50):
            await broker.publish(sent[start : start + 50])

        async with redis_client() as client:
            length = await client.xlen(f"{prefix}queue:{subscriber}")
        assert 100 <= length <= 200  # trimmed by whole nodes (MAXLEN ~), never below the cap
        got = await collect(broker, subscriber, length, max_count=100)
    assert [d.message for d in got] == sent[-length:]


# --- outages --------------------------------------------------------------------------------------------


async def test_a_waiting_fetch_and_a_held_lease_survive_a_reset(prefix: str) -> None:
    name, subscriber = event_name(), subscriber_name()
    async with FaultProxy(PORT) as proxy, RedisBroker(redis_url(prefix, proxy.port, poll=2)) as broker:
        await broker.bind(subscriber, name)
        await broker.publish([message(name)])
        [held] = await collect(broker, subscriber, 1, ack=False)
        fetching = asyncio.create_task(broker.fetch(subscriber, 10, PATIENCE))
        await asyncio.sleep(0.3)  # blocked in XREADGROUP by now
        proxy.reset()
        await asyncio.sleep(0.3)
        sent = message(name)
        await broker.publish([sent])  # redis-py connects again for the next command: no BrokerUnavailable
        async with asyncio.timeout(PATIENCE):
            got = await fetching
        assert [d.message for d in got] == [sent]
        await broker.ack(got[0])
        await broker.ack(held)  # the lease is the server's: it survived the reset
        assert await broker.pending_count(subscriber) == 0


async def test_a_lost_queue_is_recreated_with_its_bindings(prefix: str) -> None:
    name, subscriber = event_name(), subscriber_name()
    async with RedisBroker(redis_url(prefix, poll=0.1)) as broker:
        await broker.bind(subscriber, name)
        await broker.publish([message(name)])
        assert len(await collect(broker, subscriber, 1)) == 1

        await delete_keys(prefix)  # as after a restart of a Redis that keeps nothing on disk
        assert await broker.fetch(subscriber, 10, 0.2) == []

        sent = message(name)
        await broker.publish([sent])
        assert [d.message for d in await collect(broker, subscriber, 1)] == [sent]


# --- the bus on Redis: the order of a key ---------------------------------------------------------------


class PriceChanged(Event, name="RedisBrokerTests.PriceChanged"):
    product_id: int


async def test_one_instance_handles_each_key_in_publish_order(prefix: str, sqlite_url: str) -> None:
    # The per-key order this adapter offers: one instance per service (see the module docstring).
    handled: dict[str, list[int]] = {"a": [], "b": []}
    failed_once: set[int] = set()

    async def record(event: PriceChanged, context: Context) -> None:
        await asyncio.sleep(random.random() / 500)  # unordered handlers would overtake each other here
        if event.product_id % 7 == 3 and event.product_id not in failed_once:
            failed_once.add(event.product_id)
            raise RuntimeError("a retry must not let the next event of the key overtake")
        assert context.key is not None
        handled[context.key].append(event.product_id)

    url = redis_url(prefix, poll=0.2)
    bus = DistributedEventBus("Orders", broker=url, database=sqlite_url, settings=settings(max_in_flight=20))
    await bus.subscribe(record)
    async with bus:
        for product_id in range(40):
            await bus.publish(PriceChanged(product_id=product_id), key="a" if product_id % 3 else "b")
        await wait_until_idle(bus, timeout=20)

    assert handled["a"] == [n for n in range(40) if n % 3]
    assert handled["b"] == [n for n in range(40) if not n % 3]
    assert failed_once
