"""Events <-> message bodies: the only place that knows the wire format (JSON, UTF-8)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from eventrelay.envelope import Message
from eventrelay.errors import ConfigurationError, DecodeError
from eventrelay.events import DynamicEvent, Event


def encode_body(event: Event | DynamicEvent) -> bytes:
    """The JSON body of an event (field aliases applied)."""
    if isinstance(event, DynamicEvent):
        try:
            return json.dumps(event.data, separators=(",", ":"), ensure_ascii=False).encode()
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(
                f"The payload of dynamic event {event.name!r} is not JSON: {exc}"
            ) from exc
    return event.model_dump_json(by_alias=True).encode()


def check_headers(headers: Mapping[Any, Any]) -> dict[str, str]:
    """Return `headers` as a plain dict if every key and value is a string; raise `ConfigurationError`."""
    bad = [k for k, v in headers.items() if not (isinstance(k, str) and isinstance(v, str))]
    if bad:
        raise ConfigurationError(f"Header names and values must be strings; check {bad!r}")
    return dict(headers)


def decode(message: Message, event_type: type[Event] | None, max_bytes: int) -> Event | DynamicEvent:
    """Turn a message into `event_type`, or into a `DynamicEvent` when `event_type` is None.

    Raises `DecodeError` with a readable reason for oversize, non-JSON, too deeply nested or invalid bodies
    and bad headers, and for any other exception decoding raises: such a message is dead-lettered at once.
    """
    if len(message.body) > max_bytes:
        raise DecodeError(f"message is {len(message.body)} bytes, over the limit of {max_bytes}")
    bad = [k for k, v in message.headers.items() if not (isinstance(k, str) and isinstance(v, str))]
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
    try:
        return event_type.model_validate_json(message.body)
    except ValidationError as exc:
        raise DecodeError(
            f"body of {message.name!r} does not fit {event_type.__name__}: "
            f"{exc.error_count()} error(s): {_summary(exc)}"
        ) from exc
    except RecursionError as exc:  # a validator of the event's own that recurses per level
        raise DecodeError(f"body of {message.name!r} is nested too deeply to decode") from exc
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
