"""`nats://host:4222?stream=shop&prefix=shop` (or `tls://user:password@host`): NATS JetStream, with nats-py.

Topology: one stream per solution (`stream`; interest retention, file storage) captures `<prefix>.>`; an
event goes to `<prefix>.<event name>`. Names become subject levels reversibly, by percent-encoding all but
letters, digits and `_.-~`: `Orders.OrderPlaced` keeps its two levels, spaces, `*`, `>`, `%` and non-ASCII
become `%XX`, and a name with an empty level (`a..b`, `.a`) has its dots encoded too. Each (subscriber,
event name) has a durable pull consumer on that subject (explicit ack, deliver "new"), created on bind and
named `<subscriber>_<name>_<digest>`; the instances of a service share it and compete. One consumer per
name because nats-server 2.9 takes one filter subject per consumer (2.10 takes several).

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

Retention: a message leaves the stream once every consumer on its subject acked it; one that no consumer
is bound to is not kept (as RabbitMQ drops what no binding routes); `max_age` bounds what a subscriber
that never comes back leaves behind. The message id is `Nats-Msg-Id`, so JetStream stores an id once
within `duplicate_window`: an outbox row sent again after a crash is not delivered twice (a later copy is
left to the inbox). Headers are NATS headers, percent-escaped where NATS would alter or act on them; the
ordering key is the `Eventrelay-Key` header. `publish` writes a batch at once and returns when JetStream
acked every message. nats-py reconnects forever; the stream and consumers are then declared again. While
disconnected, `publish` raises `BrokerUnavailable`, and so does a `fetch` not reconnected in time.

Options: `stream` (eventrelay), `prefix` (the stream name), `ack_wait` (30 s), `max_age` (7 days, 0 = none),
`duplicate_window` (120 s, at most `max_age`), `max_ack_pending` (1000 per consumer), `publish_timeout`
(5 s), `connect_timeout` (5 s), `ping_interval` (10 s; three unanswered pings drop a hung connection);
another option is an error.
TLS: `tls://` with `tls_ca` (a CA file; the system's CAs without it), `tls_cert` and `tls_key` (a client
certificate) and `tls_handshake_first=1` (for a server with `handshake_first`: TLS before its INFO). A
`tls://` URL (or a `tls_*` option) to a server whose INFO does not ask for TLS is refused: nats-py would go on
in plaintext (after sending CONNECT; only `tls_handshake_first` keeps that from an impostor).

Limits: per-key order across the instances of a service only with `max_ack_pending=1`, which delivers one
event name in stream order, one message at a time (retries included), never across event names. A message
is at most the server's `max_payload` (1 MB by default).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import re
import ssl
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit

try:
    import nats.errors
    import nats.js.errors
    from nats.aio.client import Client
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription
    from nats.js import JetStreamContext, api
except ImportError as exc:  # pragma: no cover
    raise ImportError("NATS support needs an extra: pip install 'eventrelay[nats]'") from exc

from eventrelay.brokers.base import Broker
from eventrelay.brokers.options import UrlOptions
from eventrelay.config import redact_url
from eventrelay.envelope import Delivery, Message
from eventrelay.errors import BrokerUnavailable, ConfigurationError, PublishFailed

logger = logging.getLogger(__name__)

KEY_HEADER = "Eventrelay-Key"
OPTIONS = {"ack_wait": 30.0, "max_age": 7 * 86400.0, "duplicate_window": 120.0, "max_ack_pending": 1000.0}
OPTIONS |= {"publish_timeout": 5.0, "connect_timeout": 5.0, "ping_interval": 10.0}
TLS_FILES = ("tls_ca", "tls_cert", "tls_key")
_LINGER = 1.0  # the longest a pull request stays open; close() lets the open ones end
_ABANDONED = 300.0  # the inactive_threshold of a draining consumer, so that the server reaps an abandoned one
_VALUE_SAFE = "".join(chr(c) for c in range(32, 127) if chr(c) != "%")  # printable ASCII stays readable
_NAME_SAFE = "!#$&'*+-.^_`|~"  # what a NATS header name may hold besides letters and digits


@dataclass(eq=False)
class _Consumer:
    subscriber: str
    name: str
    cutoff: int | None = None  # draining: the last stream sequence published before the unbind
    request: _Request | None = None  # our open pull request, if any

    @functools.cached_property
    def durable(self) -> str:
        return durable(self.subscriber, self.name)


@dataclass(eq=False)
class _Request:
    token: str
    consumer: _Consumer
    batch: int
    got: int = 0


Pulled = tuple[_Consumer, Msg]


class NatsBroker(Broker):
    """NATS JetStream as the broker (see the module docstring)."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        query = dict(parse_qsl(parts.query))
        options = UrlOptions("NATS", url, query)
        self.stream = options.string("stream", "eventrelay")
        self.prefix = options.string("prefix", self.stream)
        self._tls = {name: value for name in TLS_FILES if (value := options.string(name))}
        self._handshake_first = options.flag("tls_handshake_first")
        self.options = {
            name: options.number(name, default, zero=name == "max_age") for name, default in OPTIONS.items()
        }
        options.finish()
        if not re.fullmatch(r"[\w-]+", self.stream) or not re.fullmatch(r"[\w-]+(\.[\w-]+)*", self.prefix):
            raise ConfigurationError(
                f"NATS broker URL: stream={self.stream!r} must be a name, prefix={self.prefix!r} a subject"
            )
        self.url = parts._replace(query="").geturl()
        token = parts.username is not None and parts.password is None  # nats://<token>@host
        self.safe_url = redact_url(self.url.replace(f"{parts.username}@", "***@", 1) if token else self.url)
        self._context = self._tls_context()
        self._wants_tls = parts.scheme == "tls" or bool(self._tls) or "tls_handshake_first" in query
        self._nc = Client()
        self._js = self._nc.jetstream()
        self._inbox: Subscription | None = None  # where the answers to all our pull requests come
        self._consumers: dict[str, _Consumer] = {}  # by durable name
        self._adopted: set[str] = set()  # subscribers whose consumers on the server were looked up
        self._requests: dict[str, _Request] = {}  # open pull requests, by inbox token
        self._buffer: dict[str, list[Pulled]] = {}  # pulled, not handed out yet, by subscriber
        self._held: dict[Delivery, Pulled] = {}
        self._released: dict[tuple[str, int], int] = {}
        self._arrival = asyncio.Event()  # replaced by a fresh one each time it is set
        self._turn = 0
        self._tasks: set[asyncio.Task[None]] = set()

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

        self._nc, self._requests = Client(), {}  # a fresh client: a closed broker can start again
        self._js = self._nc.jetstream()
        for consumer in self._consumers.values():
            consumer.request = None
        whole = {name: int(max(1, self.options[name])) for name in ("ping_interval", "connect_timeout")}
        handshake_first = self._handshake_first
        connecting = self._nc.connect(
            self.url,
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
            tls_handshake_first=handshake_first,
        )
        try:
            async with self._translate("connect to"):
                try:
                    await asyncio.wait_for(connecting, self.options["connect_timeout"])
                except TimeoutError as exc:  # nats-py tries again until then: say what went wrong
                    if (last := self._nc.last_error) is None:
                        raise
                    raise nats.errors.Error(f"timed out; the last error was {last!r}") from exc
                if self._wants_tls and not (handshake_first or self._nc._server_info.get("tls_required")):
                    raise nats.errors.Error("the server did not ask for TLS")  # nats-py went on in plaintext
                await self._declare()
                self._inbox = await self._nc.subscribe(f"{self._nc.new_inbox()}.*", cb=self._receive)
        except BaseException:
            await self._nc.close()
            raise
        self._spawn(self._renew_leases())

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
                    await self._arrival.wait()
        self._requests.clear()
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

    async def _add_stream(self, config: api.StreamConfig, tries: int = 5) -> None:
        """Create the stream, trying again after a server error (500). nats-server 2.9 removes an account's
        stream folder when its last stream is deleted; a stream created meanwhile fails with "error
        creating store for stream" (its log: "mkdir .../streams: no such file or directory"), and the next
        try creates the folder again (seen in `make soak`)."""
        for attempt in range(1, tries + 1):
            try:
                await self._js.add_stream(config)
                return
            except nats.js.errors.ServerError as exc:
                if attempt == tries:
                    raise
                logger.warning("NATS could not create stream %r, trying again: %s", self.stream, exc)
                await asyncio.sleep(0.05 * attempt)

    async def _declare(self, again: bool = False) -> None:
        """Create the stream (or check the one there); after a reconnect, also the consumers again."""
        subjects, interest = [f"{self.prefix}.>"], api.RetentionPolicy.INTEREST
        max_age = self.options["max_age"]
        config = api.StreamConfig(
            name=self.stream,
            subjects=subjects,
            retention=interest,
            storage=api.StorageType.FILE,
            max_age=max_age,
            duplicate_window=min(self.options["duplicate_window"], max_age or float("inf")),
        )
        try:
            try:
                await self._add_stream(config)
            except nats.js.errors.BadRequestError:  # it exists with other limits: fine if it routes alike
                found = (await self._js.stream_info(self.stream)).config
                if (found.subjects, found.retention) != (subjects, interest):
                    raise ConfigurationError(
                        f"NATS stream {self.stream!r} exists with subjects {found.subjects} and retention "
                        f"{found.retention}; this broker needs {subjects} and interest retention"
                    ) from None
            for consumer in [c for c in self._consumers.values() if again and c.cutoff is None]:
                await self._js.add_consumer(self.stream, self._config(consumer))
        except Exception:
            if not again:
                raise
            logger.warning("Could not declare the NATS stream and consumers again", exc_info=True)

    # --- the port ------------------------------------------------------------------------------------

    async def publish(self, messages: Sequence[Message]) -> None:
        futures: list[asyncio.Future[api.PubAck]] = []
        async with self._translate("publish to"):
            if messages and not self._nc.is_connected:
                raise nats.errors.ConnectionReconnectingError
            try:
                for m in messages:  # written in order on one connection, then confirmed together
                    headers = {_escape(k, _NAME_SAFE, name=True): _escape(v) for k, v in m.headers.items()}
                    headers["Nats-Msg-Id"] = _escape(m.id)
                    if m.key is not None:
                        headers[KEY_HEADER] = _escape(m.key)
                    subject = f"{self.prefix}.{subject_token(m.name)}"
                    publishing = self._js.publish_async(subject, m.body, stream=self.stream, headers=headers)
                    futures.append(await publishing)
                await asyncio.wait_for(asyncio.gather(*futures), self.options["publish_timeout"])
            finally:
                for future in futures:
                    future.cancel()

    async def bind(self, subscriber: str, name: str) -> None:
        consumer = _Consumer(subscriber, name)
        consumer = self._consumers.setdefault(consumer.durable, consumer)
        consumer.cutoff = None
        async with self._translate("bind on"):
            await self._js.add_consumer(self.stream, self._config(consumer))  # creates, or updates in place

    async def unbind(self, subscriber: str, name: str) -> None:
        consumer = _Consumer(subscriber, name)
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
                arrival = self._arrival
                consumers = [c for c in self._consumers.values() if c.subscriber == subscriber]
                if connected and (idle := [c for c in consumers if c.request is None]):
                    await self._request(idle, max_count, min(remaining, _LINGER))
                wait = remaining if consumers and connected else min(remaining, 0.05)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(arrival.wait(), wait)
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
        prefix, offset = f"{self.prefix}.", 0
        while True:
            try:
                page = await self._js.consumers_info(self.stream, offset)
            except TypeError:  # nats-py fails on a consumer deleted while listed: the next fetch looks again
                logger.debug("Could not list the consumers of %s; the next fetch tries again", self.stream)
                return
            if not page:
                break
            offset += len(page)
            for config in (info.config for info in page):
                subject, found = config.filter_subject or "", config.durable_name or ""
                if not subject.startswith(prefix) or found in self._consumers:
                    continue
                name = unquote(subject.removeprefix(prefix))
                draining = (config.description or "").startswith("draining")
                if found == durable(subscriber, name) and not draining:
                    self._consumers[found] = _Consumer(subscriber, name)
        self._adopted.add(subscriber)

    def _config(self, consumer: _Consumer) -> api.ConsumerConfig:
        draining = consumer.cutoff is not None
        return api.ConsumerConfig(
            durable_name=consumer.durable,
            filter_subject=f"{self.prefix}.{subject_token(consumer.name)}",
            description=f"{'draining: ' if draining else ''}{consumer.subscriber} <- {consumer.name}",
            deliver_policy=api.DeliverPolicy.NEW,
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=self.options["ack_wait"],
            max_ack_pending=int(self.options["max_ack_pending"]),
            inactive_threshold=_ABANDONED if draining else None,
        )

    async def _request(self, consumers: list[_Consumer], max_count: int, expires: float) -> None:
        """One pull request per consumer, a fair share of `max_count` each; the larger shares take turns.

        A request is never withdrawn (on nats-server 2.9 a message can still be sent to an inbox that was
        just unsubscribed, and would be lost until `ack_wait`): it ends when full, or at `expires`."""
        self._turn += 1
        shift = self._turn % len(consumers)
        for index, consumer in enumerate(consumers[shift:] + consumers[:shift]):
            token = f"{self._turn}-{index}"
            request = _Request(token, consumer, max(1, len(range(index, max_count, len(consumers)))))
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
        self._buffer.setdefault(consumer.subscriber, []).append((consumer, msg))
        request = consumer.request
        if request is not None:
            request.got += 1
            if request.got >= request.batch:
                self._end(request.token)
        self._wake()

    def _end(self, token: str) -> None:
        request = self._requests.pop(token, None)
        if request is None:
            return
        consumer = request.consumer
        if consumer.request is request:
            consumer.request = None
        if consumer.cutoff is not None and not request.got:  # nothing came: maybe drained
            self._spawn(self._finish_drain(consumer))
        self._wake()

    def _wake(self) -> None:
        arrival, self._arrival = self._arrival, asyncio.Event()
        arrival.set()

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
            raw = msg.headers or {}
            message_id = unquote(raw.get("Nats-Msg-Id", f"{self.stream}:{sequence}"))
            key = unquote(raw[KEY_HEADER]) if KEY_HEADER in raw else None
            headers = {unquote(k): unquote(v) for k, v in raw.items() if not _reserved(k)}
            attempt = msg.metadata.num_delivered - self._released.get((consumer.durable, sequence), 0)
            message = Message(message_id, consumer.name, msg.data, headers, key)
            delivery = Delivery(message, attempt, (consumer, msg))
            self._held[delivery] = (consumer, msg)
            batch.append(delivery)
        return batch

    def _let_go(self, delivery: Delivery) -> Pulled:
        if not isinstance(delivery.token, tuple) or not isinstance(delivery.token[-1], Msg):
            raise ConfigurationError("This delivery did not come from a NatsBroker")
        self._held.pop(delivery, None)
        return delivery.token

    async def _nak(self, consumer: _Consumer, msg: Msg) -> None:
        """Give back at once. JetStream counts it as a delivery: remember to take it off the attempt."""
        key = (consumer.durable, msg.metadata.sequence.stream)
        self._released[key] = self._released.pop(key, 0) + 1
        while len(self._released) > 10_000:
            del self._released[next(iter(self._released))]
        await msg.nak()

    async def _finish_drain(self, consumer: _Consumer) -> None:
        """Delete a draining consumer once what was queued before its unbind is delivered and settled."""
        if consumer.cutoff is None or any(c is consumer for c, _ in self._held.values()):
            return
        try:
            info = await consumer_info(self._js, self.stream, consumer.durable)
            if info is None:
                self._consumers.pop(consumer.durable, None)  # deleted by another process's drain
            elif not (info.config.description or "").startswith("draining"):
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

    async def _delete(self, consumer: _Consumer) -> None:
        self._consumers.pop(consumer.durable, None)
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await self._js.delete_consumer(self.stream, consumer.durable)

    async def _renew_leases(self) -> None:
        while True:
            await asyncio.sleep(self.options["ack_wait"] / 3)
            held = [msg for _, msg in self._held.values()]
            held += [msg for buffer in self._buffer.values() for _, msg in buffer]
            try:
                for msg in held:
                    await msg.in_progress()
            except Exception:
                logger.warning("Could not renew %d lease(s); they may come again", len(held), exc_info=True)

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


def subject_token(name: str) -> str:
    """The subject levels of an event name: reversible (`unquote`), no wildcards, no empty level."""
    token = quote(name, safe="")
    return token.replace(".", "%2E") if "" in token.split(".") else token


def durable(subscriber: str, name: str) -> str:
    """The durable consumer name of (subscriber, event name): readable, and unique by a digest."""
    digest = hashlib.sha256(f"{subscriber}\0{name}".encode()).hexdigest()[:12]
    return re.sub(r"[^A-Za-z0-9_-]+", "-", f"{subscriber[:60]}_{name[-100:]}_{digest}")


def _escape(text: str, safe: str = _VALUE_SAFE, name: bool = False) -> str:
    """Percent-escape what NATS would alter in a header (CR, LF, `%`, non-ASCII, spaces at the ends)."""
    out = quote(text, safe=safe)
    if name and _reserved(out):  # a user's header never passes for one that NATS or this adapter reads
        out = f"%{ord(out[0]):02X}{out[1:]}"
    core, lead = out.strip(" "), len(out) - len(out.lstrip(" "))
    return "%20" * lead + core + "%20" * (len(out) - lead - len(core))


def _reserved(header: str) -> bool:
    return header.lower().startswith(("nats-", "eventrelay-"))


def _retrieved(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


async def consumer_info(js: JetStreamContext, stream: str, durable: str) -> Any:
    """The consumer's `nats.js.api.ConsumerInfo`, or None when it does not exist. (Typed Any: nats-py makes
    every field optional, and a reply that found the consumer has them all.)

    A consumer deleted while the server looks it up (another instance finishing a drain) comes back as a
    reply with no fields and no error, which nats-py fails to read with a TypeError (seen in CI).
    """
    try:
        return await js.consumer_info(stream, durable)
    except nats.js.errors.NotFoundError:
        return None
    except TypeError:  # only reading the reply raises it: the request itself raises nats' own errors
        return None
