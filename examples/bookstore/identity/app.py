"""IdentityService: users over HTTP. It publishes EntityCreated/Updated/DeletedEto[UserEto] with no publishing
code of its own: `User` is selected for auto events and mapped to `UserEto`."""

from __future__ import annotations

import uuid

from fastapi import HTTPException
from pydantic import BaseModel
from sqlalchemy import String, Uuid, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from bookstore.hosting import create_app, default_broker, sqlite_url
from bookstore.identity_contracts import UserEto
from eventrelay import EntityEvents, Service


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    user_name: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(128))
    email: Mapped[str] = mapped_column(String(256))
    entity_version: Mapped[int] = mapped_column()
    # SQLAlchemy increments it on every update; the entity events carry it.
    __mapper_args__ = {"version_id_col": entity_version}  # noqa: RUF012 - SQLAlchemy's own attribute


service = Service(
    "IdentityService",
    database=sqlite_url("identity"),
    broker=default_broker(),
    entity_events=EntityEvents().select(User).map(User, UserEto),
    env_prefix="IDENTITY_",
)
app = create_app(service, Base.metadata, "IdentityService")


class UserIn(BaseModel):
    user_name: str
    name: str
    email: str


class UserChange(BaseModel):
    name: str | None = None
    email: str | None = None


@app.post("/users", status_code=201)
async def create_user(body: UserIn) -> UserEto:
    async with service.bus.unit_of_work() as uow:
        user = User(**body.model_dump())
        uow.session.add(user)
        await uow.session.flush()
        return UserEto.model_validate(user, from_attributes=True)


@app.get("/users")
async def list_users() -> list[UserEto]:
    async with service.bus.unit_of_work() as uow:
        users = (await uow.session.scalars(select(User).order_by(User.user_name))).all()
        return [UserEto.model_validate(u, from_attributes=True) for u in users]


@app.put("/users/{user_id}")
async def update_user(user_id: uuid.UUID, body: UserChange) -> UserEto:
    async with service.bus.unit_of_work() as uow:
        user = await uow.session.get(User, user_id)
        if user is None:
            raise HTTPException(404, f"No user {user_id}")
        for field, value in body.model_dump(exclude_none=True).items():
            setattr(user, field, value)
        await uow.session.flush()
        return UserEto.model_validate(user, from_attributes=True)


@app.delete("/users/{user_id}", status_code=204)
async def delete_user(user_id: uuid.UUID) -> None:
    async with service.bus.unit_of_work() as uow:
        user = await uow.session.get(User, user_id)
        if user is None:
            raise HTTPException(404, f"No user {user_id}")
        await uow.session.delete(user)
