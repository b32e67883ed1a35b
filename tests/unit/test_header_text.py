"""`text_headers`: AMQP header values that are not strings (ABP's `headersArguments`: ints, booleans, tables)
become the strings the bus carries; only what cannot be carried honestly is named, for a dead letter."""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal

from eventrelay.codec import text_headers


def test_scalar_values_become_their_text() -> None:
    headers, reason = text_headers(
        {
            "x-text": "as is",
            "x-retries": 7,
            "x-big": 2**40,
            "x-on": True,
            "x-off": False,
            "x-ratio": 0.1,
            "x-price": Decimal("9.99"),
            "x-tiny": Decimal("0.0000001"),
            "x-sent-at": datetime(2024, 5, 1, 12, 0, tzinfo=UTC),
            "x-day": date(2024, 5, 1),
            "x-name": b"caf\xc3\xa9",
            "x-void": None,
        }
    )
    assert reason is None
    assert headers == {
        "x-text": "as is",
        "x-retries": "7",
        "x-big": "1099511627776",
        "x-on": "true",
        "x-off": "false",
        "x-ratio": "0.1",
        "x-price": "9.99",
        "x-tiny": "0.0000001",
        "x-sent-at": "2024-05-01T12:00:00+00:00",
        "x-day": "2024-05-01",
        "x-name": "café",
    }  # a void value is left out: no text tells it from a missing header


def test_tables_and_arrays_become_compact_json() -> None:
    headers, reason = text_headers(
        {"x-args": {"a": 1, "b": [True, None, Decimal("1.5"), b"x"], "c": {"at": datetime(2024, 1, 2)}}}
    )
    assert reason is None
    assert headers == {"x-args": '{"a":1,"b":[true,null,1.5,"x"],"c":{"at":"2024-01-02T00:00:00"}}'}


def test_what_cannot_be_carried_is_named_in_the_reason_and_kept_as_its_repr() -> None:
    headers, reason = text_headers({"x-ok": 1, "x-raw": b"\xff\xfe", "x-deep": {"k": [b"\xff"]}})
    assert headers == {"x-ok": "1", "x-raw": "b'\\xff\\xfe'", "x-deep": "{'k': [b'\\xff']}"}
    assert reason == (
        "header values that cannot be carried as text: 'x-raw' (bytes that are not UTF-8 text), "
        "'x-deep' (bytes that are not UTF-8 text)"
    )
