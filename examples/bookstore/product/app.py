"""ProductService: products over HTTP. Changing a price publishes `ProductPriceChangedEto` through the outbox,
in the transaction that changes the price; products also publish entity events (`ProductEto`)."""

from __future__ import annotations

import uuid
from decimal import Decimal

from fastapi import HTTPException
from pydantic import BaseModel, Field
from sqlalchemy import Numeric, String, Uuid, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from bookstore.hosting import create_app, default_broker, sqlite_url
from bookstore.product_contracts import ProductEto, ProductPriceChangedEto
from eventrelay import EntityEvents, Service


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


service = Service(
    "ProductService",
    database=sqlite_url("product"),
    broker=default_broker(),
    publishes=[ProductPriceChangedEto],
    entity_events=EntityEvents().select(Product).map(Product, ProductEto),
    env_prefix="PRODUCT_",
)
app = create_app(service, Base.metadata, "ProductService")


class ProductIn(BaseModel):
    name: str
    price: Decimal = Field(gt=0, decimal_places=2)


class PriceChange(BaseModel):
    price: Decimal = Field(gt=0, decimal_places=2)


@app.post("/products", status_code=201)
async def create_product(body: ProductIn) -> ProductEto:
    async with service.bus.unit_of_work() as uow:
        product = Product(name=body.name, price=body.price)
        uow.session.add(product)
        await uow.session.flush()
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
