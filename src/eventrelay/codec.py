"""Events <-> message bodies: the only place that knows the wire format (JSON, UTF-8)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from pydantic import ValidationError

from eventrelay.envelope import VERSION, Message
from eventrelay.errors import ConfigurationError, DecodeError
from eventrelay.events import DynamicEvent, Event
from eventrelay.json_style import JsonStyle, decode_abp, encode_abp, validate_abp
from eventrelay.upcasting import upcast


def encode_body(event: Event | DynamicEvent, style: JsonStyle = "eventrelay") -> bytes:
    """The JSON body of an event (field aliases applied), in `style`'s conventions (`json_style.py`).

    A dynamic event's dict is written as it is in either style."""
    if style == "abp" and isinstance(event, Event):
        try:
            return encode_abp(event)
        except ValueError as exc:
            raise ConfigurationError(f"{type(event).__name__} cannot be written as JSON: {exc}") from exc
    if isinstance(event, DynamicEvent):
        try:
            return json.dumps(event.data, separators=(",", ":"), ensure_ascii=False).encode()
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(
                f"The payload of dynamic event {event.name!r} is not JSON: {exc}"
            ) from exc
    return event.model_dump_json(by_alias=True).encode()


def version_header(event: Event | DynamicEvent) -> dict[str, str]:
    """The version header of `event`'s message: none at version 1 (or dynamic), so such a message is
    byte-for-byte what it was before versions, and what ABP sends."""
    version = event.__event_version__ if isinstance(event, Event) else 1
    return {VERSION: str(version)} if version > 1 else {}


def _not_text(headers: Mapping[Any, Any]) -> list[Any]:
    """The names of the headers whose name or value is not a string."""
    return [k for k, v in headers.items() if not (isinstance(k, str) and isinstance(v, str))]


def check_headers(headers: Mapping[Any, Any]) -> dict[str, str]:
    """Return `headers` as a plain dict if every key and value is a string; raise `ConfigurationError`."""
    bad = _not_text(headers)
    if bad:
        raise ConfigurationError(f"Header names and values must be strings; check {bad!r}")
    return dict(headers)


def text_headers(headers: Mapping[Any, Any]) -> tuple[dict[str, str], str | None]:
    """Headers a broker delivered with values of any type (an AMQP table: ABP's `headersArguments` may
    hold ints, booleans, tables), as the strings the bus carries, and why not, if some cannot be.

    A string stays; `True`/`False` become `true`/`false`; an int and a Decimal their decimal text (`7`,
    `9.99`); a float its shortest exact text (`0.1`, `inf`); a datetime or date ISO 8601
    (`2024-05-01T12:00:00+00:00`); bytes their text if UTF-8; a nested table or list compact JSON (its
    decimals as numbers, its datetimes and UTF-8 bytes as strings: `{"a":1,"b":[true]}`); None (AMQP's
    void) is left out. What cannot be carried so (bytes that are not UTF-8, a name that is not a string, a
    type none of these) is kept as its `repr` and named in the reason: the message is then a dead letter,
    unhandled.
    """
    text: dict[str, str] = {}
    bad: list[str] = []
    for name, value in headers.items():
        if value is None:
            continue
        try:
            if not isinstance(name, str):
                raise TypeError(f"a header name is {type(name).__name__}, not a string")
            text[name] = value if isinstance(value, str) else _header_text(value)
        except (TypeError, ValueError) as exc:
            text[str(name)] = repr(value)
            bad.append(f"{name!r} ({exc})")
    return text, (f"header values that cannot be carried as text: {', '.join(bad)}" if bad else None)


def _header_text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, float):
        return float.__repr__(value)
    if isinstance(value, Decimal):  # AMQP's decimal: a scale and an integer, so `f` never needs an exponent
        return format(value, "f") if value.is_finite() else str(value)
    if isinstance(value, dict | list | tuple):
        return json.dumps(_json_ready(value), separators=(",", ":"), ensure_ascii=False)
    return str(_json_ready(value))  # datetime, date, bytes: their text; anything else raised


def _json_ready(value: object) -> Any:
    if value is None or isinstance(value, str | bool | int | float):
        return value
    if isinstance(value, Decimal):  # AMQP's decimal holds at most 10 digits: a float keeps its value
        return int(value) if value.is_finite() and value == value.to_integral_value() else float(value)
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, bytes | bytearray | memoryview):
        try:
            return bytes(value).decode()
        except UnicodeDecodeError:
            raise ValueError("bytes that are not UTF-8 text") from None
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise ValueError("a table with a name that is not a string")
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    raise ValueError(f"a value of type {type(value).__name__}")


def decode(
    message: Message, event_type: type[Event] | None, max_bytes: int, style: JsonStyle = "eventrelay"
) -> Event | DynamicEvent:
    """Turn a message into `event_type`, or into a `DynamicEvent` when `event_type` is None, reading the body
    in `style`'s conventions (a `DynamicEvent`'s dict is the body as it is, in either style).

    A message of an older version than `event_type`'s is upcast first (`upcasting.py`).

    Raises `DecodeError` with a readable reason for oversize, non-JSON, too deeply nested or invalid bodies,
    bad headers and failed upcasts, and for any other exception decoding raises: such a message is
    dead-lettered at once.
    """
    if len(message.body) > max_bytes:
        raise DecodeError(f"message is {len(message.body)} bytes, over the limit of {max_bytes}")
    # A broker maps what it cannot carry as text (`text_headers`); a Broker of the user's own may not.
    bad = _not_text(message.headers)
    if bad:
        raise DecodeError(f"headers must be strings; these are not: {bad!r}")
    if event_type is None:
        try:
            data = json.loads(message.body)
        except (UnicodeDecodeError, ValueError) as exc:
            raise DecodeError(f"body of {message.name!r} is not JSON: {exc}") from exc
        except RecursionError as exc:  # the C decoder recurses per level: a poison message, not a bug of ours
            raise DecodeError(f"body of {message.name!r} is nested too deeply to decode") from exc
        except Exception as exc:  # whatever else decoding raises, the message cannot be decoded
            raise DecodeError(f"body of {message.name!r} cannot be decoded: {_named(exc)}") from exc
        if not isinstance(data, dict):
            raise DecodeError(f"body of {message.name!r} is not a JSON object")
        return DynamicEvent(message.name, data)
    # The common case, a version-1 message for a version-1 class, pays two lookups here and nothing more.
    versioned = VERSION in message.headers or event_type.__event_version__ > 1
    upcast_body = upcast(message, event_type, style) if versioned else None  # None: validate the body as sent
    try:
        if upcast_body is not None:
            if style == "abp":
                return validate_abp(upcast_body, event_type)
            return event_type.model_validate(upcast_body)
        if style == "abp":
            return decode_abp(message.body, event_type)
        return event_type.model_validate_json(message.body)
    except ValidationError as exc:
        raise DecodeError(
            f"body of {message.name!r} does not fit {event_type.__name__}: "
            f"{exc.error_count()} error(s): {_summary(exc)}"
        ) from exc
    except RecursionError as exc:  # a validator of the event's own that recurses per level
        raise DecodeError(f"body of {message.name!r} is nested too deeply to decode") from exc
    except ValueError as exc:  # only json.loads (style "abp") lets one through: pydantic's are wrapped
        raise DecodeError(f"body of {message.name!r} is not JSON: {exc}") from exc
    except Exception as exc:  # a validator raised what pydantic lets through (not ValueError, AssertionError)
        raise DecodeError(f"body of {message.name!r} cannot be decoded: {_named(exc)}") from exc


def _named(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _summary(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors(include_url=False)[:5]:
        where = ".".join(str(p) for p in error["loc"]) or "body"
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)
