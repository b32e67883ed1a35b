"""The broker port: move messages to every subscriber bound to their name; hand them out; take outcomes.

An adapter knows nothing of events, handlers, retries policy or dead letters: the bus owns all that.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from types import TracebackType
from typing import Self

from eventrelay.envelope import Delivery, Message

RECONNECT_PAUSE_MAX = 5.0
"""The longest pause between two tries of a broker that is away: at most this long after it is back."""


def reconnect_pause(failures: int) -> float:
    """Seconds to wait before trying a broker again after `failures` failures in a row: 0.2, 0.4, ... 5."""
    return min(RECONNECT_PAUSE_MAX, 0.1 * 2.0 ** min(failures, 16))  # the exponent capped: no overflow


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

    async def pending_count(self, subscriber: str) -> int:
        """Messages the broker still owes `subscriber`: queued, leased or waiting for a retry."""
        raise NotImplementedError(f"{type(self).__name__} cannot count the messages it still owes")
