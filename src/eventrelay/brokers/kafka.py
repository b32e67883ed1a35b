"""Apache Kafka as the broker: `kafka://host:9092[,host2:9092]?topic_prefix=eventrelay.&session_timeout=45`
(SASL: `kafka://user:password@host:9092?security.protocol=SASL_SSL&sasl.mechanism=SCRAM-SHA-512`), or ABP's
layout: `kafka://host:9092?single_topic=MyTopic`. Needs confluent-kafka: `pip install 'eventrelay[kafka]'`.

Features: fan-out (a consumer group per subscribing service), competing instances with per-key order across
them, offsets committed only after the ack and in order per partition, retries that never block a partition,
crash redeliveries counted as attempts, topics created as needed, an idempotent producer with `acks=all`.

Topology: a topic per event name, `<topic_prefix><name>`, with every byte but letters, digits, `.` and `-`
escaped as `_XX` (reversible); a name too long for Kafka's 249 characters is cut and ends in `_h` and 16 hex
digits of its SHA-256. Subscriber `S` is the group `<topic_prefix>S`, subscribed to the topics of its bound
names and to its retry topic `<topic_prefix>_retry_<S>`; range assignment spreads every topic over the
instances. `single_topic=NAME` is ABP's layout, for interop: one topic, the event name as key, ABP's
`messageId` header; groups filter by name, so order and parallelism are per event name. `bind` creates the
topics and commits their current end where the group has no offset yet: a new subscriber starts at its bind,
one that is down finds its messages waiting (a broker that refuses the commit because the group is active
gets the end applied at assignment). `unbind` takes the topic's end as a fence: what was queued before it is
still delivered, later messages of the name are committed past unseen, and once the partitions owned here
are past the fence the topic leaves the subscription. A name bound again resumes where the group left it.

Messages: the Kafka key is the ordering key, else the event name (a name's unkeyed events keep publish order
in one partition: give events keys to spread them); with `single_topic` always the event name. Headers:
`messageId`, `eventrelay-name`, `eventrelay-key` and the message's own, UTF-8. `publish` produces a batch at
once and returns when the broker acknowledged every message.

Fetch (`kafka_group.py`): a subscriber's consumer runs in a thread of its own, polled in slices of 0.1 s so
commits and seeks get their turn. A fetched offset is *out* until acked or retried; a partition's committed
offset is its lowest offset out or released, so an ack never commits past an earlier unacked message, and
`ack` returns once committed (a failed commit is retried with the next). `retry` produces a copy with
`eventrelay-attempt` and `eventrelay-due` to the retry topic, then acks: the partition moves on, and the group
holds the copy, uncommitted, until due. `release` seeks back; re-read offsets still out or done are skipped.
Attempts: what a fetch hands out is committed as offset metadata (`offset:count,...`), and the next owner of
the partition counts a redelivery of what its predecessor held and never settled as one more attempt. A
rebalance waits up to min(session_timeout, 10 s) for what was handed out of the revoked partitions to be
settled, then commits; what is still out comes again to the new owner (the inbox drops the duplicate) and its
late ack is ignored. `pending_count` is the group's lag on the topics bound here (held retries and leased
messages count).

Options: `topic_prefix` (`eventrelay.`), `single_topic`, `session_timeout` (45 s: how long a dead instance
keeps its partitions), `partitions` (6) and `replication_factor` (-1: the broker's) of topics created here,
`timeout` (10 s: publish acknowledgement, admin calls). Options with a dot go to librdkafka as they are (it
checks them at `start`); any other is an error when the broker is made. A consumer prefetches at most 4 MiB
(`queued.max.messages.kbytes=4096`, librdkafka's default is 64 MiB).

Replies (`bus.request`): the generic reply channel, a subscriber of the process's own (a topic, a retry topic
and a consumer group), whose close leaves the group and deletes all three, so that a process leaves nothing.

Why confluent-kafka (librdkafka): its idempotent producer, which lets `acks=all` retry without duplicates or
reordering, works against Kafka and Tansu alike; aiokafka's idempotent producer and transactions fail at
start on Tansu. Its calls block, so they run in threads.

Limits: order is per partition, never across event names; instances beyond a topic's partition count idle;
a held retry holds back its retry partition's commit (after a restart the copies behind it are read again);
publishing is at least once (a batch that timed out may still arrive). A producer the broker refuses for good
(fenced, as Tansu does after messages timed out during an outage) is replaced by a new one, and that publish
raises `BrokerUnavailable`, so the caller sends it again. On Tansu, the test broker, ListOffsets
reports the first offset of a partition's last record batch plus one, so the unbind fence, the bind start
and `pending_count` (for partitions owned elsewhere) can fall short by the rest of that batch, and commit
metadata is dropped, so a crash redelivery keeps its attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

try:
    from confluent_kafka import (
        OFFSET_INVALID,
        ConsumerGroupTopicPartitions,
        KafkaError,
        KafkaException,
        Producer,
        TopicPartition,
    )
    from confluent_kafka.admin import AdminClient
    from confluent_kafka.admin._listoffsets import OffsetSpec  # confluent_kafka.admin re-exports it untyped
    from confluent_kafka.cimpl import NewTopic

    from eventrelay.brokers.kafka_group import (
        ATTEMPT,
        DUE,
        ID,
        KEY,
        NAME,
        Group,
        give_back,
        lease_of,
        topic_name,
    )
except ImportError as exc:  # pragma: no cover
    raise ImportError("Kafka support needs an extra: pip install 'eventrelay[kafka]'") from exc

from eventrelay.brokers.base import Broker, Replies, SubscriptionReplies
from eventrelay.brokers.options import UrlOptions, url_query
from eventrelay.config import redact_url
from eventrelay.envelope import Delivery, Message
from eventrelay.errors import BrokerUnavailable, ConfigurationError, PublishFailed

logger = logging.getLogger(__name__)

_LATEST = OffsetSpec.latest()  # type: ignore[no-untyped-call]
_SLICE = 0.1  # the longest one poll holds the consumer's thread
_UNAVAILABLE = {KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT, KafkaError._TIMED_OUT}
_UNAVAILABLE |= {KafkaError._MSG_TIMED_OUT, KafkaError._RESOLVE, KafkaError.NETWORK_EXCEPTION}
# Errors after which an idempotent producer refuses every later batch: only a new producer (a new producer
# id) publishes again.
_SPENT = {KafkaError.PRODUCER_FENCED, KafkaError.INVALID_PRODUCER_EPOCH, KafkaError.UNKNOWN_PRODUCER_ID}
_SPENT |= {KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER, KafkaError._FATAL, KafkaError._FENCED}


class KafkaBroker(Broker):
    """A broker on Apache Kafka or another Kafka-protocol broker (see the module docstring)."""

    def __init__(self, url: str) -> None:
        parts, self.url, query = urlsplit(url), redact_url(url), url_query(url)
        dotted = {name for name in query if "." in name}
        options = UrlOptions("Kafka", url, query, passes=dotted, note="options with a dot go to librdkafka")
        self.topic_prefix = options.string("topic_prefix", "eventrelay.")
        self.single_topic = options.string("single_topic") or None
        self.session_timeout, self.timeout = (
            options.number("session_timeout", 45.0),
            options.number("timeout", 10.0),
        )
        self.partitions = options.integer("partitions", 6, minimum=1)
        self.replication_factor = options.integer("replication_factor", -1)
        client_options = options.finish()
        if len(self.topic_prefix) > 150:
            raise ConfigurationError(f"Kafka topic_prefix is over 150 characters: {self.topic_prefix!r}")
        self.config: dict[str, Any] = {
            "bootstrap.servers": parts.netloc.rpartition("@")[2] or "localhost:9092",
            "logger": logging.getLogger(f"{__name__}.librdkafka"),
            "log.connection.close": False,
            **client_options,
        }
        if parts.username:
            self.config.setdefault("security.protocol", "SASL_PLAINTEXT")
            self.config.setdefault("sasl.mechanism", "PLAIN")
            self.config.update(
                {"sasl.username": unquote(parts.username), "sasl.password": unquote(parts.password or "")}
            )
        self._producer: Producer | None = None
        self._admin: AdminClient | None = None
        self._groups: dict[str, Group] = {}
        self._partitions: dict[str, list[int]] = {}  # topics known to exist -> their partitions

    def consumer_config(self, group_id: str, subscriber: str) -> dict[str, Any]:
        session_ms = int(self.session_timeout * 1000)
        return {
            # librdkafka prefetches up to 64 MiB per consumer by default, whatever `max_in_flight` says: a
            # backlog would sit in memory. 4 MiB keeps the fetches large and the memory bounded.
            "queued.max.messages.kbytes": 4096,
            **self.config,
            "group.id": group_id,
            "client.id": f"eventrelay-{subscriber}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",  # only where neither a commit nor a bind says where to start
            "session.timeout.ms": session_ms,
            "heartbeat.interval.ms": max(100, session_ms // 10),
            "max.poll.interval.ms": max(300_000, session_ms),
            "partition.assignment.strategy": "range",  # every topic (event name) spread over the instances
        }

    # --- lifecycle -----------------------------------------------------------------------------------

    async def start(self) -> None:
        try:
            self._producer, self._admin = self._new_producer(), AdminClient(self.config)
        except KafkaException as exc:
            raise ConfigurationError(f"Bad Kafka broker URL {self.url!r}: {exc}") from exc
        async with self.translate("connect to"):
            await asyncio.to_thread(self._admin.list_topics, timeout=self.timeout)

    async def close(self) -> None:
        for group in self._groups.values():
            try:
                await group.run(group.close)
            except Exception:
                logger.warning(
                    "Could not leave the Kafka group of %s cleanly", group.subscriber, exc_info=True
                )
            group.thread.shutdown(wait=False)
        self._groups.clear()
        if self._producer is not None:
            await asyncio.to_thread(self._producer.flush, self.timeout)
        self._producer = self._admin = None

    # --- the port ------------------------------------------------------------------------------------

    async def publish(self, messages: Sequence[Message]) -> None:
        if messages:
            await self._ensure_topics({self._topic(m.name) for m in messages})
            await self._send([(self._topic(m.name), m, []) for m in messages])

    async def bind(self, subscriber: str, name: str) -> None:
        group, topic = await self._group(subscriber), self._topic(name)
        if name in group.bound:
            return
        await self._ensure_topics({topic})
        ends, committed = await self._offsets(group.id, topic)
        if missing := [TopicPartition(topic, p, end) for p, end in ends.items() if committed[p] < 0]:
            request = [ConsumerGroupTopicPartitions(group.id, missing)]
            try:
                await asyncio.wrap_future(
                    self._admin_client().alter_consumer_group_offsets(request)[group.id]
                )
            except KafkaException as exc:  # an active group: the start is applied when assigned
                logger.info("Group %s keeps its start in memory: %s", group.id, exc)
        await group.run(group.bind, name, topic, ends)

    async def unbind(self, subscriber: str, name: str) -> None:
        group = self._groups.get(subscriber)
        if group is not None and name in group.bound:
            ends, _ = await self._offsets(group.id, group.bound[name])
            await group.run(group.unbind, name, ends)

    async def fetch(self, subscriber: str, max_count: int, timeout: float) -> list[Delivery]:
        group = await self._group(subscriber)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            job = loop.run_in_executor(
                group.thread, group.read, max_count, max(0.0, min(deadline - loop.time(), _SLICE))
            )
            try:
                async with self.translate("fetch from"):
                    batch = await asyncio.shield(job)
            except asyncio.CancelledError:  # what the read took goes back, unseen
                job.add_done_callback(lambda done: give_back(group, done))
                raise
            if batch or loop.time() >= deadline:
                return batch

    async def ack(self, delivery: Delivery) -> None:
        lease = lease_of(delivery)
        if lease.group.settle(lease):
            await lease.group.commit()

    async def retry(self, delivery: Delivery, delay: float) -> None:
        extra = [(ATTEMPT, str(delivery.attempt + 1)), (DUE, f"{time.time() + max(0.0, delay):.3f}")]
        await self._send([(lease_of(delivery).group.retry_topic, delivery.message, extra)])
        await self.ack(delivery)

    async def release(self, delivery: Delivery) -> None:
        lease = lease_of(delivery)
        if lease.group.settle(lease, released=True):
            await lease.group.run(lease.group.seek, lease)

    async def pending_count(self, subscriber: str) -> int:
        """The group's lag on the topics bound here (held retries and leased messages are uncommitted)."""
        if (group := self._groups.get(subscriber)) is None:
            return 0
        total, owned = 0, dict(group.ends)
        for topic in group.topics():
            ends, committed = await self._offsets(group.id, topic)
            for p, end in ends.items():
                start = committed[p] if committed[p] >= 0 else group.start.get((topic, p), 0)
                total += max(0, max(end, owned.get((topic, p), 0)) - start)
        return total

    async def open_replies(self, instance: str) -> Replies:
        """The generic reply channel, whose close deletes what it made (see the module docstring)."""
        return await _KafkaReplies(self, instance).open()

    async def delete_subscription(self, subscriber: str) -> None:
        """Leave `subscriber`'s group, then delete it, its retry topic and the topic of the name that is the
        subscriber's own (a reply channel's), which nobody else reads."""
        if (group := self._groups.pop(subscriber, None)) is not None:
            await group.run(group.close)
            group.thread.shutdown(wait=False)
        retry = topic_name(f"{self.topic_prefix}_retry_", subscriber)  # as its `Group` names it
        admin, topics = self._admin_client(), [self._topic(subscriber), retry]
        async with self.translate("delete topics on"):
            for topic, future in admin.delete_topics(topics, operation_timeout=self.timeout).items():
                self._partitions.pop(topic, None)
                with contextlib.suppress(KafkaException):  # never made (no reply came), say
                    await asyncio.wrap_future(future)
            for future in admin.delete_consumer_groups([f"{self.topic_prefix}{subscriber}"]).values():
                with contextlib.suppress(KafkaException):  # no offset committed: no group
                    await asyncio.wrap_future(future)

    # --- internals -----------------------------------------------------------------------------------

    def _new_producer(self) -> Producer:
        producer = {"enable.idempotence": True, "acks": "all", "linger.ms": 5}
        producer |= {"partitioner": "murmur2_random", "message.timeout.ms": int(self.timeout * 1000)}
        return Producer({**self.config, **producer})

    def _topic(self, name: str) -> str:
        return self.single_topic or topic_name(self.topic_prefix, name)

    def _admin_client(self) -> AdminClient:
        if self._admin is None:
            raise BrokerUnavailable(f"The Kafka broker at {self.url} is not started")
        return self._admin

    async def _group(self, subscriber: str) -> Group:
        if subscriber not in self._groups:
            group = Group(self, subscriber)
            await self._ensure_topics({group.retry_topic})
            self._groups.setdefault(subscriber, group)
        return self._groups[subscriber]

    async def _ensure_topics(self, topics: Iterable[str]) -> None:
        if not (missing := [t for t in topics if t not in self._partitions]):
            return
        admin, refused = self._admin_client(), {}
        async with self.translate("create topics on"):
            new = [NewTopic(t, self.partitions, self.replication_factor) for t in missing]
            made = admin.create_topics(new, operation_timeout=self.timeout, request_timeout=self.timeout)
            for topic, future in made.items():
                try:
                    await asyncio.wrap_future(future)
                except KafkaException as exc:  # TOPIC_ALREADY_EXISTS is fine; the metadata tells
                    refused[topic] = exc
            for topic in missing:
                metadata = await asyncio.to_thread(admin.list_topics, topic, timeout=self.timeout)
                found = metadata.topics.get(topic)
                if found is None or found.error is not None or not found.partitions:
                    reason = refused.get(topic) or (found and found.error)
                    raise PublishFailed(f"No Kafka topic {topic!r} at {self.url}: {reason}")
                self._partitions[topic] = sorted(found.partitions)

    async def _offsets(self, group_id: str, topic: str) -> tuple[dict[int, int], dict[int, int]]:
        """The end offset of each partition of `topic`, and the group's committed offset (-1001: none)."""
        admin, wanted = self._admin_client(), [TopicPartition(topic, p) for p in self._partitions[topic]]
        async with self.translate("read offsets on"):
            ends = admin.list_offsets(dict.fromkeys(wanted, _LATEST), request_timeout=self.timeout)
            request = [ConsumerGroupTopicPartitions(group_id, wanted)]
            group = admin.list_consumer_group_offsets(request, request_timeout=self.timeout)[group_id]
            end = {tp.partition: (await asyncio.wrap_future(f)).offset for tp, f in ends.items()}
            listed = (await asyncio.wrap_future(group)).topic_partitions or ()
        committed = {tp.partition: tp.offset for tp in listed}
        return end, {p: committed.get(p, OFFSET_INVALID) for p in end}

    async def _send(self, items: list[tuple[str, Message, list[tuple[str, str]]]]) -> None:
        """Produce every item, then wait until the broker acknowledged all of them."""
        if (producer := self._producer) is None:
            raise BrokerUnavailable(f"The Kafka broker at {self.url} is not started")
        loop = asyncio.get_running_loop()
        results: list[asyncio.Future[KafkaError | None]] = []
        async with self.translate("publish to"):
            for topic, m, extra in items:
                results.append(result := loop.create_future())
                ours = [(ID, m.id), (NAME, m.name), *([(KEY, m.key)] if m.key is not None else []), *extra]
                headers: list[tuple[str, str | bytes | None]] = [*m.headers.items(), *ours]
                key = (m.name if self.single_topic or m.key is None else m.key).encode()
                producer.produce(topic, m.body, key, headers=headers, on_delivery=_resolver(loop, result))
            if left := await asyncio.to_thread(producer.flush, self.timeout):
                raise BrokerUnavailable(f"Kafka at {self.url} did not acknowledge {left} message(s) in time")
            errors = [e for e in await asyncio.wait_for(asyncio.gather(*results), self.timeout) if e]
        if not errors:
            return
        text = f"Kafka at {self.url} refused {len(errors)} message(s): {errors[0].str()}"
        if any(e.fatal() or e.code() in _SPENT for e in errors):
            # E.g. on Tansu after messages timed out in the queue during an outage: PRODUCER_FENCED for good.
            if self._producer is producer:  # not replaced yet by a concurrent publish
                logger.warning("%s; a new producer takes over", text)
                self._producer = self._new_producer()
                await asyncio.to_thread(producer.flush, 0)  # nothing is left in it: it was flushed
            raise BrokerUnavailable(f"{text} (a new producer takes over: publish again)")
        raise (BrokerUnavailable if any(map(_unavailable, errors)) else PublishFailed)(text)

    @contextlib.asynccontextmanager
    async def translate(self, action: str) -> AsyncIterator[None]:
        try:
            yield
        except KafkaException as exc:
            error = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
            text = f"Could not {action} Kafka at {self.url}: {error.str() if error else exc}"
            kind = BrokerUnavailable if error is None or _unavailable(error) else PublishFailed
            raise kind(text) from exc
        except (BufferError, TimeoutError) as exc:
            raise BrokerUnavailable(f"Could not {action} Kafka at {self.url}: {exc or 'timed out'}") from exc


class _KafkaReplies(SubscriptionReplies):
    """The generic reply channel; its close deletes its topics and consumer group."""

    broker: KafkaBroker

    async def close(self) -> None:
        await self.broker.delete_subscription(self.subscriber)


def _unavailable(error: KafkaError) -> bool:
    return error.code() in _UNAVAILABLE or error.retriable()


def _resolver(
    loop: asyncio.AbstractEventLoop, result: asyncio.Future[KafkaError | None]
) -> Callable[..., None]:
    """A delivery callback (it runs in the flushing thread) that resolves `result` in the event loop."""

    def resolve(error: KafkaError | None) -> None:
        if not result.done():
            result.set_result(error)

    def delivered(error: KafkaError | None, _record: object) -> None:
        loop.call_soon_threadsafe(resolve, error)

    return delivered


__all__ = ["KafkaBroker", "topic_name"]
