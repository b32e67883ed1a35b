"""NotificationService: a second subscriber of `ProductPriceChangedEto`. It gets its own copy of every price
change (fan-out) and keeps a notice for the people watching that product."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from pydantic import BaseModel
from sqlalchemy import DateTime, String, Uuid, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from bookstore.hosting import create_app, default_broker, sqlite_url
from bookstore.product_contracts import ProductPriceChangedEto
from eventrelay import Context, Service


class Base(DeclarativeBase):
    pass


class Notice(Base):
    __tablename__ = "notices"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    product_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    text: Mapped[str] = mapped_column(String(400))
    created_at: Mapped[datetime] = mapped_column(DateTime)


async def notify_watchers(event: ProductPriceChangedEto, context: Context) -> None:
    """A plain async function as a handler; its insert commits with the inbox record."""
    direction = "dropped" if event.new_price < event.old_price else "rose"
    text = f"{event.name}: the price {direction} from {event.old_price} to {event.new_price}"
    context.session.add(
        Notice(product_id=event.product_id, text=text, created_at=datetime.now(UTC).replace(tzinfo=None))
    )


service = Service(
    "NotificationService",
    database=sqlite_url("notification"),
    broker=default_broker(),
    handlers=[notify_watchers],
    env_prefix="NOTIFICATION_",
)
app = create_app(service, Base.metadata, "NotificationService")


class NoticeOut(BaseModel):
    product_id: uuid.UUID
    text: str
    created_at: datetime


@app.get("/notices")
async def list_notices() -> list[NoticeOut]:
    async with service.bus.unit_of_work() as uow:
        notices = await uow.session.scalars(select(Notice).order_by(Notice.created_at))
        return [NoticeOut.model_validate(n, from_attributes=True) for n in notices]
