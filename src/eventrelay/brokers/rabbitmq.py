"""`amqp://` and `amqps://`: RabbitMQ through aio-pika, with ABP's topology.

Features: one durable exchange per solution; one durable queue per subscribing service, named after it (ABP's
ClientName), shared by its instances, which compete; one binding per event name (routing key = event name),
added by `bind`, removed by `unbind`; persistent messages, published a batch at a time with publisher
confirms; prefetch; delayed retries without the delayed-message plugin; reconnection; classic or quorum
queues; TLS.

URL: `amqp://user:pass@host:port/vhost?exchange=eventrelay&exchange_type=direct&queue_type=classic&prefetch=100`;
the nodes of a cluster as `host1:5672,host2:5672,...`, tried in turn (`rabbitmq_hosts.py`).
Options: `exchange` (`eventrelay`; ABP's ExchangeName), `exchange_type` (`direct` or `topic`), `queue_type`
(`classic` or `quorum`: replicated, and its retry queues dead-letter at-least-once), `prefetch` (100 unacked
messages per subscriber: also the bound on its in-flight handlers), `retry_delays` (seconds,
`0.1,0.25,0.5,1,2.5,5,10,25,60,150,300,900,3600`), `publish_timeout` (30 s, for a confirm), `profile`
(`eventrelay` or `abp`), `single_active_consumer` (`0` or `1`). aio-pika's `heartbeat` (60 s) and `name`
pass through; another option is an error.
TLS: `amqps://` (port 5671) with aio-pika's `cafile`, `certfile`, `keyfile` and `no_verify_ssl`.

Mapping: `rabbitmq_wire.py`. `profile=abp` also makes the bus write and read ABP's JSON
(`Settings.json_style`); `docs/wire-format.md` has the ABP profile in full.

A routing key nobody binds: RabbitMQ would drop the message and still confirm it. So the exchange has the
alternate exchange `<exchange>.unrouted` (fanout), whose classic queue keeps such messages for an operator
(give it a TTL or length policy if that suits you); while its node is down (a cluster), the adapter connects
without it (untested: where an unrouted message goes then). ABP declares the exchange without that argument,
which RabbitMQ would refuse as different, so `profile=abp` declares none: the broker returns the message,
publish raises `PublishFailed`, and the outbox tries again later (ABP drops it).

Order: a queue hands messages out in publish order, and the bus keeps the order of a key among what one
instance fetched; instances that compete share a queue, so across them a key's order does not hold unless
`single_active_consumer=1`: then one instance consumes and the others stand by until its connection goes.

Leases are unacked messages: when a consumer's connection dies RabbitMQ delivers them again, one attempt
higher. `release` nacks with requeue, and this adapter does not count that redelivery as an attempt (another
process would count one). `retry(delay)` publishes a copy, attempt + 1, to `<queue>.retry.<delay>s`, the first
retry queue whose delay is not shorter, then acks. Each retry queue has one TTL and dead-letters through the
default exchange back to the service queue, so a short delay never waits behind a long one (per-message
TTLs expire only at the head). A longer delay than the longest goes round that queue until it is due.

Replies: an exclusive queue per process (`rabbitmq_replies.py`); `send_reply` publishes to it through the
default exchange, not mandatory (a reply to an asker that has gone is dropped): alike with `profile=abp`.

Reconnection: a dropped connection is reopened with the bus's backoff (`reconnect_pause`: 0.1 s, doubling up
to 5 s); the exchange, queues and bindings are declared again and consuming resumes. Meanwhile publish raises
`BrokerUnavailable` (as does a publish whose confirm did not come, so its outbox row stays); fetch waits up to
its timeout for the connection, then raises it (the bus backs off). Leases of the lost connection come again;
acking them raises `BrokerUnavailable`. Credentials never appear in errors or logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any

from yarl import URL

from eventrelay.brokers import amqp_guard
from eventrelay.brokers.amqp_guard import UndecodableHeaders
from eventrelay.brokers.base import Arrivals, Broker, Replies, delivery_token, reconnect_pause
from eventrelay.brokers.options import UrlOptions
from eventrelay.config import redact_url
from eventrelay.envelope import Delivery, Message, printable
from eventrelay.errors import BrokerUnavailable, ConfigurationError, EventRelayError, PublishFailed

try:
    import aio_pika
    from aio_pika.abc import (
        AbstractChannel,
        AbstractConnection,
        AbstractExchange,
        AbstractIncomingMessage,
        AbstractQueue,
    )
    from aiormq import exceptions as amqp

    from eventrelay.brokers import rabbitmq_replies
    from eventrelay.brokers import rabbitmq_wire as wire
    from eventrelay.brokers.rabbitmq_hosts import Hosts, gone, split_hosts
    from eventrelay.brokers.rabbitmq_replies import RabbitMQReplies
    from eventrelay.brokers.tls_hints import mutual_tls_hint
except ImportError as exc:  # pragma: no cover
    raise ImportError("RabbitMQ support needs an extra: pip install 'eventrelay[rabbitmq]'") from exc

logger = logging.getLogger(__name__)

_PASS_THROUGH = {"heartbeat", "name", "cafile", "capath", "cadata", "certfile", "keyfile", "no_verify_ssl"}
DEFAULT_RETRY_DELAYS = "0.1,0.25,0.5,1,2.5,5,10,25,60,150,300,900,3600"
CONNECT_TIMEOUT = 10.0  # seconds


@dataclass(eq=False)
class _Subscriber:
    """One subscriber's consuming channel, the buffer its consumer fills, and the leases handed out."""

    name: str
    channel: AbstractChannel | None = None
    buffer: deque[AbstractIncomingMessage] = field(default_factory=deque)
    leased: set[_Lease] = field(default_factory=set)
    arrivals: Arrivals = field(default_factory=Arrivals)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass(eq=False)
class _Lease:
    subscriber: _Subscriber
    incoming: AbstractIncomingMessage


class RabbitMQBroker(Broker):
    """A broker on a RabbitMQ server (see the module docstring)."""

    def __init__(self, url: str) -> None:
        each = split_hosts(url)
        parsed = URL(each[0])
        options = UrlOptions("RabbitMQ", url, parsed.query, client="aio-pika", passes=_PASS_THROUGH)
        self.exchange = options.string("exchange", "eventrelay")
        self.exchange_type = options.choice("exchange_type", ("direct", "topic"))
        self.queue_type = options.choice("queue_type", ("classic", "quorum"))
        self.profile = options.choice("profile", ("eventrelay", "abp"))
        self.single_active_consumer = options.flag("single_active_consumer")
        self.prefetch = options.integer("prefetch", 100, minimum=1)
        self.publish_timeout = options.number("publish_timeout", 30)
        self.retry_delays = sorted(set(options.numbers("retry_delays", DEFAULT_RETRY_DELAYS)))
        client_options = options.finish()
        self.unrouted = f"{self.exchange}.unrouted"
        self._where = redact_url(url)  # for messages and logs
        self._bare_tls = parsed.scheme == "amqps" and "certfile" not in client_options  # for a hint
        self.hosts = Hosts([str(URL(one).with_query(client_options)) for one in each])
        self._secret = parsed.password or ""
        self._conn: AbstractConnection | None = None
        self._admin: AbstractChannel | None = None
        self._publisher: AbstractChannel | None = None
        self._publishing: tuple[AbstractChannel, AbstractExchange] | None = None
        self._ready, self._lost = asyncio.Event(), asyncio.Event()
        self._supervisor: asyncio.Task[None] | None = None
        self._closed = False
        self._bindings: dict[str, set[str]] = {}
        self._subscribers: dict[str, _Subscriber] = {}
        self._replies: set[RabbitMQReplies] = set()  # declared again on each new connection
        self._declared: set[str] = set()  # subscribers whose retry queues this connection declared
        self._returned: dict[str, bool] = {}  # ids given back unhandled: their redelivery is no attempt

    def retry_queues(self, subscriber: str) -> list[str]:
        """The names of `subscriber`'s retry queues, shortest delay first."""
        return [f"{subscriber}.retry.{delay:g}s" for delay in self.retry_delays]

    # --- the connection ------------------------------------------------------------------------------

    async def start(self) -> None:
        amqp_guard.install()  # a message whose properties cannot be decoded must not close the connection
        self._closed = False
        if self._conn is None:
            async with self._translate("connect to"):
                await self._connect()
        self._supervisor = self._supervisor or asyncio.create_task(self._reconnect(), name="rabbitmq")

    async def close(self) -> None:
        self._closed, conn = True, self._conn
        if self._supervisor is not None:
            self._supervisor.cancel()
            await asyncio.gather(self._supervisor, return_exceptions=True)
            self._supervisor = None
        self._forget()
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()

    async def _connect(self) -> None:
        """Connect, declare the topology, bind what is bound and consume what was consumed."""
        conn = await self.hosts.connect(CONNECT_TIMEOUT)
        try:
            conn.close_callbacks.add(functools.partial(self._on_lost, conn))
            admin = await conn.channel(publisher_confirms=False)
            publisher = await conn.channel(publisher_confirms=True, on_return_raises=True)
            arguments: dict[str, Any] | None = None
            if self.profile != "abp":
                await admin.declare_exchange(self.unrouted, "fanout", durable=True)
                try:
                    unrouted = await admin.declare_queue(self.unrouted, durable=True)  # classic, shared
                    await unrouted.bind(self.unrouted, "")
                except amqp.ChannelNotFoundEntity as exc:  # its node is down: a cluster goes on without it
                    logger.warning("Going on without %s: %s", self.unrouted, self._scrub(exc))
                    admin = await conn.channel(publisher_confirms=False)
                arguments = {"alternate-exchange": self.unrouted}
            await admin.declare_exchange(self.exchange, self.exchange_type, durable=True, arguments=arguments)
            self._declared = set()
            for subscriber, names in self._bindings.items():
                queue = await self._declare(admin, subscriber)
                for name in names:
                    await queue.bind(self.exchange, name)
            for sub in self._subscribers.values():
                await self._consume(sub, conn)
            for replies in self._replies:
                await replies.attach(conn)
        except BaseException:
            with contextlib.suppress(Exception):
                await conn.close()
            raise
        self._conn, self._admin, self._publisher = conn, admin, publisher
        self._ready.set()
        if not conn.connected.is_set():  # lost while restoring
            self._on_lost(conn)

    def _on_lost(self, conn: AbstractConnection, *_: object) -> None:
        if conn is self._conn and not self._closed:
            self.hosts.lost()
            self._forget()
            self._lost.set()

    def _forget(self) -> None:
        """Drop what belonged to the connection that is gone: its channels, buffers and leases."""
        self._conn = self._admin = self._publisher = self._publishing = None
        self._ready.clear()
        for sub in self._subscribers.values():
            self._give_back_buffer(sub)
            sub.leased.clear()
            sub.channel = None
            sub.arrivals.wake()

    async def _reconnect(self) -> None:
        while True:
            await self._lost.wait()
            self._lost.clear()
            failures = 0
            while True:
                pause = reconnect_pause(failures)
                logger.warning(
                    "Lost the connection to RabbitMQ at %s; reconnecting in %.1fs", self._where, pause
                )
                await asyncio.sleep(pause)
                try:
                    async with self._translate("reconnect to"):
                        await self._connect()
                    break
                except Exception as exc:
                    logger.warning("Could not reconnect to RabbitMQ at %s: %s", self._where, self._scrub(exc))
                    failures += 1
            logger.info("Reconnected to RabbitMQ at %s", self._where)

    async def _channel(self, which: str) -> AbstractChannel:
        """The admin or publisher channel, opened again if a channel error closed it."""
        channel: AbstractChannel | None = getattr(self, which)
        if self._conn is None:
            raise BrokerUnavailable(f"Not connected to RabbitMQ at {self._where}")
        if channel is None or channel.is_closed:
            confirms = which == "_publisher"
            channel = await self._conn.channel(publisher_confirms=confirms, on_return_raises=confirms)
            setattr(self, which, channel)
        return channel

    # --- topology ------------------------------------------------------------------------------------

    def _args(self) -> dict[str, Any]:
        return {"x-queue-type": "quorum"} if self.queue_type == "quorum" else {}

    async def _declare(self, channel: AbstractChannel, subscriber: str) -> AbstractQueue:
        """Declare `subscriber`'s queue, and its retry queues once per connection."""
        single = {"x-single-active-consumer": True} if self.single_active_consumer else {}
        queue = await channel.declare_queue(subscriber, durable=True, arguments=self._args() | single)
        if subscriber not in self._declared:
            back = {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": subscriber}
            arguments = self._args() | back
            if self.queue_type == "quorum":
                arguments |= {"x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"}
            for delay, name in zip(self.retry_delays, self.retry_queues(subscriber), strict=True):
                ttl = {"x-message-ttl": max(1, round(delay * 1000))}
                await channel.declare_queue(name, durable=True, arguments=arguments | ttl)
            self._declared.add(subscriber)
        return queue

    async def bind(self, subscriber: str, name: str) -> None:
        async with self._translate("bind on"):
            await (await self._declare(await self._channel("_admin"), subscriber)).bind(self.exchange, name)
        self._bindings.setdefault(subscriber, set()).add(name)

    async def unbind(self, subscriber: str, name: str) -> None:
        async with self._translate("unbind on"):
            await (await self._declare(await self._channel("_admin"), subscriber)).unbind(self.exchange, name)
        self._bindings.get(subscriber, set()).discard(name)

    # --- publishing ----------------------------------------------------------------------------------

    async def publish(self, messages: Sequence[Message]) -> None:
        if not messages:
            return
        async with self._translate("publish to"):
            exchange = await self._exchange()
            sending = [
                exchange.publish(wire.outgoing(m), m.name, timeout=self.publish_timeout) for m in messages
            ]
            # All at once, so their confirms come back together; the channel keeps them in order.
            if len(sending) == 1:
                outcomes: list[object] = [await _outcome(sending[0])]
            else:
                outcomes = await asyncio.gather(*sending, return_exceptions=True)
        refused: dict[int, str] = {}
        for position, (message, outcome) in enumerate(zip(messages, outcomes, strict=True)):
            if isinstance(outcome, amqp.PublishError):  # mandatory, and returned
                refused[position] = (
                    f"RabbitMQ returned {message.id}: no queue is bound to {message.name!r} on exchange "
                    f"{self.exchange!r}, which has no alternate exchange"
                )
            elif isinstance(outcome, BaseException):
                raise self._error("publish to", outcome) from outcome
        if refused:
            first = refused[min(refused)]
            raise PublishFailed(f"{len(refused)} of {len(messages)} refused; the first: {first}", refused)

    async def _exchange(self) -> AbstractExchange:
        """The exchange to publish to, on the publisher channel; looked up once per channel."""
        channel = await self._channel("_publisher")
        if self._publishing is None or self._publishing[0] is not channel:
            self._publishing = channel, await channel.get_exchange(self.exchange, ensure=False)
        return self._publishing[1]

    async def _send(self, queue: str, message: aio_pika.Message) -> None:
        """Publish straight to a queue (through the default exchange), confirmed."""
        channel = await self._channel("_publisher")
        await channel.default_exchange.publish(message, queue, timeout=self.publish_timeout)

    async def open_replies(self, instance: str) -> Replies:
        """An exclusive, auto-delete queue of this process's own (see the module docstring)."""
        replies = RabbitMQReplies(instance, self._replies.discard)
        async with self._translate("open replies on"):
            if self._conn is None:
                raise BrokerUnavailable(f"Not connected to RabbitMQ at {self._where}")
            await replies.attach(self._conn)
        self._replies.add(replies)
        return replies

    async def send_reply(self, address: str, message: Message) -> None:
        """Publish to the reply queue `address`, confirmed, through the default exchange."""
        if not address.startswith(rabbitmq_replies.PREFIX):
            raise PublishFailed(f"Not a RabbitMQ reply queue: {address[:100]!r}")
        reply = wire.outgoing(message)
        reply.delivery_mode = aio_pika.DeliveryMode.NOT_PERSISTENT  # its queue does not outlive its process
        async with self._translate("reply on"):
            exchange = (await self._channel("_publisher")).default_exchange
            await exchange.publish(reply, address, mandatory=False, timeout=self.publish_timeout)

    # --- consuming -----------------------------------------------------------------------------------

    async def fetch(self, subscriber: str, max_count: int, timeout: float) -> list[Delivery]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        sub = self._subscribers.setdefault(subscriber, _Subscriber(subscriber))
        while True:
            if self._conn is None and not self._closed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._ready.wait(), max(0.0, deadline - loop.time()))
            if self._conn is None:
                raise BrokerUnavailable(f"Not connected to RabbitMQ at {self._where}")
            async with self._translate("consume from"):
                await self._consume(sub, self._conn)
            if sub.buffer or (remaining := deadline - loop.time()) <= 0:
                break
            await sub.arrivals.wait(remaining)
        batch: list[Delivery] = []
        while sub.buffer and len(batch) < max_count:
            incoming = sub.buffer.popleft()
            message, attempt, unreadable = wire.incoming(incoming)
            if incoming.redelivered and not self._returned.pop(message.id, False):
                attempt += 1  # delivered before and not given back: its consumer died
            lease = _Lease(sub, incoming)
            sub.leased.add(lease)
            if isinstance(incoming.headers, UndecodableHeaders):
                unreadable = incoming.headers.reason
            batch.append(Delivery(message, attempt, lease, unreadable))
        return batch

    async def _consume(self, sub: _Subscriber, conn: AbstractConnection) -> None:
        async with sub.lock:
            if sub.channel is None or sub.channel.is_closed:
                self._give_back_buffer(sub)  # from a closed channel: they come again
                channel = sub.channel = await conn.channel(publisher_confirms=False)
                await channel.set_qos(prefetch_count=self.prefetch)
                queue = await self._declare(channel, sub.name)
                await queue.consume(functools.partial(self._on_message, sub, channel))

    async def _on_message(
        self, sub: _Subscriber, channel: AbstractChannel, msg: AbstractIncomingMessage
    ) -> None:
        if sub.channel is not channel:
            return  # from a channel given up on; it comes again
        due = (msg.headers or {}).get(wire.DUE)  # epoch milliseconds (AMQP floats are 32-bit)
        if isinstance(due, int) and due > time.time() * 1000 + 1:  # not due yet: another round
            message, attempt, _ = wire.incoming(msg)
            queue = self._retry_queue(sub.name, due / 1000 - time.time())
            try:
                await self._send(queue, wire.outgoing(message, attempt, due))
                await msg.ack()
            except Exception as exc:
                logger.warning(
                    "Could not hold back %s; it comes again: %s", printable(message.id), self._scrub(exc)
                )
        else:
            sub.buffer.append(msg)
            sub.arrivals.wake()

    def _retry_queue(self, subscriber: str, delay: float) -> str:
        queues = self.retry_queues(subscriber)
        return next((q for d, q in zip(self.retry_delays, queues, strict=True) if d >= delay), queues[-1])

    # --- outcomes ------------------------------------------------------------------------------------

    async def ack(self, delivery: Delivery) -> None:
        async with self._translate("ack on"):
            await self._let_go(delivery).incoming.ack()

    async def release(self, delivery: Delivery) -> None:
        incoming = self._let_go(delivery).incoming
        self._gave_back(incoming)
        async with self._translate("release on"):
            await incoming.nack(requeue=True)

    async def retry(self, delivery: Delivery, delay: float) -> None:
        lease = self._let_go(delivery)
        queue = self._retry_queue(lease.subscriber.name, delay) if delay > 0 else lease.subscriber.name
        due = round((time.time() + delay) * 1000) if delay > self.retry_delays[-1] else None
        async with self._translate("retry on"):
            _ = lease.incoming.channel  # raises if the lease was lost: then it comes again, without a copy
            await self._send(queue, wire.outgoing(delivery.message, delivery.attempt + 1, due))
            await lease.incoming.ack()

    def _let_go(self, delivery: Delivery) -> _Lease:
        lease = delivery_token(delivery, _Lease, "RabbitMQBroker")
        lease.subscriber.leased.discard(lease)
        return lease

    def _gave_back(self, incoming: AbstractIncomingMessage) -> None:
        if incoming.message_id:
            self._returned[incoming.message_id] = True
            if len(self._returned) > 10_000:
                del self._returned[next(iter(self._returned))]

    def _give_back_buffer(self, sub: _Subscriber) -> None:
        for incoming in sub.buffer:
            self._gave_back(incoming)
        sub.buffer.clear()

    async def pending_count(self, subscriber: str) -> int:
        """Ready in the retry queues, then in the queue, then held here: the order messages flow in."""
        total = 0
        for queue in [*self.retry_queues(subscriber), subscriber]:
            async with self._translate("count on"):
                with contextlib.suppress(amqp.ChannelNotFoundEntity):
                    declared = await (await self._channel("_admin")).declare_queue(queue, passive=True)
                    total += declared.declaration_result.message_count or 0
        sub = self._subscribers.get(subscriber)
        return total + (len(sub.buffer) + len(sub.leased) if sub else 0)

    # --- errors --------------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _translate(self, action: str) -> AsyncIterator[None]:
        try:
            yield
        except EventRelayError:
            raise
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if task is None or task.cancelling():
                raise  # we are cancelled; otherwise aiormq cancelled a call because its channel closed
            raise self._error(action, exc) from exc
        except Exception as exc:
            raise self._error(action, exc) from exc

    def _error(self, action: str, exc: BaseException) -> Exception:
        if isinstance(exc, asyncio.CancelledError) and exc.args and isinstance(exc.args[0], Exception):
            exc = exc.args[0]  # the reason the channel closed
        text = f"Could not {action} RabbitMQ at {self._where}: {self._scrub(exc)}"
        if action == "connect to" and self._bare_tls:
            text += mutual_tls_hint(exc, "certfile and keyfile")
        if isinstance(exc, amqp.ChannelPreconditionFailed):
            return ConfigurationError(f"{text} (an exchange or queue exists with other settings)")
        # A connection lost under a call (reset, broker gone) before the supervisor noticed: aio-pika then
        # raises what it likes (RuntimeError "... closed" opening a channel), and it is no refusal.
        lost = gone(self._conn) or isinstance(exc, asyncio.CancelledError | amqp.ChannelInvalidStateError)
        if lost or isinstance(exc, ConnectionError | OSError | TimeoutError | amqp.AMQPConnectionError):
            return BrokerUnavailable(text)
        return PublishFailed(text)

    def _scrub(self, exc: BaseException) -> str:
        text = f"{type(exc).__name__}: {exc}"
        return text.replace(self._secret, "***") if self._secret else text


async def _outcome(sending: Awaitable[object]) -> object:
    """What `sending` returned or raised (one message needs no task of its own)."""
    try:
        return await sending
    except Exception as exc:
        return exc
