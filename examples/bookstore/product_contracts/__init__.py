"""ProductService's contracts: the ETOs other services may depend on (ABP's *.Application.Contracts)."""

from __future__ import annotations

from decimal import Decimal
from uuid import UUID

from eventrelay import Event


class ProductPriceChangedEto(Event, name="BookStore.Product.PriceChanged"):
    """Published whenever a product's price is updated, in the transaction that changes it."""

    product_id: UUID
    name: str
    old_price: Decimal
    new_price: Decimal


class ProductEto(Event, name="BookStore.Product"):
    """A product, as ProductService publishes it in EntityCreated/Updated/DeletedEto[ProductEto].

    `entity_version` is the product's version, inside the entity where ABP's ETOs carry it
    (`IHasEntityVersion`, as `Volo.Abp.Users.UserEto` does).
    """

    id: UUID
    name: str
    price: Decimal
    entity_version: int = 0


class StockReservedEto(Event, name="BookStore.Product.StockReserved"):
    """`quantity` copies of the product are held for the order (the answer to a reservation request)."""

    order_id: UUID
    product_id: UUID
    quantity: int


class StockRejectedEto(Event, name="BookStore.Product.StockRejected"):
    """Fewer copies are in stock than the order asked for: none are held for it."""

    order_id: UUID
    product_id: UUID
    requested: int
    available: int
