"""The sample's tracing: with `BOOKSTORE_TRACES=FILE`, each service writes its spans to FILE, one JSON a line.

A real deployment sends spans to a collector (Jaeger, Tempo, ...) through an OpenTelemetry exporter; a file
keeps the sample free of servers. Read one trace as a tree:

    python -m bookstore.traces FILE TRACE_ID
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request, Response


def configure(service_name: str) -> bool:
    """Trace this process to `BOOKSTORE_TRACES` when it is set; True if tracing is on.

    The spans' `service.name` is `service_name`, or `OTEL_SERVICE_NAME` (a process hosting several services,
    such as `eventrelay dashboard`, sets that). The first call of a process sets its tracer provider.
    """
    path = os.environ.get("BOOKSTORE_TRACES")
    if not path:
        return False
    from opentelemetry import trace
    from opentelemetry.trace import ProxyTracerProvider

    if not isinstance(trace.get_tracer_provider(), ProxyTracerProvider):
        return True  # configured already (another service of this process)
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor

    def one_line(span: ReadableSpan) -> str:
        return str(span.to_json(indent=None)) + "\n"

    out = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - open for the process's life
    name = os.environ.get("OTEL_SERVICE_NAME", service_name)
    provider = TracerProvider(resource=Resource.create({"service.name": name}))
    provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter(out=out, formatter=one_line)))
    trace.set_tracer_provider(provider)
    return True


def trace_requests(app: FastAPI) -> None:
    """A SERVER span per HTTP request (continuing a `traceparent` the caller sent), named after its route."""
    from opentelemetry import propagate, trace
    from opentelemetry.trace import SpanKind

    tracer = trace.get_tracer("bookstore.http")

    @app.middleware("http")
    async def request_span(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        context = propagate.extract(dict(request.headers))
        attributes = {"http.request.method": request.method, "url.path": request.url.path}
        name = f"{request.method} {request.url.path}"
        with tracer.start_as_current_span(
            name, context=context, kind=SpanKind.SERVER, attributes=attributes
        ) as span:
            response = await call_next(request)
            route = getattr(request.scope.get("route"), "path", None)
            if route:
                span.update_name(f"{request.method} {route}")
                span.set_attribute("http.route", route)
            span.set_attribute("http.response.status_code", response.status_code)
            return response


def print_trace(path: str, trace_id: str) -> int:
    """Print the spans of one trace in FILE as an indented tree; 1 if there are none."""
    spans: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            span = json.loads(line)
            if span["context"]["trace_id"].removeprefix("0x") == trace_id.removeprefix("0x"):
                spans.append(span)
    if not spans:
        print(f"No span of trace {trace_id} in {path}", file=sys.stderr)
        return 1
    ids = {s["context"]["span_id"] for s in spans}
    children: dict[str | None, list[dict[str, Any]]] = {}
    for span in sorted(spans, key=lambda s: s["start_time"]):
        parent = span["parent_id"] if span["parent_id"] in ids else None
        children.setdefault(parent, []).append(span)

    def show(span: dict[str, Any], depth: int) -> None:
        service = span["resource"]["attributes"].get("service.name", "?")
        status = span["status"]["status_code"]
        mark = "  ERROR" if status == "ERROR" else ""
        attempt = span["attributes"].get("eventrelay.attempt")
        extra = f"  attempt {attempt}" if attempt is not None else ""
        extra += "  (replay)" if span["attributes"].get("eventrelay.replay") else ""
        print(f"{'    ' * depth}{span['name']}  [{service}]{extra}{mark}")
        for event in span.get("events", []):
            if event["name"] == "exception":
                message = event["attributes"].get("exception.message", "")
                kind = event["attributes"].get("exception.type", "")
                print(f"{'    ' * (depth + 1)}! {kind}: {message}")
        for child in children.get(span["context"]["span_id"], []):
            show(child, depth + 1)

    for root in children.get(None, []):
        show(root, 0)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print("usage: python -m bookstore.traces FILE TRACE_ID", file=sys.stderr)
        sys.exit(2)
    sys.exit(print_trace(sys.argv[1], sys.argv[2]))
