"""Redis Streams as the broker: `redis://[user:password@]host:6379/0?prefix=eventrelay:&visibility_timeout=30`
(`rediss://` for TLS). Needs Redis 7.0 or later and redis-py (`pip install 'eventrelay[redis]'`).

Features: fan-out per subscriber (service), competing instances, leases renewed while held, a dead instance's
messages reclaimed, delayed retries that only the retrying subscriber sees, bounded memory, reconnects.

Topology: a stream per *subscriber*, filled at publish. Keys under `prefix`: `routes:<event name>`, the set of
subscribers bound to a name (`bind` adds, `unbind` removes); `queue:<subscriber>`, a stream with one consumer
group named after the subscriber, created at `$` (every instance of the service is a consumer of it, so they
compete); `delayed:<subscriber>`, a sorted set of retry copies scored by due time. `publish` is one Lua script
per batch (one round trip, atomic with `bind`/`unbind`) that appends a copy of each message to the queue of
every subscriber its name routes to. Why not a stream per event name with a group per subscriber: `unbind`
must stop new messages while queued ones still arrive (per-name streams would need a fence per group at the
stream's last id); a subscriber's messages of several names would come from several streams in no total
order; retries would need a stream per subscriber anyway; counting what is owed would need group-lag
arithmetic. Here unbind is one `SREM`, a queue holds its subscriber's messages of all names in publish order,
a retry re-enters a queue no other service reads, and what is owed is `XLEN queue + ZCARD delayed`. The
price is a copy per bound subscriber, as with RabbitMQ's queue per service.

Entries hold `i` (message id), `n` (name), `b` (body), `h` (headers, JSON), `k` (key, if any) and `a` (the
attempt of a retry copy). A delivery's attempt is `a` (default 1) plus Redis's delivery counter minus one. A
fetch moves due retries into the queue, reclaims (`XAUTOCLAIM`) entries idle for `visibility_timeout` (an
attempt), then reads new ones (`XREADGROUP ... BLOCK`). The pending entry is the lease; the adapter renews
what it holds (`XCLAIM ... JUSTID`) every third of the timeout, so only a dead instance's messages move.
`ack` is `XACK` + `XDEL` in one `MULTI`, so a queue holds only what is owed. `retry` acks and schedules a copy
with `attempt + 1`, due by the server's clock. `release` leaves the entry pending but reclaimable at once,
its delivery counter set back so that no attempt is counted.

Replies (`bus.request`): pub/sub on the channel `<prefix>replies:<instance>`, one per process, unsubscribed at
close. Fire and forget: nothing is stored, and a reply sent while nobody listens (its asker gone) is lost. A
payload is the reply's id, headers and key as one JSON line, then its body.

Options (query string): `prefix` (`eventrelay:`), `visibility_timeout` (30 s), `poll` (1 s: the longest a
fetch blocks before it looks for due retries and reclaimable entries again), `maxlen` (0: no cap; n: each
queue is capped with `XADD MAXLEN ~ n`). redis-py's URL options go to it (e.g. `socket_timeout`), TLS's too:
`rediss://host:6380/0?ssl_ca_certs=/ca.pem` (and `ssl_certfile`, `ssl_keyfile` for a client certificate; a
connection reset at start without them says that the server may demand one).
Another option is an error when the broker is made (`UrlOptions`).
Connections: a blocking pool of `max_connections` (50); a command past them waits for a free one.

Limits:
- `maxlen` is off by default: trimming drops a lagging subscriber's oldest entries although nobody acked
  them. Set it only where losing a backlog beats running out of memory. Without it, the queue of a service
  that is down but still bound grows until the service comes back (watch `XLEN`).
- Order: one instance gets its subscriber's messages in publish order across names, and released messages
  come back before newer ones. Instances of one service compete with no key affinity, so per-key order across
  instances is not offered; a crashed instance's messages come back after the timeout, behind newer ones.
- A delayed retry is due to within `poll`; a retry without delay wakes fetchers at once.
- At least once: a publish retried over a dropped connection may store a batch twice (the inbox dedupes).
- One Redis primary (with replicas or Sentinel), not Redis Cluster: the scripts touch keys in many slots.
- Durability is the server's: without AOF (`appendonly yes`) a restart loses queues, retries and bindings;
  the adapter then recreates its queues and the bindings it made, but the messages are gone.
- Crashed instances stay listed, with nothing pending, in `XINFO CONSUMERS`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import os
import socket
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Self
from urllib.parse import urlencode, urlsplit, urlunsplit

try:
    from redis.asyncio import BlockingConnectionPool, Redis
    from redis.asyncio.client import PubSub
    from redis.asyncio.connection import URL_QUERY_ARGUMENT_PARSERS as TYPED_OPTIONS
    from redis.asyncio.connection import Connection, SSLConnection, UnixDomainSocketConnection
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialWithJitterBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import ReadOnlyError, RedisError, ResponseError
    from redis.exceptions import TimeoutError as RedisTimeoutError
except ImportError as exc:  # pragma: no cover
    raise ImportError("Redis support needs an extra: pip install 'eventrelay[redis]'") from exc

from eventrelay.brokers.base import Broker, LeaseKeeper, Replies, delivery_token
from eventrelay.brokers.options import UrlOptions, keyword_names, url_query
from eventrelay.brokers.tls_hints import mutual_tls_hint
from eventrelay.config import redact_url
from eventrelay.envelope import Delivery, Message
from eventrelay.errors import BrokerUnavailable, ConfigurationError, PublishFailed

logger = logging.getLogger(__name__)

_RELEASED = "eventrelay-released"  # the consumer that holds released entries until someone reclaims them
_TEXT_OPTIONS = {"client_name", "username", "password", "lib_name", "lib_version"}  # redis-py's text options
_TEXT_OPTIONS |= {"ssl_keyfile", "ssl_certfile", "ssl_ca_certs", "ssl_ca_data", "ssl_ca_path", "ssl_password"}
_TEXT_OPTIONS |= {"ssl_cert_reqs", "ssl_ciphers"}
_LONG_IDLE = 2**36  # ms: idle enough for any visibility timeout, yet a time after the epoch as Redis wants

# KEYS: the route set of each message. ARGV: prefix, maxlen, then id, name, body, headers, "-" or "+key".
_PUBLISH = """
for m = 1, #KEYS do
    local a = 2 + (m - 1) * 5
    local fields = {'i', ARGV[a + 1], 'n', ARGV[a + 2], 'b', ARGV[a + 3], 'h', ARGV[a + 4]}
    if string.sub(ARGV[a + 5], 1, 1) == '+' then
        fields[9], fields[10] = 'k', string.sub(ARGV[a + 5], 2)
    end
    for _, subscriber in ipairs(redis.call('SMEMBERS', KEYS[m])) do
        local queue = ARGV[1] .. 'queue:' .. subscriber
        if ARGV[2] ~= '0' then
            redis.call('XADD', queue, 'MAXLEN', '~', ARGV[2], '*', unpack(fields))
        else
            redis.call('XADD', queue, '*', unpack(fields))
        end
    end
end
"""
# KEYS: queue, delayed. ARGV: group, entry id, next attempt, delay (ms). Copies the entry on the server.
_RETRY = """
local entry = redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[2])[1]
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
if not entry then return 0 end
local copy = {}
for i = 1, #entry[2], 2 do
    if entry[2][i] ~= 'a' then
        copy[#copy + 1], copy[#copy + 2] = entry[2][i], entry[2][i + 1]
    end
end
copy[#copy + 1], copy[#copy + 2] = 'a', ARGV[3]
if tonumber(ARGV[4]) <= 0 then
    redis.call('XADD', KEYS[1], '*', unpack(copy))
else
    local time = redis.call('TIME')
    local due = time[1] * 1000 + math.floor(time[2] / 1000) + tonumber(ARGV[4])
    redis.call('ZADD', KEYS[2], due, cmsgpack.pack(copy))
end
return 1
"""
# KEYS: queue, delayed. ARGV: group, consumer, visibility timeout (ms), XAUTOCLAIM cursor, count.
# Returns the next cursor, the reclaimed entries, their delivery counts, ms until the next retry is due, and
# how many pending entries were trimmed away (by `maxlen`) before anyone acked them.
_PREPARE = """
local time = redis.call('TIME')
local now = time[1] * 1000 + math.floor(time[2] / 1000)
for _, copy in ipairs(redis.call('ZRANGE', KEYS[2], '-inf', now, 'BYSCORE', 'LIMIT', 0, 100)) do
    redis.call('XADD', KEYS[1], '*', unpack(cmsgpack.unpack(copy)))
    redis.call('ZREM', KEYS[2], copy)
end
local claimed = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4], 'COUNT', ARGV[5])
local counts = {}
for i, entry in ipairs(claimed[2]) do
    counts[i] = redis.call('XPENDING', KEYS[1], ARGV[1], entry[1], entry[1], 1)[1][4]
end
local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')[2]
return {claimed[1], claimed[2], counts, first and (tonumber(first) - now) or false, #claimed[3]}
"""


@dataclass(frozen=True, slots=True)
class _Entry:
    """A delivery's token: where its entry is, and how often Redis has handed it out."""

    subscriber: str
    entry_id: bytes
    deliveries: int


class RedisBroker(Broker):
    """A broker on Redis Streams (see the module docstring)."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        note = "ssl_* options need rediss://" if parts.scheme == "redis" else ""
        options = UrlOptions(
            "Redis", url, url_query(url), client="redis-py", passes=_client_options(parts.scheme), note=note
        )
        self.prefix = options.string("prefix", "eventrelay:")
        self.visibility_timeout = options.number("visibility_timeout", 30.0)
        self.poll = options.number("poll", 1.0)
        self.maxlen = options.integer("maxlen", 0, minimum=0)
        self.url = urlunsplit(parts._replace(query=urlencode(options.finish())))
        try:
            # Blocking: past `max_connections` (50) a command waits for a free connection, where redis-py's
            # default pool fails with "Too many connections" (a burst of concurrent publishes).
            pool = BlockingConnectionPool.from_url(
                self.url,
                socket_timeout=self.poll + 5.0,  # a blocking read waits at most `poll`
                socket_connect_timeout=5.0,
                retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), 2),
            )
            self._redis = Redis.from_pool(pool)
        except ValueError as exc:
            raise ConfigurationError(f"Bad Redis broker URL {redact_url(url)!r}: {exc}") from exc
        self._publish = self._redis.register_script(_PUBLISH)
        self._retry = self._redis.register_script(_RETRY)
        self._prepare = self._redis.register_script(_PREPARE)
        self._consumer = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._bound: dict[str, set[str]] = {}  # bindings made here, restored if Redis lost them
        self._cursors: dict[str, bytes] = {}  # XAUTOCLAIM cursor per subscriber fetched for
        self._held: set[_Entry] = set()
        self._leases = LeaseKeeper("Redis", self.visibility_timeout, lambda: list(self._held), self._renew)

    def _key(self, kind: str, name: str) -> str:
        return f"{self.prefix}{kind}:{name}"

    # --- lifecycle -----------------------------------------------------------------------------------

    async def start(self) -> None:
        try:
            async with self._translate("connect to"):
                await self._redis.ping()
        except BrokerUnavailable as exc:
            hint = mutual_tls_hint(exc, "ssl_certfile and ssl_keyfile")
            if not (hint and self.url.startswith("rediss:") and "ssl_certfile" not in self.url):
                raise
            raise BrokerUnavailable(f"{exc}{hint}") from exc.__cause__
        self._leases.start()

    async def close(self) -> None:
        await self._leases.stop()
        try:
            await self._leave()
        except (RedisError, OSError):
            logger.warning("Could not leave the Redis consumer groups cleanly", exc_info=True)
        await self._redis.aclose()

    async def _leave(self) -> None:
        """Give back what a cancelled read left pending but never handed out; drop our consumer if idle."""
        for subscriber in self._cursors:
            queue = self._key("queue", subscriber)
            held = {e.entry_id for e in self._held if e.subscriber == subscriber}
            pending: list[dict[str, Any]] = await self._redis.xpending_range(
                queue, subscriber, "-", "+", 1000, self._consumer
            )
            for row in pending:
                if row["message_id"] not in held:
                    await self._give_back(subscriber, row["message_id"], row["times_delivered"])
            if not held:
                await self._redis.xgroup_delconsumer(queue, subscriber, self._consumer)

    # --- the port ------------------------------------------------------------------------------------

    async def publish(self, messages: Sequence[Message]) -> None:
        if not messages:
            return
        args: list[str | bytes | int] = [self.prefix, self.maxlen]
        for m in messages:
            key = "-" if m.key is None else f"+{m.key}"
            args += [m.id, m.name, m.body, json.dumps(dict(m.headers)), key]
        async with self._translate("publish to"):
            await self._publish(keys=[self._key("routes", m.name) for m in messages], args=args)

    async def bind(self, subscriber: str, name: str) -> None:
        async with self._translate("bind on"):
            await self._create_group(subscriber)
            await self._redis.sadd(self._key("routes", name), subscriber)
        self._bound.setdefault(subscriber, set()).add(name)

    async def unbind(self, subscriber: str, name: str) -> None:
        async with self._translate("unbind on"):
            await self._redis.srem(self._key("routes", name), subscriber)
        self._bound.get(subscriber, set()).discard(name)

    async def fetch(self, subscriber: str, max_count: int, timeout: float) -> list[Delivery]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        queue = self._key("queue", subscriber)
        while True:
            async with self._translate("fetch from"):
                try:
                    batch, due_in = await self._reclaim(subscriber, max_count)
                    if batch:
                        return batch
                    wait = min(deadline - loop.time(), self.poll, due_in)
                    block = math.ceil(wait * 1000) if wait > 0 else None
                    reply: Any = await self._redis.xreadgroup(
                        subscriber, self._consumer, {queue: ">"}, count=max_count, block=block
                    )
                except ResponseError as exc:
                    if "NOGROUP" not in str(exc):
                        raise
                    await self._restore(subscriber)
                    continue
            batch = [self._delivery(subscriber, i, f, 1) for _, entries in reply or () for i, f in entries]
            if batch or loop.time() >= deadline:
                return batch

    async def ack(self, delivery: Delivery) -> None:
        entry = self._let_go(delivery)
        queue = self._key("queue", entry.subscriber)
        async with self._translate("ack on"), self._redis.pipeline(transaction=True) as pipe:
            pipe.xack(queue, entry.subscriber, entry.entry_id)
            pipe.xdel(queue, entry.entry_id)
            await pipe.execute()

    async def retry(self, delivery: Delivery, delay: float) -> None:
        entry = self._let_go(delivery)
        keys = [self._key("queue", entry.subscriber), self._key("delayed", entry.subscriber)]
        delay_ms = math.ceil(max(0.0, delay) * 1000)
        args: list[str | bytes | int] = [entry.subscriber, entry.entry_id, delivery.attempt + 1, delay_ms]
        async with self._translate("retry on"):
            await self._retry(keys=keys, args=args)

    async def release(self, delivery: Delivery) -> None:
        entry = self._let_go(delivery)
        async with self._translate("release on"):
            await self._give_back(entry.subscriber, entry.entry_id, entry.deliveries)

    async def open_replies(self, instance: str) -> Replies:
        """A pub/sub channel of this process's own (see the module docstring)."""
        async with self._translate("open replies on"):
            return await RedisReplies(self, self._key("replies", instance)).open()

    async def send_reply(self, address: str, message: Message) -> None:
        """Publish to the reply channel `address`, one made under this broker's `prefix`."""
        if not address.startswith(self._key("replies", "")):
            raise PublishFailed(f"Not a Redis reply channel under {self.prefix!r}: {address[:100]!r}")
        head = json.dumps({"i": message.id, "h": dict(message.headers), "k": message.key})
        async with self._translate("reply on"):
            await self._redis.publish(address, head.encode() + b"\n" + message.body)

    async def pending_count(self, subscriber: str) -> int:
        """Entries in the subscriber's queue (new or pending) plus retries waiting to be due."""
        async with self._translate("count on"), self._redis.pipeline(transaction=False) as pipe:
            pipe.xlen(self._key("queue", subscriber))
            pipe.zcard(self._key("delayed", subscriber))
            queued, delayed = await pipe.execute()
        return int(queued) + int(delayed)

    # --- internals -----------------------------------------------------------------------------------

    async def _create_group(self, subscriber: str) -> None:
        try:
            await self._redis.xgroup_create(self._key("queue", subscriber), subscriber, "$", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _restore(self, subscriber: str) -> None:
        """The queue or its group is gone (Redis restarted without persistence, or keys were deleted)."""
        names = self._bound.get(subscriber, set())
        if names:
            logger.warning(
                "Redis lost the queue of %s; recreating it and %d binding(s)", subscriber, len(names)
            )
        await self._create_group(subscriber)
        for name in names:
            await self._redis.sadd(self._key("routes", name), subscriber)

    async def _reclaim(self, subscriber: str, max_count: int) -> tuple[list[Delivery], float]:
        """Move due retries into the queue; reclaim idle entries. Returns them and seconds to the next due."""
        keys = [self._key("queue", subscriber), self._key("delayed", subscriber)]
        cursor = self._cursors.get(subscriber, b"0-0")
        ms = int(self.visibility_timeout * 1000)
        reply = await self._prepare(keys=keys, args=[subscriber, self._consumer, ms, cursor, max_count])
        self._cursors[subscriber], entries, counts, due_in, trimmed = reply
        if trimmed:
            logger.error(
                "%d pending message(s) of %s were trimmed by maxlen before an ack", trimmed, subscriber
            )
        batch = [
            self._delivery(subscriber, entry_id, dict(zip(flat[::2], flat[1::2], strict=True)), count)
            for (entry_id, flat), count in zip(entries, counts, strict=True)
        ]
        return batch, math.inf if due_in is None else max(0, due_in) / 1000

    def _delivery(self, subscriber: str, entry_id: bytes, fields: dict[bytes, bytes], count: int) -> Delivery:
        try:
            key = None if (k := fields.get(b"k")) is None else k.decode()
            headers = json.loads(fields[b"h"])
            message = Message(fields[b"i"].decode(), fields[b"n"].decode(), fields[b"b"], headers, key)
            attempt = int(fields.get(b"a", b"1")) + count - 1
        except (KeyError, ValueError) as exc:  # not ours: hand it on nameless, the bus dead-letters it
            logger.error("Malformed entry %s in the Redis queue of %s: %r", entry_id, subscriber, exc)
            message, attempt = Message(entry_id.decode(), "", fields.get(b"b", b""), {}), count
        entry = _Entry(subscriber, entry_id, count)
        self._held.add(entry)
        return Delivery(message, attempt, entry)

    def _let_go(self, delivery: Delivery) -> _Entry:
        entry = delivery_token(delivery, _Entry, "RedisBroker")
        self._held.discard(entry)
        return entry

    async def _give_back(self, subscriber: str, entry_id: bytes, deliveries: int) -> None:
        """Leave the entry pending but reclaimable at once, its counter set back so no attempt is counted."""
        queue, back = self._key("queue", subscriber), deliveries - 1
        await self._redis.xclaim(
            queue, subscriber, _RELEASED, 0, [entry_id], idle=_LONG_IDLE, retrycount=back, justid=True
        )

    async def _renew(self, held: Sequence[_Entry]) -> None:
        """Claim the held entries again, which resets their idle time: nobody else reclaims them."""
        by_subscriber: dict[str, list[Any]] = {}
        for entry in held:
            by_subscriber.setdefault(entry.subscriber, []).append(entry.entry_id)
        async with self._redis.pipeline(transaction=False) as pipe:
            for subscriber, ids in by_subscriber.items():
                pipe.xclaim(self._key("queue", subscriber), subscriber, self._consumer, 0, ids, justid=True)
            await pipe.execute()

    @contextlib.asynccontextmanager
    async def _translate(self, action: str) -> AsyncIterator[None]:
        try:
            yield
        except (RedisConnectionError, RedisTimeoutError, ReadOnlyError, OSError) as exc:
            raise BrokerUnavailable(f"Could not {action} Redis at {redact_url(self.url)}: {exc}") from exc
        except RedisError as exc:
            raise PublishFailed(f"Could not {action} Redis at {redact_url(self.url)}: {exc}") from exc


class RedisReplies(Replies):
    """Replies to the requests of one process, on the pub/sub channel `address`."""

    def __init__(self, broker: RedisBroker, address: str) -> None:
        self.broker, self.address = broker, address
        self._pubsub: PubSub = broker._redis.pubsub()

    async def open(self) -> Self:
        await self._pubsub.subscribe(self.address)
        return self

    async def receive(self, timeout: float) -> list[Message]:
        came: list[Message] = []
        wait = timeout  # for the first; then only what is here already
        async with self.broker._translate("receive replies from"):
            while got := await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=wait):
                wait = 0.0
                head, _, body = got["data"].partition(b"\n")
                try:
                    fields = json.loads(head)
                    came.append(Message(fields["i"], self.address, body, fields["h"], fields["k"]))
                except (KeyError, TypeError, ValueError) as exc:  # not sent by `send_reply`
                    logger.warning("Dropped a malformed reply on %s: %r", self.address, exc)
        return came

    async def close(self) -> None:
        async with self.broker._translate("close replies on"):
            try:
                await self._pubsub.unsubscribe(self.address)
                async with asyncio.timeout(5.0):
                    while self._pubsub.subscribed:  # until the server confirms: gone when close returns
                        await self._pubsub.get_message(timeout=1.0)
            finally:
                await self._pubsub.aclose()  # type: ignore[no-untyped-call]  # (redis-py leaves it unannotated)


@functools.cache
def _client_options(scheme: str) -> frozenset[str]:
    """The query options redis-py reads for `scheme`: those it types (`socket_timeout`, ...) and the text
    ones (names, files), where its connection class or pool for the scheme takes them (`ssl_*` only with
    `rediss://`). Its internals (`parser_class`, ...) and `decode_responses` (the broker reads bytes) are no
    URL options."""
    connection = {"rediss": SSLConnection, "unix": UnixDomainSocketConnection}.get(scheme, Connection)
    return keyword_names(connection, BlockingConnectionPool) & (set(TYPED_OPTIONS) | _TEXT_OPTIONS)


__all__ = ["RedisBroker"]
