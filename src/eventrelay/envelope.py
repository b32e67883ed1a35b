"""What travels between services: a `Message` (id, name, body, headers, key) and its `Delivery`.

The body is the event's JSON; everything the bus needs besides the payload rides in string headers, so every
broker can carry it (`docs/wire-format.md` lists them).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

CORRELATION_ID = "x-correlation-id"
CAUSATION_ID = "x-causation-id"
TENANT_ID = "x-tenant-id"
TRACEPARENT = "traceparent"
COMMITTED_AT = "x-eventrelay-committed-at"
REPLY_TO = "x-eventrelay-reply-to"  # a request's: the reply channel's address
DEADLINE = "x-eventrelay-deadline"  # a request's: when its asker gives up, in Unix seconds
IN_REPLY_TO = "x-eventrelay-in-reply-to"  # a reply's: the request's message id
FAILURE = "x-eventrelay-failure"  # a failure reply's: the type name of the exception that answered
VERSION = "x-eventrelay-version"  # the version of the event class that wrote the body, when it is over 1
RESERVED_HEADERS = frozenset({CORRELATION_ID, CAUSATION_ID, TENANT_ID})
REQUEST_HEADERS = frozenset({REPLY_TO, DEADLINE, IN_REPLY_TO, FAILURE})


def printable(text: object, *, lines: bool = False) -> str:
    """`text` safe to show on a terminal or in one log line: each character that is not printable (ESC and
    the other control characters, CR and LF, bidirectional overrides) becomes an escape as `repr` writes it,
    such as `\\x1b`. With `lines`, newlines and tabs stay (a body, a traceback). Message fields come from
    other services: pass them through this before printing or logging them."""
    value = str(text)
    if value.isprintable():
        return value
    keep = "\n\t" if lines else ""
    return "".join(c if c.isprintable() or c in keep else repr(c)[1:-1] for c in value)


def new_message_id() -> str:
    """A fresh message id: 32 lowercase hex digits, like ABP's `Guid.ToString("N")`."""
    return uuid.uuid4().hex


class BusHeaders:
    """The bus's own headers (correlation, causation, tenant) as properties, for anything with `headers`."""

    __slots__ = ()
    headers: Mapping[str, str]

    @property
    def correlation_id(self) -> str | None:
        return self.headers.get(CORRELATION_ID)

    @property
    def causation_id(self) -> str | None:
        return self.headers.get(CAUSATION_ID)

    @property
    def tenant_id(self) -> str | None:
        return self.headers.get(TENANT_ID)


@dataclass(frozen=True, slots=True)
class Message(BusHeaders):
    """One event on the wire. `id` is kept from the outbox to the inbox: it is what deduplicates."""

    id: str
    name: str
    body: bytes
    headers: Mapping[str, str] = field(default_factory=dict)
    key: str | None = None


@dataclass(eq=False, slots=True)
class Delivery:
    """A message handed to one subscriber. `attempt` is 1 the first time; `token` belongs to the broker.

    `undecodable` is set by a broker that could not decode all of the message (its properties, say), to why:
    the bus dead-letters such a delivery with that reason, unhandled.
    """

    message: Message
    attempt: int = 1
    token: object = None
    undecodable: str | None = None
