"""PaymentService: takes the payments OrderService's fulfilment saga asks for, through a simulated card
gateway. While the gateway answers, a payment is captured at once (`PaymentCapturedEto`); while it is silent
(`PUT /gateway {"answering": false}`, what the demo does to one order) a payment waits, unanswered, until the
order's timeout cancels it and the cancellation voids it."""

from __future__ import annotations

import uuid
from decimal import Decimal

from fastapi import HTTPException
from pydantic import BaseModel
from sqlalchemy import Numeric, String, Uuid, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from bookstore.hosting import create_app, default_broker, sqlite_url
from bookstore.order_contracts import OrderCancelledEto, PaymentRequestedEto
from bookstore.payment_contracts import PaymentCapturedEto
from eventrelay import Context, Service


class Gateway(BaseModel):
    """The simulated card gateway. It lives in the process: the sample runs one PaymentService."""

    answering: bool = True


GATEWAY = Gateway()


class Base(DeclarativeBase):
    pass


class Payment(Base):
    """A payment for an order: "captured", "pending" (the gateway did not answer), "voided" or "refunded".
    A payment voided before its request came has no amount and no currency."""

    __tablename__ = "payments"

    order_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    amount: Mapped[Decimal] = mapped_column(Numeric(12, 2))
    currency: Mapped[str | None] = mapped_column(String(3))
    status: Mapped[str] = mapped_column(String(16))


async def take_payment(event: PaymentRequestedEto, context: Context) -> None:
    """Capture the payment, in the currency the request names, and say so, in one transaction; while the
    gateway is silent, only note it. A version-1 request, which named no currency, arrives upcast to euros."""
    if await context.session.get(Payment, event.order_id) is not None:
        return  # the order was cancelled before its request came (NATS and Kafka may reorder them)
    status = "captured" if GATEWAY.answering else "pending"
    context.session.add(
        Payment(order_id=event.order_id, amount=event.amount, currency=event.currency, status=status)
    )
    if status == "captured":
        captured = PaymentCapturedEto(order_id=event.order_id, amount=event.amount)
        context.unit_of_work.publish(captured, key=str(event.order_id))


async def void_payment(event: OrderCancelledEto, context: Context) -> None:
    """A cancelled order is not charged: void its pending payment, refund one captured too late."""
    payment = await context.session.get(Payment, event.order_id, with_for_update=True)
    if payment is None:  # its request is still on the way: make it do nothing when it comes
        context.session.add(Payment(order_id=event.order_id, amount=Decimal("0"), status="voided"))
    elif payment.status == "pending":
        payment.status = "voided"
    elif payment.status == "captured":  # captured while the order's timeout was cancelling it
        payment.status = "refunded"


service = Service(
    "PaymentService",
    database=sqlite_url("payment"),
    broker=default_broker(),
    handlers=[take_payment, void_payment],
    publishes=[PaymentCapturedEto],
    env_prefix="PAYMENT_",
)
app = create_app(service, Base.metadata, "PaymentService")


class PaymentOut(BaseModel):
    order_id: uuid.UUID
    amount: Decimal
    currency: str | None
    status: str


@app.get("/payments")
async def list_payments() -> list[PaymentOut]:
    async with service.bus.unit_of_work() as uow:
        payments = await uow.session.scalars(select(Payment).order_by(Payment.status))
        return [PaymentOut.model_validate(p, from_attributes=True) for p in payments]


@app.get("/payments/{order_id}")
async def show_payment(order_id: uuid.UUID) -> PaymentOut:
    async with service.bus.unit_of_work() as uow:
        payment = await uow.session.get(Payment, order_id)
        if payment is None:
            raise HTTPException(404, f"No payment for order {order_id}")
        return PaymentOut.model_validate(payment, from_attributes=True)


@app.get("/gateway")
async def show_gateway() -> Gateway:
    return GATEWAY


@app.put("/gateway")
async def set_gateway(body: Gateway) -> Gateway:
    """Make the simulated gateway answer, or stop answering (payments then wait)."""
    GATEWAY.answering = body.answering
    return GATEWAY
