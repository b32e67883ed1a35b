"""OrderService's contracts: the ETOs other services may depend on (ABP's *.Application.Contracts).

OrderService's fulfilment saga publishes them, each keyed by its order so that one consumer takes an order's
events in turn.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any
from uuid import UUID

from eventrelay import Event, upcaster

# What PaymentRequestedEto version 1 left unsaid: the store charged every order in euros.
VERSION_1_CURRENCY = "EUR"


class OrderPlacedEto(Event, name="BookStore.Order.Placed"):
    """An order was placed; its fulfilment starts (in the transaction that stores the order)."""

    order_id: UUID
    buyer_id: UUID
    product_id: UUID
    quantity: int


class StockReservationRequestedEto(Event, name="BookStore.Order.StockReservationRequested"):
    """The order needs `quantity` copies of the product held for it; ProductService answers."""

    order_id: UUID
    product_id: UUID
    quantity: int


class PaymentRequestedEto(Event, name="BookStore.Order.PaymentRequested", version=2):
    """The order's stock is held and it waits for its payment; PaymentService answers.

    Version 2 added `currency`, an ISO 4217 code. A version-1 request (from an OrderService not yet upgraded,
    or still in a queue or the dead letters) is upcast by `charged_in_euros`.
    """

    order_id: UUID
    buyer_id: UUID
    amount: Decimal
    currency: str


@upcaster(PaymentRequestedEto, from_version=1)
def charged_in_euros(body: dict[str, Any]) -> dict[str, Any]:
    """Version 1 had no currency: every amount was in euros."""
    return {**body, "currency": VERSION_1_CURRENCY}


class OrderCancelledEto(Event, name="BookStore.Order.Cancelled"):
    """The order was not paid in time: what was held or asked for it is to be given back."""

    order_id: UUID
    product_id: UUID
    reason: str
