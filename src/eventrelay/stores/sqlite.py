"""SQLite on the event loop's own thread: an async SQLAlchemy dialect over the standard library's `sqlite3`.

`create_engine` uses it for every SQLite URL (`sqlite+aiosqlite:///path` included); its own name is
`sqlite+eventrelay`. aiosqlite runs each connection in a thread of its own, so every statement, fetch and
commit is a hop to that thread and back (most of the cost of a short transaction), and a cancelled task
leaves the statement running there: a cancellation that lands while SQLAlchemy closes such a connection can
leave its transaction, and with it the file's write lock, open until the garbage collector finds it
(issue 14: services that took 30 s to stop). A statement on a local file takes microseconds, so this driver
runs it where it is called, and a task can only be cancelled between statements, never inside one.

It never blocks the event loop on a lock: SQLite's own busy timeout is 0, and a statement that finds the
database locked while no transaction is open yet (`BEGIN IMMEDIATE` while another connection writes) is
tried again after an asynchronous pause, from 1 ms doubling to 50 ms with jitter, for up to 30 s (the URL's
`?timeout=` in seconds); then it fails with "database is locked" as SQLite would. Inside a transaction
SQLite never waits for a lock in WAL mode when the transaction began with `BEGIN IMMEDIATE`, as every write
transaction of eventrelay's engines does.

Since no statement suspends the task, the event loop's other tasks get a turn before a transaction begins
and before a statement within one, each when 10 ms have passed since the last such turn (`Turns`), and
before a transaction begins while a writer of this process waits for the lock (it goes first). Without
them, a task that commits units of work back to back and awaits nothing else (a batch import) kept the
loop, and the file's write lock, to itself, and the service's relay sent nothing until it ended (a
1,000,000-event backlog in issue 21). A turn within a transaction lets the relay's network steps go on; a
cancellation landing there rolls the transaction back, as one landing on an `await` of the caller's would.
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
import time
from types import SimpleNamespace
from typing import Any

from sqlalchemy import pool
from sqlalchemy.dialects import registry
from sqlalchemy.dialects.sqlite.pysqlite import SQLiteDialect_pysqlite
from sqlalchemy.engine import URL
from sqlalchemy.util import await_only
from sqlalchemy.util.concurrency import in_greenlet

from eventrelay.stores.base import Turns

DRIVER = "eventrelay"
BUSY_TIMEOUT = 30.0  # seconds a statement waits for a lock, unless the URL says `?timeout=`
FIRST_PAUSE = 0.001  # seconds before the first try again of a statement that found the database locked
LONGEST_PAUSE = 0.05
_writers: list[asyncio.Future[None]] = []  # statements of this process waiting for the write lock
_BEGINS, _STATEMENTS = Turns(), Turns()  # turns before a transaction, and within one


def _locked(exc: sqlite3.OperationalError) -> bool:
    return getattr(exc, "sqlite_errorcode", 0) & 0xFF == sqlite3.SQLITE_BUSY


async def _nothing() -> None:
    pass


def _as_async(outside_transaction: bool) -> None:
    """Hand SQLAlchemy's asyncio bridge an awaitable: its `AsyncConnection.execute` refuses a driver that
    never awaits. It completes at once, with no trip to the event loop, unless a turn for the loop's other
    tasks is due (`Turns`: one clock before transactions, one within), or, outside a transaction, a writer
    of this process waits for the lock (it goes first: `_wake_writers`)."""
    if in_greenlet():
        begins = outside_transaction and (_wake_writers() or _BEGINS.due())
        await_only(asyncio.sleep(0) if begins or _STATEMENTS.due() else _nothing())


async def _wait_for_the_lock(pause: float) -> None:
    """Wait `pause` seconds, or less if a writer of this process is about to begin (`_wake_writers`)."""
    loop = asyncio.get_running_loop()
    woken = loop.create_future()
    timer = loop.call_later(pause, _wake, woken)
    _writers.append(woken)
    try:
        await woken  # directly: a waker's next turn of the loop is this task's
    finally:
        timer.cancel()
        _writers.remove(woken)


def _wake(woken: asyncio.Future[None]) -> None:
    if not woken.done():
        woken.set_result(None)


def _wake_writers() -> bool:
    """Wake the statements of this event loop waiting for the write lock; whether there were any. Called
    before a transaction begins: the caller then lets them run first, else a writer that begins again at
    once (a loop of units of work) would find the lock free before a waiter's pause ran out, every time."""
    if not _writers:
        return False
    loop = asyncio.get_running_loop()
    waiting = [woken for woken in _writers if woken.get_loop() is loop and not woken.done()]
    for woken in waiting:
        _wake(woken)
    return bool(waiting)


class Connection(sqlite3.Connection):
    """A `sqlite3` connection whose statements wait for a lock asynchronously (see the module docstring)."""

    busy_timeout = BUSY_TIMEOUT

    def cursor(self, factory: Any = None) -> Cursor:  # type: ignore[override]
        return super().cursor(factory or Cursor)

    def execute(self, *args: Any) -> Any:  # only through our cursors, so that locks are waited for
        return self.cursor().execute(*args)

    def run(self, statement: Any, *args: Any) -> Any:
        """`statement(*args)`, tried again while it finds the database locked outside a transaction."""
        _as_async(not self.in_transaction)
        deadline, pause = 0.0, FIRST_PAUSE
        while True:
            opened = self.in_transaction
            try:
                return statement(*args)
            except sqlite3.OperationalError as exc:
                if opened or not _locked(exc):
                    raise
                now = time.monotonic()
                deadline = deadline or now + self.busy_timeout
                if now >= deadline:
                    raise
            await_only(_wait_for_the_lock(pause * random.uniform(0.5, 1.0)))
            pause = min(pause * 2, LONGEST_PAUSE)


class Cursor(sqlite3.Cursor):
    """A cursor of `Connection`: its statements wait for locks asynchronously."""

    connection: Connection

    def execute(self, sql: str, parameters: Any = ()) -> Cursor:
        self.connection.run(super().execute, sql, parameters)
        return self

    def executemany(self, sql: str, parameters: Any) -> Cursor:
        self.connection.run(super().executemany, sql, parameters)
        return self

    async def _async_soft_close(self) -> None:
        """Asked for by SQLAlchemy's asyncio extension (2.0.44+) before a result is read outside the
        bridge. Rows of this cursor are read where they are asked for, with no await: nothing to do."""


def _connect(database: str, timeout: float = BUSY_TIMEOUT, **options: Any) -> Connection:
    """A connection to `database`; `timeout` (the URL's `?timeout=`) is how long a statement waits for a
    lock, in seconds."""
    # check_same_thread: the pool may close a connection it finds garbage-collected from another thread;
    # in use, a connection is only ever touched from the event loop's thread.
    options.update(factory=Connection, timeout=0.0, check_same_thread=False, isolation_level=None)
    connection: Connection = sqlite3.connect(database, **options)
    connection.busy_timeout = float(timeout)
    return connection


_DBAPI = SimpleNamespace(**{**{name: getattr(sqlite3, name) for name in dir(sqlite3)}, "connect": _connect})


class SQLiteDialect(SQLiteDialect_pysqlite):
    """`sqlite+eventrelay://`: SQLite for SQLAlchemy's asyncio extension, without a thread per connection."""

    driver = DRIVER
    is_async = True
    has_terminate = True
    supports_statement_cache = True
    supports_server_side_cursors = False

    @classmethod
    def import_dbapi(cls) -> Any:
        return _DBAPI

    @classmethod
    def get_pool_class(cls, url: URL) -> type[pool.Pool]:
        return pool.AsyncAdaptedQueuePool if cls._is_url_file_db(url) else pool.StaticPool

    # Savepoints straight to the driver: SQLAlchemy compiles each one anew (its name is new every time),
    # which cost more than the rest of a handler's savepoint in a batch (py-spy, issue 16).
    def do_savepoint(self, connection: Any, name: str) -> None:
        connection.connection.dbapi_connection.execute(f'SAVEPOINT "{name}"')

    def do_release_savepoint(self, connection: Any, name: str) -> None:
        connection.connection.dbapi_connection.execute(f'RELEASE SAVEPOINT "{name}"')

    def do_rollback_to_savepoint(self, connection: Any, name: str) -> None:
        connection.connection.dbapi_connection.execute(f'ROLLBACK TO SAVEPOINT "{name}"')

    def do_terminate(self, dbapi_connection: Any) -> None:
        dbapi_connection.close()  # immediate: it rolls back what is open and lets go of the file's locks


registry.register(f"sqlite.{DRIVER}", __name__, "SQLiteDialect")


def eventrelay_url(url: URL) -> URL:
    """`url` (any SQLite driver) with this module's driver."""
    return url.set(drivername=f"sqlite+{DRIVER}")
