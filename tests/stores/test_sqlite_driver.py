"""eventrelay's SQLite driver (`eventrelay.stores.sqlite`): what a service relies on when several connections
and processes write one file.

- A task cancelled anywhere in a transaction (mid-statement, at commit, while its connection is closed, even
  cancelled twice) never leaves the file's write lock held: a service stops at once instead of waiting for
  a busy timeout (issue 14's 30 s stalls, which aiosqlite's thread per connection caused).
- A writer waiting for the lock waits without blocking the event loop, and fails with "database is locked"
  once its busy timeout has passed.
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from eventrelay.envelope import Message
from eventrelay.sql import create_engine
from eventrelay.stores.base import utcnow
from eventrelay.stores.sqlalchemy import SqlStore

ROUNDS = 60


def write_lock_is_free(path: Path) -> bool:
    """Whether another connection (the standard library's, not waiting at all) can take the write lock."""
    connection = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        connection.execute("BEGIN IMMEDIATE")
        connection.execute("ROLLBACK")
        return True
    except sqlite3.OperationalError:
        return False
    finally:
        connection.close()


async def test_cancelled_transactions_never_leave_the_write_lock_held(tmp_path: Path) -> None:
    path = tmp_path / "service.db"
    store = SqlStore(f"sqlite+aiosqlite:///{path}")
    await store.create_tables()
    chance = random.Random(14)  # the same cancellations on every run

    async def write(n: int) -> None:
        tx = store.begin()
        try:
            await store.add_outbox(tx, [Message(f"m{n}", "Cancelled", b"{}", {}, None)], utcnow())
            await asyncio.sleep(chance.random() * 0.002)  # the transaction is open, the lock held
            await tx.session.execute(text("SELECT 1"))
        except BaseException:
            await tx.rollback()
            raise
        await tx.commit()

    try:
        for round_ in range(ROUNDS):
            tasks = [asyncio.create_task(write(round_ * 100 + n)) for n in range(20)]
            for _ in range(3):  # cancelled at different points, some of them twice or three times
                await asyncio.sleep(chance.random() * 0.003)
                for task in tasks:
                    if chance.random() < 0.4:
                        task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            assert write_lock_is_free(path), f"round {round_}: the write lock is still held"
    finally:
        await store.close()


async def test_a_waiting_writer_leaves_the_event_loop_free_and_gives_up_after_its_busy_timeout(
    tmp_path: Path,
) -> None:
    path = tmp_path / "service.db"
    engine = create_engine(f"sqlite+aiosqlite:///{path}")
    holder = sqlite3.connect(path, isolation_level=None)
    ticked = asyncio.Event()

    async def ticker() -> None:
        for _ in range(20):
            await asyncio.sleep(0.001)
        ticked.set()

    async def write() -> None:
        async with engine.begin() as conn:
            await conn.execute(text("CREATE TABLE IF NOT EXISTS t (n INTEGER)"))

    try:
        await write()  # the file exists, in WAL mode
        holder.execute("BEGIN IMMEDIATE")  # another process's writer holds the lock
        counting = asyncio.create_task(ticker())
        waiting = asyncio.create_task(write())
        await ticked.wait()  # the loop runs other tasks while the writer waits
        assert not waiting.done(), "the writer did not wait for the lock"
        holder.execute("COMMIT")
        await waiting  # it gets the lock once the other writer let go
        await counting
    finally:
        holder.close()
        await engine.dispose()


async def test_a_writer_fails_with_database_is_locked_after_its_busy_timeout(tmp_path: Path) -> None:
    path = tmp_path / "service.db"
    impatient = create_engine(f"sqlite+aiosqlite:///{path}?timeout=0.2")
    async with impatient.begin() as conn:
        await conn.execute(text("CREATE TABLE t (n INTEGER)"))
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        with pytest.raises(OperationalError, match="database is locked"):
            async with impatient.begin() as conn:
                await conn.execute(text("INSERT INTO t VALUES (1)"))
    finally:
        holder.close()
        await impatient.dispose()
