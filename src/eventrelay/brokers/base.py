"""The broker port: move messages to every subscriber bound to their name; hand them out; take outcomes.

An adapter knows nothing of events, handlers, retries policy or dead letters: the bus owns all that. The
plumbing adapters share lives here too: `reconnect_pause`, `Arrivals` (waking fetchers), `LeaseKeeper`
(renewing what is held) and `delivery_token`; URL options are `brokers.options.UrlOptions`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Generic, Self, TypeVar

from eventrelay.envelope import Delivery, Message
from eventrelay.errors import ConfigurationError, PublishFailed

logger = logging.getLogger(__name__)
T = TypeVar("T")

RECONNECT_PAUSE_MAX = 5.0
"""The longest pause between two tries of a broker that is away: at most this long after it is back."""


def reconnect_pause(failures: int) -> float:
    """Seconds to wait before trying a broker again after `failures` failures in a row: 0.2, 0.4, ... 5."""
    return min(RECONNECT_PAUSE_MAX, 0.1 * 2.0 ** min(failures, 16))  # the exponent capped: no overflow


def delivery_token(delivery: Delivery, kind: type[T], broker: str) -> T:
    """The token `broker` put in `delivery` when it fetched it, which must be a `kind`."""
    if not isinstance(token := delivery.token, kind):
        raise ConfigurationError(
            f"This delivery did not come from a {broker}: settle it on the broker that fetched it"
        )
    return token


class Arrivals:
    """Wakes the fetchers that wait for a message: `wake()` ends every `wait()` under way."""

    def __init__(self) -> None:
        self._event = asyncio.Event()  # replaced by a fresh one at each wake, so a wake is never missed

    def wake(self) -> None:
        """End every wait under way."""
        event, self._event = self._event, asyncio.Event()
        event.set()

    def mark(self) -> asyncio.Event:
        """What the next wake sets: take it before a step that may wake the fetcher, wait `since` it after."""
        return self._event

    async def wait(self, timeout: float | None, since: asyncio.Event | None = None) -> bool:
        """Wait up to `timeout` seconds (None: no limit) for a wake (or one since the `since` mark); return
        whether one came."""
        event = self._event if since is None else since
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)
        return event.is_set()


class LeaseKeeper(Generic[T]):
    """Renews the leases an adapter holds every `lease / 3` seconds, so that only a dead process's run out.

    `held()` lists what is held now; `renew(held)` renews those leases (the broker-specific part). A failed
    renewal is logged and tried again a period later: the leases may run out meanwhile, and then their
    messages come again (the inbox drops a duplicate).
    """

    def __init__(
        self,
        broker: str,
        lease: float,
        held: Callable[[], Sequence[T]],
        renew: Callable[[Sequence[T]], Awaitable[object]],
    ) -> None:
        self.broker, self.period, self._held, self._renew = broker, lease / 3, held, renew
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Renew from now on, until `stop()`; a keeper already running goes on."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name=f"eventrelay-{self.broker}-leases")

    async def stop(self) -> None:
        """Stop renewing; return once the renewal under way, if any, is cancelled."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.period)
            if held := self._held():
                try:
                    await self._renew(held)
                except Exception:  # a connection lost, say: the next period tries again
                    logger.warning(
                        "Could not renew %d %s lease(s); they may be delivered again",
                        len(held),
                        self.broker,
                        exc_info=True,
                    )


REPLIES = "eventrelay.replies."
"""What the name of every generic reply channel (and RabbitMQ's reply queue) begins with: no event's."""


class Replies(ABC):
    """The replies to one process's requests: put `address` in a request's reply-to header; whoever answers
    sends to it with `Broker.send_reply`, and `receive()` hands the replies here, each once, unacked: a reply
    nobody waits for any more is simply dropped, so a channel need not be durable."""

    address: str

    @abstractmethod
    async def receive(self, timeout: float) -> list[Message]:
        """Wait up to `timeout` seconds for replies; return those that came ([] if none)."""

    @abstractmethod
    async def close(self) -> None:
        """Stop receiving and remove what the channel made on the broker."""


class PushedReplies(Replies):
    """A reply channel whose client hands each reply to a callback: it calls `arrived`, and `receive` gives
    what came since the last call. `close` ends with `stop_waiting`, so no receive outlives the channel."""

    def __init__(self) -> None:
        self._came: list[Message] = []
        self._arrivals = Arrivals()

    def arrived(self, message: Message) -> None:
        """Keep a reply until the next `receive`, and wake one waiting for it."""
        self._came.append(message)
        self._arrivals.wake()

    def stop_waiting(self) -> None:
        """End a `receive` under way (closing)."""
        self._arrivals.wake()

    async def receive(self, timeout: float) -> list[Message]:
        if not self._came:
            await self._arrivals.wait(timeout)
        came, self._came = self._came, []
        return came


class SubscriptionReplies(Replies):
    """A reply channel on any broker: a subscription of its own, bound to a name of its own (the address),
    fetched and acked through the broker port. Brokers with something lighter (a NATS inbox, an exclusive
    RabbitMQ queue) override `Broker.open_replies`."""

    def __init__(self, broker: Broker, instance: str) -> None:
        self.broker = broker
        self.subscriber = self.address = f"{REPLIES}{instance}"

    async def open(self) -> Self:
        await self.broker.bind(self.subscriber, self.address)
        return self

    async def receive(self, timeout: float) -> list[Message]:
        deliveries = await self.broker.fetch(self.subscriber, 100, timeout)
        if deliveries:
            await self.broker.ack_many(deliveries)
        return [d.message for d in deliveries if d.undecodable is None]

    async def close(self) -> None:
        await self.broker.unbind(self.subscriber, self.address)


class Broker(ABC):
    """Moves messages from publishers to subscriptions. One subclass per technology.

    A *subscriber* is a service name (ABP's ClientName): it owns one durable subscription, which receives a
    copy of every message whose name is bound to it (fan-out across services). Everyone fetching for the same
    subscriber competes for its messages (instances of one service).
    """

    async def start(self) -> None:
        """Connect. Called once before use; the default does nothing."""

    async def close(self) -> None:
        """Disconnect; the default does nothing."""

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @abstractmethod
    async def publish(self, messages: Sequence[Message]) -> None:
        """Send messages in order; return once the broker has accepted all of them.

        Raise `BrokerUnavailable` when the broker cannot be reached and `PublishFailed` when it refuses one.
        """

    @abstractmethod
    async def bind(self, subscriber: str, name: str) -> None:
        """From now on, `subscriber` receives the messages named `name`. Idempotent."""

    @abstractmethod
    async def unbind(self, subscriber: str, name: str) -> None:
        """Stop routing messages named `name` to `subscriber`; those already queued stay. Idempotent."""

    @abstractmethod
    async def fetch(self, subscriber: str, max_count: int, timeout: float) -> list[Delivery]:
        """Wait up to `timeout` seconds for 1 to `max_count` deliveries for `subscriber`; [] if none came.

        A fetched delivery is leased to the caller until it is acked, retried or released; if the caller
        dies, the broker delivers it again (with a higher attempt).
        """

    @abstractmethod
    async def ack(self, delivery: Delivery) -> None:
        """The delivery is done with: never deliver it again."""

    async def ack_many(self, deliveries: Sequence[Delivery]) -> None:
        """`ack` each delivery; the default acks one by one, a broker may do it in one round trip."""
        for delivery in deliveries:
            await self.ack(delivery)

    @abstractmethod
    async def retry(self, delivery: Delivery, delay: float) -> None:
        """Deliver it again, no sooner than `delay` seconds from now, with `attempt + 1`."""

    @abstractmethod
    async def release(self, delivery: Delivery) -> None:
        """Give back a delivery that was not handled (shutting down); same attempt, available at once."""

    async def open_replies(self, instance: str) -> Replies:
        """A channel for the replies to this process's requests (`instance` is unique to the process).

        The default is a subscription of its own, through `bind` and `fetch`; an adapter may override this and
        `send_reply` with something lighter."""
        return await SubscriptionReplies(self, instance).open()

    async def send_reply(self, address: str, message: Message) -> None:
        """Send `message` to the reply channel at `address` (any broker's `Replies.address`). The default
        publishes it under the address as its name, which only that channel's subscription is bound to; it
        refuses any other name, so that a forged reply-to header cannot make a reply pass for an event."""
        if not address.startswith(REPLIES):
            raise PublishFailed(f"Not a reply channel: {address[:100]!r}")
        await self.publish([dataclasses.replace(message, name=address)])

    async def pending_count(self, subscriber: str) -> int:
        """Messages the broker still owes `subscriber`: queued, leased or waiting for a retry."""
        raise NotImplementedError(f"{type(self).__name__} cannot count the messages it still owes")
