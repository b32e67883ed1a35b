"""OrderService's contracts: the ETOs other services may depend on (ABP's *.Application.Contracts).

OrderService's fulfilment saga publishes them, each keyed by its order so that one consumer takes an order's
events in turn.
"""

from __future__ import annotations

from decimal import Decimal
from uuid import UUID

from eventrelay import Event


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


class PaymentRequestedEto(Event, name="BookStore.Order.PaymentRequested"):
    """The order's stock is held and it waits for its payment; PaymentService answers."""

    order_id: UUID
    buyer_id: UUID
    amount: Decimal


class OrderCancelledEto(Event, name="BookStore.Order.Cancelled"):
    """The order was not paid in time: what was held or asked for it is to be given back."""

    order_id: UUID
    product_id: UUID
    reason: str
