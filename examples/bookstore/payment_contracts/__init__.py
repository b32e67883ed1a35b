"""PaymentService's contracts: the ETOs other services may depend on (ABP's *.Application.Contracts)."""

from __future__ import annotations

from decimal import Decimal
from uuid import UUID

from eventrelay import Event


class PaymentCapturedEto(Event, name="BookStore.Payment.Captured"):
    """The buyer paid for the order."""

    order_id: UUID
    amount: Decimal
