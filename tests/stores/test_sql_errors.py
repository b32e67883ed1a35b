"""What a failing database raises through the SQL store: `StoreError` for the store's own work, saying what
failed; SQLAlchemy's own errors for what the user's code runs through a transaction's session."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
from sqlalchemy import func, insert, select, text
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from eventrelay.envelope import Message, new_message_id
from eventrelay.errors import StoreError
from eventrelay.stores.base import NewDeadLetter, utcnow
from eventrelay.stores.sqlalchemy import SqlStore
from tests.stores.contract import started


class Base(DeclarativeBase):
    pass


class Product(Base):
    __tablename__ = "sql_errors_products"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)


def _message() -> Message:
    return Message(new_message_id(), "Products.PriceChanged", b"{}")


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[SqlStore]:
    async with started(SqlStore(database_url)) as store:
        async with store.engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        yield store


async def _products(store: SqlStore) -> int:
    async with store.engine.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(Product))).scalar_one())


async def test_the_stores_own_statements_raise_store_error_saying_what_failed(database_url: str) -> None:
    store = SqlStore(database_url)  # no tables: every statement fails
    try:
        with pytest.raises(StoreError, match="Could not claim outbox rows in ") as caught:
            async with store.transaction() as tx:
                await store.claim_outbox(tx, 10, utcnow(), utcnow() + timedelta(seconds=30))
        assert isinstance(caught.value.__cause__, SQLAlchemyError)
        with pytest.raises(StoreError, match="Could not store a dead letter in "):
            async with store.transaction() as tx:
                await store.add_dead_letter(tx, NewDeadLetter("Orders", None, _message(), 1, "test"))
        with pytest.raises(StoreError, match="Could not list dead letters in "):
            await store.dead_letters()
        with pytest.raises(StoreError, match="Could not purge the inbox in "):
            await store.purge_inbox(utcnow())
    finally:
        await store.close()


async def test_an_unreachable_database_raises_store_error_without_the_password() -> None:
    store = SqlStore("postgresql+asyncpg://postgres:secret@127.0.0.1:1/none")  # nothing listens on port 1
    try:
        with pytest.raises(StoreError, match="Could not create the eventrelay tables") as caught:
            await store.create_tables()
        assert "secret" not in str(caught.value)
        with pytest.raises(StoreError, match="Could not connect to the database in postgresql"):
            async with store.transaction() as tx:
                await store.add_outbox(tx, [_message()], utcnow())
        with pytest.raises(StoreError, match="Could not read when the outbox is due"):
            await store.next_outbox_due()
    finally:
        await store.close()


async def test_the_users_own_statements_raise_sqlalchemys_errors(store: SqlStore) -> None:
    with pytest.raises(SQLAlchemyError):
        async with store.transaction() as tx:
            await tx.session.execute(text("SELECT * FROM no_such_table_here"))


async def test_a_users_failing_flush_in_a_savepoint_is_theirs_and_undoes_only_the_savepoint(
    store: SqlStore,
) -> None:
    async with store.transaction() as tx:
        await tx.session.execute(insert(Product).values(id=1))  # the ORM does not know this row
        with pytest.raises(IntegrityError):
            async with tx.savepoint("AddProduct"):
                tx.session.add(Product(id=1))  # flushed at the end of the block: a duplicate key
        assert tx.usable
        await store.add_outbox(tx, [_message()], utcnow())
    assert await _products(store) == 1
    assert (await store.outbox_backlog())[0] == 1


@pytest.mark.parametrize("opened", [False, True], ids=["first", "after-a-statement"])
async def test_a_users_failing_flush_in_a_plain_savepoint_is_theirs(store: SqlStore, opened: bool) -> None:
    """A plain savepoint (the key's earlier blocks used no ORM), first in its transaction or after a
    statement: a flush of the user's object that fails in it raises their error."""
    async with store.transaction() as tx:
        await tx.session.execute(insert(Product).values(id=1))
        async with tx.savepoint("SometimesOrm"):  # no ORM object: this key's next savepoints are plain
            await tx.session.execute(insert(Product).values(id=2))
    tx = store.begin()
    try:
        if opened:
            await store.claim_inbox(tx, "Products", "SometimesOrm", new_message_id())  # as the consumer does
        with pytest.raises(IntegrityError):
            async with tx.savepoint("SometimesOrm"):
                tx.session.add(Product(id=1))
    finally:
        await tx.rollback()
    assert await _products(store) == 2


async def test_a_users_object_that_fails_at_commit_raises_their_error(store: SqlStore) -> None:
    async with store.transaction() as tx:
        await tx.session.execute(insert(Product).values(id=1))
    tx = store.begin()
    tx.session.add(Product(id=1))
    with pytest.raises(IntegrityError):
        await tx.commit()
    assert await _products(store) == 1
