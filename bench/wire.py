"""The benchmark event as JSON bytes, stdlib only: what the baselines publish and read (bench/payload.py
defines the same event as eventrelay's `ProductPriceChangedEto`, and a test checks the bytes are the same);
and the request/reply rows' question, `GetProductEto` there, whose answer is that event's bytes."""

from __future__ import annotations

import json
from typing import Any

SIZE = 1024
"""Bytes of JSON per event, give or take a few (the sequence number and the stamp vary in length)."""

_PADDING = "Spring sale on the whole catalogue. " * 40


def product_id(seq: int) -> str:
    """The id of the product of event (or request) `seq`."""
    return f"3a0f6b1c-0000-4000-8000-{seq:012d}"


def fields(seq: int, sent_ns: int) -> dict[str, Any]:
    """The event's fields; `description` pads the JSON to about `SIZE` bytes."""
    base: dict[str, Any] = {
        "seq": seq,
        "product_id": product_id(seq),
        "product_name": "The Pragmatic Programmer, 20th Anniversary Edition",
        "old_price": "49.99",
        "new_price": "39.99",
        "currency": "EUR",
        "description": "",
        "sent_ns": sent_ns,
    }
    base["description"] = _PADDING[: SIZE - len(json.dumps(base, separators=(",", ":")))]
    return base


def body(seq: int, sent_ns: int) -> bytes:
    """The event as JSON bytes, as the baselines publish it."""
    return json.dumps(fields(seq, sent_ns), separators=(",", ":")).encode()


def stamp_of(raw: bytes) -> tuple[int, int]:
    """`(seq, sent_ns)` of a body, as a baseline consumer reads it."""
    data = json.loads(raw)
    return int(data["seq"]), int(data["sent_ns"])


def request_fields(seq: int, sent_ns: int) -> dict[str, Any]:
    """A request/reply row's question, about 90 bytes of JSON: product `seq`, asked at `sent_ns`. The answer
    is `fields(seq, sent_ns)`, about `SIZE` bytes."""
    return {"seq": seq, "product_id": product_id(seq), "sent_ns": sent_ns}


def request_body(seq: int, sent_ns: int) -> bytes:
    """The question as JSON bytes, as FastStream's asker sends it."""
    return json.dumps(request_fields(seq, sent_ns), separators=(",", ":")).encode()
