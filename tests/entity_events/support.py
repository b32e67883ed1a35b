"""What the entity event tests share: the models of IdentityService and OrderService, ETOs, buses and waits.

IdentityService's `User` maps to `UserEto`, named `Tests.Identity.User`: it declares only the fields these
models have. The sample's `bookstore.identity_contracts.UserEto` is ABP's whole shape under ABP's name
`Volo.Abp.Users.User` (with a Guid tenant id and the version inside the entity); tests/interop/ loads it in
the same process, and two classes may not share a wire name. OrderService keeps `Buyer`, a local
copy of users, in its own database.
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import Integer, MetaData, String, Uuid, func, literal_column, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from eventrelay import DistributedEventBus, Event, Message
from eventrelay.brokers.base import Broker
from eventrelay.entity_events import EntityEvents
from eventrelay.sql import READ_ONLY
from eventrelay.testing import RecordingBroker, wait_until_idle
from tests.bus.helpers import settings, sql_store


class UserEto(Event, name="Tests.Identity.User"):
    """The users' ETO of these tests: ABP's event name, the fields `User` has."""

    id: uuid.UUID
    user_name: str
    name: str
    email: str


class IdentityBase(DeclarativeBase):
    """IdentityService's models."""


class User(IdentityBase):
    """A user with a database-side version (`version_id_col`) and a tenant."""

    __tablename__ = "identity_users"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    kind: Mapped[str] = mapped_column(String(20))
    user_name: Mapped[str] = mapped_column(String(100))
    name: Mapped[str] = mapped_column(String(100))
    email: Mapped[str] = mapped_column(String(200))
    tenant_id: Mapped[str | None] = mapped_column(String(64), default=None)
    entity_version: Mapped[int] = mapped_column(Integer, nullable=False)

    __mapper_args__ = {  # noqa: RUF012  (SQLAlchemy's declaration)
        "version_id_col": entity_version,
        "polymorphic_on": kind,
        "polymorphic_identity": "user",
    }


class AdminUser(User):
    """A subclass of `User` (single-table inheritance)."""

    __mapper_args__ = {"polymorphic_identity": "admin"}  # noqa: RUF012


class Book(IdentityBase):
    """A model whose key the database assigns (autoincrement)."""

    __tablename__ = "identity_books"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    title: Mapped[str] = mapped_column(String(100))


class BookEto(Event, name="EntityEventTests.Book"):
    id: int
    title: str


class Article(IdentityBase):
    """A model whose `revision` the database computes at each update (so the ORM expires it after a flush)."""

    __tablename__ = "identity_articles"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    title: Mapped[str] = mapped_column(String(100))
    revision: Mapped[int] = mapped_column(Integer, default=1, onupdate=literal_column("revision + 1"))


class ArticleEto(Event, name="EntityEventTests.Article"):
    id: int
    title: str
    revision: int


class Tag(IdentityBase):
    """A model with a composite key, selected without a mapping (it publishes `EntityEto`)."""

    __tablename__ = "identity_tags"

    group_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    label: Mapped[str] = mapped_column(String(50), primary_key=True)
    note: Mapped[str] = mapped_column(String(100), default="")


class OrderBase(DeclarativeBase):
    """OrderService's models, in its own database."""


class Buyer(OrderBase):
    """OrderService's local copy of a user; `entity_version` is a plain integer the synchronizer sets."""

    __tablename__ = "order_buyers"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    user_name: Mapped[str] = mapped_column(String(100), default="")
    name: Mapped[str] = mapped_column(String(100), default="")
    email: Mapped[str] = mapped_column(String(200), default="")
    note: Mapped[str | None] = mapped_column(String(200), default=None)
    entity_version: Mapped[int | None] = mapped_column(Integer, default=None)


def new_user(name: str = "john", *, tenant_id: str | None = None, admin: bool = False) -> User:
    cls = AdminUser if admin else User
    return cls(
        id=uuid.uuid4(),
        user_name=name,
        name=name.title(),
        email=f"{name}@example.com",
        tenant_id=tenant_id,
    )


def identity(
    database: str,
    broker: Broker | str,
    entity_events: EntityEvents | None,
    service: str = "IdentityService",
    **changes: Any,
) -> DistributedEventBus:
    """IdentityService on `database` with fast settings."""
    return DistributedEventBus(
        service,
        broker=broker,
        database=database,
        settings=settings(**changes),
        entity_events=entity_events,
    )


def engine_of(bus: DistributedEventBus) -> AsyncEngine:
    return sql_store(bus).engine


async def create_models(bus: DistributedEventBus, metadata: MetaData) -> None:
    """Create the tables of `metadata` on the bus's own database (next to its eventrelay tables)."""
    async with engine_of(bus).begin() as conn:
        await conn.run_sync(metadata.create_all)


async def sent(bus: DistributedEventBus, broker: RecordingBroker) -> list[Message]:
    """Wait until the bus has relayed its outbox; return what the broker received."""
    await wait_until_idle(bus)
    return list(broker.published)


def names(messages: list[Message]) -> list[str]:
    return [m.name for m in messages]


async def outbox(bus: DistributedEventBus) -> list[tuple[str, str | None]]:
    """(name, ordering key) of the outbox rows: committed rows, read on a connection of its own."""
    table = sql_store(bus).tables.outbox
    async with engine_of(bus).connect() as conn:
        conn = await conn.execution_options(**READ_ONLY)
        result = await conn.execute(select(table.c.name, table.c.ordering_key).order_by(table.c.seq))
        return [(str(name), key) for name, key in result.all()]


async def count(bus: DistributedEventBus, model: type[Any]) -> int:
    """Committed rows of `model` in the bus's database."""
    async with engine_of(bus).connect() as conn:
        conn = await conn.execution_options(**READ_ONLY)
        result = await conn.execute(select(func.count()).select_from(model))
        return int(result.scalar_one())


def orders(
    database: str, broker: Broker | str, service: str = "OrderService", **changes: Any
) -> DistributedEventBus:
    """OrderService on `database` with fast settings (no entity events of its own)."""
    return DistributedEventBus(service, broker=broker, database=database, settings=settings(**changes))


async def buyer(bus: DistributedEventBus, buyer_id: uuid.UUID) -> Buyer | None:
    """OrderService's committed copy of a user, read in a session of its own."""
    async with AsyncSession(engine_of(bus), expire_on_commit=False) as session:
        return await session.get(Buyer, buyer_id)
