"""The NATS adapter's reply channel: a core NATS subscription to a subject of the process's own.

No stream and no durable consumer: a reply is on the wire once, and one sent while nobody listens is lost,
as a reply whose asker has gone may be. nats-py subscribes again after a reconnect.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from typing import Self

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from eventrelay.brokers import nats_wire
from eventrelay.brokers.base import PushedReplies


class NatsReplies(PushedReplies):
    """Replies to the requests of one process, on `_INBOX.<nuid>` (`nats_wire.reply_subject`); `round_trip`
    is the broker's flush, which a cancel never leaves half-way."""

    def __init__(self, client: Client, round_trip: Callable[[], Awaitable[None]]) -> None:
        super().__init__()
        self._client, self._round_trip = client, round_trip
        self.address = client.new_inbox()
        self._subscription: Subscription | None = None

    async def open(self) -> Self:
        self._subscription = await self._client.subscribe(self.address, cb=self._arrived)
        await self._round_trip()  # subscribed on the server before a request names it
        return self

    async def _arrived(self, msg: Msg) -> None:
        self.arrived(nats_wire.reply(msg))

    async def close(self) -> None:
        subscription, self._subscription = self._subscription, None
        if subscription is not None and not self._client.is_closed:
            # Disconnected: the server forgets the subscription with the connection anyway.
            with contextlib.suppress(nats.errors.Error):
                await subscription.unsubscribe()
                await self._round_trip()  # gone from the server when close returns
        self.stop_waiting()
