"""How a `Message` travels as a NATS message, both ways (the NATS adapter's mapping).

Subject: `<prefix>.<event name>`. Names become subject levels reversibly, by percent-encoding all but
letters, digits and `_.-~`: `Orders.OrderPlaced` keeps its two levels, spaces, `*`, `>`, `%` and non-ASCII
become `%XX`, and a name with an empty level (`a..b`, `.a`) has its dots encoded too.

Headers: the message's own as NATS headers, percent-escaped where NATS would alter or act on them (CR, LF,
`%`, non-ASCII, spaces at the ends; a name NATS or this adapter reads, `Nats-*` and `Eventrelay-*`, has its
first character escaped). The message id is `Nats-Msg-Id` (JetStream stores an id once within its duplicate
window), the ordering key `Eventrelay-Key`. A message without an id (not published by eventrelay) takes
`<stream>:<sequence>`.

Replies: core NATS (no stream) to a subject of one level under `_INBOX` (`reply_subject`), which no stream of
this adapter captures (a `prefix` under `_INBOX` is refused) and no nats-py inbox (two levels or more) is.
A reply's name is its subject, as on the generic reply channel.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from urllib.parse import quote, unquote

from nats.aio.msg import Msg

from eventrelay.envelope import Message, new_message_id

MSG_ID, KEY_HEADER = "Nats-Msg-Id", "Eventrelay-Key"
_VALUE_SAFE = "".join(chr(c) for c in range(32, 127) if chr(c) != "%")  # printable ASCII stays readable
_NAME_SAFE = "!#$&'*+-.^_`|~"  # what a NATS header name may hold besides letters and digits
INBOX = "_INBOX"  # nats-py's inbox prefix (the adapter never changes it)
_REPLY_SUBJECT = re.compile(rf"{INBOX}\.[A-Za-z0-9]+")  # what `Client.new_inbox()` makes: one level


def subject_token(name: str) -> str:
    """The subject levels of an event name: reversible (`unquote`), no wildcards, no empty level."""
    token = quote(name, safe="")
    return token.replace(".", "%2E") if "" in token.split(".") else token


def subject(prefix: str, name: str) -> str:
    """The subject that messages named `name` are published to."""
    return f"{prefix}.{subject_token(name)}"


def name_of(prefix: str, subject: str) -> str | None:
    """The event name of a `subject` under `prefix`; None for another subject."""
    return unquote(subject.removeprefix(f"{prefix}.")) if subject.startswith(f"{prefix}.") else None


def outgoing(message: Message) -> dict[str, str]:
    """The NATS headers `message` is published with."""
    headers = {_escape(k, _NAME_SAFE, name=True): _escape(v) for k, v in message.headers.items()}
    headers[MSG_ID] = _escape(message.id)
    if message.key is not None:
        headers[KEY_HEADER] = _escape(message.key)
    return headers


def incoming(msg: Msg, name: str, stream: str) -> Message:
    """The message `msg` carries, fetched from `stream` by the consumer of event name `name`."""
    return _read(msg, name, lambda: f"{stream}:{msg.metadata.sequence.stream}")


def reply_subject(address: str) -> bool:
    """Whether `address` is a reply subject: `_INBOX.<letters and digits>`, one level, no wildcard."""
    return _REPLY_SUBJECT.fullmatch(address) is not None


def reply(msg: Msg) -> Message:
    """The reply `msg` carries, named by its subject (a core message has no stream sequence to name it by)."""
    return _read(msg, msg.subject, new_message_id)


def _read(msg: Msg, name: str, default_id: Callable[[], str]) -> Message:
    raw = msg.headers or {}
    message_id = unquote(raw[MSG_ID]) if MSG_ID in raw else default_id()
    key = unquote(raw[KEY_HEADER]) if KEY_HEADER in raw else None
    headers = {unquote(k): unquote(v) for k, v in raw.items() if not _reserved(k)}
    return Message(message_id, name, msg.data, headers, key)


def _escape(text: str, safe: str = _VALUE_SAFE, name: bool = False) -> str:
    """Percent-escape what NATS would alter in a header (CR, LF, `%`, non-ASCII, spaces at the ends)."""
    out = quote(text, safe=safe)
    if name and _reserved(out):  # a user's header never passes for one that NATS or this adapter reads
        out = f"%{ord(out[0]):02X}{out[1:]}"
    core, lead = out.strip(" "), len(out) - len(out.lstrip(" "))
    return "%20" * lead + core + "%20" * (len(out) - lead - len(core))


def _reserved(header: str) -> bool:
    return header.lower().startswith(("nats-", "eventrelay-"))
