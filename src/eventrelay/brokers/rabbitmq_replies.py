"""The RabbitMQ adapter's reply channel: an exclusive, auto-delete queue of the process's own.

The queue is named `eventrelay.replies.<instance>` by the adapter rather than by the server, so that it keeps
its address when the broker reconnects and declares it again (a server-named queue would get a new name, and
the replies to requests sent before would go nowhere). Exclusive: no other connection can consume it or
declare it; RabbitMQ deletes it with its connection. If the server still holds it for a connection it has not
noticed is gone (half-open), the channel takes a new name (`<instance>.<n>`) rather than wait for that.
Consumed without acks: a reply is not worth a round trip more, and one that comes while nobody listens may be
lost.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage, AbstractQueue
from aiormq.exceptions import ChannelLockedResource

from eventrelay.brokers import rabbitmq_wire as wire
from eventrelay.brokers.base import REPLIES, PushedReplies

PREFIX = REPLIES
"""What every reply queue's name begins with: `send_reply` sends to no other queue."""


class RabbitMQReplies(PushedReplies):
    """Replies to the requests of one process, on the queue `address` (see the module docstring)."""

    def __init__(self, instance: str, closed: Callable[[RabbitMQReplies], None]) -> None:
        super().__init__()
        self.address = f"{PREFIX}{instance}"
        self._instance, self._renamed, self._closed = instance, 0, closed
        self._consuming: tuple[AbstractChannel, AbstractQueue, str] | None = None  # channel, queue, tag

    async def attach(self, connection: AbstractConnection) -> None:
        """Declare the queue on `connection` and consume it: at open, and after each reconnect."""
        try:
            channel, queue = await self._declare(connection)
        except ChannelLockedResource:  # held for our lost connection, whose replies are lost anyway
            self._renamed += 1
            self.address = f"{PREFIX}{self._instance}.{self._renamed}"
            channel, queue = await self._declare(connection)
        self._consuming = channel, queue, await queue.consume(self._arrived, no_ack=True)

    async def _declare(self, connection: AbstractConnection) -> tuple[AbstractChannel, AbstractQueue]:
        channel = await connection.channel(publisher_confirms=False)
        return channel, await channel.declare_queue(self.address, exclusive=True, auto_delete=True)

    async def _arrived(self, incoming: AbstractIncomingMessage) -> None:
        self.arrived(wire.incoming(incoming)[0])

    async def close(self) -> None:
        self._closed(self)
        consuming, self._consuming = self._consuming, None
        # A connection lost meanwhile took the queue with it: nothing is left to delete then.
        with contextlib.suppress(Exception):
            if consuming is not None and not consuming[0].is_closed:
                channel, queue, tag = consuming
                await queue.cancel(tag)  # first: aiormq warns of a consumer the server cancels
                await queue.delete(if_unused=False, if_empty=False)  # at once, not when the connection goes
                await channel.close()
        self.stop_waiting()
