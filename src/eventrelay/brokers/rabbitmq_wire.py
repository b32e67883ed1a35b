"""How a `Message` travels as an AMQP message, both ways (the RabbitMQ adapter's mapping).

`message_id` = Message.id, `correlation_id` = the `x-correlation-id` header, persistent, `application/json`;
the other headers go as AMQP headers, the ordering key as `x-eventrelay-key`. Retry copies add
`x-eventrelay-attempt` (our own count: `x-death` counts are unreliable), `x-eventrelay-name` and
`x-eventrelay-due`. A message without them (as ABP publishes it) is named by its routing key, takes its
correlation id from the property and is attempt 1.
"""

from __future__ import annotations

from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from eventrelay.codec import text_headers
from eventrelay.envelope import CORRELATION_ID, Message, new_message_id

ATTEMPT, NAME, KEY, DUE = "x-eventrelay-attempt", "x-eventrelay-name", "x-eventrelay-key", "x-eventrelay-due"
_BROKER_HEADERS = ("x-death", "x-first-death-", "x-last-death-", "x-delivery-count")


def outgoing(message: Message, attempt: int = 1, due: int | None = None) -> aio_pika.Message:
    """`message` as published: a first attempt, or a retry copy due at `due` (epoch milliseconds)."""
    headers: dict[str, Any] = dict(message.headers)
    if message.key is not None:
        headers[KEY] = message.key
    if attempt > 1 or due is not None:
        headers |= {ATTEMPT: attempt, NAME: message.name} | ({} if due is None else {DUE: due})
    return aio_pika.Message(
        message.body,
        headers=headers,
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=message.id,
        correlation_id=message.correlation_id,
    )


def incoming(delivered: AbstractIncomingMessage) -> tuple[Message, int, str | None]:
    """The message and its attempt as published (a redelivery not counted yet), and why some of its headers
    cannot be carried, if so (the bus then dead-letters it)."""
    headers = {k: v for k, v in (delivered.headers or {}).items() if not k.startswith(_BROKER_HEADERS)}
    name, key, attempt = headers.pop(NAME, None), headers.pop(KEY, None), headers.pop(ATTEMPT, 1)
    headers.pop(DUE, None)
    text, unreadable = text_headers(headers)  # ABP's headersArguments may hold ints, booleans, tables
    if delivered.correlation_id and CORRELATION_ID not in text:
        text[CORRELATION_ID] = delivered.correlation_id
    message = Message(
        delivered.message_id or new_message_id(),
        str(name or delivered.routing_key or ""),
        delivered.body,
        text,
        None if key is None else str(key),
    )
    return message, attempt if isinstance(attempt, int) and attempt > 1 else 1, unreadable
