"""ABP's JSON conventions for event bodies (`Settings.json_style = "abp"`).

ABP (System.Text.Json with its Web defaults and ABP's converters) writes property names in camelCase and reads
them ignoring case. Under the "abp" style:

- Out, a field's name is its alias when it has one (`Field(alias=...)`, `serialization_alias`, or the class's
  `alias_generator`: an alias always wins); else the .NET name of the field (`product_id` -> `ProductId`, each
  part's first letter upper-cased) passed through `camel_case`, which is System.Text.Json's
  `JsonNamingPolicy.CamelCase`: `productId`; a field named `productID` gives `productID`.
- In, a body key names a field when it equals, ignoring case, the field's camel name, its alias or its
  Python name. Other keys are ignored, as unknown fields always are.
- Decimals are JSON numbers both ways (`9.90`, never `"9.90"`; read exactly, not through a float).
- Datetimes go out as .NET writes them: `2024-05-01T12:00:00.5Z` (fraction without trailing zeros, `Z` for
  UTC, `+02:00` for another offset, nothing for a naive one); in, up to 7 fractional digits are read (the
  7th, .NET's 100 ns, is dropped), with or without an offset.
- A timedelta is a .NET TimeSpan both ways: `"1.02:03:04.5000000"` (`[-][d.]hh:mm:ss[.fffffff]`).
- A float that is NaN or infinite is written `null`, as pydantic writes it.
- A field a class lists in `__abp_inside__` (`{"entity_version": "entity"}` on the entity events) travels
  inside the object of the named field, as ABP's `IHasEntityVersion` puts `entityVersion` inside the entity.

Nested models (an ETO inside `EntityUpdatedEto`, lists and dicts of models) follow the same rules. The work
per class is done once and cached. A model with serializers of its own (`@field_serializer`,
`@model_serializer`) is dumped by pydantic in JSON mode and only its own keys renamed.
"""

from __future__ import annotations

import json
import re
import types
import typing
import unicodedata
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from enum import Enum
from typing import Any, Literal, TypeVar

from pydantic import BaseModel
from pydantic_core import to_json

JsonStyle = Literal["eventrelay", "abp"]
JSON_STYLES: tuple[JsonStyle, ...] = ("eventrelay", "abp")
M = TypeVar("M", bound=BaseModel)


def camel_case(name: str) -> str:
    """`name` as System.Text.Json's `JsonNamingPolicy.CamelCase` converts it: the leading run of upper-case
    letters is lower-cased, except the last of a run followed by a lower-case letter (`ProductID` ->
    `productID`, `URLValue` -> `urlValue`, `ID` -> `id`); a name not starting upper-case is kept."""
    if not name or not _upper(name[0]):
        return name
    chars = list(name)
    for i, char in enumerate(chars):
        if i == 1 and not _upper(char):
            break
        if i > 0 and i + 1 < len(chars) and not _upper(chars[i + 1]):
            if chars[i + 1] == " ":
                chars[i] = _lower(char)
            break
        chars[i] = _lower(char)
    return "".join(chars)


def dotnet_name(field: str) -> str:
    """The .NET property name of a Python field: each `_`-separated part with its first letter upper-cased
    (`product_id` -> `ProductId`, `productID` -> `ProductID`)."""
    return "".join(part[:1].upper() + part[1:] for part in field.split("_"))


def _upper(char: str) -> bool:
    return unicodedata.category(char) == "Lu"  # .NET's char.IsUpper: letters of category Lu only


def _lower(char: str) -> str:
    lowered = char.lower()
    return lowered if len(lowered) == 1 else char  # .NET maps one char to one char


# --- the per-class plan ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Plan:
    fields: tuple[tuple[str, str, bytes], ...]
    """(Python name, wire name, `"wire":` as JSON) of what is written, in declaration order."""
    keys: dict[str, str]
    """Lower-cased body key -> the key pydantic validates the field by."""
    nested: dict[str, Callable[[Any], Any]]
    """Validation key -> what renames the keys of the models in its value."""
    inside: dict[str, tuple[str, str]]
    """Python name -> (the field whose object carries it, its wire name there)."""
    dumped: bool
    """The class has serializers of its own: pydantic dumps it."""


_plans: weakref.WeakKeyDictionary[type[BaseModel], _Plan] = weakref.WeakKeyDictionary()


def _plan(cls: type[BaseModel]) -> _Plan:
    plan = _plans.get(cls)
    if plan is None:
        plan = _plans[cls] = _make_plan(cls)
    return plan


def _make_plan(cls: type[BaseModel]) -> _Plan:
    fields: list[tuple[str, str]] = []
    keys: dict[str, str] = {}
    nested: dict[str, Callable[[Any], Any]] = {}
    for name, info in cls.model_fields.items():
        wire = info.serialization_alias or info.alias or camel_case(dotnet_name(name))
        if not info.exclude:
            fields.append((name, wire))
        if info.validation_alias is not None and not isinstance(info.validation_alias, str):
            continue  # AliasChoices / AliasPath: the body's keys go to pydantic as they came
        target = info.validation_alias or info.alias or name
        for key in (name, wire, info.alias, target):
            if key is not None:
                keys.setdefault(key.lower(), target)
        if (rename := _renamer(info.annotation)) is not None:
            nested[target] = rename
    for name, computed in cls.model_computed_fields.items():
        fields.append((name, computed.alias or camel_case(dotnet_name(name))))
    wires = dict(fields)
    written = tuple((name, wire, to_json(wire) + b":") for name, wire in fields)
    inside = {
        name: (holder, wires.get(name, camel_case(dotnet_name(name))))
        for name, holder in getattr(cls, "__abp_inside__", {}).items()
        if name in cls.model_fields and holder in cls.model_fields
    }
    decorators = cls.__pydantic_decorators__
    dumped = bool(decorators.field_serializers or decorators.model_serializers)
    return _Plan(written, keys, nested, inside, dumped)


def _renamer(annotation: Any) -> Callable[[Any], Any] | None:
    """What renames the body keys of the models an annotation holds (and reads .NET TimeSpans), or None if
    it holds neither."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        model = annotation
        return lambda value: _rename(value, model)
    if annotation is timedelta:
        return _read_timespan
    if origin is typing.Annotated:
        return _renamer(args[0])
    if origin is typing.Union or origin is types.UnionType:
        found = [r for r in map(_renamer, args) if r is not None]
        return found[0] if len(found) == 1 else None  # two model types: which one a body is, pydantic decides
    if origin in (list, set, frozenset, tuple, Sequence) and args and (args[1:] in ((), (...,))):
        element = _renamer(args[0])
        if element is not None:
            return lambda value: [element(v) for v in value] if isinstance(value, list) else value
    if origin in (dict, Mapping) and len(args) == 2 and (member := _renamer(args[1])) is not None:
        return lambda value: {k: member(v) for k, v in value.items()} if isinstance(value, dict) else value
    return None


# --- decoding ----------------------------------------------------------------------------------------


def decode_abp(body: bytes, event_type: type[M]) -> M:
    """`event_type` from a body in ABP's conventions. Raises `ValueError` for a body that is not JSON and
    pydantic's `ValidationError` for one that does not fit."""
    data = json.loads(body, parse_float=Decimal)  # a decimal read exactly, not rounded through a float
    return validate_abp(data, event_type)


def validate_abp(data: Any, event_type: type[M]) -> M:
    """`event_type` from a parsed body in ABP's conventions; pydantic's `ValidationError` if it misfits."""
    return event_type.model_validate(_rename(data, event_type))


def _rename(data: Any, cls: type[BaseModel]) -> Any:
    if not isinstance(data, dict):
        return data  # pydantic says what is wrong with it
    plan = _plan(cls)
    renamed: dict[str, Any] = {}
    for key, value in data.items():
        target = str(plan.keys.get(key.lower(), key))
        rename = plan.nested.get(target)
        renamed[target] = value if rename is None else rename(value)
    for name, (holder, wire) in plan.inside.items():
        carried = renamed.get(holder)
        if name not in renamed and isinstance(carried, dict):
            wanted = (wire.lower(), name.lower())  # the holder's keys are renamed already if it has the field
            found = [v for k, v in carried.items() if k.lower() in wanted]
            if found:
                renamed[name] = found[-1]
    return renamed


# --- encoding ----------------------------------------------------------------------------------------


def encode_abp(model: BaseModel) -> bytes:
    """The JSON body of `model` in ABP's conventions. Raises `ValueError` for a decimal that is NaN or
    infinite, which JSON has no number for, and pydantic's errors for values it cannot serialize."""
    out: list[bytes] = []
    _write(model, out)
    return b"".join(out)


def _write(value: Any, out: list[bytes]) -> None:
    if isinstance(value, BaseModel):
        _write_model(value, out, None)
    elif isinstance(value, Decimal):
        if not value.is_finite():
            raise ValueError(f"{value} cannot be a JSON number")
        out.append(format(value, "f").encode())
    elif isinstance(value, datetime):
        out.append(_dotnet_datetime(value))
    elif isinstance(value, timedelta):
        out.append(_dotnet_timespan(value))
    elif isinstance(value, Enum):
        _write(value.value, out)
    elif isinstance(value, dict):
        out.append(b"{")
        for i, (key, item) in enumerate(value.items()):
            name = to_json(key if isinstance(key, str) else str(key)) + b":"
            out.append(b"," + name if i else name)
            _write(item, out)
        out.append(b"}")
    elif isinstance(value, list | tuple | set | frozenset):
        out.append(b"[")
        for i, item in enumerate(value):
            if i:
                out.append(b",")
            _write(item, out)
        out.append(b"]")
    else:
        out.append(to_json(value, inf_nan_mode="null"))  # as pydantic writes them: JSON has no NaN


def _write_model(model: BaseModel, out: list[bytes], extra: dict[str, Any] | None) -> None:
    """Write `model`'s object; `extra` holds members carried into it (`__abp_inside__`), by wire name: one
    the model has a field for fills that field when the model's own value is None."""
    plan = _plan(type(model))
    extras = {wire.lower(): (wire, value) for wire, value in (extra or {}).items()}
    if plan.dumped:
        wires = {name: wire for name, wire, _ in plan.fields}
        dumped = {wires.get(k, k): v for k, v in model.model_dump(mode="json").items()}
        _write(dict(extras.values()) | {k: v for k, v in dumped.items() if v is not None}, out)
        return
    carried: dict[str, dict[str, Any]] = {}
    for name, (holder, wire) in plan.inside.items():
        if (value := getattr(model, name)) is not None:
            carried.setdefault(holder, {})[wire] = value
    out.append(b"{")
    first = True
    for name, wire, key in plan.fields:
        if name in plan.inside:
            continue
        out.append(key if first else b"," + key)
        first = False
        value = getattr(model, name)
        if extras and wire.lower() in extras:
            own = extras.pop(wire.lower())[1]
            value = own if value is None else value
        if name in carried and isinstance(value, BaseModel):
            _write_model(value, out, carried[name])
        else:
            _write(value, out)
    for wire, value in extras.values():
        out.append(to_json(wire) + b":" if first else b"," + to_json(wire) + b":")
        first = False
        _write(value, out)
    out.append(b"}")


def _dotnet_datetime(value: datetime) -> bytes:
    """As System.Text.Json writes a DateTime: ISO 8601, the fraction without trailing zeros."""
    text = (
        f"{value.year:04d}-{value.month:02d}-{value.day:02d}"
        f"T{value.hour:02d}:{value.minute:02d}:{value.second:02d}"
    )
    if value.microsecond:
        text += f".{value.microsecond:06d}".rstrip("0")
    offset = value.utcoffset()
    if offset is not None:
        if not offset:
            text += "Z"
        else:
            minutes = int(offset.total_seconds()) // 60
            sign = "-" if minutes < 0 else "+"
            text += f"{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"
    return f'"{text}"'.encode()


_TICKS_PER = {"day": 864_000_000_000, "hour": 36_000_000_000, "minute": 600_000_000, "second": 10_000_000}
_TIMESPAN = re.compile(r"(-)?(?:(\d+)\.)?(\d{1,2}):(\d{2}):(\d{2})(?:\.(\d{1,7}))?")


def _dotnet_timespan(value: timedelta) -> bytes:
    """As System.Text.Json writes a TimeSpan (its "c" format): `[-][d.]hh:mm:ss[.fffffff]`."""
    ticks = (value // timedelta(microseconds=1)) * 10
    sign, ticks = ("-" if ticks < 0 else ""), abs(ticks)
    days, ticks = divmod(ticks, _TICKS_PER["day"])
    hours, ticks = divmod(ticks, _TICKS_PER["hour"])
    minutes, ticks = divmod(ticks, _TICKS_PER["minute"])
    seconds, ticks = divmod(ticks, _TICKS_PER["second"])
    text = f"{sign}{f'{days}.' if days else ''}{hours:02d}:{minutes:02d}:{seconds:02d}"
    return f'"{text}.{ticks:07d}"'.encode() if ticks else f'"{text}"'.encode()


def _read_timespan(value: Any) -> Any:
    """A .NET TimeSpan's text as a timedelta (its 7th fractional digit, 100 ns, dropped); other values as
    they came, for pydantic."""
    match = _TIMESPAN.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        return value
    sign, days, hours, minutes, seconds, fraction = match.groups()
    span = timedelta(
        days=int(days or 0),
        hours=int(hours),
        minutes=int(minutes),
        seconds=int(seconds),
        microseconds=int((fraction or "0").ljust(7, "0")[:6]),
    )
    return -span if sign else span
