"""The benchmark's event: a ~1 KiB `ProductPriceChangedEto`; the request/reply rows' question
`GetProductEto` and its answer `ProductEto` (the same ~1 KiB of fields). Their JSON bytes for the baselines
are in bench/wire.py (stdlib only), re-exported here."""

from __future__ import annotations

from decimal import Decimal

from bench.wire import SIZE, body, fields, request_body, request_fields, stamp_of
from eventrelay import Event

__all__ = [
    "SIZE",
    "GetProductEto",
    "ProductEto",
    "ProductPriceChangedEto",
    "answer",
    "body",
    "event",
    "fields",
    "question",
    "request_body",
    "stamp_of",
]


class ProductPriceChangedEto(Event, name="Bench.Product.PriceChanged"):
    """What ProductService publishes when a price changes; `seq` and `sent_ns` are for the harness."""

    seq: int
    product_id: str
    product_name: str
    old_price: Decimal
    new_price: Decimal
    currency: str
    description: str
    sent_ns: int


def event(seq: int, sent_ns: int) -> ProductPriceChangedEto:
    """The event eventrelay publishes."""
    return ProductPriceChangedEto(**fields(seq, sent_ns))


class GetProductEto(Event, name="Bench.Product.Get"):
    """The asker's request for product `seq`; `sent_ns` is for the answering side's count."""

    seq: int
    product_id: str
    sent_ns: int


class ProductEto(ProductPriceChangedEto, name="Bench.Product.Details"):
    """The answer: the product, the same ~1 KiB of fields as the other rows' event."""


def question(seq: int, sent_ns: int) -> GetProductEto:
    """The request eventrelay's asker sends."""
    return GetProductEto(**request_fields(seq, sent_ns))


def answer(request: GetProductEto) -> ProductEto:
    """The reply eventrelay's answering service returns (stamped with the request's `sent_ns`)."""
    return ProductEto(**fields(request.seq, request.sent_ns))
