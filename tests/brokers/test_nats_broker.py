"""The broker contract on NATS JetStream, and what is NATS-only: subjects, leases, drains, outages, order.

Every test has a stream and subject prefix of its own, deleted afterwards; the shared server is never
stopped or reconfigured. Outages go through our TCP fault proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import uuid
from collections.abc import AsyncIterator

import nats
import nats.errors
import nats.js.errors
import pytest

from eventrelay.brokers import broker_from_url
from eventrelay.brokers.base import Broker
from eventrelay.brokers.nats import NatsBroker, consumer_info, durable, subject_token
from eventrelay.envelope import Message, new_message_id
from eventrelay.errors import BrokerUnavailable, ConfigurationError, PublishFailed
from tests.brokers.contract import (
    PATIENCE,
    QUIET,
    BrokerContract,
    MakeBroker,
    collect,
    message,
    nothing_for,
    publish_when_back,
    receive,
    subscriber_name,
)
from tests.brokers.contract_replies import ReplyContract
from tests.faultproxy import FaultProxy
from tests.servers import require_server

pytestmark = pytest.mark.nats

PORT = 4222


@pytest.fixture
async def nats_url() -> AsyncIterator[str]:
    """The URL of a stream and subject prefix of this test's own; the stream is deleted afterwards."""
    require_server("NATS", PORT)
    stream = f"er_{uuid.uuid4().hex[:12]}"
    yield f"nats://127.0.0.1:{PORT}?stream={stream}&prefix=t.{stream}"
    client = await nats.connect(f"nats://127.0.0.1:{PORT}")
    try:
        with contextlib.suppress(nats.js.errors.NotFoundError):  # a test that failed early made none
            await client.jetstream().delete_stream(stream)
    finally:
        await client.close()


def _with(url: str, **options: object) -> str:
    return url + "".join(f"&{name}={value}" for name, value in options.items())


async def _stream_info(broker: NatsBroker) -> nats.js.api.StreamInfo:
    """What the server says about the broker's stream, asked on a connection of the test's own."""
    client = await nats.connect(f"nats://127.0.0.1:{PORT}")
    try:
        return await client.jetstream().stream_info(broker.stream)
    finally:
        await client.close()


async def _until_the_stream_holds(broker: NatsBroker, count: int) -> None:
    """Wait until the stream holds `count` messages. An ack is a message to the server that nothing answers,
    so the stream lets an acked message go a moment after `ack` returned; one never let go fails the test."""
    client = await nats.connect(f"nats://127.0.0.1:{PORT}")
    held: int | None = None
    try:
        async with asyncio.timeout(PATIENCE):
            while True:
                held = (await client.jetstream().stream_info(broker.stream)).state.messages
                if held == count:
                    return
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"the stream holds {held} messages after {PATIENCE}s, not {count}") from None
    finally:
        await client.close()


async def _until_the_stream_is_empty(broker: NatsBroker) -> None:
    await _until_the_stream_holds(broker, 0)


class TestNatsBroker(BrokerContract, ReplyContract):
    # A durable consumer per (service, event name), fetched in turn: each name keeps its stream order, but
    # nothing orders one name's messages against another's.
    orders_across_names = False
    unreachable_urls = (  # a user and password, or a token
        "nats://someone:secret@127.0.0.1:9?connect_timeout=1",
        "nats://secret@127.0.0.1:9?connect_timeout=1",
    )
    server_port = PORT
    outage_log = "Lost the connection to NATS"
    short_lease = "ack_wait=1"

    @pytest.fixture
    def make_broker(self, nats_url: str) -> MakeBroker:
        def make(options: str = "", *, port: int | None = None) -> NatsBroker:
            url = nats_url.replace(f":{PORT}?", f":{port}?") if port else nats_url
            return NatsBroker(f"{url}&{options}" if options else url)

        return make

    async def reply_channel_exists(self, broker: Broker, address: str) -> bool:
        """Whether the server has a subscriber to `address`: a request to it finds none at once, or waits
        (the reply channel drops a message that answers no request of its process)."""
        client = await nats.connect(f"nats://127.0.0.1:{PORT}")
        try:
            await client.request(address, b"", timeout=QUIET)
        except nats.errors.NoRespondersError:
            return False
        except nats.errors.TimeoutError:
            return True
        finally:
            await client.close()
        raise AssertionError(f"{address} answered a request")


# --- configuration ---------------------------------------------------------------------------------


def test_urls_choose_the_nats_broker() -> None:
    broker = broker_from_url("tls://someone:secret@nats.example:4222?stream=shop&ack_wait=10")
    assert isinstance(broker, NatsBroker)
    assert (broker.stream, broker.prefix, broker.options["ack_wait"]) == ("shop", "shop", 10.0)
    assert "secret" not in broker.safe_url  # what its logs and errors name
    assert "secret" not in NatsBroker("nats://secret@127.0.0.1:4222").safe_url  # a token
    with pytest.raises(ConfigurationError, match="ack_wait takes a number above 0"):
        NatsBroker("nats://127.0.0.1:4222?ack_wait=soon")
    with pytest.raises(ConfigurationError, match=r"option 'ackwait'.*Did you mean 'ack_wait'"):
        NatsBroker("nats://127.0.0.1:4222?ackwait=3")
    with pytest.raises(ConfigurationError, match=r"prefix='shop\.\*' a subject"):
        NatsBroker("nats://127.0.0.1:4222?prefix=shop.*")


def test_event_names_map_to_subject_levels_reversibly() -> None:
    assert subject_token("Orders.OrderPlaced") == "Orders.OrderPlaced"
    assert subject_token("Prix réduit ✓") == "Prix%20r%C3%A9duit%20%E2%9C%93"
    assert subject_token("a..b") == "a%2E%2Eb"
    assert subject_token("a.*.>") == "a.%2A.%3E"
    assert subject_token("100%") == "100%25"
    assert durable("svc", "a.b") != durable("svc", "a b")  # same slug, told apart by the digest


async def test_replies_never_reach_the_stream(nats_url: str) -> None:
    with pytest.raises(ConfigurationError, match="is under _INBOX"):  # its stream would capture replies
        NatsBroker("nats://127.0.0.1:4222?prefix=_INBOX.shop")
    async with NatsBroker(nats_url) as broker:
        replies = await broker.open_replies("x")
        await replies.close()
        forged = [f"{broker.prefix}.Orders", "_INBOX.*", "_INBOX.>", f"{replies.address}.x", "Orders"]
        for address in forged:
            with pytest.raises(PublishFailed, match="Not a NATS reply subject"):
                await broker.send_reply(address, Message(new_message_id(), "Orders", b"{}"))
        await broker.send_reply(replies.address, Message(new_message_id(), "Orders", b"{}"))  # gone: dropped
        assert (await _stream_info(broker)).state.messages == 0


async def test_a_closed_broker_starts_again(nats_url: str) -> None:
    broker = NatsBroker(nats_url)
    async with broker:
        await broker.bind("svc", "e")
    async with broker:
        await broker.publish([sent := message("e")])
        assert [d.message for d in await collect(broker, "svc", 1)] == [sent]


async def test_a_round_trip_cancelled_half_way_leaves_the_client_sound(
    nats_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A fetch cancelled in its round trip (a consumer stopping): the PONG that comes later must not fail
    nats-py's read loop (it did, with InvalidStateError, when the PING's waiter had been cancelled)."""
    async with NatsBroker(nats_url) as broker:
        await broker.bind("svc", "e")
        for turns in range(3):  # cancelled before and after the PING went out
            for _ in range(10):
                trip = asyncio.create_task(broker._round_trip())
                for _ in range(turns):
                    await asyncio.sleep(0)
                trip.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await trip
        await broker._round_trip()  # the PONGs of the cancelled ones came before this one's
        await broker.publish([sent := message("e")])
        assert [d.message for d in await collect(broker, "svc", 1)] == [sent]
    errors = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert not errors, errors[0].getMessage()


# --- subjects, dedup, retention --------------------------------------------------------------------

NAMES = ["Orders.OrderPlaced", "Order Placed", "a..b", ".lead", "trail.", "*", ">", "a.*.b", "100%", "a%2Eb"]
NAMES += ["Prix réduit ✓ 🎉", "EntityUpdatedEto[UserEto]", "x" * 200]


async def test_event_names_with_dots_spaces_and_unicode_are_routed_apart(nats_url: str) -> None:
    async with NatsBroker(nats_url) as broker:
        subscribers = [subscriber_name() for _ in NAMES]
        for subscriber, name in zip(subscribers, NAMES, strict=True):
            await broker.bind(subscriber, name)
        sent = [message(name) for name in NAMES]
        await broker.publish(sent)

        for subscriber, one in zip(subscribers, sent, strict=True):
            assert [d.message for d in await collect(broker, subscriber, 1)] == [one]
        await _until_the_stream_is_empty(broker)  # every ack has been applied
        for subscriber in subscribers:
            assert await broker.pending_count(subscriber) == 0


async def test_a_resent_message_id_is_stored_once(nats_url: str) -> None:
    # The outbox sends a row again when it crashed after the broker confirmed it: JetStream drops the copy.
    async with NatsBroker(nats_url) as broker:
        subscriber, sent = subscriber_name(), message("e")
        await broker.bind(subscriber, "e")
        await broker.publish([sent])
        await broker.publish([sent, message("e")])

        got = await collect(broker, subscriber, 2)
        assert got[0].message.id == sent.id
        assert len({d.message.id for d in got}) == 2
        assert await nothing_for(broker, subscriber)


async def test_acked_and_unrouted_messages_leave_the_stream(nats_url: str) -> None:
    async with NatsBroker(nats_url) as broker:
        orders, audit = subscriber_name(), subscriber_name()
        await broker.bind(orders, "placed")
        await broker.bind(audit, "placed")
        await broker.publish([message("placed"), message("placed"), message("nobody.binds.this")])
        assert (await _stream_info(broker)).state.messages == 2

        await collect(broker, orders, 2)
        assert (await _stream_info(broker)).state.messages == 2  # audit has not acked yet
        await collect(broker, audit, 2)
        await _until_the_stream_is_empty(broker)
        assert await broker.pending_count(orders) == await broker.pending_count(audit) == 0


async def test_pending_count_covers_queued_leased_and_retrying(nats_url: str) -> None:
    async with NatsBroker(nats_url) as broker:
        subscriber = subscriber_name()
        await broker.bind(subscriber, "a")
        await broker.bind(subscriber, "b")
        await broker.publish([message("a"), message("b"), message("b")])
        assert await broker.pending_count(subscriber) == 3
        first, *_ = await collect(broker, subscriber, 1, max_count=1, ack=False)
        await broker.retry(first, 30.0)
        assert await broker.pending_count(subscriber) == 3
        assert len(await collect(broker, subscriber, 2)) == 2
        await _until_the_stream_holds(broker, 1)  # the acks of the two have been applied
        assert await broker.pending_count(subscriber) == 1  # the one waiting for its retry


async def test_headers_that_nats_would_alter_or_read_survive(nats_url: str) -> None:
    headers = {
        "Nats-Expected-Stream": "not-this-one",  # NATS would act on it
        "Eventrelay-Key": "not the key",  # nor is this the ordering key
        "Status": "404",
        " padded name ": "  padded value  ",
        "lines": "one\r\ntwo\nthree",
        "percent": "100% %41",
        "Zürich": "☃",
        "blank": "",
    }
    async with NatsBroker(nats_url) as broker:
        subscriber = subscriber_name()
        await broker.bind(subscriber, "e")
        sent = Message(new_message_id(), "e", b"{}", headers, key=" spaced key ")
        await broker.publish([sent])
        [got] = await collect(broker, subscriber, 1)
    assert got.message == sent


async def test_a_message_over_the_servers_limit_is_refused_and_the_batch_can_be_sent_again(
    nats_url: str,
) -> None:
    # What the relay does: a refused batch is sent again one by one; the copies JetStream already has
    # are dropped by their Nats-Msg-Id.
    async with NatsBroker(nats_url) as broker:
        await broker.bind("svc", "e")
        before, huge, after = (
            message("e"),
            Message(new_message_id(), "e", b"x" * (2 * 1024 * 1024)),
            message("e"),
        )
        with pytest.raises(PublishFailed):
            await broker.publish([before, huge, after])
        await broker.publish([before])
        await broker.publish([after])
        assert [d.message for d in await collect(broker, "svc", 2)] == [before, after]
        assert await nothing_for(broker, "svc")


async def test_an_existing_stream_is_used_when_it_routes_alike(nats_url: str) -> None:
    async with NatsBroker(_with(nats_url, max_age=60)) as first:
        await first.bind("svc", "e")
    async with NatsBroker(_with(nats_url, max_age=600)) as second:  # other limits: the stream is kept
        assert (await _stream_info(second)).config.max_age == 60
    other_prefix = nats_url.replace("&prefix=t.", "&prefix=u.")
    with pytest.raises(ConfigurationError, match="exists with subjects"):
        async with NatsBroker(other_prefix):
            pass


# --- unbind ----------------------------------------------------------------------------------------


async def _consumer_exists(broker: NatsBroker, subscriber: str, name: str) -> bool:
    client = await nats.connect(f"nats://127.0.0.1:{PORT}")
    try:
        return await consumer_info(client.jetstream(), broker.stream, durable(subscriber, name)) is not None
    finally:
        await client.close()


async def test_unbind_deletes_an_empty_consumer_at_once(nats_url: str) -> None:
    async with NatsBroker(nats_url) as broker:
        subscriber = subscriber_name()
        await broker.bind(subscriber, "e")
        assert await _consumer_exists(broker, subscriber, "e")
        await broker.unbind(subscriber, "e")
        assert not await _consumer_exists(broker, subscriber, "e")
        await broker.publish([message("e")])
        assert (await _stream_info(broker)).state.messages == 0


async def test_a_draining_consumer_is_deleted_once_what_was_queued_is_settled(nats_url: str) -> None:
    async with NatsBroker(nats_url) as broker:
        subscriber = subscriber_name()
        await broker.bind(subscriber, "e")
        queued = [message("e"), message("e")]
        await broker.publish(queued)
        [leased] = await collect(broker, subscriber, 1, max_count=1, ack=False)

        await broker.unbind(subscriber, "e")
        await broker.publish([message("e")])  # after the unbind: not for this subscriber
        [rest] = await collect(broker, subscriber, 1)
        await broker.retry(leased, 0.1)  # a retry of a queued message still comes
        [again] = await collect(broker, subscriber, 1)
        assert {leased.message.id, rest.message.id} == {m.id for m in queued}
        assert (again.message, again.attempt) == (leased.message, 2)
        assert await _consumer_exists(broker, subscriber, "e")

        async with asyncio.timeout(PATIENCE):  # a fetch that finds nothing more deletes it
            while await _consumer_exists(broker, subscriber, "e"):
                assert await nothing_for(broker, subscriber)
        await _until_the_stream_is_empty(broker)


async def test_binding_again_while_draining_keeps_the_consumer(nats_url: str) -> None:
    async with NatsBroker(nats_url) as broker:
        subscriber = subscriber_name()
        await broker.bind(subscriber, "e")
        await broker.publish([message("e")])
        await broker.unbind(subscriber, "e")
        await broker.bind(subscriber, "e")
        later = message("e")
        await broker.publish([later])

        assert len(await collect(broker, subscriber, 2)) == 2
        assert await nothing_for(broker, subscriber)
        assert await _consumer_exists(broker, subscriber, "e")


# --- leases ----------------------------------------------------------------------------------------


async def test_a_held_delivery_keeps_its_lease(nats_url: str) -> None:
    url = _with(nats_url, ack_wait=1)
    async with NatsBroker(url) as holder, NatsBroker(url) as other:
        for broker in (holder, other):
            await broker.bind("svc", "e")
        await holder.publish([message("e")])
        [held] = await collect(holder, "svc", 1, ack=False)
        for _ in range(5):  # 2.5 x ack_wait: renewed all along
            assert await nothing_for(other, "svc")
        await holder.ack(held)
        assert await nothing_for(other, "svc")


async def test_release_in_another_process_counts_one_delivery_more(nats_url: str) -> None:
    # Documented: JetStream counts a NAK as a delivery; only the process that released can take it off.
    async with NatsBroker(nats_url) as first, NatsBroker(nats_url) as second:
        for broker in (first, second):
            await broker.bind("svc", "e")
        await first.publish([message("e")])
        [taken] = await collect(first, "svc", 1, ack=False)
        await first.release(taken)
        [again] = await collect(second, "svc", 1)
    assert again.attempt == 2


# --- outages ---------------------------------------------------------------------------------------


async def test_a_hung_connection_is_noticed_and_replaced(nats_url: str) -> None:
    async with FaultProxy(PORT) as proxy:
        url = _with(nats_url.replace(f":{PORT}?", f":{proxy.port}?"), ping_interval=1, publish_timeout=1)
        async with NatsBroker(url) as broker:
            await broker.bind("svc", "e")
            proxy.stall()  # bytes stop flowing; the connection stays open
            with pytest.raises(BrokerUnavailable):
                await broker.publish([message("e")])
            await asyncio.sleep(3.5)  # pings go unanswered: the client drops the connection
            proxy.resume()
            proxy.reset()
            sent = message("e")
            await publish_when_back(broker, [sent])
            assert sent.id in [d.message.id for d in await receive(broker, "svc", {sent.id})]
        assert proxy.connections >= 2


# --- order -----------------------------------------------------------------------------------------


async def test_max_ack_pending_1_keeps_one_names_order_across_instances(nats_url: str) -> None:
    url = _with(nats_url, max_ack_pending=1)
    sent = [Message(new_message_id(), "e", f'{{"n": {n}}}'.encode(), key="customer-1") for n in range(20)]
    handled: list[str] = []
    running: list[str] = []
    rng = random.Random(6)

    async def instance(broker: Broker) -> None:
        while len(handled) < len(sent):
            for delivery in await broker.fetch("svc", 10, 0.2):
                assert not running, "two instances handled messages of one name at the same time"
                running.append(delivery.message.id)
                await asyncio.sleep(rng.uniform(0, 0.02))
                if rng.random() < 0.2 and delivery.attempt == 1:
                    await broker.retry(delivery, 0.05)  # a retry waits in place: order still holds
                else:
                    handled.append(delivery.message.id)
                    await broker.ack(delivery)
                running.remove(delivery.message.id)

    async with NatsBroker(url) as one, NatsBroker(url) as two:
        for broker in (one, two):
            await broker.bind("svc", "e")
        await one.publish(sent)
        async with asyncio.timeout(PATIENCE), asyncio.TaskGroup() as group:
            group.create_task(instance(one))
            group.create_task(instance(two))
    assert handled == [m.id for m in sent]


# --- clusters: several hosts in the URL, stream replicas ---------------------------------------------------


async def test_replicas_a_single_server_cannot_keep_are_refused(nats_url: str) -> None:
    broker = NatsBroker(_with(nats_url, replicas=3))
    with pytest.raises(
        ConfigurationError, match=r"cannot keep stream '\w+' with 3 replicas.*\(`replicas` option"
    ):
        await broker.start()
    client = await nats.connect(f"nats://127.0.0.1:{PORT}")
    try:
        with pytest.raises(nats.js.errors.NotFoundError):  # nothing was made
            await client.jetstream().stream_info(broker.stream)
    finally:
        await client.close()


async def test_a_host_of_the_url_that_is_down_is_gone_round(nats_url: str) -> None:
    """Two hosts, one with nothing listening: the broker connects to the other, whichever comes first."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead = closed.getsockname()[1]  # bound, never listening: connections are refused
        url = nats_url.replace(f"127.0.0.1:{PORT}", f"user:pw@127.0.0.1:{dead},127.0.0.1:{PORT}")
        for _ in range(3):  # nats-py shuffles the hosts: the dead one comes first in some of these
            async with NatsBroker(url) as broker:
                await broker.bind("svc", "e")
                sent = message("e")
                await broker.publish([sent])
                assert [d.message.id for d in await collect(broker, "svc", 1)] == [sent.id]
