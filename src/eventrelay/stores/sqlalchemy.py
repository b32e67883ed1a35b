"""The SQL store (SQLAlchemy 2 async): SQLite (aiosqlite), PostgreSQL (asyncpg), MariaDB/MySQL (asyncmy).

Three tables, named with a prefix (default `eventrelay_`); `define_tables(metadata)` adds them to your own
`MetaData`, so Alembic (or any migration tool) can own them. `docs/stores.md` shows the DDL.

SQLite engines made by `create_engine` run in WAL mode with a busy timeout, and every transaction starts
with `BEGIN IMMEDIATE`: it takes the write lock up front, so a read-then-write never fails with
"database is locked" when another process wrote in between.

PostgreSQL over TLS: `postgresql+asyncpg://...?ssl=verify-full&sslrootcert=/ca.pem` (`sslcert`, `sslkey` for a
client certificate; `sslmode` for `ssl`). asyncpg takes no certificate files through SQLAlchemy, so
`create_engine` turns them into an `ssl.SSLContext` connect argument (`docs/stores.md`).
"""

from __future__ import annotations

import contextlib
import json
import ssl
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    bindparam,
    delete,
    event,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.engine import URL, Connection, Row, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.pool import StaticPool

from eventrelay.config import redact_url
from eventrelay.envelope import Message
from eventrelay.errors import ConfigurationError, StoreError
from eventrelay.stores import sqlite as sqlite_driver
from eventrelay.stores.base import DeadLetter, NewDeadLetter, OutboxRecord, Store, Transaction, utcnow
from eventrelay.stores.sqlite import eventrelay_url

_ID = BigInteger().with_variant(Integer(), "sqlite")  # SQLite autoincrements only INTEGER PRIMARY KEY
TIME = DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
_BYTES = LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb")
# Execution option `eventrelay_begin` on SQLite: "IMMEDIATE" (default), "DEFERRED" for reads, "NONE" for
# statements that must run outside a transaction (PRAGMA wal_checkpoint).
READ_ONLY = {"eventrelay_begin": "DEFERRED"}
NO_TRANSACTION = {"eventrelay_begin": "NONE"}


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
        Column("seq", _ID, primary_key=True, autoincrement=True),
        Column("message_id", String(64), nullable=False, unique=True),
        Column("name", String(256), nullable=False),
        Column("body", _BYTES, nullable=False),
        Column("headers", Text, nullable=False),
        Column("ordering_key", String(256)),
        Column("created_at", TIME, nullable=False),
        Column("available_at", TIME, nullable=False),
        Column("attempts", Integer, nullable=False, default=0),
        Column("last_error", Text),
        Column("leased_until", TIME),  # a relay publishes the row until then; NULL: nobody holds it
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
        Column("id", _ID, primary_key=True, autoincrement=True),
        Column("subscriber", String(200), nullable=False),
        Column("handler", String(300)),
        Column("message_id", String(64), nullable=False),
        Column("name", String(256), nullable=False),
        Column("body", _BYTES, nullable=False),
        Column("headers", Text, nullable=False),
        Column("ordering_key", String(256)),
        Column("attempts", Integer, nullable=False),
        Column("reason", Text, nullable=False),
        Column("error", Text),
        Column("created_at", TIME, nullable=False),
        Index(f"ix_{prefix}dead_letters_subscriber", "subscriber", "id"),
        sqlite_autoincrement=True,
    )
    return Tables(outbox, inbox, dead_letters)


def create_engine(url: str, **options: Any) -> AsyncEngine:
    """An async engine for `url`, set up for eventrelay.

    SQLite (any `sqlite` URL, `sqlite+aiosqlite://` included) runs on eventrelay's own driver
    (`eventrelay.stores.sqlite`: statements on the event loop's thread, locks waited for asynchronously),
    in WAL mode, every transaction opened with `BEGIN IMMEDIATE`.
    """
    skip_idle_reset = False
    try:
        parsed = make_url(url)
        if parsed.get_backend_name() == "sqlite":
            parsed = eventrelay_url(parsed)
            if parsed.database in (None, "", ":memory:"):
                options.setdefault("poolclass", StaticPool)  # one shared in-memory database
            skip_idle_reset = "pool_reset_on_return" not in options
            if skip_idle_reset:
                options["pool_reset_on_return"] = None  # `_reset` below rolls back only what is open
        elif parsed.drivername == "postgresql+asyncpg":
            parsed, context = _asyncpg_tls(parsed)
            if context is not None:
                options["connect_args"] = {**options.get("connect_args", {}), "ssl": context}
        engine = create_async_engine(parsed, **options)
    except (ImportError, ModuleNotFoundError) as exc:
        raise ConfigurationError(
            f"No driver for {redact_url(url)!r} ({exc}). eventrelay is async: use sqlite:///path, "
            "postgresql+asyncpg:// (pip install 'eventrelay[postgresql]') or mysql+asyncmy:// "
            "(pip install 'eventrelay[mysql]')"
        ) from exc
    except (SQLAlchemyError, ValueError) as exc:  # ValueError: a port that is not a number
        raise ConfigurationError(f"Not a usable database URL: {exc}") from exc
    if engine.dialect.name == "sqlite":
        configure_sqlite(engine)
    if skip_idle_reset:

        @event.listens_for(engine.sync_engine, "reset")
        def _reset(dbapi_connection: Any, record: Any, state: Any) -> None:
            # A connection back in the pool after a commit has nothing to roll back: skip the statement.
            if state.asyncio_safe and getattr(record.driver_connection, "in_transaction", True):
                dbapi_connection.rollback()

    return engine


def _asyncpg_tls(url: URL) -> tuple[URL, ssl.SSLContext | None]:
    """libpq's `sslmode`, `sslrootcert`, `sslcert` and `sslkey` for asyncpg, which takes none of them from
    SQLAlchemy: the URL without them, and the TLS context they make (None when they are not there)."""
    query = dict(url.query)
    if "sslmode" in query:  # libpq's name; asyncpg's is ssl
        query["ssl"] = query.pop("sslmode")
    files = {name: query.pop(name) for name in ("sslrootcert", "sslcert", "sslkey") if name in query}
    url = url.set(query=query)
    if not files:
        return url, None
    mode = query.pop("ssl", "verify-full")
    if not isinstance(mode, str) or mode not in ("require", "verify-ca", "verify-full"):
        raise ConfigurationError(
            f"sslrootcert, sslcert and sslkey need ssl=verify-full, verify-ca or require, not {mode!r}"
        )
    rootcert, cert, key = (files.get(name) for name in ("sslrootcert", "sslcert", "sslkey"))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the chain, and the host name if told to
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = mode == "verify-full"
    try:
        if isinstance(rootcert, str):  # as libpq: with a root certificate, even `require` checks the chain
            context.load_verify_locations(cafile=rootcert)
        elif mode == "require":
            context.verify_mode = ssl.CERT_NONE
        else:
            context.load_default_certs()
        if isinstance(cert, str):
            context.load_cert_chain(cert, key if isinstance(key, str) else None)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise ConfigurationError(f"Cannot load the TLS files of {url.render_as_string()!r}: {exc}") from exc
    return url.set(query=query), context


def configure_sqlite(engine: AsyncEngine, busy_timeout_ms: int = 30_000) -> None:
    """Set up a SQLite engine for several processes: WAL, a busy timeout, `BEGIN IMMEDIATE`.

    `busy_timeout_ms` is for another driver's engine (aiosqlite), where SQLite waits for a lock in the
    driver's thread; eventrelay's driver waits asynchronously, as long as the URL's `?timeout=` says.
    """
    sync_engine = engine.sync_engine
    if getattr(sync_engine, "_eventrelay_configured", False):
        return
    ours = engine.dialect.driver == sqlite_driver.DRIVER

    @event.listens_for(sync_engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we emit BEGIN ourselves, below
        cursor = dbapi_connection.cursor()
        if not ours:
            cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.close()

    @event.listens_for(sync_engine, "begin")
    def _begin(connection: Connection) -> None:
        mode = connection.get_execution_options().get("eventrelay_begin", "IMMEDIATE")
        if mode != "NONE":
            connection.exec_driver_sql(f"BEGIN {mode}")

    sync_engine._eventrelay_configured = True  # type: ignore[attr-defined]


async def create_all(engine: AsyncEngine, metadata: MetaData) -> None:
    """Create `metadata`'s tables that do not exist yet, safe when several processes start at once.

    PostgreSQL's `CREATE TABLE IF NOT EXISTS` is not safe against itself: two at once can fail on the
    catalog's unique index, so the creators take turns behind a transaction-scoped advisory lock.
    """
    async with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            await conn.exec_driver_sql("SELECT pg_advisory_xact_lock(7365871024)")  # eventrelay's own key
        await conn.run_sync(metadata.create_all)


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

    async def execute(self, statement: Any, parameters: Any = None) -> Any:
        """Run one of the store's own statements on the session's connection: SQLAlchemy Core, without
        the ORM's autoflush and bookkeeping (the user's statements through `session` keep them)."""
        return await (await self._connect()).execute(statement, parameters)

    async def _connect(self, **options: Any) -> AsyncConnection:
        """The session's connection, held for the transaction; `options` apply when it is the first call."""
        if self._connection is None:
            self._connection = await self._session.connection(execution_options=options or None)
        return self._connection

    @property
    def usable(self) -> bool:
        return self._session.is_active

    @contextlib.asynccontextmanager
    async def _savepoint(self, key: str | None) -> AsyncIterator[None]:
        session = self._session
        if key is None or key not in self._core_only or not await self._plain_savepoints():
            known = len(session.identity_map)
            async with session.begin_nested():  # the ORM forgets objects added in it on a rollback, too
                yield
                orm = bool(session.new or session.dirty or session.deleted)
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
            await self._driver_sql(f"ROLLBACK TO SAVEPOINT {name}", f"RELEASE SAVEPOINT {name}")
            session.expunge_all()  # what the block added or changed must not be flushed later
            raise
        if isinstance(self._driver, sqlite_driver.Connection):
            self._driver.execute(f"RELEASE SAVEPOINT {name}")
        else:
            self._unreleased = name  # what runs until then joins it: nothing rolls back to it any more

    async def _plain_savepoints(self) -> bool:
        """Whether plain savepoints can go straight to this session's driver."""
        if self._driver is None:
            connection = await self._connect()
            driver = (await connection.get_raw_connection()).driver_connection
            plain = isinstance(driver, sqlite_driver.Connection) or connection.dialect.driver == "asyncpg"
            self._driver = driver if plain else False
        return self._driver is not False

    async def _driver_sql(self, *statements: str) -> None:
        if isinstance(self._driver, sqlite_driver.Connection):
            for statement in statements:
                self._driver.execute(statement)
            return
        if self._unreleased is not None:
            statements = (f"RELEASE SAVEPOINT {self._unreleased}", *statements)
            self._unreleased = None
        await self._driver.execute("; ".join(statements))  # asyncpg: one round trip for them all

    async def _commit(self) -> None:
        try:
            await self._session.commit()
        finally:
            await self._session.close()

    async def _rollback(self) -> None:
        try:
            await self._session.rollback()
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
        self._inbox_insert = _insert_if_absent(inbox, self._dialect)  # built once: a hot path
        self._inbox_claim_many = self._inbox_insert.returning(inbox.c.handler, inbox.c.message_id)
        outbox, by_seq = self.tables.outbox, self.tables.outbox.c.seq == bindparam("b_seq")
        self._lease = update(outbox).where(by_seq).values(leased_until=bindparam("b_until"))
        self._release = (
            update(outbox)
            .where(by_seq, outbox.c.leased_until == bindparam("b_until"))
            .values(leased_until=None)
        )
        self._delete = delete(outbox).where(by_seq)
        self._outbox_insert = insert(outbox)
        now: Any = bindparam("b_now")
        self._due = (
            select(outbox)
            .where(
                outbox.c.available_at <= now,
                or_(outbox.c.leased_until.is_(None), outbox.c.leased_until <= now),
            )
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
            .values(leased_until=bindparam("b_until"))
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
        try:
            await create_all(self.engine, self.metadata)
        except (SQLAlchemyError, OSError) as exc:
            where = redact_url(self.engine.url.render_as_string(hide_password=False))
            raise StoreError(f"Could not create the eventrelay tables in {where}: {exc}") from exc

    async def close(self) -> None:
        if self._owns_engine:
            await self.engine.dispose()

    def begin(self) -> SqlTransaction:
        return SqlTransaction(self.engine, self._core_only)

    async def add_outbox(self, tx: Transaction, messages: Sequence[Message], available_at: datetime) -> None:
        if not messages:
            return
        now = utcnow()
        rows = [
            {
                "message_id": m.id,
                "name": m.name,
                "body": m.body,
                "headers": json.dumps(dict(m.headers)),
                "ordering_key": m.key,
                "created_at": now,
                "available_at": available_at,
                "attempts": 0,
            }
            for m in messages
        ]
        await _sql(tx).execute(self._outbox_insert, rows[0] if len(rows) == 1 else rows)

    async def claim_outbox(
        self, tx: Transaction, limit: int, now: datetime, lease_until: datetime | None = None
    ) -> list[OutboxRecord]:
        sql = await self._relay_tx(tx)
        if lease_until is not None and self._lease_due is not None:  # one statement: lease and read
            values = {"b_now": now, "b_limit": limit, "b_until": lease_until}
            rows = sorted(await sql.execute(self._lease_due, values), key=lambda row: int(row.seq))
        else:
            rows = list(await sql.execute(self._due.limit(limit), {"b_now": now}))
            if rows and lease_until is not None:
                await self._by_seq(tx, self._lease, [row.seq for row in rows], b_until=lease_until)
        return [
            OutboxRecord(row.seq, _message(row), row.available_at, row.attempts, row.last_error)
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
        await self._by_seq(tx, self._release, seqs, b_until=lease_until)

    async def delete_outbox(self, tx: Transaction, seqs: Sequence[int]) -> None:
        await self._by_seq(tx, self._delete, seqs)

    async def _by_seq(self, tx: Transaction, statement: Any, seqs: Sequence[int], **values: Any) -> None:
        # One row per statement (executemany): MariaDB's `seq IN (...)` also locks neighbours another
        # relay holds.
        if seqs:
            await (await self._relay_tx(tx)).execute(statement, [{"b_seq": seq, **values} for seq in seqs])

    async def defer_outbox(self, tx: Transaction, seq: int, until: datetime, error: str) -> None:
        t = self.tables.outbox
        await (await self._relay_tx(tx)).execute(
            update(t)
            .where(t.c.seq == seq)
            .values(available_at=until, attempts=t.c.attempts + 1, last_error=error[:4000], leased_until=None)
        )

    async def claim_inbox(self, tx: Transaction, subscriber: str, handler: str, message_id: str) -> bool:
        values = {
            "subscriber": subscriber,
            "handler": handler,
            "message_id": message_id,
            "received_at": utcnow(),
        }
        result = await _sql(tx).execute(self._inbox_insert, values)
        return bool(result.rowcount)

    async def unclaim_inbox(self, tx: Transaction, subscriber: str, handler: str, message_id: str) -> None:
        values = {"b_subscriber": subscriber, "b_handler": handler, "b_message_id": message_id}
        await _sql(tx).execute(self._unclaim, values)

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
        result = await _sql(tx).execute(self._inbox_claim_many, rows)
        new = {(row.handler, row.message_id) for row in result}
        claimed = []
        for key in claims:
            claimed.append(key in new)
            new.discard(key)  # a repeated key is a duplicate of the first
        return claimed

    async def add_dead_letter(self, tx: Transaction, letter: NewDeadLetter) -> None:
        m = letter.message
        await _sql(tx).execute(
            insert(self.tables.dead_letters).values(
                subscriber=letter.subscriber,
                handler=letter.handler,
                message_id=m.id,
                name=m.name,
                body=m.body,
                # default=str: a foreign message's header values that JSON lacks (AMQP's decimals and
                # timestamps) must not keep its dead letter from being stored
                headers=json.dumps(dict(m.headers), default=str),
                ordering_key=m.key,
                attempts=letter.attempts,
                reason=letter.reason,
                error=letter.error,
                created_at=utcnow(),
            )
        )

    async def remove_dead_letter(self, tx: Transaction, letter_id: int) -> None:
        t = self.tables.dead_letters
        await _sql(tx).execute(delete(t).where(t.c.id == letter_id))

    async def next_outbox_due(self) -> datetime | None:
        due: datetime | None = await self._scalar(select(func.min(self.tables.outbox.c.available_at)))
        return due

    async def outbox_backlog(self) -> tuple[int, datetime | None]:
        t = self.tables.outbox
        row: Any = (await self._read(select(func.count(), func.min(t.c.created_at))))[0]
        return int(row[0]), row[1]

    async def dead_letters(self, subscriber: str | None = None, limit: int = 100) -> list[DeadLetter]:
        t = self.tables.dead_letters
        query = select(t).order_by(t.c.id).limit(limit)
        if subscriber is not None:
            query = query.where(t.c.subscriber == subscriber)
        return [_dead_letter(row) for row in await self._read(query)]

    async def count_dead_letters(self, subscriber: str | None = None, since: datetime | None = None) -> int:
        t = self.tables.dead_letters
        query = select(func.count()).select_from(t)
        if subscriber is not None:
            query = query.where(t.c.subscriber == subscriber)
        if since is not None:
            query = query.where(t.c.created_at >= since)
        return int(await self._scalar(query) or 0)

    async def dead_letter(self, letter_id: int) -> DeadLetter | None:
        t = self.tables.dead_letters
        rows = await self._read(select(t).where(t.c.id == letter_id))
        return _dead_letter(rows[0]) if rows else None

    async def purge_inbox(self, before: datetime) -> int:
        t = self.tables.inbox
        async with self.engine.begin() as conn:
            result = await conn.execute(delete(t).where(t.c.received_at < before))
        return int(result.rowcount)

    async def inbox_count(self, subscriber: str, since: datetime | None = None) -> int:
        t = self.tables.inbox
        query = select(func.count()).select_from(t).where(t.c.subscriber == subscriber)
        if since is not None:
            query = query.where(t.c.received_at >= since)
        return int(await self._scalar(query) or 0)

    async def _read(self, query: Any) -> list[Row[Any]]:
        async with self.engine.connect() as conn:
            conn = await conn.execution_options(**READ_ONLY)
            return list(await conn.execute(query))

    async def _scalar(self, query: Any) -> Any:
        rows = await self._read(query)
        return rows[0][0] if rows else None


def _sql(tx: Transaction) -> SqlTransaction:
    if not isinstance(tx, SqlTransaction):
        raise TypeError(f"A SqlStore works in its own transactions (store.begin()), not in {tx!r}")
    return tx


def _insert_if_absent(table: Table, dialect: str) -> Any:
    """An INSERT that does nothing (0 rows) when the primary key exists already."""
    if dialect == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing()
    if dialect == "sqlite":
        return sqlite.insert(table).on_conflict_do_nothing()
    return insert(table).prefix_with("IGNORE")  # MySQL and MariaDB: a duplicate key becomes 0 rows


def _message(row: Row[Any]) -> Message:
    return Message(row.message_id, row.name, bytes(row.body), json.loads(row.headers), row.ordering_key)


def _dead_letter(row: Row[Any]) -> DeadLetter:
    return DeadLetter(
        row.id,
        row.subscriber,
        row.handler,
        _message(row),
        row.attempts,
        row.reason,
        row.error,
        row.created_at,
    )
