"""A subscriber's consumer group as one `KafkaBroker` sees it: the group logic of the Kafka adapter.

A `Group` runs its consumer in a thread of its own and tracks, per partition assigned here, the offsets out,
handed out and released, so that it commits only past what is settled; it holds retry copies until due,
finishes the drains of unbound names and waits, at a rebalance, for what is being handled. The "Fetch"
paragraph of `kafka.py`'s docstring says what that promises; the headers are those of its "Messages".
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import heapq
import logging
import string
import threading
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_INVALID,
    Consumer,
    KafkaError,
    KafkaException,
    TopicPartition,
)
from confluent_kafka import Message as Record

from eventrelay.brokers.base import delivery_token
from eventrelay.brokers.options import finite_number
from eventrelay.envelope import Delivery, Message
from eventrelay.errors import BrokerUnavailable, PublishFailed

logger = logging.getLogger(__name__)
T = TypeVar("T")

ID, NAME, KEY = "messageId", "eventrelay-name", "eventrelay-key"  # ABP's Kafka provider sends messageId
ATTEMPT, DUE = "eventrelay-attempt", "eventrelay-due"  # on retry copies
_OURS = frozenset({ID, NAME, KEY, ATTEMPT, DUE})
_SAFE = frozenset(string.ascii_letters + string.digits + ".-")


class GroupOwner(Protocol):
    """What a group reads of the broker that made it."""

    topic_prefix: str
    single_topic: str | None
    session_timeout: float
    timeout: float

    def consumer_config(self, group_id: str, subscriber: str) -> dict[str, Any]: ...

    def translate(self, action: str) -> AbstractAsyncContextManager[None]: ...


def topic_name(prefix: str, text: str) -> str:
    """`prefix` + `text` made a valid topic name: reversibly escaped, or cut and hashed when too long."""
    escaped = "".join(c if c in _SAFE else "".join(f"_{b:02X}" for b in c.encode()) for c in text)
    if len(escaped) > (room := 249 - len(prefix)):
        escaped = f"{escaped[: room - 18]}_h{hashlib.sha256(text.encode()).hexdigest()[:16]}"
    return prefix + escaped


@dataclass(eq=False)
class Partition:
    """A partition assigned here: offsets out (handed out or held until due), released, the next to read."""

    next: int
    leases: dict[int, int]  # offset -> times handed out and not settled (from the commit metadata, then ours)
    out: set[int] = field(default_factory=set)
    handed: set[int] = field(default_factory=set)
    released: set[int] = field(default_factory=set)
    dirty: bool = False

    def commit_point(self) -> int:
        return min(self.out | self.released | {self.next})

    def metadata(self) -> str:
        """What is handed out and not settled, committed for a successor: `offset:count,...`."""
        point = self.commit_point()
        return ",".join(f"{o}:{n}" for o, n in sorted(self.leases.items()) if o >= point)[:2000]

    @classmethod
    def assigned(cls, start: int, metadata: str | None) -> Partition:
        pairs = [item.partition(":") for item in (metadata or "").split(",")]
        return cls(
            max(start, 0), {int(finite_number(o, -1)): int(finite_number(n, 0)) for o, _, n in pairs if n}
        )


@dataclass(frozen=True, eq=False)
class Lease:
    group: Group
    part: Partition
    topic: str
    partition: int
    offset: int


class Group:
    """A subscriber's consumer group as one broker sees it. Consumer calls run in `thread`; the partition
    state is shared with the event loop under `lock`, so an ack settles without waiting for a poll."""

    def __init__(self, broker: GroupOwner, subscriber: str) -> None:
        self.broker, self.subscriber, self.id = broker, subscriber, f"{broker.topic_prefix}{subscriber}"
        self.retry_topic = topic_name(f"{broker.topic_prefix}_retry_", subscriber)
        self.thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"kafka-{subscriber}")
        self.lock = threading.Condition()
        self.consumer: Consumer | None = None
        self.closing = False
        self.bound: dict[str, str] = {}  # name -> topic
        self.draining: dict[str, tuple[str, dict[int, int]]] = {}  # name -> (topic, fence per partition)
        self.start: dict[tuple[str, int], int] = {}  # where a partition with no committed offset begins
        self.parts: dict[tuple[str, int], Partition] = {}
        self.ends: dict[tuple[str, int], int] = {}  # of the partitions here, from the fetch responses
        self.held: list[tuple[float, int, Delivery]] = []  # retry copies not due yet
        self.subscribed: list[str] = []
        self._seq = 0
        self._commit_lock = asyncio.Lock()

    async def run(self, call: Callable[..., T], *args: Any) -> T:
        async with self.broker.translate("reach"):
            return await asyncio.get_running_loop().run_in_executor(self.thread, call, *args)

    async def commit(self) -> None:
        async with self._commit_lock:  # who waited here usually finds their ack in the commit before
            try:
                await self.run(self.commit_now, False)
            except (BrokerUnavailable, PublishFailed) as exc:  # the offsets stay dirty: the next commit
                logger.warning("Kafka commit of %s deferred: %s", self.subscriber, exc)

    def topics(self) -> set[str]:
        with self.lock:
            return {*self.bound.values(), *(t for t, _ in self.draining.values()), self.retry_topic}

    def current(self, lease: object) -> bool:
        return isinstance(lease, Lease) and self.parts.get((lease.topic, lease.partition)) is lease.part

    def settle(self, lease: Lease, released: bool = False) -> bool:
        """Done with an offset (or, `released`, given back with no attempt counted); False if it moved."""
        with self.lock:
            if not self.current(lease):
                return False
            part, offset = lease.part, lease.offset
            part.out.discard(offset)
            part.handed.discard(offset)
            count = part.leases.pop(offset, 1) - 1
            if released:
                part.released.add(offset)
                if count > 0:
                    part.leases[offset] = count
            part.dirty = True
            self.lock.notify_all()
            return True

    # --- in the thread -------------------------------------------------------------------------------

    def bind(self, name: str, topic: str, ends: dict[int, int]) -> None:
        with self.lock:
            self.draining.pop(name, None)
            self.bound[name] = topic
            for partition, end in ends.items():
                self.start.setdefault((topic, partition), end)
        self.resubscribe()

    def unbind(self, name: str, ends: dict[int, int]) -> None:
        with self.lock:
            topic = self.bound.pop(name)
            self.draining[name] = (topic, {p: max(e, self.ends.get((topic, p), 0)) for p, e in ends.items()})

    def resubscribe(self) -> None:
        topics = sorted(self.topics())
        if self.consumer is not None and topics != self.subscribed:
            self.consumer.subscribe(
                topics, on_assign=self._assigned, on_revoke=self._revoked, on_lost=self._lost
            )
        self.subscribed = topics

    def seek(self, lease: Lease) -> None:
        with self.lock:
            if not self.current(lease) or not lease.part.released or self.consumer is None:
                return
            target = TopicPartition(lease.topic, lease.partition, min(lease.part.released))
        self.consumer.seek(target)

    def read(self, max_count: int, wait: float) -> list[Delivery]:
        if self.closing:
            raise BrokerUnavailable(f"The Kafka consumer of {self.subscriber} is closed")
        if self.consumer is None:
            self.consumer = Consumer(self.broker.consumer_config(self.id, self.subscriber))
            self.subscribed = []
            self.resubscribe()
        with self.lock:
            batch = self._due(max_count)
            wait = min(wait, max(0.0, self.held[0][0] - time.time())) if self.held else wait
        records: list[Record] = []
        if len(batch) < max_count and (first := self.consumer.poll(0 if batch else wait)) is not None:
            more = max_count - len(batch) - 1
            records = [first, *(self.consumer.consume(more, 0) if more else [])]
        assigned = self.consumer.assignment()
        with self.lock:
            batch += [d for r in records if (d := self._accept(r)) is not None]
            batch += self._due(max_count - len(batch))
            for tp in assigned:
                if (high := self.consumer.get_watermark_offsets(tp, cached=True)[1]) >= 0:
                    self.ends[(tp.topic, tp.partition)] = high
            self._finish_drains({(tp.topic, tp.partition) for tp in assigned})
        try:
            self.commit_now(True)  # what was handed out (for a successor, should this process die), skips
        except KafkaException as exc:
            logger.info("Kafka commit of %s deferred: %s", self.subscriber, exc)
        return batch

    def _accept(self, record: Record) -> Delivery | None:
        if (error := record.error()) is not None:
            if error.fatal() or error.code() == KafkaError._ALL_BROKERS_DOWN:
                raise KafkaException(error)
            logger.info("Kafka consumer of %s: %s", self.subscriber, error.str())
            return None
        topic, partition, offset = record.topic() or "", record.partition() or 0, record.offset() or 0
        part = self.parts.get((topic, partition))
        if part is None or (offset < part.next and offset not in part.released):
            return None  # not ours (any more), or re-read after a seek back and still out or done
        part.released.discard(offset)
        part.next = max(part.next, offset + 1)
        raw = record.headers() or []
        pairs = raw.items() if isinstance(raw, dict) else raw
        headers = {k: v.decode(errors="replace") if isinstance(v, bytes) else v or "" for k, v in pairs}
        name = headers.get(NAME) or self._name_of(topic, record.key())
        if topic != self.retry_topic and not self._routed(name, partition, offset):
            part.dirty = True  # published after its unbind, or a name not bound here: committed past
            return None
        own = {k: v for k, v in headers.items() if k not in _OURS}
        message_id = headers.get(ID) or f"{topic}:{partition}:{offset}"
        message = Message(message_id, name, record.value() or b"", own, headers.get(KEY))
        part.out.add(offset)
        attempt = int(finite_number(headers.get(ATTEMPT), 1))
        delivery = Delivery(message, attempt, Lease(self, part, topic, partition, offset))
        if (due := finite_number(headers.get(DUE), 0)) > time.time():
            self._seq += 1
            heapq.heappush(self.held, (due, self._seq, delivery))
            return None
        return self._hand_out(delivery)

    def _name_of(self, topic: str, key: bytes | None) -> str:
        if topic == self.broker.single_topic:
            return (key or b"").decode(errors="replace")
        names = [*self.bound.items(), *((n, t) for n, (t, _) in self.draining.items())]
        return next((n for n, t in names if t == topic), "")

    def _routed(self, name: str, partition: int, offset: int) -> bool:
        drain = self.draining.get(name)
        return name in self.bound or (drain is not None and offset < drain[1].get(partition, 0))

    def _hand_out(self, delivery: Delivery) -> Delivery:
        lease = lease_of(delivery)
        count = lease.part.leases.get(lease.offset, 0)
        delivery.attempt += count  # a predecessor held it and died: that was an attempt
        lease.part.leases[lease.offset] = count + 1
        lease.part.handed.add(lease.offset)
        lease.part.dirty = True
        return delivery

    def _due(self, count: int) -> list[Delivery]:
        batch: list[Delivery] = []
        while self.held and len(batch) < count and self.held[0][0] <= time.time():
            if self.current((delivery := heapq.heappop(self.held)[2]).token):
                batch.append(self._hand_out(delivery))
        return batch

    def _finish_drains(self, assigned: set[tuple[str, int]]) -> None:
        if not self.draining or not assigned:
            return  # nothing to drain, or not a member yet (the partitions may still come here)
        for name, (topic, fence) in list(self.draining.items()):
            owned = [
                (self.parts[k], fence.get(k[1], 0)) for k in assigned if k[0] == topic and k in self.parts
            ]
            if all(part.commit_point() >= end for part, end in owned):
                del self.draining[name]
        self.resubscribe()

    def commit_now(self, asynchronous: bool) -> None:
        with self.lock:
            dirty = [(key, part) for key, part in self.parts.items() if part.dirty]
            for _, part in dirty:
                part.dirty = False
            offsets = [
                TopicPartition(t, p, part.commit_point(), metadata=part.metadata()) for (t, p), part in dirty
            ]
        if self.consumer is None or not offsets:
            return
        try:
            if asynchronous:
                self.consumer.commit(offsets=offsets, asynchronous=True)
            else:
                self.consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException:
            with self.lock:
                for _, part in dirty:
                    part.dirty = True
            raise

    def _assigned(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        try:
            committed, known = consumer.committed(partitions, timeout=self.broker.timeout), True
        except KafkaException as exc:  # librdkafka then starts from the committed offsets itself
            logger.warning("Could not read the committed offsets of %s: %s", self.subscriber, exc)
            committed, known = partitions, False
        start = []
        with self.lock:
            for tp in committed:
                offset, key = tp.offset, (tp.topic, tp.partition)
                if offset < 0:
                    offset = self.start.get(key, OFFSET_BEGINNING) if known else OFFSET_INVALID
                self.parts[key] = Partition.assigned(offset, tp.metadata)
                start.append(TopicPartition(tp.topic, tp.partition, offset))
        consumer.assign(start)

    def _revoked(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Before partitions go: wait (bounded) until what was handed out of them is settled; commit."""
        with self.lock:
            busy = [part.handed for tp in partitions if (part := self.parts.get((tp.topic, tp.partition)))]
            if not self.closing:  # a broker closed with deliveries out is treated as a dead process
                self.lock.wait_for(lambda: not any(busy), min(10.0, self.broker.session_timeout))
        try:
            self.commit_now(False)
        except KafkaException as exc:
            logger.warning("Could not commit %s before a rebalance: %s", self.subscriber, exc)
        self._lost(consumer, partitions)

    def _lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        with self.lock:
            for tp in partitions:
                self.parts.pop((tp.topic, tp.partition), None)
                self.ends.pop((tp.topic, tp.partition), None)
            self.held = [h for h in self.held if self.current(h[2].token)]
            heapq.heapify(self.held)

    def close(self) -> None:
        self.closing = True
        if self.consumer is not None:
            try:
                self.commit_now(False)
            finally:
                self.consumer.close()


def give_back(group: Group, done: asyncio.Future[list[Delivery]]) -> None:
    """Release what a cancelled fetch's read took (`done`), unseen: it is read again."""
    if not done.cancelled() and done.exception() is None:
        for delivery in done.result():
            if group.settle(lease := lease_of(delivery), released=True):
                with contextlib.suppress(RuntimeError):  # the broker closed meanwhile
                    group.thread.submit(group.seek, lease)


def lease_of(delivery: Delivery) -> Lease:
    """The lease a `KafkaBroker` put in `delivery`."""
    return delivery_token(delivery, Lease, "KafkaBroker")
