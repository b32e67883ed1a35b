"""The SQL store (SQLAlchemy 2 async): SQLite (aiosqlite), PostgreSQL (asyncpg), MariaDB/MySQL (asyncmy).

Three tables, named with a prefix (default `eventrelay_`); `define_tables(metadata)` adds them to your own
`MetaData`, so Alembic (or any migration tool) can own them. `docs/stores.md` shows the DDL. Engines come
from `eventrelay.sql.create_engine` (SQLite's pragmas, PostgreSQL's TLS files).

The store's own statements that fail raise `StoreError`; what the user's code runs through a transaction's
`session` (their statements, the flush of their objects) raises SQLAlchemy's errors, as it would without us.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Column,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    bindparam,
    delete,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from eventrelay.envelope import Message
from eventrelay.sql import (
    DATABASE_ERRORS,
    ID,
    TIME,
    configure_sqlite,
    create_all,
    create_engine,
    insert_if_absent,
    lease_ran_out,
    message_columns,
    message_of,
    message_rows,
    read_only,
    store_error,
)
from eventrelay.stores import sqlite as sqlite_driver
from eventrelay.stores.base import DeadLetter, NewDeadLetter, OutboxRecord, Store, Transaction, utcnow


@dataclass(frozen=True)
class Tables:
    """The three tables of a store."""

    outbox: Table
    inbox: Table
    dead_letters: Table


def define_tables(metadata: MetaData, prefix: str = "eventrelay_") -> Tables:
    """Add the outbox, inbox and dead-letter tables to `metadata` and return them."""
    outbox = Table(
        f"{prefix}outbox",
        metadata,
        Column("seq", ID, primary_key=True, autoincrement=True),
        *message_columns(unique_id=True),
        Column("created_at", TIME, nullable=False),
        Column("available_at", TIME, nullable=False),
        Column("attempts", Integer, nullable=False, default=0),
        Column("last_error", Text),
        # A relay publishes the row until then; NULL: nobody holds it. `lease_until` in Python, as the
        # broker's column and every parameter; the column keeps the name existing databases have.
        Column("leased_until", TIME, key="lease_until"),
        Index(f"ix_{prefix}outbox_due", "available_at", "seq"),
        sqlite_autoincrement=True,
    )
    inbox = Table(
        f"{prefix}inbox",
        metadata,
        Column("subscriber", String(200), nullable=False),
        Column("handler", String(300), nullable=False),
        Column("message_id", String(64), nullable=False),
        Column("received_at", TIME, nullable=False),
        PrimaryKeyConstraint("subscriber", "handler", "message_id", name=f"pk_{prefix}inbox"),
        Index(f"ix_{prefix}inbox_received", "received_at"),
    )
    dead_letters = Table(
        f"{prefix}dead_letters",
        metadata,
        Column("id", ID, primary_key=True, autoincrement=True),
        Column("subscriber", String(200), nullable=False),
        Column("handler", String(300)),
        *message_columns(),
        Column("attempts", Integer, nullable=False),
        Column("reason", Text, nullable=False),
        Column("error", Text),
        Column("created_at", TIME, nullable=False),
        Index(f"ix_{prefix}dead_letters_subscriber", "subscriber", "id"),
        sqlite_autoincrement=True,
    )
    return Tables(outbox, inbox, dead_letters)


class SqlTransaction(Transaction):
    """A transaction on one `AsyncSession`; user code writes through the same session.

    A savepoint is the ORM's (`Session.begin_nested`: objects added in it are forgotten on a rollback, and
    a failed flush in it rolls back only it), which costs more Python than a handler's own statement. So
    for a `key` (a handler) whose blocks left no ORM object in the session, later blocks of that key on
    SQLite (eventrelay's driver) and PostgreSQL (asyncpg) get a plain `SAVEPOINT` sent to the driver; on
    PostgreSQL its `RELEASE` goes out with the next `SAVEPOINT`, in one round trip (or ends with the
    commit). Such a block that uses the ORM after all is flushed at its end; if that flush fails, the
    session can only roll back (`usable` is False), and the key goes back to the ORM's savepoints.
    """

    def __init__(self, engine: AsyncEngine, core_only: set[str]) -> None:
        super().__init__()
        self._engine = engine
        self._session = AsyncSession(engine, expire_on_commit=False)
        self._core_only = core_only  # the store's: keys whose savepoints need no ORM bookkeeping
        self._driver: Any = None  # the driver's connection, once a plain savepoint was taken
        self._savepoints = 0
        self._unreleased: str | None = None  # PostgreSQL: released with the next driver statement
        self._connection: AsyncConnection | None = None

    @property
    def session(self) -> AsyncSession:
        return self._session

    async def read_committed(self) -> None:
        """Run this transaction at READ COMMITTED (MySQL/MariaDB: no gap locks); call it first."""
        if self._connection is None and not self._session.in_transaction():
            await self._connect(isolation_level="READ COMMITTED")

    async def execute(self, action: str, statement: Any, parameters: Any = None) -> Any:
        """Run one of the store's own statements on the session's connection: SQLAlchemy Core, without
        the ORM's autoflush and bookkeeping (the user's statements through `session` keep them).
        `action` says what it does, for the `StoreError` its failure raises."""
        try:
            return await (await self._connect()).execute(statement, parameters)
        except DATABASE_ERRORS as exc:
            raise store_error(action, self._engine, exc) from exc

    async def _connect(self, **options: Any) -> AsyncConnection:
        """The session's connection, held for the transaction; `options` apply when it is the first call."""
        if self._connection is None:
            try:
                self._connection = await self._session.connection(execution_options=options or None)
            except DATABASE_ERRORS as exc:
                raise store_error("connect to the database", self._engine, exc) from exc
        return self._connection

    @property
    def usable(self) -> bool:
        return self._session.is_active

    @contextlib.asynccontextmanager
    async def _savepoint(self, key: str | None) -> AsyncIterator[None]:
        session = self._session
        if key is None or key not in self._core_only or not await self._plain_savepoints():
            known, theirs = len(session.identity_map), False
            try:
                async with session.begin_nested():  # the ORM forgets objects added in it on a rollback, too
                    try:
                        yield
                        orm = bool(session.new or session.dirty or session.deleted)
                        if orm:
                            await session.flush()  # here, not at the release: its failure is the user's
                    except BaseException:
                        theirs = True
                        raise
            except DATABASE_ERRORS as exc:
                if theirs:
                    raise
                raise store_error("take or release a savepoint", self._engine, exc) from exc
            if key is not None and not orm and len(session.identity_map) == known:
                self._core_only.add(key)
            return
        self._savepoints += 1
        name = f"eventrelay_{self._savepoints}"
        await self._driver_sql(f"SAVEPOINT {name}")
        try:
            yield
            if session.new or session.dirty or session.deleted:
                self._core_only.discard(key)  # it uses the ORM now: the next blocks get the ORM's savepoints
                await session.flush()
        except BaseException:
            # Not when the failed flush rolled back the whole transaction, savepoint and all.
            if session.is_active:
                await self._driver_sql(f"ROLLBACK TO SAVEPOINT {name}", f"RELEASE SAVEPOINT {name}")
            session.expunge_all()  # what the block added or changed must not be flushed later
            raise
        if isinstance(self._driver, sqlite_driver.Connection):
            await self._driver_sql(f"RELEASE SAVEPOINT {name}")
        else:
            self._unreleased = name  # what runs until then joins it: nothing rolls back to it any more

    async def _plain_savepoints(self) -> bool:
        """Whether a plain savepoint can go straight to this session's driver now."""
        if self._driver is None:
            connection = await self._connect()
            driver = (await connection.get_raw_connection()).driver_connection
            plain = isinstance(driver, sqlite_driver.Connection) or connection.dialect.driver == "asyncpg"
            self._driver = driver if plain else False
        if isinstance(self._driver, sqlite_driver.Connection):
            return True  # in a transaction since `_connect`: SQLite's BEGIN is sent at once
        # asyncpg: SQLAlchemy sends BEGIN with the first statement, and a SAVEPOINT before it fails
        return self._driver is not False and bool(self._driver.is_in_transaction())

    async def _driver_sql(self, *statements: str) -> None:
        """Send savepoint statements straight to the driver (sqlite3 or asyncpg)."""
        try:
            if isinstance(self._driver, sqlite_driver.Connection):
                for statement in statements:
                    self._driver.execute(statement)
                return
            if self._unreleased is not None:
                statements = (f"RELEASE SAVEPOINT {self._unreleased}", *statements)
                self._unreleased = None
            await self._driver.execute("; ".join(statements))  # asyncpg: one round trip for them all
        except Exception as exc:  # the driver's own errors, unwrapped by SQLAlchemy; only our text ran
            raise store_error(f"run {'; '.join(statements)}", self._engine, exc) from exc

    async def _commit(self) -> None:
        session = self._session
        try:
            if session.new or session.dirty or session.deleted:
                await session.flush()  # the user's objects: a failure here is theirs, not the store's
            try:
                await session.commit()
            except DATABASE_ERRORS as exc:
                raise store_error("commit", self._engine, exc) from exc
        finally:
            await session.close()

    async def _rollback(self) -> None:
        try:
            await self._session.rollback()
        except DATABASE_ERRORS as exc:
            raise store_error("roll back", self._engine, exc) from exc
        finally:
            await self._session.close()


class SqlStore(Store):
    """Outbox, inbox and dead letters in SQL tables of the service's own database."""

    def __init__(self, engine: AsyncEngine | str, prefix: str = "eventrelay_") -> None:
        self.engine = create_engine(engine) if isinstance(engine, str) else engine
        self._owns_engine = isinstance(engine, str)
        if self.engine.dialect.name == "sqlite":
            configure_sqlite(self.engine)
        self.metadata = MetaData()
        self.tables = define_tables(self.metadata, prefix)
        self._dialect = self.engine.dialect.name
        self._core_only: set[str] = set()  # savepoint keys that left no ORM object (SqlTransaction)
        inbox = self.tables.inbox
        self._inbox_insert = insert_if_absent(inbox, self._dialect)  # built once: a hot path
        self._inbox_claim_many = self._inbox_insert.returning(inbox.c.handler, inbox.c.message_id)
        outbox, by_seq = self.tables.outbox, self.tables.outbox.c.seq == bindparam("b_seq")
        self._lease = update(outbox).where(by_seq).values(lease_until=bindparam("b_until"))
        self._release = (
            update(outbox)
            .where(by_seq, outbox.c.lease_until == bindparam("b_until"))
            .values(lease_until=None)
        )
        self._delete = delete(outbox).where(by_seq)
        self._outbox_insert = insert(outbox)
        now: Any = bindparam("b_now")
        self._due = (
            select(outbox)
            .where(outbox.c.available_at <= now, lease_ran_out(outbox.c.lease_until, now))
            .order_by(outbox.c.seq)
            .with_for_update(skip_locked=True)
            # MySQL/MariaDB: read in seq order and stop at the limit, instead of locking every due row
            .with_hint(outbox, "FORCE INDEX (PRIMARY)", "mysql")
            .with_hint(outbox, "FORCE INDEX (PRIMARY)", "mariadb")
        )
        # PostgreSQL and SQLite lease the due rows and return them in one statement (MariaDB cannot).
        self._lease_due = (
            update(outbox)
            .where(outbox.c.seq.in_(self._due.with_only_columns(outbox.c.seq).limit(bindparam("b_limit"))))
            .values(lease_until=bindparam("b_until"))
            .returning(*outbox.c)
            if self._dialect in ("postgresql", "sqlite")
            else None
        )
        self._unclaim = delete(inbox).where(
            inbox.c.subscriber == bindparam("b_subscriber"),
            inbox.c.handler == bindparam("b_handler"),
            inbox.c.message_id == bindparam("b_message_id"),
        )

    async def create_tables(self) -> None:
        await self.create_tables_of(self.metadata)

    async def create_tables_of(self, metadata: MetaData) -> None:
        try:
            await create_all(self.engine, metadata)
        except DATABASE_ERRORS as exc:
            what = "eventrelay" if metadata is self.metadata else f"saga {sorted(metadata.tables)}"
            raise store_error(f"create the {what} tables", self.engine, exc) from exc

    async def close(self) -> None:
        if self._owns_engine:
            await self.engine.dispose()

    def begin(self) -> SqlTransaction:
        return SqlTransaction(self.engine, self._core_only)

    async def add_outbox(self, tx: Transaction, messages: Sequence[Message], available_at: datetime) -> None:
        if not messages:
            return
        rows = message_rows(messages, created_at=utcnow(), available_at=available_at, attempts=0)
        await _sql(tx).execute(
            "write to the outbox", self._outbox_insert, rows[0] if len(rows) == 1 else rows
        )

    async def claim_outbox(
        self, tx: Transaction, limit: int, now: datetime, lease_until: datetime | None = None
    ) -> list[OutboxRecord]:
        sql, action = await self._relay_tx(tx), "claim outbox rows"
        if lease_until is not None and self._lease_due is not None:  # one statement: lease and read
            values = {"b_now": now, "b_limit": limit, "b_until": lease_until}
            rows = sorted(await sql.execute(action, self._lease_due, values), key=lambda row: int(row.seq))
        else:
            rows = list(await sql.execute(action, self._due.limit(limit), {"b_now": now}))
            if rows and lease_until is not None:
                await self._by_seq(tx, action, self._lease, [row.seq for row in rows], b_until=lease_until)
        return [
            OutboxRecord(row.seq, message_of(row), row.available_at, row.attempts, row.last_error)
            for row in rows
        ]

    async def _relay_tx(self, tx: Transaction) -> SqlTransaction:
        """`tx` for the relay's statements: on MySQL/MariaDB at READ COMMITTED, which takes no gap locks,
        so new outbox rows need not wait for a relay."""
        sql = _sql(tx)
        if self._dialect in ("mysql", "mariadb"):
            await sql.read_committed()
        return sql

    async def release_outbox(self, tx: Transaction, seqs: Sequence[int], lease_until: datetime) -> None:
        await self._by_seq(tx, "release outbox rows", self._release, seqs, b_until=lease_until)

    async def delete_outbox(self, tx: Transaction, seqs: Sequence[int]) -> None:
        await self._by_seq(tx, "delete sent outbox rows", self._delete, seqs)

    async def _by_seq(
        self, tx: Transaction, action: str, statement: Any, seqs: Sequence[int], **values: Any
    ) -> None:
        # One row per statement (executemany): MariaDB's `seq IN (...)` also locks neighbours another
        # relay holds.
        if seqs:
            rows = [{"b_seq": seq, **values} for seq in seqs]
            await (await self._relay_tx(tx)).execute(action, statement, rows)

    async def defer_outbox(self, tx: Transaction, seq: int, until: datetime, error: str) -> None:
        t = self.tables.outbox
        await (await self._relay_tx(tx)).execute(
            "defer an outbox row",
            update(t)
            .where(t.c.seq == seq)
            .values(available_at=until, attempts=t.c.attempts + 1, last_error=error[:4000], lease_until=None),
        )

    async def claim_inbox(self, tx: Transaction, subscriber: str, handler: str, message_id: str) -> bool:
        values = {
            "subscriber": subscriber,
            "handler": handler,
            "message_id": message_id,
            "received_at": utcnow(),
        }
        result = await _sql(tx).execute("claim an inbox record", self._inbox_insert, values)
        return bool(result.rowcount)

    async def unclaim_inbox(self, tx: Transaction, subscriber: str, handler: str, message_id: str) -> None:
        values = {"b_subscriber": subscriber, "b_handler": handler, "b_message_id": message_id}
        await _sql(tx).execute("remove an inbox record", self._unclaim, values)

    async def claim_inbox_many(
        self, tx: Transaction, subscriber: str, claims: Sequence[tuple[str, str]]
    ) -> list[bool]:
        if self._dialect not in ("sqlite", "postgresql") or len(claims) < 2:  # MariaDB: no INSERT RETURNING
            return await super().claim_inbox_many(tx, subscriber, claims)
        now = utcnow()
        rows = [
            {"subscriber": subscriber, "handler": handler, "message_id": message_id, "received_at": now}
            for handler, message_id in dict.fromkeys(claims)
        ]
        # One statement (SQLAlchemy's "insertmanyvalues", compiled once): the rows it inserted come back;
        # the others were claimed before.
        result = await _sql(tx).execute("claim inbox records", self._inbox_claim_many, rows)
        new = {(row.handler, row.message_id) for row in result}
        claimed = []
        for key in claims:
            claimed.append(key in new)
            new.discard(key)  # a repeated key is a duplicate of the first
        return claimed

    async def add_dead_letter(self, tx: Transaction, letter: NewDeadLetter) -> None:
        [row] = message_rows(
            [letter.message],
            subscriber=letter.subscriber,
            handler=letter.handler,
            attempts=letter.attempts,
            reason=letter.reason,
            error=letter.error,
            created_at=utcnow(),
        )
        await _sql(tx).execute("store a dead letter", insert(self.tables.dead_letters).values(row))

    async def remove_dead_letter(self, tx: Transaction, letter_id: int) -> None:
        t = self.tables.dead_letters
        await _sql(tx).execute("remove a dead letter", delete(t).where(t.c.id == letter_id))

    async def next_outbox_due(self) -> datetime | None:
        query = select(func.min(self.tables.outbox.c.available_at))
        due: datetime | None = await self._scalar("read when the outbox is due", query)
        return due

    async def outbox_backlog(self) -> tuple[int, datetime | None]:
        t = self.tables.outbox
        row: Any = (await self._read("count the outbox", select(func.count(), func.min(t.c.created_at))))[0]
        return int(row[0]), row[1]

    async def dead_letters(self, subscriber: str | None = None, limit: int = 100) -> list[DeadLetter]:
        t = self.tables.dead_letters
        query = select(t).order_by(t.c.id).limit(limit)
        if subscriber is not None:
            query = query.where(t.c.subscriber == subscriber)
        return [_dead_letter(row) for row in await self._read("list dead letters", query)]

    async def count_dead_letters(self, subscriber: str | None = None, since: datetime | None = None) -> int:
        t = self.tables.dead_letters
        query = select(func.count()).select_from(t)
        if subscriber is not None:
            query = query.where(t.c.subscriber == subscriber)
        if since is not None:
            query = query.where(t.c.created_at >= since)
        return int(await self._scalar("count dead letters", query) or 0)

    async def dead_letter(self, letter_id: int) -> DeadLetter | None:
        t = self.tables.dead_letters
        rows = await self._read("read a dead letter", select(t).where(t.c.id == letter_id))
        return _dead_letter(rows[0]) if rows else None

    async def purge_inbox(self, before: datetime) -> int:
        t = self.tables.inbox
        try:
            async with self.engine.begin() as conn:
                result = await conn.execute(delete(t).where(t.c.received_at < before))
        except DATABASE_ERRORS as exc:
            raise store_error("purge the inbox", self.engine, exc) from exc
        return int(result.rowcount)

    async def inbox_count(self, subscriber: str, since: datetime | None = None) -> int:
        t = self.tables.inbox
        query = select(func.count()).select_from(t).where(t.c.subscriber == subscriber)
        if since is not None:
            query = query.where(t.c.received_at >= since)
        return int(await self._scalar("count inbox records", query) or 0)

    async def _read(self, action: str, query: Any) -> list[Row[Any]]:
        try:
            async with read_only(self.engine) as conn:
                return list(await conn.execute(query))
        except DATABASE_ERRORS as exc:
            raise store_error(action, self.engine, exc) from exc

    async def _scalar(self, action: str, query: Any) -> Any:
        rows = await self._read(action, query)
        return rows[0][0] if rows else None


def _sql(tx: Transaction) -> SqlTransaction:
    if not isinstance(tx, SqlTransaction):
        raise TypeError(f"A SqlStore works in its own transactions (store.begin()), not in {tx!r}")
    return tx


def _dead_letter(row: Row[Any]) -> DeadLetter:
    return DeadLetter(
        row.id,
        row.subscriber,
        row.handler,
        message_of(row),
        row.attempts,
        row.reason,
        row.error,
        row.created_at,
    )
