"""Contract snapshots of a service's ETOs, and the changes between two that break a consumer.

`eventrelay schema MODULE:SERVICE --write FILE` stores `event_schemas(service)` under the service's name in
FILE; `--check FILE` compares the schemas of now with them (`compare`). A consumer validates each message
against its own copy of the ETO and a publisher sends every field (pydantic writes defaults too), so the
check reports as **breaking**, each with the event, the field's path and why:

- an event gone (a renamed event is one gone and one new);
- a required field removed;
- a field added as required (no default), or a field made required;
- a field's type changed: its JSON `type`, `format`, `const`, the branches of an `anyOf`/`oneOf`, the
  items of an array (path `lines[]`), the values of a map (path `prices{}`); a nested model (`$ref` to
  `$defs`) is compared field by field (path `entity.name`), whatever its class is called;
- enum values removed (messages sent before carry them) or added (consumers on the old copy reject them).

And as **safe**: a new event, an optional field added or removed, a required field made optional.

Versions: an event's schema records its class's version under `x-eventrelay-version` when it is over 1, and
the older versions its upcasters read under `x-eventrelay-upcasts-from` (`eventrelay.upcasting`). A version
raised with an upcaster chain from the old one makes safe what only breaks messages written before the
change, since the chain brings them up: a required field added or made required, enum values removed, a
field newly limited to values. What breaks consumers still on the old copy stays breaking: a field removed
or retyped, values added. A version raised with no upcaster from the old one, or lowered, is breaking.

Not checked: titles, descriptions, examples and default values; constraints (`minLength`, `maximum`,
`pattern`, ...); `additionalProperties` of a model; `allOf` of more than one schema; tuples' `prefixItems`;
a `$ref` outside the schema's own `$defs`; what an upcaster does. A snapshot is JSON with sorted keys:
`{"format": 1, "services": {service name: {event name: JSON Schema}}}`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from eventrelay.envelope import VERSION
from eventrelay.errors import ConfigurationError

FORMAT = 1
UPCASTS_FROM = "x-eventrelay-upcasts-from"
Schema = Mapping[str, Any]


@dataclass(frozen=True)
class Change:
    """One difference between a snapshot and now: the event, the field's path ("" for the event), why."""

    event: str
    path: str
    reason: str
    breaking: bool

    def __str__(self) -> str:
        return f"{self.event} {self.path}: {self.reason}" if self.path else f"{self.event}: {self.reason}"

    def as_dict(self) -> dict[str, str]:
        return {"event": self.event, "path": self.path, "reason": self.reason}


def compare(old: Mapping[str, Schema], new: Mapping[str, Schema]) -> list[Change]:
    """The changes from `old` to `new` (event name -> JSON Schema), breaking and safe, by event name."""
    changes: list[Change] = []
    for name in sorted(old.keys() | new.keys()):
        if name not in new:
            changes.append(Change(name, "", "the event is gone: its consumers get nothing", breaking=True))
        elif name not in old:
            changes.append(Change(name, "", "a new event", breaking=False))
        else:
            changes.extend(_versioned(name, old[name], new[name]))
    return changes


def versions(schemas: Mapping[str, Schema]) -> dict[str, int]:
    """Event name -> the version its schema records (1 when it records none)."""
    return {name: _version(schema) for name, schema in schemas.items()}


def _version(schema: Schema) -> int:
    version = schema.get(VERSION, 1)
    return version if isinstance(version, int) and not isinstance(version, bool) else 1


def _versioned(name: str, old: Schema, new: Schema) -> list[Change]:
    """The changes within one event, with what its version and upcasters make of them."""
    walk = _Walk(name, old, new)
    was, now = _version(old), _version(new)
    if was == now:
        hint = f" (to keep older messages, raise its version above {was} with an upcaster from {was})"
        return [_amended(c, hint, True) if id(c) in walk.old_messages_only else c for c in walk.changes]
    if now < was:
        reason = f"its version went down from {was} to {now}: raise it above {was} instead"
        return [Change(name, "", reason, breaking=True), *walk.changes]
    upcast = new.get(UPCASTS_FROM, [])
    missing = [v for v in range(was, now) if v not in upcast]
    if missing:
        reason = (
            f"version {was} -> {now} with no upcaster from version {missing[-1]}: messages of version {was} "
            f"still queued or dead-lettered fail; register @upcaster({new.get('title', name)}, "
            f"from_version={missing[-1]})"
        )
        return [Change(name, "", reason, breaking=True), *walk.changes]
    upcasted = f", but the upcasters from version {was} bring older messages up"
    changes = [Change(name, "", f"version {was} -> {now}, with upcasters from version {was}", breaking=False)]
    for change in walk.changes:
        changes.append(_amended(change, upcasted, False) if id(change) in walk.old_messages_only else change)
    return changes


def _amended(change: Change, said: str, breaking: bool) -> Change:
    return Change(change.event, change.path, change.reason + said, breaking)


class _Walk:
    """The changes within one event, from its old schema to its new one."""

    def __init__(self, event: str, old: Schema, new: Schema) -> None:
        self.event = event
        self.defs = (old.get("$defs", {}), new.get("$defs", {}))
        self.inside: set[tuple[str, str]] = set()  # the pairs of models being walked, to stop a recursion
        self.changes: list[Change] = []
        self.old_messages_only: set[int] = set()  # ids of the changes an upcaster can undo (module docstring)
        self.node("", old, new)

    def add(self, path: str, reason: str, breaking: bool = True, old_messages_only: bool = False) -> None:
        """Record a change; `old_messages_only` when it breaks only messages written before it."""
        change = Change(self.event, path, reason, breaking)
        self.changes.append(change)
        if old_messages_only:
            self.old_messages_only.add(id(change))

    def node(self, path: str, old: Schema, new: Schema) -> None:
        (old, old_ref), (new, new_ref) = _resolve(old, self.defs[0]), _resolve(new, self.defs[1])
        pair = (old_ref or "", new_ref or "")
        if pair in self.inside:  # a model within itself: its fields are being compared already
            return
        if old_ref and new_ref:
            self.inside.add(pair)
        try:
            self.compared(path, old, new)
        finally:
            self.inside.discard(pair)

    def compared(self, path: str, old: Schema, new: Schema) -> None:
        was, now = self.kind(old, 0), self.kind(new, 1)
        if was != now:
            self.add(path, f"its type changed from {was} to {now}")
            return
        self.values(path, old, new)
        branches = [self.branches(old, 0), self.branches(new, 1)]
        if branches[0]:
            for old_branch, new_branch in zip(*branches, strict=True):
                self.node(path, old_branch, new_branch)
        elif "properties" in old or "properties" in new:
            self.fields(path, old, new)
        elif was == "array":
            self.node(f"{path}[]", old.get("items", {}), new.get("items", {}))
        elif isinstance(old.get("additionalProperties"), Mapping):
            self.node(f"{path}{{}}", old["additionalProperties"], new.get("additionalProperties") or {})

    def fields(self, path: str, old: Schema, new: Schema) -> None:
        before, after = old.get("properties", {}), new.get("properties", {})
        required = set(old.get("required", ())), set(new.get("required", ()))
        for field in [*before, *(f for f in after if f not in before)]:
            where = f"{path}.{field}" if path else field
            if field not in after:
                if field in required[0]:
                    self.add(where, "a required field removed: consumers on the old copy reject the messages")
                else:
                    self.add(where, "an optional field removed (consumers use its default)", breaking=False)
            elif field not in before:
                if field in required[1]:
                    self.add(
                        where,
                        "a required field added without a default: messages without it fail",
                        old_messages_only=True,
                    )
                else:
                    self.add(where, "an optional field added (it has a default)", breaking=False)
            else:
                if field in required[1] and field not in required[0]:
                    self.add(where, "made required: messages without it fail", old_messages_only=True)
                elif field in required[0] and field not in required[1]:
                    self.add(where, "made optional (it has a default)", breaking=False)
                self.node(where, before[field], after[field])

    def values(self, path: str, old: Schema, new: Schema) -> None:
        was, now = _enum(old), _enum(new)
        if was is None and now is None:
            return
        if was is None or now is None:
            limit = "now limited to" if now is not None else "no longer limited to"
            self.add(
                path,
                f"{limit} the values {_shown(now if now is not None else was or [])}",
                old_messages_only=now is not None,
            )
            return
        if gone := [v for v in was if v not in now]:
            reason = f"values removed: {_shown(gone)} (messages sent before may carry them)"
            self.add(path, reason, old_messages_only=True)
        if added := [v for v in now if v not in was]:
            self.add(path, f"values added: {_shown(added)} (consumers on the old copy reject them)")

    def branches(self, schema: Schema, side: int) -> list[Schema]:
        """The branches of an anyOf/oneOf, in the order of their kinds (so old and new pair up)."""
        found = schema.get("anyOf") or schema.get("oneOf") or []
        return sorted(found, key=lambda branch: self.kind(branch, side))

    def kind(self, schema: Schema, side: int) -> str:
        """What a schema is, in a few words, without looking into a model's fields: "string (uuid)"."""
        schema = _resolve(schema, self.defs[side])[0]
        if branches := schema.get("anyOf") or schema.get("oneOf"):
            return " | ".join(sorted(self.kind(branch, side) for branch in branches))
        declared = schema.get("type")
        if declared is None:
            declared = "object" if "properties" in schema else "any"
        text = "/".join(sorted(declared)) if isinstance(declared, list) else str(declared)
        return f"{text} ({schema['format']})" if "format" in schema else text


def _resolve(schema: Schema, defs: Schema) -> tuple[Schema, str | None]:
    """The schema a `$ref` to `#/$defs/...` (or a one-item `allOf`) stands for, and the name it refers to."""
    if isinstance(schema.get("allOf"), list) and len(schema["allOf"]) == 1:
        schema = {**{k: v for k, v in schema.items() if k != "allOf"}, **schema["allOf"][0]}
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/$defs/") and ref[8:] in defs:
        rest = {k: v for k, v in schema.items() if k != "$ref"}
        return {**defs[ref[8:]], **rest}, ref[8:]
    return schema, None


def _enum(schema: Schema) -> list[Any] | None:
    if "enum" in schema:
        return list(schema["enum"])
    return [schema["const"]] if "const" in schema else None


def _shown(values: list[Any]) -> str:
    return ", ".join(json.dumps(v, ensure_ascii=False) for v in values)


def snapshot(service: str, schemas: Mapping[str, Schema], previous: Schema | None = None) -> dict[str, Any]:
    """A snapshot with `service`'s schemas, keeping the other services of `previous`."""
    services = dict(previous["services"]) if previous else {}
    services[service] = dict(schemas)
    return {"format": FORMAT, "services": services}


def dumps(data: Schema) -> str:
    """A snapshot as stable, readable JSON: keys sorted, two-space indent, one newline at the end."""
    return json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def loads(text: str, source: str) -> dict[str, Any]:
    """A snapshot from its JSON; ConfigurationError, naming `source`, when it is not one."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ConfigurationError(f"{source} is not JSON: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("services"), dict):
        raise ConfigurationError(f"{source} is not an eventrelay contract snapshot (no 'services')")
    if data.get("format") != FORMAT:
        raise ConfigurationError(
            f"{source} has snapshot format {data.get('format')!r}; this eventrelay reads {FORMAT}"
        )
    return data


def service_schemas(data: Schema, service: str, source: str) -> dict[str, Any]:
    """The schemas of `service` in a snapshot; ConfigurationError when it has none."""
    if service not in data["services"]:
        known = ", ".join(sorted(data["services"])) or "none"
        raise ConfigurationError(
            f"{source} holds no contracts of {service} (it has: {known}); write them with --write"
        )
    return dict(data["services"][service])


__all__ = [
    "FORMAT",
    "UPCASTS_FROM",
    "Change",
    "compare",
    "dumps",
    "loads",
    "service_schemas",
    "snapshot",
    "versions",
]
