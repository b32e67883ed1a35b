"""Request/reply: `Requester` sends a request past the outbox and waits for its typed reply on this process's
reply channel; `reply_to`, `answer` and `failure` are how the answering side reads a request and makes its
reply.

A request is an ordinary message with two more headers: the asker's reply address and the time it gives up.
Whoever handles it answers by returning an event; a handler that raises answers with a failure (the
exception's type and text). Replies are sent once the handler's unit of work has committed, so the inbox that
drops a redelivered request drops its second reply too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import traceback
import uuid
from typing import TypeVar

from eventrelay.brokers.base import Broker, Replies, reconnect_pause
from eventrelay.codec import decode, encode_body, version_header
from eventrelay.envelope import (
    CORRELATION_ID,
    DEADLINE,
    FAILURE,
    IN_REPLY_TO,
    REPLY_TO,
    Message,
    new_message_id,
    printable,
)
from eventrelay.errors import ConfigurationError, DecodeError, RemoteError, RequestTimeout
from eventrelay.events import Event
from eventrelay.json_style import JsonStyle
from eventrelay.outbox import Outbox
from eventrelay.uow import current_unit_of_work

logger = logging.getLogger(__name__)

R = TypeVar("R", bound=Event)


def reply_to(message: Message) -> str | None:
    """The reply address of a request; None for an ordinary message."""
    return message.headers.get(REPLY_TO)


def expired(message: Message, now: float) -> bool:
    """Whether `message` is a request its asker has given up on by `now` (Unix seconds)."""
    deadline = message.headers.get(DEADLINE)
    if deadline is None:
        return False
    try:
        return float(deadline) < now
    except ValueError:  # a foreign or forged header: handle it as if it had none
        return False


def answer(request: Message, value: object, style: JsonStyle) -> Message:
    """The reply to `request` that carries `value`, an event; `ConfigurationError` for anything else."""
    if not isinstance(value, Event):
        raise ConfigurationError(
            f"A request's handler answers with an Event, not {type(value).__name__}: return e.g. Stock(...)"
        )
    return _reply(request, encode_body(value, style), version_header(value))


def failure(request: Message, service: str, exc: BaseException, tracebacks: bool) -> Message:
    """The reply to `request` saying that `service` failed to answer it with `exc`."""
    body = {"type": type(exc).__name__, "message": str(exc), "service": service}
    if tracebacks:
        body["traceback"] = "".join(traceback.format_exception(exc))
    return _reply(request, json.dumps(body).encode(), {FAILURE: type(exc).__name__})


def _reply(request: Message, body: bytes, headers: dict[str, str]) -> Message:
    if (correlation := request.headers.get(CORRELATION_ID)) is not None:
        headers = {CORRELATION_ID: correlation, **headers}
    return Message(new_message_id(), request.name, body, {**headers, IN_REPLY_TO: request.id})


class Requester:
    """Asks questions for one process: sends requests and hands each reply to the task waiting for it.

    The reply channel is opened at the first request and closed by `close()`.
    """

    def __init__(self, service: str, broker: Broker, outbox: Outbox, max_bytes: int) -> None:
        self.service, self.broker, self.outbox, self.max_bytes = service, broker, outbox, max_bytes
        self.instance = uuid.uuid4().hex
        self._channel: Replies | None = None
        self._opening = asyncio.Lock()
        self._receiver: asyncio.Task[None] | None = None
        self._waiting: dict[str, asyncio.Future[Message]] = {}

    async def ask(
        self, event: Event, reply: type[R], timeout: float, *, key: str | None = None, owner: object = None
    ) -> R:
        """Send `event` as a request and return its reply as a `reply`.

        Raises `RequestTimeout` when none came within `timeout` seconds, `RemoteError` when the answering
        service failed, `DecodeError` when its reply does not fit `reply`.
        """
        if not (isinstance(reply, type) and issubclass(reply, Event)):
            raise ConfigurationError(f"reply= is the Event class of the answer, not {reply!r}")
        if timeout <= 0:
            raise ConfigurationError(f"timeout= is more than 0 seconds: {timeout!r}")
        uow = current_unit_of_work()
        if uow is not None and uow.owner is owner:
            raise ConfigurationError(
                "bus.request inside a unit of work (a handler runs in one): the request would leave before "
                "the commit and the transaction would stay open while another service answers. Ask before or "
                "after the unit of work, or publish an event and handle the answer as an event (a saga step)"
            )
        channel = await self._open()
        message = self.outbox.message(event, key=key)
        deadline = time.time() + timeout
        message = dataclasses.replace(
            message, headers={**message.headers, REPLY_TO: channel.address, DEADLINE: f"{deadline:.3f}"}
        )
        waiting = self._waiting[message.id] = asyncio.get_running_loop().create_future()
        try:
            await self.outbox.send([message])
            async with asyncio.timeout(timeout):
                response = await waiting
        except TimeoutError:
            raise RequestTimeout(
                f"No reply to {message.name!r} from {self.service} within {timeout}s: is a service that "
                "handles it running, and does its handler return the reply?",
                message.name,
            ) from None
        finally:
            self._waiting.pop(message.id, None)
        return self._read(response, reply)

    def _read(self, response: Message, reply: type[R]) -> R:
        if FAILURE in response.headers:
            try:
                body = json.loads(response.body)
                raise RemoteError(
                    str(body["type"]), str(body["message"]), str(body["service"]), body.get("traceback")
                )
            except (ValueError, KeyError, TypeError) as exc:
                raise DecodeError(f"a failure reply to {response.name!r} that cannot be read: {exc}") from exc
        event = decode(response, reply, self.max_bytes, self.outbox.json_style)
        assert isinstance(event, reply)  # decode with a class gives that class
        return event

    async def _open(self) -> Replies:
        async with self._opening:
            if self._channel is None:
                self._channel = await self.broker.open_replies(self.instance)
                self._receiver = asyncio.create_task(
                    self._receive(self._channel), name=f"{self.service}-replies"
                )
            return self._channel

    async def _receive(self, channel: Replies) -> None:
        failures = 0
        while True:
            try:
                replies = await channel.receive(1.0)
                failures = 0
            except Exception:
                failures += 1
                logger.warning("Could not receive replies; trying again", exc_info=True)
                await asyncio.sleep(reconnect_pause(failures))
                continue
            for response in replies:
                waiting = self._waiting.get(response.headers.get(IN_REPLY_TO, ""))
                if waiting is None or waiting.done():  # its asker gave up, or a second answer
                    logger.debug("Reply %s came with no one waiting", printable(response.id))
                else:
                    waiting.set_result(response)

    async def close(self) -> None:
        """Stop receiving replies and close the channel; requests under way time out."""
        receiver, channel, self._receiver, self._channel = self._receiver, self._channel, None, None
        if receiver is not None:
            receiver.cancel()
            await asyncio.gather(receiver, return_exceptions=True)
        if channel is not None:
            try:
                await channel.close()
            except Exception:
                logger.warning("Could not close the reply channel", exc_info=True)
