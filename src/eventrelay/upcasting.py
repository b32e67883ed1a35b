"""Upcasters: bring a message written by an older version of an event class up to the current one.

```python
class ProductPriceChangedEto(Event, name="BookStore.Product.PriceChanged", version=2):
    product_id: int
    new_price: Decimal
    currency: str


@upcaster(ProductPriceChangedEto, from_version=1)
def add_currency(body: dict[str, Any]) -> dict[str, Any]:
    return {**body, "currency": "EUR"}
```

A publisher stamps the `x-eventrelay-version` header with its class's version when it is over 1; a message
without it is version 1. Decoding a message of version v into a class of version n > v runs the upcasters
from v, v+1, ... n-1 in turn on the body, then validates the result. An upcaster receives the body as it is
on the wire, a parsed JSON object: in JSON style "abp" its names are camelCase and its decimals `Decimal`s.
The result is validated as a dict (pydantic's Python mode, not JSON mode), so an upcaster may put in JSON
values or Python ones (a `Decimal`, a `datetime`). A message newer than the class is decoded as any other
(unknown fields ignored).

Upcasters are registered by event name and from-version, so a class and the upcasters of its name must be
imported before the bus decodes messages of it (declare them next to the class).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from decimal import Decimal
from typing import Any, TypeVar

from eventrelay.envelope import VERSION, Message
from eventrelay.errors import ConfigurationError, DecodeError
from eventrelay.events import Event, event_name, event_version
from eventrelay.json_style import JsonStyle

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]
U = TypeVar("U", bound=Upcaster)

# (event name, from-version) -> the upcaster to the next version. Keyed by name, as the wire is: the name is
# what a message carries, and a generic event's parametrization may be made again as a new class.
_upcasters: dict[tuple[str, int], Upcaster] = {}


def upcaster(event_type: type[Event], *, from_version: int) -> Callable[[U], U]:
    """Register the decorated function as the upcaster of `event_type`'s body from `from_version` to the
    next version. `ConfigurationError` for a version outside 1 .. version-1, or a second, other upcaster."""
    name, version = event_name(event_type), event_version(event_type)
    if not isinstance(from_version, int) or isinstance(from_version, bool) or not 1 <= from_version < version:
        raise ConfigurationError(
            f"{event_type.__name__} is at version {version}: an upcaster's from_version must be an integer "
            f"from 1 to {version - 1}, not {from_version!r}"
        )

    def register(function: U) -> U:
        existing = _upcasters.get((name, from_version))
        if existing is not None and _identity(existing) != _identity(function):
            raise ConfigurationError(
                f"{name!r} has two upcasters from version {from_version}: "
                f"{_identity(existing)} and {_identity(function)}"
            )
        _upcasters[(name, from_version)] = function
        return function

    return register


def upcast_versions(event_type: type[Event]) -> list[int]:
    """The older versions whose messages `event_type`'s upcasters bring up to it (an unbroken chain from
    each to the current version), ascending; empty at version 1 or without upcasters."""
    name, versions = event_name(event_type), []
    for version in range(event_version(event_type) - 1, 0, -1):
        if (name, version) not in _upcasters:
            break
        versions.append(version)
    return versions[::-1]


def _identity(function: Callable[..., object]) -> str:
    return f"{function.__module__}.{getattr(function, '__qualname__', repr(function))}"


def message_version(message: Message) -> int:
    """The version of the class that wrote `message` (1 without the header); `DecodeError` if it is not a
    positive integer."""
    text = message.headers.get(VERSION)
    if text is None:
        return 1
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise DecodeError(f"the {VERSION} header of {message.name!r} is not a positive integer: {text!r}")
    return int(text)


def upcast(message: Message, event_type: type[Event], style: JsonStyle) -> dict[str, Any] | None:
    """The body of `message` brought up to `event_type`'s version, or None when it needs no upcast (then the
    body is validated as it is). `DecodeError` for a missing upcaster, one that raised or returned no dict,
    and a body that is not a JSON object."""
    sent, current = message_version(message), event_version(event_type)
    if sent >= current:
        return None
    name = message.name
    missing = [v for v in range(sent, current) if (name, v) not in _upcasters]
    if missing:
        raise DecodeError(
            f"{name!r} is version {sent} and {event_type.__name__} version {current}, with no upcaster from "
            f"version {missing[0]}: register @upcaster({event_type.__name__}, from_version={missing[0]})"
        )
    body = _parse(message, style)
    for version in range(sent, current):
        function = _upcasters[(name, version)]
        try:
            result: object = function(body)
        except Exception as exc:
            raise DecodeError(
                f"upcaster {_identity(function)} of {name!r} from version {version} raised "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        if not isinstance(result, dict):
            raise DecodeError(
                f"upcaster {_identity(function)} of {name!r} from version {version} returned "
                f"{type(result).__name__}, not a dict"
            )
        body = result
    return body


def _parse(message: Message, style: JsonStyle) -> dict[str, Any]:
    try:
        # As the validators read it: style "abp" reads decimals exactly, not through a float.
        data = json.loads(message.body, parse_float=Decimal) if style == "abp" else json.loads(message.body)
    except RecursionError as exc:
        raise DecodeError(f"body of {message.name!r} is nested too deeply to decode") from exc
    except ValueError as exc:  # UnicodeDecodeError is one
        raise DecodeError(f"body of {message.name!r} is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise DecodeError(f"body of {message.name!r} is not a JSON object")
    return data
