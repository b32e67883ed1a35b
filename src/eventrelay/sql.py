"""What the SQL store and the SQL broker share: engines, column types, the message columns and their rows,
read-only connections, and what a database error means.

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
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    ColumnElement,
    DateTime,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    event,
    insert,
    or_,
)
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import StaticPool

from eventrelay.config import redact_url
from eventrelay.envelope import Message
from eventrelay.errors import ConfigurationError, StoreError
from eventrelay.stores import sqlite as sqlite_driver

ID = BigInteger().with_variant(Integer(), "sqlite")  # SQLite autoincrements only INTEGER PRIMARY KEY
TIME = DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
BYTES = LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb")

# Execution option `eventrelay_begin` on SQLite: "IMMEDIATE" (default), "DEFERRED" for reads, "NONE" for
# statements that must run outside a transaction (PRAGMA wal_checkpoint).
READ_ONLY = {"eventrelay_begin": "DEFERRED"}
NO_TRANSACTION = {"eventrelay_begin": "NONE"}

DATABASE_ERRORS = (SQLAlchemyError, OSError)
"""What a database call raises when the database fails: OSError for a socket or TLS failure SQLAlchemy did
not wrap (asyncpg's connect)."""

MESSAGE_COLUMNS = ("message_id", "name", "body", "headers", "ordering_key")
"""The names of `message_columns()`, in order: the keys of `message_rows()`."""

# default=str: a foreign message's header values that JSON lacks (AMQP's decimals and timestamps) must not
# keep it from being stored
_headers_json = json.JSONEncoder(default=str).encode


# --- the message columns -----------------------------------------------------------------------------


def message_columns(unique_id: bool = False) -> list[Column[Any]]:
    """New columns for a message (a table's own copies): id, name, body, headers (JSON) and ordering key."""
    return [
        Column("message_id", String(64), nullable=False, unique=True if unique_id else None),
        Column("name", String(256), nullable=False),
        Column("body", BYTES, nullable=False),
        Column("headers", Text, nullable=False),
        Column("ordering_key", String(256)),
    ]


def message_rows(
    messages: Sequence[Message], keys: Sequence[str] = MESSAGE_COLUMNS, **same: Any
) -> list[dict[str, Any]]:
    """Each message's values of the message columns, under `keys` (the columns' names, or those of the bind
    parameters that stand for them, in `MESSAGE_COLUMNS`' order), with `same` added to every row."""
    id_, name, body, headers, key = keys
    return [
        {id_: m.id, name: m.name, body: m.body, headers: _headers_json(dict(m.headers)), key: m.key, **same}
        for m in messages
    ]


def message_of(row: Any) -> Message:
    """The message in a row that has the message columns."""
    return Message(row.message_id, row.name, bytes(row.body), json.loads(row.headers), row.ordering_key)


def insert_if_absent(table: Table, dialect: str) -> Any:
    """An INSERT that does nothing (0 rows) when the primary key exists already."""
    if dialect == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing()
    if dialect == "sqlite":
        return sqlite.insert(table).on_conflict_do_nothing()
    return insert(table).prefix_with("IGNORE")  # MySQL and MariaDB: a duplicate key becomes 0 rows


def lease_ran_out(lease_until: ColumnElement[Any], now: Any) -> ColumnElement[bool]:
    """Whether a row is free of a lease at `now`: none, or one that ran out.

    A lease until T holds the row before T, not at T: `lease_until <= now` has run out, as a row
    `available_at <= now` is due.
    """
    return or_(lease_until.is_(None), lease_until <= now)


# --- connections ---------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def read_only(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A connection for reads; on SQLite its transaction takes no write lock (`BEGIN DEFERRED`)."""
    async with engine.connect() as conn:
        yield await conn.execution_options(**READ_ONLY)


@contextlib.asynccontextmanager
async def outside_transaction(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A SQLite connection that opens no transaction, for the PRAGMAs that cannot run in one."""
    async with engine.connect() as conn:
        yield await conn.execution_options(**NO_TRANSACTION)


# --- errors --------------------------------------------------------------------------------------------


def connection_lost(exc: BaseException) -> bool:
    """Whether a database error means "unavailable, try again later": a socket error, SQLAlchemy's
    OperationalError or InterfaceError (SQLite's "database is locked" too), or a connection that dropped
    mid-statement."""
    if isinstance(exc, OSError | OperationalError | InterfaceError):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


def database_said(exc: BaseException) -> str:
    """What the database (or its driver) said, without SQLAlchemy's statement and parameters."""
    return str(exc.orig if isinstance(exc, DBAPIError) else exc)


def store_error(action: str, engine: AsyncEngine, exc: BaseException) -> StoreError:
    """The `StoreError` for a database error: what the store could not do (`action`), where, and why."""
    where = redact_url(engine.url.render_as_string(hide_password=False))
    return StoreError(f"Could not {action} in {where}: {database_said(exc)}")


# --- engines ---------------------------------------------------------------------------------------------


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
            parsed = sqlite_driver.eventrelay_url(parsed)
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
