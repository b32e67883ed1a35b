"""`nats://host:4222?stream=shop&prefix=shop` (or `tls://user:password@host`, or a cluster's hosts:
`nats://user:password@h1:4222,h2:4223,h3:4224?replicas=3`): NATS JetStream, with nats-py.

Topology: one stream per solution (`stream`; interest retention, file storage) captures `<prefix>.>`; an
event goes to `<prefix>.<event name>` (the name escaped: `nats_wire.py`). Each (subscriber, event name) has
a durable pull consumer on that subject (explicit ack, deliver "new"), created on bind and named
`<subscriber>_<name>_<digest>` (`nats_topology.py`); the instances of a service share it and compete. One
consumer per name because nats-server 2.9 takes one filter subject per consumer (2.10 takes several).

Fetch: one pull request per consumer without one open (a fair share of `max_count` each, at least one,
the larger shares taking turns), answered on one inbox; a fetch returns what came, in stream order. A
request is never withdrawn (on 2.9 the server may still send a message to a dropped inbox, and it would be
lost until `ack_wait`): it ends when full or after at most 1 s, and what it brings later waits for the next
fetch (a prefetch of up to `max(max_count, names)`, with its leases renewed). attempt = `num_delivered`;
retry = NAK with a delay; release = NAK, which JetStream counts as a delivery: the adapter takes off the
releases it made itself, so a release fetched again in the same process keeps its attempt, and one fetched
by another process counts one more (so does prefetched work NAKed at close). The lease is `ack_wait`,
renewed (`in_progress`) every `ack_wait / 3` for what the adapter holds; a dead consumer's messages come back.

A process also fetches from the subscriber's consumers that it did not bind (an earlier deployment's, for a
name no handler takes now; looked up at its first fetch): the bus dead-letters their messages.

Unbind deletes a consumer with nothing queued. Otherwise it marks it draining (description, and a 5 minute
`inactive_threshold` so that the server reaps a drain nobody finishes): what was queued before the unbind
is still delivered (the bus dead-letters it when no handler is left, so nothing vanishes), what comes
after is acked unseen, and the consumer is deleted once drained. Other processes still fetching from it
handle its messages until then.

Retention: a message leaves the stream once every consumer on its subject acked it; one that no consumer is
bound to is not kept (as RabbitMQ drops what no binding routes); `max_age` bounds what a subscriber that never
comes back leaves behind. The message id is `Nats-Msg-Id`, so JetStream stores an id once within
`duplicate_window`: an outbox row sent again after a crash is not delivered twice (a later copy is left to the
inbox). Headers are NATS headers (`nats_wire.py`). `publish` writes a batch at once and returns when JetStream
acked every message. nats-py reconnects forever; the stream and consumers are then declared again. While
disconnected, `publish` raises `BrokerUnavailable`, and so does a `fetch` not reconnected in time.

Options: `stream` (eventrelay), `prefix` (the stream name), `ack_wait` (30 s), `max_age` (7 days, 0 = none),
`duplicate_window` (120 s, at most `max_age`), `max_ack_pending` (1000 per consumer), `publish_timeout`
(5 s), `connect_timeout` (5 s), `ping_interval` (10 s; three unanswered pings drop a hung connection),
`replicas` (1: the stream's, and so its consumers', copies in a cluster; `nats_topology.py`); another option
is an error. Several hosts (`nats_url.py`) share the scheme, credentials and options; nats-py connects to one,
learns the cluster's others from it, and reconnects to any.
TLS: `tls://` with `tls_ca` (a CA file; the system's CAs without it), `tls_cert` and `tls_key` (a client
certificate) and `tls_handshake_first=1` (for a server with `handshake_first`: TLS before its INFO). A
`tls://` URL (or a `tls_*` option) to a server whose INFO does not ask for TLS is refused before CONNECT,
so the credentials never go in plaintext, on reconnections too (`nats_tls.py`).

Replies (`bus.request`): a core NATS subscription per process to `_INBOX.<nuid>` (`nats_replies.py`), no
stream and no consumer; `send_reply` publishes there and flushes. A `prefix` under `_INBOX` is refused, so
that the stream never captures a reply (or nats-py's own inboxes).

Limits: per-key order across the instances of a service only with `max_ack_pending=1`, which delivers one
event name in stream order, one message at a time (retries included), never across event names. A message
is at most the server's `max_payload` (1 MB by default).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import re
import ssl
from collections.abc import AsyncIterator, Sequence
from typing import Any
from urllib.parse import urlsplit

try:
    import nats.errors
    import nats.js.errors
    from nats.aio.client import Client
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription
    from nats.js import api

    from eventrelay.brokers import nats_topology, nats_wire
    from eventrelay.brokers.nats_replies import NatsReplies
    from eventrelay.brokers.nats_tls import SecureClient
    from eventrelay.brokers.nats_topology import Consumer, Pulled, Request, consumer_info, durable
    from eventrelay.brokers.nats_url import parse_servers
    from eventrelay.brokers.nats_wire import subject_token
except ImportError as exc:  # pragma: no cover
    raise ImportError("NATS support needs an extra: pip install 'eventrelay[nats]'") from exc

from eventrelay.brokers.base import Arrivals, Broker, LeaseKeeper, Replies, delivery_token
from eventrelay.brokers.options import UrlOptions, url_query
from eventrelay.brokers.tls_hints import mutual_tls_hint
from eventrelay.config import redact_url
from eventrelay.envelope import Delivery, Message
from eventrelay.errors import BrokerUnavailable, ConfigurationError, PublishFailed

logger = logging.getLogger(__name__)

OPTIONS = {"ack_wait": 30.0, "max_age": 7 * 86400.0, "duplicate_window": 120.0, "max_ack_pending": 1000.0}
OPTIONS |= {"publish_timeout": 5.0, "connect_timeout": 5.0, "ping_interval": 10.0}
TLS_FILES = ("tls_ca", "tls_cert", "tls_key")
_LINGER = 1.0  # the longest a pull request stays open; close() lets the open ones end


class NatsBroker(Broker):
    """NATS JetStream as the broker (see the module docstring)."""

    def __init__(self, url: str) -> None:
        parts, query = urlsplit(url), url_query(url)
        options = UrlOptions("NATS", url, query)
        self.stream = options.string("stream", "eventrelay")
        self.prefix = options.string("prefix", self.stream)
        self._tls = {name: value for name in TLS_FILES if (value := options.string(name))}
        self._handshake_first = options.flag("tls_handshake_first")
        self.options = {
            name: options.number(name, default, zero=name == "max_age") for name, default in OPTIONS.items()
        }
        self.options["replicas"] = options.integer("replicas", 1, minimum=1)
        options.finish()
        if not re.fullmatch(r"[\w-]+", self.stream) or not re.fullmatch(r"[\w-]+(\.[\w-]+)*", self.prefix):
            raise ConfigurationError(
                f"NATS broker URL: stream={self.stream!r} must be a name, prefix={self.prefix!r} a subject"
            )
        if self.prefix.split(".")[0] == nats_wire.INBOX:  # its stream would capture replies and pull answers
            raise ConfigurationError(f"NATS broker URL: prefix={self.prefix!r} is under {nats_wire.INBOX}")
        self.url = parts._replace(query="").geturl()
        self._servers = parse_servers(self.url)  # one host or several
        token = parts.username is not None and parts.password is None  # nats://<token>@host
        self.safe_url = redact_url(self.url.replace(f"{parts.username}@", "***@", 1) if token else self.url)
        self._context = self._tls_context()
        self._wants_tls = parts.scheme == "tls" or bool(self._tls) or "tls_handshake_first" in query
        self._nc: Client = SecureClient(self._wants_tls)
        self._js = self._nc.jetstream()
        self._inbox: Subscription | None = None  # where the answers to all our pull requests come
        self._consumers: dict[str, Consumer] = {}  # by durable name
        self._adopted: set[str] = set()  # subscribers whose consumers on the server were looked up
        self._requests: dict[str, Request] = {}  # open pull requests, by inbox token
        self._buffer: dict[str, list[Pulled]] = {}  # pulled, not handed out yet, by subscriber
        self._held: dict[Delivery, Pulled] = {}
        self._released: dict[tuple[str, int], int] = {}
        self._arrivals = Arrivals()
        self._turn = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._leases = LeaseKeeper("NATS", self.options["ack_wait"], self._leased, self._renew)

    # --- lifecycle -----------------------------------------------------------------------------------

    async def start(self) -> None:
        async def disconnected() -> None:
            if not self._nc.is_closed:  # not our own close()
                logger.warning("Lost the connection to NATS at %s; reconnecting", self.safe_url)

        async def reconnected() -> None:
            logger.info("Reconnected to NATS at %s", self.safe_url)
            for token in list(self._requests):  # the server forgot them with the connection
                self._end(token)
            self._spawn(self._declare(again=True))

        async def error(exc: Exception) -> None:
            logger.debug("NATS connection to %s: %r", self.safe_url, exc)

        self._nc, self._requests = SecureClient(self._wants_tls), {}  # a closed broker can start again
        self._js = self._nc.jetstream()
        for consumer in self._consumers.values():
            consumer.request = None
        whole = {name: int(max(1, self.options[name])) for name in ("ping_interval", "connect_timeout")}
        connecting = self._nc.connect(
            self._servers.urls,
            **self._servers.credentials(),
            name="eventrelay",
            max_reconnect_attempts=-1,
            reconnect_time_wait=1,
            ping_interval=whole["ping_interval"],
            max_outstanding_pings=3,
            connect_timeout=whole["connect_timeout"],
            disconnected_cb=disconnected,
            reconnected_cb=reconnected,
            error_cb=error,
            tls=self._context,
            tls_handshake_first=self._handshake_first,
        )
        try:
            async with self._translate("connect to"):
                try:
                    await asyncio.wait_for(connecting, self.options["connect_timeout"])
                except TimeoutError as exc:  # nats-py tries again until then: say what went wrong
                    if (last := self._nc.last_error) is None:
                        raise
                    bare = self._wants_tls and "tls_cert" not in self._tls  # TLS, no client certificate
                    hint = mutual_tls_hint(last, "tls_cert and tls_key") if bare else ""
                    raise nats.errors.Error(f"timed out; the last error was {last!r}{hint}") from exc
                await self._declare()
                self._inbox = await self._nc.subscribe(f"{self._nc.new_inbox()}.*", cb=self._receive)
        except BaseException:
            await self._nc.close()
            raise
        self._leases.start()

    def _tls_context(self) -> ssl.SSLContext | None:
        """The TLS context of `tls_ca`, `tls_cert` and `tls_key`; None (nats-py's default) without them."""
        if not self._tls:
            return None
        try:
            context = ssl.create_default_context(cafile=self._tls.get("tls_ca"))
            if "tls_cert" in self._tls:
                context.load_cert_chain(self._tls["tls_cert"], self._tls.get("tls_key"))
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise ConfigurationError(f"NATS broker URL: cannot load its TLS files: {exc}") from exc
        return context

    async def close(self) -> None:
        with contextlib.suppress(TimeoutError):  # let open pull requests end: withdrawn, one could still
            async with asyncio.timeout(_LINGER + 1):  # send a message into the void
                while self._requests and self._nc.is_connected:
                    await self._arrivals.wait(None)
        self._requests.clear()
        await self._leases.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        pulled = [pulled for buffer in self._buffer.values() for pulled in buffer]
        self._buffer.clear()
        with contextlib.suppress(Exception):
            for consumer, msg in pulled:  # pulled but never handed out: available again at once
                await self._nak(consumer, msg)
        with contextlib.suppress(Exception):
            await self._nc.close()

    async def _declare(self, again: bool = False) -> None:
        """Create the stream (or check it); after a reconnect, the consumers too (`declare_again`)."""
        consumers = [self._config(c) for c in self._consumers.values() if again and c.cutoff is None]
        declare = functools.partial(nats_topology.declare, self._js, self.stream, self.prefix, self.options)
        connected = functools.partial(getattr, self._nc, "is_connected")
        await (nats_topology.declare_again(declare, consumers, connected) if again else declare(consumers))

    # --- the port ------------------------------------------------------------------------------------

    async def publish(self, messages: Sequence[Message]) -> None:
        futures: list[asyncio.Future[api.PubAck]] = []
        async with self._translate("publish to"):
            if messages and not self._nc.is_connected:
                raise nats.errors.ConnectionReconnectingError
            try:
                for m in messages:  # written in order on one connection, then confirmed together
                    subject, headers = nats_wire.subject(self.prefix, m.name), nats_wire.outgoing(m)
                    publishing = self._js.publish_async(subject, m.body, stream=self.stream, headers=headers)
                    futures.append(await publishing)
                # cancelled (the relay's lease ran out), it holds a CancelledError that asyncio would log
                (confirmed := asyncio.gather(*futures)).add_done_callback(_retrieved)
                await asyncio.wait_for(confirmed, self.options["publish_timeout"])
            finally:
                for future in futures:
                    future.cancel()

    async def bind(self, subscriber: str, name: str) -> None:
        consumer = Consumer(subscriber, name)
        consumer = self._consumers.setdefault(consumer.durable, consumer)
        consumer.cutoff = None
        async with self._translate("bind on"):
            await nats_topology.add_consumer(self._js, self.stream, self._config(consumer))

    async def unbind(self, subscriber: str, name: str) -> None:
        consumer = Consumer(subscriber, name)
        consumer = self._consumers.get(consumer.durable, consumer)
        async with self._translate("unbind on"):
            info = await consumer_info(self._js, self.stream, consumer.durable)
            if info is None:
                self._consumers.pop(consumer.durable, None)
                return
            if info.num_pending + info.num_ack_pending == 0:
                await self._delete(consumer)
                return
            consumer.cutoff = (await self._js.stream_info(self.stream)).state.last_seq
            await self._js.add_consumer(self.stream, self._config(consumer))
            self._consumers[consumer.durable] = consumer  # drained by the fetches, then deleted

    async def fetch(self, subscriber: str, max_count: int, timeout: float) -> list[Delivery]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        async with self._translate("fetch from"):
            if subscriber not in self._adopted:
                await self._adopt(subscriber)
            while not (batch := await self._take(subscriber, max_count)):
                remaining, connected = deadline - loop.time(), self._nc.is_connected
                if remaining <= 0 and not connected:
                    raise nats.errors.ConnectionReconnectingError
                if remaining <= 0:
                    return []
                mark = self._arrivals.mark()  # a message may come while the requests go out
                consumers = [c for c in self._consumers.values() if c.subscriber == subscriber]
                if connected and (idle := [c for c in consumers if c.request is None]):
                    await self._request(idle, max_count, min(remaining, _LINGER))
                wait = remaining if consumers and connected else min(remaining, 0.05)
                await self._arrivals.wait(wait, since=mark)
                if self._buffer.get(subscriber) and self._inbox is not None:
                    # One round trip more: what the server sent along with the first message is here too.
                    await self._round_trip()
                    for _ in range(self._inbox.pending_msgs + 1):  # let the inbox hand them over
                        await asyncio.sleep(0)
        return batch

    async def _round_trip(self) -> None:
        """nats-py's `flush` (a PING and its PONG), never cancelled half-way: a PING whose waiter was
        cancelled stays in nats-py's list, and its PONG then fails the client's read loop with
        InvalidStateError (a consumer stopped mid-fetch logged that traceback)."""
        flushing = asyncio.ensure_future(self._nc.flush(int(max(1, self.options["publish_timeout"]))))
        flushing.add_done_callback(_retrieved)  # a failure after we were cancelled is no news to anyone
        await asyncio.shield(flushing)

    async def ack(self, delivery: Delivery) -> None:
        consumer, msg = self._let_go(delivery)
        self._released.pop((consumer.durable, msg.metadata.sequence.stream), None)
        async with self._translate("ack on"):
            await msg.ack()

    async def retry(self, delivery: Delivery, delay: float) -> None:
        _, msg = self._let_go(delivery)
        async with self._translate("retry on"):
            await msg.nak(delay=max(0.0, delay))

    async def release(self, delivery: Delivery) -> None:
        async with self._translate("release on"):
            await self._nak(*self._let_go(delivery))

    async def open_replies(self, instance: str) -> Replies:
        """A core NATS subscription to a reply subject of this process's own (see the module docstring)."""
        async with self._translate("open replies on"):
            return await NatsReplies(self._nc, self._round_trip).open()

    async def send_reply(self, address: str, message: Message) -> None:
        """Publish to the reply subject `address` (core NATS, flushed); anything else is refused."""
        if not nats_wire.reply_subject(address):
            raise PublishFailed(f"Not a NATS reply subject: {address[:100]!r}")
        async with self._translate("reply on"):
            await self._nc.publish(address, message.body, headers=nats_wire.outgoing(message))
            await self._round_trip()

    async def pending_count(self, subscriber: str) -> int:
        """What the subscriber's consumers still hold: not delivered yet, or delivered and not acked."""
        total = 0
        async with self._translate("count on"):
            for consumer in [c for c in self._consumers.values() if c.subscriber == subscriber]:
                info = await consumer_info(self._js, self.stream, consumer.durable)
                if info is not None:
                    total += info.num_pending + info.num_ack_pending
        return total

    # --- internals -----------------------------------------------------------------------------------

    async def _adopt(self, subscriber: str) -> None:
        """Fetch from the subscriber's consumers that are on the server but not bound by this process.

        An earlier deployment may have bound an event name that this one no longer handles: the consumer
        stays (bindings outlive processes, as RabbitMQ's do), and its messages must reach the bus, which
        dead-letters them, rather than wait unseen until `max_age`. A draining consumer is left to its drain.
        """
        found = await nats_topology.unbound(self._js, self.stream, self.prefix, subscriber, self._consumers)
        if found is not None:
            for consumer in found:
                self._consumers.setdefault(consumer.durable, consumer)
            self._adopted.add(subscriber)

    def _config(self, consumer: Consumer) -> api.ConsumerConfig:
        return nats_topology.config(consumer, self.prefix, self.options)

    async def _request(self, consumers: list[Consumer], max_count: int, expires: float) -> None:
        """One pull request per consumer, a fair share of `max_count` each; the larger shares take turns.

        A request is never withdrawn (on nats-server 2.9 a message can still be sent to an inbox that was
        just unsubscribed, and would be lost until `ack_wait`): it ends when full, or at `expires`."""
        self._turn += 1
        shift = self._turn % len(consumers)
        for index, consumer in enumerate(consumers[shift:] + consumers[:shift]):
            token = f"{self._turn}-{index}"
            request = Request(token, consumer, max(1, len(range(index, max_count, len(consumers)))))
            self._requests[token] = consumer.request = request
            data = json.dumps({"batch": request.batch, "expires": int(expires * 1e9)}).encode()
            subject = f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{consumer.durable}"
            assert self._inbox is not None
            await self._nc.publish(subject, data, reply=self._inbox.subject.replace("*", token))
            asyncio.get_running_loop().call_later(expires + _LINGER, self._end, token)  # if never answered

    async def _receive(self, msg: Msg) -> None:
        """A message for one of our pull requests, or a status that ends one."""
        if not msg.reply:
            self._end(msg.subject.rpartition(".")[2])
            return
        consumer = self._consumers.get(msg.metadata.consumer)
        if consumer is None:  # unbound meanwhile: it comes back after ack_wait, to whoever still binds it
            return
        self._buffer.setdefault(consumer.subscriber, []).append(Pulled(consumer, msg))
        request = consumer.request
        if request is not None:
            request.got += 1
            if request.got >= request.batch:
                self._end(request.token)
        self._arrivals.wake()

    def _end(self, token: str) -> None:
        request = self._requests.pop(token, None)
        if request is None:
            return
        consumer = request.consumer
        if consumer.request is request:
            consumer.request = None
        if consumer.cutoff is not None and not request.got:  # nothing came: maybe drained
            self._spawn(self._finish_drain(consumer))
        self._arrivals.wake()

    async def _take(self, subscriber: str, max_count: int) -> list[Delivery]:
        buffer = self._buffer.get(subscriber) or []
        buffer.sort(key=lambda pulled: pulled[1].metadata.sequence.stream)
        batch: list[Delivery] = []
        while buffer and len(batch) < max_count:
            consumer, msg = buffer.pop(0)
            sequence = msg.metadata.sequence.stream
            if consumer.cutoff is not None and sequence > consumer.cutoff:
                await msg.ack()  # published after the unbind: not for this subscriber
                continue
            attempt = msg.metadata.num_delivered - self._released.get((consumer.durable, sequence), 0)
            pulled = Pulled(consumer, msg)
            delivery = Delivery(nats_wire.incoming(msg, consumer.name, self.stream), attempt, pulled)
            self._held[delivery] = pulled
            batch.append(delivery)
        return batch

    def _let_go(self, delivery: Delivery) -> Pulled:
        pulled = delivery_token(delivery, Pulled, "NatsBroker")
        self._held.pop(delivery, None)
        return pulled

    async def _nak(self, consumer: Consumer, msg: Msg) -> None:
        """Give back at once. JetStream counts it as a delivery: remember to take it off the attempt."""
        key = (consumer.durable, msg.metadata.sequence.stream)
        self._released[key] = self._released.pop(key, 0) + 1
        while len(self._released) > 10_000:
            del self._released[next(iter(self._released))]
        await msg.nak()

    async def _finish_drain(self, consumer: Consumer) -> None:
        """Delete a draining consumer once what was queued before its unbind is delivered and settled."""
        if consumer.cutoff is None or any(c is consumer for c, _ in self._held.values()):
            return
        try:
            info = await consumer_info(self._js, self.stream, consumer.durable)
            if info is None:
                self._consumers.pop(consumer.durable, None)  # deleted by another process's drain
            elif not nats_topology.draining(info):
                self._consumers.pop(consumer.durable, None)  # bound again by another process: theirs now
            elif (
                info.num_ack_pending == 0
                and min(info.num_pending, consumer.cutoff - info.delivered.stream_seq) <= 0
            ):
                await self._delete(consumer)
        except Exception:
            logger.debug(
                "Could not finish the drain of %s; the next fetch tries again",
                consumer.durable,
                exc_info=True,
            )

    async def _delete(self, consumer: Consumer) -> None:
        self._consumers.pop(consumer.durable, None)
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await self._js.delete_consumer(self.stream, consumer.durable)

    def _leased(self) -> list[Msg]:
        """What the server leased to this process: handed out, or pulled and waiting in a buffer."""
        return [msg for _, msg in [*self._held.values(), *(p for b in self._buffer.values() for p in b)]]

    async def _renew(self, held: Sequence[Msg]) -> None:
        for msg in held:
            await msg.in_progress()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @contextlib.asynccontextmanager
    async def _translate(self, action: str) -> AsyncIterator[None]:
        try:
            yield
        except (nats.errors.Error, OSError, TimeoutError) as exc:
            unreachable = (nats.js.errors.ServiceUnavailableError, nats.js.errors.NotFoundError)
            refused = (nats.errors.MaxPayloadError, nats.errors.BadHeaderError, nats.js.errors.APIError)
            if isinstance(exc, refused) and not isinstance(exc, unreachable):
                raise PublishFailed(f"NATS refused to {action} stream {self.stream!r}: {exc!r}") from exc
            raise BrokerUnavailable(f"Could not {action} NATS at {self.safe_url}: {exc!r}") from exc


def _retrieved(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


__all__ = ["NatsBroker", "consumer_info", "durable", "subject_token"]
