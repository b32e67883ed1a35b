"""A guard around pamqp's frame decoder: one message whose properties cannot be decoded must not take the
RabbitMQ connection down with it.

aiormq reads every frame of a connection in one task, through `pamqp.frame.unmarshal`. When the content
header of one message cannot be decoded (headers nested thousands deep: pamqp recurses per level and raises
RecursionError; a message id, content type or header name that is not UTF-8; a timestamp past the year
9999), the exception ends that task: the connection closes, the unacked message comes again on the next one,
and the subscriber never gets past it. RabbitMQ takes all of these from a publisher, as it does not decode
properties it does not route on.

`install()` wraps `pamqp.frame.unmarshal` once per process. A content header that fails to decode is decoded
again property by property, each cut out by its length, so only the properties that fail are dropped; its
headers then come as `UndecodableHeaders`, which say what was dropped, and the adapter hands the delivery to
the bus, which dead-letters it with that reason and its body. Other frames, and every header that decodes,
are left as pamqp makes them. Neither aiormq nor aio-pika has a hook for this, hence the wrapper of a public
pamqp function (aiormq looks it up at each call); it is written for pamqp 4 and stays off on another version.
"""

from __future__ import annotations

import functools
import logging
import struct
from collections.abc import Callable, Mapping
from typing import Any

import pamqp
import pamqp.frame
from pamqp import commands, constants, decode, header

logger = logging.getLogger(__name__)

VERIFIED = "4."
"""The pamqp versions (a prefix) whose frame layout and `Basic.Properties` this reads."""

REASON = "AMQP properties that cannot be decoded were dropped: "
"""How the reason of a message whose properties could not all be decoded begins; what was dropped follows."""

_FIXED = {"octet": 1, "timestamp": 8}  # the sizes of Basic.Properties' fixed-size types
_Unmarshal = Callable[[bytes], tuple[int, int, pamqp.frame.FrameTypes]]


class UndecodableHeaders(dict[str, Any]):
    """The decodable headers of a message whose properties could not all be decoded; `reason` says why."""

    def __init__(self, headers: Mapping[str, Any], reason: str) -> None:
        super().__init__(headers)
        self.reason = reason

    def __bool__(self) -> bool:
        return True  # aio-pika replaces empty headers with a plain {}, which would lose the reason


def install() -> bool:
    """Wrap `pamqp.frame.unmarshal` (once); return whether the guard is on."""
    current: Any = pamqp.frame.unmarshal
    if getattr(current, "eventrelay_guard", False):
        return True
    version = pamqp.__version__
    if not version.startswith(VERIFIED):
        logger.warning(
            "pamqp %s is not a version eventrelay's RabbitMQ guard was written for, so it is off: a message "
            "whose properties cannot be decoded will close the connection at each delivery and stall its "
            "subscriber. Install pamqp 4: pip install 'pamqp>=4,<5'",
            version,
        )
        return False
    setattr(pamqp.frame, "unmarshal", _guarded(current))  # noqa: B010 (mypy: a module's function)
    return True


def _guarded(unmarshal: _Unmarshal) -> _Unmarshal:
    @functools.wraps(unmarshal)
    def guarded(data_in: bytes) -> tuple[int, int, pamqp.frame.FrameTypes]:
        try:
            return unmarshal(data_in)
        except Exception:  # RecursionError included: the stack is unwound by now
            salvaged = _salvage(data_in)
            if salvaged is None:
                raise
            return salvaged

    guarded.eventrelay_guard = True  # type: ignore[attr-defined]
    return guarded


def _salvage(data_in: bytes) -> tuple[int, int, header.ContentHeader] | None:
    """A content header frame decoded property by property, those that fail dropped; None for another frame,
    or one whose layout is broken (then nothing can be said of the message)."""
    frame_type, channel, size = pamqp.frame.frame_parts(data_in)
    start = constants.FRAME_HEADER_SIZE
    if frame_type != constants.FRAME_HEADER or not size or len(data_in) < start + size + 1:
        return None
    payload = data_in[start : start + size]
    try:
        class_id, weight, body_size, flags = struct.unpack_from(">HHQH", payload)
    except struct.error:
        return None
    if flags & 1:  # a second word of flags: Basic has 14 properties, one word holds them
        return None
    properties, offset, dropped = commands.Basic.Properties(), 14, []
    for name in properties.__slots__:
        if not flags & properties.flags[name]:
            continue
        kind = properties.amqp_type(name)
        try:
            if kind == "shortstr":
                length = 1 + payload[offset]
            elif kind == "table":
                length = 4 + struct.unpack_from(">I", payload, offset)[0]
            else:
                length = _FIXED[kind]
        except (IndexError, struct.error, KeyError):
            return None
        if offset + length > len(payload):
            return None
        try:
            _, value = decode.by_type(payload[offset : offset + length], kind)
        except RecursionError:
            dropped.append(f"{name} (nested too deeply)")
        except Exception as exc:
            dropped.append(f"{name} ({type(exc).__name__}: {exc})")
        else:
            setattr(properties, name, value)
        offset += length
    if dropped:  # else each decoded here: a table nested just deep enough to fail a few frames deeper
        reason = REASON + ", ".join(dropped)
        properties.headers = UndecodableHeaders(properties.headers or {}, reason)
    content = header.ContentHeader(weight, body_size, properties)
    content.class_id = class_id
    return start + size + 1, channel, content
