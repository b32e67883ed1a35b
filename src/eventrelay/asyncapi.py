"""Contracts as documents: an AsyncAPI 3.0 document of a service, and the JSON Schema of each ETO.

`eventrelay asyncapi MODULE:SERVICE` and `eventrelay schema MODULE:SERVICE` print them. In the document,
a channel is an event name (its `address`), its message's payload is the ETO's JSON Schema as pydantic
writes it for the wire (`mode="serialization"`, aliases applied), and the operations are `send` for what
the service publishes (`Service(publishes=[...])` and its entity events) and `receive` for what its
handlers take (one operation per event, naming the handlers).

Versions: each message of a class says its version in `x-eventrelay-version` and, when its upcasters read
older versions, which in `x-eventrelay-upcasts-from`; over version 1 its headers schema adds the
`x-eventrelay-version` header with that value (`const`). `event_schemas` records the same two keys in an
ETO's schema when its version is over 1, for the contract snapshots (`eventrelay.contracts`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, cast

from pydantic.json_schema import models_json_schema

from eventrelay.contracts import UPCASTS_FROM
from eventrelay.envelope import CAUSATION_ID, COMMITTED_AT, CORRELATION_ID, TENANT_ID, TRACEPARENT, VERSION
from eventrelay.events import Event, event_name, event_version
from eventrelay.upcasting import upcast_versions

if TYPE_CHECKING:
    from eventrelay.service import Service

ASYNCAPI_VERSION = "3.0.0"
HEADERS_SCHEMA = "EventRelayHeaders"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def published_events(service: Service) -> dict[str, type[Event]]:
    """Event name -> class of what `service` publishes: its `publishes` and its entity events."""
    from eventrelay.entity_events import EntityCreatedEto, EntityDeletedEto, EntityUpdatedEto

    events = {event_name(cls): cls for cls in service.publishes}
    config = service.bus.entity_events
    if config is not None:
        for model, (eto, _) in getattr(config, "_mappings", {}).items():
            if config.selects(model):
                for generic in (EntityCreatedEto, EntityUpdatedEto, EntityDeletedEto):
                    cls = cast("type[Event]", generic[eto])
                    events[event_name(cls)] = cls
    return events


def handled_events(service: Service) -> dict[str, tuple[type[Event] | None, list[str]]]:
    """Event name -> (class, or None for a dynamic event; handler names) of what `service` handles.

    Call after `await service.prepare()`, which subscribes the handlers.
    """
    handled: dict[str, tuple[type[Event] | None, list[str]]] = {}
    for name in service.handled_events:
        specs = service.bus.handlers_for(name)
        classes = [spec.events[name] for spec in specs if spec.events[name] is not None]
        handled[name] = (classes[0] if classes else None, [spec.name for spec in specs])
    return handled


def event_schemas(service: Service) -> dict[str, dict[str, Any]]:
    """Event name -> the JSON Schema of its ETO as it travels (aliases, serialization mode), with its version
    and the versions its upcasters read when it is over version 1."""
    classes = dict(published_events(service))
    for name, (cls, _) in handled_events(service).items():
        if cls is not None:
            classes.setdefault(name, cls)
    return {
        name: {**cls.model_json_schema(by_alias=True, mode="serialization"), **_versions(cls, 2)}
        for name, cls in sorted(classes.items())
    }


def _versions(cls: type[Event], least: int) -> dict[str, Any]:
    """`cls`'s version and the older ones its upcasters read, as extension keys; none under `least`."""
    version = event_version(cls)
    if version < least:
        return {}
    older = upcast_versions(cls)
    return {VERSION: version, UPCASTS_FROM: older} if older else {VERSION: version}


def asyncapi_document(service: Service, version: str = "1.0.0") -> dict[str, Any]:
    """The AsyncAPI 3.0 document of `service` (after `await service.prepare()`), as a JSON-ready dict."""
    published = published_events(service)
    handled = handled_events(service)
    classes: dict[str, type[Event] | None] = dict(published.items())
    for name, (cls, _) in handled.items():
        classes[name] = classes.get(name) or cls
    refs, definitions = models_json_schema(
        [(cls, "serialization") for cls in _unique(c for c in classes.values() if c is not None)],
        by_alias=True,
        ref_template="#/components/schemas/{model}",
    )
    schemas: dict[str, Any] = dict(definitions.get("$defs", {}))
    schemas[HEADERS_SCHEMA] = _headers_schema()
    channels: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    for name, cls in sorted(classes.items()):
        key = _UNSAFE.sub("_", name)
        payload = refs[(cls, "serialization")] if cls is not None else {"type": "object"}
        messages[key] = {
            "name": name,
            "title": cls.__name__ if cls is not None else name,
            "summary": _summary(cls),
            "contentType": "application/json",
            "correlationId": {"location": f"$message.header#/{CORRELATION_ID}"},
            "headers": _message_headers(cls),
            "payload": payload,
            **(_versions(cls, 1) if cls is not None else {}),
        }
        channels[key] = {
            "address": name,
            "messages": {key: {"$ref": f"#/components/messages/{key}"}},
        }
        channel = {"$ref": f"#/channels/{key}"}
        message = [{"$ref": f"#/channels/{key}/messages/{key}"}]
        if name in published:
            operations[f"send.{key}"] = {
                "action": "send",
                "channel": channel,
                "messages": message,
                "summary": f"{service.name} publishes {name}",
            }
        if name in handled:
            handlers = handled[name][1]
            operations[f"receive.{key}"] = {
                "action": "receive",
                "channel": channel,
                "messages": message,
                "summary": f"{service.name} handles {name} with {', '.join(handlers)}",
                "x-eventrelay-handlers": handlers,
            }
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": service.name,
            "version": version,
            "description": (
                f"The events {service.name} publishes and handles, through eventrelay. Each service "
                "subscribed to an event gets its own copy; instances of one service compete for it."
            ),
        },
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
        "components": {"schemas": schemas, "messages": messages},
    }


def _message_headers(cls: type[Event] | None) -> dict[str, Any]:
    """The headers schema of a message: eventrelay's, and over version 1 the version header's value."""
    headers = {"$ref": f"#/components/schemas/{HEADERS_SCHEMA}"}
    version = event_version(cls) if cls is not None else 1
    if version == 1:
        return headers
    stamped = {
        "type": "string",
        "const": str(version),
        "description": f"Sent as {version}; absent: version 1.",
    }
    return {"allOf": [headers, {"type": "object", "properties": {VERSION: stamped}}]}


def _headers_schema() -> dict[str, Any]:
    described = {
        CORRELATION_ID: "Correlation id: the first message's id unless the publisher set one.",
        CAUSATION_ID: "Id of the message whose handler published this one.",
        TENANT_ID: "The tenant, when known.",
        TRACEPARENT: "W3C Trace Context of the message's create span (when tracing is on).",
        "tracestate": "W3C Trace Context vendor state (when tracing is on).",
        COMMITTED_AT: "When the message was written to the outbox, ISO 8601 UTC.",
        VERSION: "The version of the event class that wrote the body, when over 1; absent: version 1.",
    }
    return {
        "type": "object",
        "description": "eventrelay's headers (docs/wire-format.md) and the publisher's own, all strings.",
        "properties": {name: {"type": "string", "description": text} for name, text in described.items()},
        "additionalProperties": {"type": "string"},
    }


def _summary(cls: type[Event] | None) -> str:
    doc = (cls.__doc__ or "").strip() if cls is not None else ""
    return doc.splitlines()[0] if doc else "An event known by name only (a dynamic event)."


def _unique(classes: Iterable[type[Event]]) -> list[type[Event]]:
    return list(dict.fromkeys(classes))


__all__ = ["asyncapi_document", "event_schemas", "handled_events", "published_events"]
