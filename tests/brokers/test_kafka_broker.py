"""The broker contract on Kafka, against Tansu (a Kafka-protocol broker the tests start on 127.0.0.1), and
what is Kafka-only: per-key order across instances, retries that do not stall a partition, a crashed
instance's messages after a rebalance, commits that follow acks, ABP's single topic, the bookstore story.

Every test uses a topic prefix of its own (so topics and groups of one test never meet another's) and a
short session timeout; Tansu still takes about a second to let a consumer join its group.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import ClassVar
from urllib.parse import urlencode

import pytest
from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, Producer, TopicPartition
from confluent_kafka import Message as Record
from confluent_kafka.admin import AdminClient

from eventrelay.brokers import broker_from_url
from eventrelay.brokers.base import Broker
from eventrelay.brokers.kafka import KafkaBroker, topic_name
from eventrelay.envelope import Delivery, Message, new_message_id
from eventrelay.errors import BrokerUnavailable, ConfigurationError, PublishFailed
from tests.brokers.contract import (
    LEASES,
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
from tests.brokers.kafka_server import tansu_server
from tests.examples.test_bookstore import run_demo
from tests.faultproxy import FaultProxy
from tests.server_process import free_port

pytestmark = pytest.mark.kafka

PARTITIONS = 4


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from tansu_server(tmp_path_factory.mktemp("tansu"))


def kafka_url(bootstrap: str, prefix: str, **options: object) -> str:
    query = {"topic_prefix": prefix, "session_timeout": 2, "partitions": PARTITIONS, **options}
    return f"kafka://{bootstrap}?{urlencode(query)}"


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}."


@pytest.fixture
def url(kafka_bootstrap: str, prefix: str) -> str:
    return kafka_url(kafka_bootstrap, prefix)


@pytest.fixture
async def proxied(tmp_path: Path, prefix: str) -> AsyncIterator[tuple[str, FaultProxy]]:
    """A Tansu of the test's own behind a fault proxy, advertising the proxy's address (a client connects
    where the metadata says): a URL through the proxy, and the proxy."""
    port = free_port()
    async with FaultProxy(port) as proxy:
        with contextlib.contextmanager(tansu_server)(tmp_path, port, f"127.0.0.1:{proxy.port}"):
            yield kafka_url(f"127.0.0.1:{proxy.port}", prefix), proxy


class TestKafkaBroker(BrokerContract, ReplyContract):
    # A topic per event name: Kafka orders within a partition (a name's unkeyed messages share one), never
    # across topics.
    orders_across_names = False
    cannot: ClassVar[Mapping[str, str]] = {
        OUTAGES: "these tests have one client go round the proxy and another through it, but every Kafka "
        "client goes to the one address the broker advertises (outages are tested with a Tansu advertising "
        "the proxy: test_the_producer_recovers_from_an_outage_longer_than_its_timeout, "
        "tests/reliability/test_outages.py)",
        LEASES: "Tansu drops commit metadata, so a redelivery after a crash keeps attempt 1 (see "
        "test_a_crashed_instances_message_goes_to_the_other_after_a_rebalance)",
    }
    # socket.timeout.ms bounds the admin requests a publish makes first (60 s by default).
    unreachable_urls = ("kafka://someone:secret@127.0.0.1:9?timeout=0.5&socket.timeout.ms=500",)

    @pytest.fixture
    def make_broker(self, url: str) -> MakeBroker:
        def make(options: str = "", *, port: int | None = None) -> KafkaBroker:
            return KafkaBroker(f"{url}&{options}" if options else url)

        return make

    async def reply_channel_exists(self, broker: Broker, address: str) -> bool:
        """Whether the generic reply channel's topic, retry topic or consumer group is on the server."""
        assert isinstance(broker, KafkaBroker)
        prefix, client = broker.topic_prefix, admin(broker.config["bootstrap.servers"])
        topics = (await asyncio.to_thread(client.list_topics, timeout=PATIENCE)).topics
        made = {topic_name(prefix, address), topic_name(f"{prefix}_retry_", address)}
        groups = (await asyncio.wrap_future(client.list_consumer_groups(request_timeout=PATIENCE))).valid
        return bool(made & set(topics)) or f"{prefix}{address}" in {g.group_id for g in groups}


# --- helpers --------------------------------------------------------------------------------------------


def admin(bootstrap: str) -> AdminClient:
    return AdminClient({"bootstrap.servers": bootstrap})


async def committed_offsets(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    """The group's committed offset of each partition of `topic` (-1001: none), read by a client of ours."""
    request = [ConsumerGroupTopicPartitions(group, [TopicPartition(topic, p) for p in range(PARTITIONS)])]
    client = admin(bootstrap)  # kept until the answer came: a client that is collected never answers
    result = await asyncio.wrap_future(client.list_consumer_group_offsets(request)[group])
    return {tp.partition: tp.offset for tp in result.topic_partitions or ()}


def header(record: Record, name: str) -> str:
    value = dict(record.headers() or []).get(name)
    return value.decode() if isinstance(value, bytes) else str(value)


def keeps_commit_metadata(bootstrap: str, prefix: str) -> bool:
    """Whether the broker stores offset commit metadata (Kafka does; Tansu drops it)."""
    group, topic = f"{prefix}probe", f"{prefix}probe"
    client = admin(bootstrap)
    probe = [ConsumerGroupTopicPartitions(group, [TopicPartition(topic, 0, 0, metadata="probe")])]
    client.alter_consumer_group_offsets(probe)[group].result()
    read = client.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group)])[group].result()
    return any(tp.metadata == "probe" for tp in read.topic_partitions or ())


async def until_members(subscriber: str, *brokers: KafkaBroker) -> None:
    """Fetch on every broker (nothing published yet) until each instance owns a share of every topic of the
    group: the rebalance that lets them compete is over."""
    async with asyncio.timeout(PATIENCE):
        while True:
            got = await asyncio.gather(*(b.fetch(subscriber, 1, 0.1) for b in brokers))
            assert not any(got), "until_members runs before anything is published"
            owned = [set(b._groups[subscriber].parts) for b in brokers]
            topics = brokers[0]._groups[subscriber].topics()
            if all(owned) and sum(map(len, owned)) == PARTITIONS * len(topics):
                return


async def drain_all(
    brokers: dict[str, KafkaBroker], subscriber: str, count: int
) -> dict[str, list[Delivery]]:
    """Fetch on every broker at once, acking each delivery, until `count` came in all."""
    got: dict[str, list[Delivery]] = {who: [] for who in brokers}

    async def fetcher(who: str, broker: KafkaBroker) -> None:
        while sum(map(len, got.values())) < count:
            for delivery in await broker.fetch(subscriber, 5, 0.2):
                got[who].append(delivery)
                await broker.ack(delivery)

    async with asyncio.timeout(PATIENCE), asyncio.TaskGroup() as group:
        for who, broker in brokers.items():
            group.create_task(fetcher(who, broker))
    return got


# --- configuration and errors ---------------------------------------------------------------------------


def test_urls_choose_the_kafka_broker_and_its_options() -> None:
    broker = broker_from_url(
        "kafka://h1:9092,h2:9092?topic_prefix=shop.&session_timeout=10&partitions=12&single_topic=Abp"
        "&compression.type=zstd"
    )
    assert isinstance(broker, KafkaBroker)
    assert (broker.topic_prefix, broker.session_timeout, broker.partitions) == ("shop.", 10.0, 12)
    assert broker.single_topic == "Abp"
    assert broker.config["bootstrap.servers"] == "h1:9092,h2:9092"
    assert broker.config["compression.type"] == "zstd"  # options with a dot go to librdkafka
    with pytest.raises(ConfigurationError, match="session_timeout takes a number above 0"):
        KafkaBroker("kafka://127.0.0.1:9092?session_timeout=soon")
    with pytest.raises(ConfigurationError, match=r"option 'sesion_timeout'.*Did you mean 'session_timeout'"):
        KafkaBroker("kafka://127.0.0.1:9092?sesion_timeout=3")


def test_event_names_become_valid_topic_names_reversibly_or_hashed() -> None:
    assert topic_name("er.", "Orders.OrderPlaced") == "er.Orders.OrderPlaced"
    assert topic_name("er.", "EntityUpdatedEto[User Eto]_ü") == "er.EntityUpdatedEto_5BUser_20Eto_5D_5F_C3_BC"
    assert topic_name("er.", "a_b") != topic_name("er.", "a.b")
    long_ones = {topic_name("er.", "x" * 256), topic_name("er.", "x" * 255 + "y")}
    assert len(long_ones) == 2
    assert all(len(t) == 249 and "_h" in t for t in long_ones)


async def test_a_message_over_the_size_limit_is_refused(url: str) -> None:
    async with KafkaBroker(url + "&message.max.bytes=10000") as broker:
        with pytest.raises(PublishFailed, match="too large"):
            await broker.publish([message(event_name(), b"x" * 20_000)])
        await broker.publish([message(event_name())])  # the producer still works


async def test_the_producer_recovers_from_an_outage_longer_than_its_timeout(
    proxied: tuple[str, FaultProxy],
) -> None:
    """Messages that time out in the idempotent producer's queue make it bump its epoch when the broker is
    back; a producer that then fails for good is replaced, not kept refusing every publish."""
    url, proxy = proxied
    name, subscriber = event_name(), subscriber_name()
    async with KafkaBroker(f"{url}&timeout=1") as broker:
        await broker.bind(subscriber, name)
        await broker.publish([first := message(name)])
        async with proxy.down():
            with pytest.raises(BrokerUnavailable):
                await broker.publish([message(name)])  # timed out in the producer's queue
        await publish_when_back(broker, [last := message(name)])
        got = {d.message.id for d in await receive(broker, subscriber, {first.id, last.id})}
        assert {first.id, last.id} <= got


# --- order, retries, crashes, commits -------------------------------------------------------------------


async def test_per_key_order_holds_across_two_instances_of_a_service(url: str) -> None:
    name, subscriber = event_name(), subscriber_name()
    async with KafkaBroker(url) as one, KafkaBroker(url) as two:
        await one.bind(subscriber, name)
        await two.bind(subscriber, name)
        await until_members(subscriber, one, two)
        sent = [
            Message(new_message_id(), name, f'{{"n": {n}}}'.encode(), key=f"k{n % 16}") for n in range(80)
        ]
        for start in range(0, len(sent), 10):
            await one.publish(sent[start : start + 10])

        got = await drain_all({"one": one, "two": two}, subscriber, len(sent))

    assert got["one"], "instances compete"
    assert got["two"], "instances compete"
    for key in {m.key for m in sent}:
        expected = [m.id for m in sent if m.key == key]
        holders = [who for who, deliveries in got.items() if any(d.message.key == key for d in deliveries)]
        assert len(holders) == 1, f"key {key} went to both instances"
        assert [d.message.id for d in got[holders[0]] if d.message.key == key] == expected


async def test_a_poison_message_retried_does_not_stall_its_partition(url: str) -> None:
    name, subscriber = event_name(), subscriber_name()
    async with KafkaBroker(url) as broker:
        await broker.bind(subscriber, name)
        poison, *others = [Message(new_message_id(), name, b"{}", key="same-partition") for _ in range(6)]
        await broker.publish([poison, *others])

        [first] = await collect(broker, subscriber, 1, max_count=1, ack=False)
        assert first.message == poison
        await broker.retry(first, 1.0)
        handled = await collect(broker, subscriber, 5)  # the partition moves on at once
        [again] = await collect(broker, subscriber, 1, ack=False)

        assert [d.message for d in handled] == others
        assert (again.message, again.attempt) == (poison, 2)
        await broker.retry(again, 0.0)
        [third] = await collect(broker, subscriber, 1)
        assert third.attempt == 3
        assert await broker.pending_count(subscriber) == 0


async def test_offsets_are_committed_only_after_the_ack_and_in_order(kafka_bootstrap: str, url: str) -> None:
    name, subscriber = event_name(), subscriber_name()
    async with KafkaBroker(url) as broker:
        await broker.bind(subscriber, name)
        group, topic = f"{broker.topic_prefix}{subscriber}", topic_name(broker.topic_prefix, name)
        await broker.publish([Message(new_message_id(), name, b"{}", key="k") for _ in range(3)])
        deliveries = await collect(broker, subscriber, 3, ack=False)

        async def committed() -> int:
            return sum(max(0, o) for o in (await committed_offsets(kafka_bootstrap, group, topic)).values())

        assert await committed() == 0  # fetched is not done
        await broker.ack(deliveries[2])
        await broker.ack(deliveries[1])
        assert await committed() == 0  # an ack never commits past an earlier unacked message
        await broker.ack(deliveries[0])
        assert await committed() == 3


async def test_a_crashed_instances_message_goes_to_the_other_after_a_rebalance(
    kafka_bootstrap: str, prefix: str, url: str
) -> None:
    name, subscriber = event_name(), subscriber_name()
    one, two = KafkaBroker(url), KafkaBroker(url)
    async with one, two:
        await one.bind(subscriber, name)
        await two.bind(subscriber, name)
        await until_members(subscriber, one, two)
        sent = message(name)
        await one.publish([sent])
        holder: KafkaBroker | None = None
        async with asyncio.timeout(PATIENCE):
            while holder is None:
                for broker in (one, two):
                    if await broker.fetch(subscriber, 10, 0.1):
                        holder = broker
        survivor = two if holder is one else one
        # What the holder commits for a successor, should it die: offset 0 of its partition, handed out once.
        leases = {part.metadata() for part in holder._groups[subscriber].parts.values()} - {""}
        assert leases == {"0:1"}

        await holder.close()  # with the delivery neither acked nor released: as if the process had died

        [again] = await collect(survivor, subscriber, 1)
    assert again.message == sent
    # On Kafka the next owner would read that lease from the commit metadata and count the redelivery as
    # attempt 2. Tansu, the broker these tests run on, drops commit metadata, so there it keeps attempt 1.
    assert not keeps_commit_metadata(kafka_bootstrap, prefix), "the broker keeps commit metadata: expect 2"
    assert again.attempt == 1


async def test_a_rebalance_waits_for_what_is_being_handled(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    name, subscriber = event_name(), subscriber_name()
    async with KafkaBroker(url) as one, KafkaBroker(url) as two:
        await one.bind(subscriber, name)
        await two.bind(subscriber, name)
        revoking = threading.Event()
        group = one._groups[subscriber]
        revoked = group._revoked

        def spy(consumer: Consumer, partitions: list[TopicPartition]) -> None:
            revoking.set()
            revoked(consumer, partitions)

        monkeypatch.setattr(group, "_revoked", spy)
        await one.publish([message(name)])
        [held] = await collect(one, subscriber, 1, ack=False)  # one is alone in the group: it has it

        # Two joins; one's next poll starts the rebalance and waits in it for the handler of `held`.
        joining = asyncio.create_task(two.fetch(subscriber, 10, 3.0))
        polling = asyncio.create_task(one.fetch(subscriber, 10, 3.0))
        assert await asyncio.to_thread(revoking.wait, PATIENCE), "no rebalance"
        await one.ack(held)  # the handler finishes while the partitions are being taken away

        async with asyncio.timeout(PATIENCE):
            assert await joining == []
            assert await polling == []
        await until_members(subscriber, one, two)  # it fails if the acked message comes again


CHILD = """
import asyncio, sys
from eventrelay.brokers.kafka import KafkaBroker

async def main(url, subscriber, name):
    async with KafkaBroker(url) as broker:
        await broker.bind(subscriber, name)
        while not (got := await broker.fetch(subscriber, 1, 1.0)):
            pass
        print(got[0].message.id, flush=True)
        await asyncio.sleep(3600)  # "handling" it, until killed

asyncio.run(main(*sys.argv[1:]))
"""


async def test_a_message_held_by_a_killed_process_comes_to_the_survivor(url: str) -> None:
    name, subscriber = event_name(), subscriber_name()
    async with KafkaBroker(url) as survivor:
        await survivor.bind(subscriber, name)
        sent = message(name)
        await survivor.publish([sent])
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            CHILD,
            url,
            subscriber,
            name,
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src")},
        )
        try:
            assert child.stdout is not None
            async with asyncio.timeout(PATIENCE):
                held = (await child.stdout.readline()).decode().strip()
            assert held == sent.id
        finally:
            child.kill()  # SIGKILL mid-handler: no close, no commit, no goodbye to the group
            await child.wait()

        [again] = await collect(survivor, subscriber, 1)  # once the group dropped the dead member
        assert again.message == sent


async def test_pending_count_is_the_lag_including_held_retries(url: str) -> None:
    name, subscriber = event_name(), subscriber_name()
    async with KafkaBroker(url) as broker:
        await broker.bind(subscriber, name)
        for _ in range(3):  # one batch each: Tansu counts a partition's end right only after a 1-record batch
            await broker.publish([message(name)])
        assert await broker.pending_count(subscriber) == 3
        first, second = await collect(broker, subscriber, 2, max_count=1, ack=False)
        await broker.ack(first)
        assert await broker.pending_count(subscriber) == 2  # one leased, one not fetched yet
        await broker.retry(second, 30.0)
        assert await broker.pending_count(subscriber) == 2  # one waiting as a retry copy
        await collect(broker, subscriber, 1)
        assert await broker.pending_count(subscriber) == 1
        assert await broker.pending_count(subscriber_name()) == 0


async def test_a_drained_topic_leaves_the_subscription_and_a_rebind_resumes(url: str) -> None:
    placed, shipped, subscriber = event_name(), event_name(), subscriber_name()
    async with KafkaBroker(url) as broker:
        await broker.bind(subscriber, placed)
        await broker.bind(subscriber, shipped)
        queued = message(placed)
        await broker.publish([queued])
        await broker.unbind(subscriber, placed)

        assert [d.message for d in await collect(broker, subscriber, 1)] == [queued]
        assert await nothing_for(broker, subscriber)
        placed_topic = topic_name(broker.topic_prefix, placed)
        assert placed_topic not in broker._groups[subscriber].subscribed

        while_unbound = message(placed)
        await broker.publish([while_unbound])
        await broker.bind(subscriber, placed)
        # Kafka keeps what was published while unbound, and the group resumes where it left the topic.
        assert [d.message for d in await collect(broker, subscriber, 1)] == [while_unbound]


# --- ABP's single topic ---------------------------------------------------------------------------------


async def test_single_topic_is_abps_layout_filtered_by_name(kafka_bootstrap: str, prefix: str) -> None:
    single = f"{prefix}AbpEvents"
    placed, shipped, cancelled, subscriber = event_name(), event_name(), event_name(), subscriber_name()
    async with KafkaBroker(kafka_url(kafka_bootstrap, prefix, single_topic=single)) as broker:
        await broker.bind(subscriber, placed)
        await broker.bind(subscriber, shipped)
        sent = [message(placed), message(cancelled), Message(new_message_id(), shipped, b"{}", key="order-7")]
        await broker.publish(sent)
        # A message as ABP's Kafka provider writes it: key = event name, header messageId, JSON body.
        abp_id = uuid.uuid4().hex
        producer = Producer({"bootstrap.servers": kafka_bootstrap})
        producer.produce(single, b'{"n": 1}', placed.encode(), headers=[("messageId", abp_id.encode())])
        assert await asyncio.to_thread(producer.flush, 10) == 0

        got = await collect(broker, subscriber, 3)
        assert sorted(d.message.id for d in got) == sorted([sent[0].id, sent[2].id, abp_id])
        assert next(d for d in got if d.message.key == "order-7").message == sent[2]
        assert next(d for d in got if d.message.id == abp_id).message.name == placed
        assert await nothing_for(broker, subscriber)  # the unbound name is skipped

    # What is in the topic, read with a plain client: the key is the event name, the id is in `messageId`.
    consumer = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": f"{prefix}reader"})
    try:
        consumer.assign([TopicPartition(single, p, 0) for p in range(PARTITIONS)])
        records: list[Record] = []
        while len(records) < len(sent) + 1:
            records += await asyncio.to_thread(consumer.consume, 10, 1.0)
    finally:
        consumer.close()
    on_the_wire = {header(r, "messageId"): (r.key() or b"").decode() for r in records}
    assert on_the_wire == {**{m.id: m.name for m in sent}, abp_id: placed}


# --- the bookstore on Kafka -----------------------------------------------------------------------------


@pytest.mark.slow
def test_the_bookstore_story_on_kafka(tmp_path: Path, kafka_bootstrap: str, prefix: str) -> None:
    run_demo(tmp_path, "--broker", kafka_url(kafka_bootstrap, prefix, session_timeout=6))
