"""ProductService: products and their stock over HTTP. Changing a price publishes `ProductPriceChangedEto`
through the outbox, in the transaction that changes the price; products also publish entity events
(`ProductEto`). For OrderService's fulfilment saga it holds stock for orders (`reserve_stock`) and gives it
back when an order is cancelled (`release_stock`)."""

from __future__ import annotations

import uuid
from decimal import Decimal

from fastapi import HTTPException
from pydantic import BaseModel, Field
from sqlalchemy import Numeric, String, Uuid, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from bookstore.hosting import create_app, default_broker, sqlite_url
from bookstore.order_contracts import OrderCancelledEto, StockReservationRequestedEto
from bookstore.product_contracts import (
    ProductEto,
    ProductPriceChangedEto,
    StockRejectedEto,
    StockReservedEto,
)
from eventrelay import Context, EntityEvents, Service


class Base(DeclarativeBase):
    pass


class Product(Base):
    __tablename__ = "products"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(200))
    price: Mapped[Decimal] = mapped_column(Numeric(12, 2))
    entity_version: Mapped[int] = mapped_column()
    # SQLAlchemy increments it on every update; the entity events carry it.
    __mapper_args__ = {"version_id_col": entity_version}  # noqa: RUF012 - SQLAlchemy's own attribute


class Stock(Base):
    """The copies of a product that are free to sell. A table of its own, so that holding stock is not an
    update of the product (which would publish an EntityUpdatedEto[ProductEto] each time)."""

    __tablename__ = "stock"

    product_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    available: Mapped[int] = mapped_column()


class Reservation(Base):
    """What was done for an order: "reserved" (its copies held), "rejected", "released", or "cancelled" (the
    cancellation came first)."""

    __tablename__ = "reservations"

    order_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    product_id: Mapped[uuid.UUID] = mapped_column(Uuid, index=True)
    quantity: Mapped[int] = mapped_column()
    status: Mapped[str] = mapped_column(String(16))


async def reserve_stock(event: StockReservationRequestedEto, context: Context) -> None:
    """Hold the order's copies, or reject the order when fewer are in stock; the answer commits with the
    stock. A redelivered request never holds twice: the inbox drops it."""
    session = context.session
    if await session.get(Reservation, event.order_id) is not None:
        return  # the order was cancelled before its request came (NATS and Kafka may reorder them)
    stock = await session.get(Stock, event.product_id, with_for_update=True)
    available = stock.available if stock is not None else 0
    answer: StockReservedEto | StockRejectedEto
    if stock is None or available < event.quantity:
        status = "rejected"
        answer = StockRejectedEto(
            order_id=event.order_id,
            product_id=event.product_id,
            requested=event.quantity,
            available=available,
        )
    else:
        status = "reserved"
        stock.available -= event.quantity
        answer = StockReservedEto(
            order_id=event.order_id, product_id=event.product_id, quantity=event.quantity
        )
    session.add(
        Reservation(
            order_id=event.order_id, product_id=event.product_id, quantity=event.quantity, status=status
        )
    )
    context.unit_of_work.publish(answer, key=str(event.order_id))


async def release_stock(event: OrderCancelledEto, context: Context) -> None:
    """Give a cancelled order's copies back to the stock (the saga's compensation)."""
    session = context.session
    reservation = await session.get(Reservation, event.order_id, with_for_update=True)
    if reservation is None:  # its request is still on the way: make it do nothing when it comes
        session.add(
            Reservation(order_id=event.order_id, product_id=event.product_id, quantity=0, status="cancelled")
        )
    elif reservation.status == "reserved":
        stock = await session.get(Stock, reservation.product_id, with_for_update=True)
        assert stock is not None  # a reservation was taken from it
        stock.available += reservation.quantity
        reservation.status = "released"


service = Service(
    "ProductService",
    database=sqlite_url("product"),
    broker=default_broker(),
    handlers=[reserve_stock, release_stock],
    publishes=[ProductPriceChangedEto, StockReservedEto, StockRejectedEto],
    entity_events=EntityEvents().select(Product).map(Product, ProductEto),
    env_prefix="PRODUCT_",
)
app = create_app(service, Base.metadata, "ProductService")


class ProductIn(BaseModel):
    name: str
    price: Decimal = Field(gt=0, decimal_places=2)
    stock: int = Field(default=0, ge=0)


class StockOut(BaseModel):
    product_id: uuid.UUID
    available: int
    reserved: int


class PriceChange(BaseModel):
    price: Decimal = Field(gt=0, decimal_places=2)


@app.post("/products", status_code=201)
async def create_product(body: ProductIn) -> ProductEto:
    async with service.bus.unit_of_work() as uow:
        product = Product(name=body.name, price=body.price)
        uow.session.add(product)
        await uow.session.flush()
        uow.session.add(Stock(product_id=product.id, available=body.stock))
        return ProductEto.model_validate(product, from_attributes=True)


@app.get("/products")
async def list_products() -> list[ProductEto]:
    async with service.bus.unit_of_work() as uow:
        products = (await uow.session.scalars(select(Product).order_by(Product.name))).all()
        return [ProductEto.model_validate(p, from_attributes=True) for p in products]


@app.put("/products/{product_id}/price")
async def change_price(product_id: uuid.UUID, body: PriceChange) -> ProductEto:
    """The guide's ProductAppService.UpdateAsync: the price and its event commit together, or neither."""
    async with service.bus.unit_of_work() as uow:
        product = await uow.session.get(Product, product_id)
        if product is None:
            raise HTTPException(404, f"No product {product_id}")
        old_price, product.price = product.price, body.price
        if old_price != body.price:
            changed = ProductPriceChangedEto(
                product_id=product.id, name=product.name, old_price=old_price, new_price=body.price
            )
            await service.bus.publish(changed, key=str(product.id))
        await uow.session.flush()
        return ProductEto.model_validate(product, from_attributes=True)


@app.get("/products/{product_id}/stock")
async def show_stock(product_id: uuid.UUID) -> StockOut:
    """The copies free to sell, and those held for orders."""
    async with service.bus.unit_of_work() as uow:
        stock = await uow.session.get(Stock, product_id)
        if stock is None:
            raise HTTPException(404, f"No product {product_id}")
        reserved = await uow.session.scalar(
            select(func.coalesce(func.sum(Reservation.quantity), 0)).where(
                Reservation.product_id == product_id, Reservation.status == "reserved"
            )
        )
        return StockOut(product_id=product_id, available=stock.available, reserved=reserved or 0)
