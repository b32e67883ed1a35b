"""The benchmark's event: a ~1 KiB `ProductPriceChangedEto`; its JSON bytes for the baselines are in
bench/wire.py (stdlib only), re-exported here."""

from __future__ import annotations

from decimal import Decimal

from bench.wire import SIZE, body, fields, stamp_of
from eventrelay import Event

__all__ = ["SIZE", "ProductPriceChangedEto", "body", "event", "fields", "stamp_of"]


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
