"""The "bare sqlite3" baseline: the E3 job as a team would write it by hand with the stdlib `sqlite3` module,
no eventrelay and no SQLAlchemy. The yardstick for the embedded path (issue 16).

- A queue file (`broker.db`, `job.url`) with one table, `queue`: an autoincrementing id, the message id, the
  same JSON bytes eventrelay publishes (bench/wire.py), and a lease. WAL, `synchronous=NORMAL`; every write
  transaction is `BEGIN IMMEDIATE`, and a writer that finds the file locked waits in SQLite's busy handler
  (`sqlite3.connect(timeout=...)`).
- The publisher inserts `job.per_unit` events per transaction (1 or 100), `job.window` transactions at once,
  each on a connection of its own in a worker thread (`asyncio.to_thread`), like eventrelay's 8 or 2
  concurrent units of work.
- The consumer owns a second file (`order.db`, `job.database`) with its inbox (primary key: the message id)
  and the handler's table (bench/child.py `TABLE`, one row per event, as eventrelay's handler writes).
  Its loop, a thread hop per batch: claim up to 100 rows in one transaction on the queue (a lease, so that
  competing consumers could share it); in one transaction on its own file, per message an `INSERT OR IGNORE`
  into the inbox and, if that inserted, the handler's row; commit; then ack (delete) the claimed rows in one
  transaction on the queue. It sleeps 1 ms when the queue is empty.

Two connections rather than the queue ATTACHed to the consumer's file: in WAL mode a transaction over attached
files is atomic per file, not across them (SQLite's documentation of ATTACH), so one transaction would not buy
atomicity anyway. Committing the inbox first and acking after is the order that holds without it: a crash
between the two leaves the rows leased, they come back when the lease runs out, and the inbox ignores them.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
import uuid
from collections.abc import Iterable
from multiprocessing.connection import Connection

from bench.child import CREATE_TABLE, TABLE, Job, Tally, serve_consumer, serve_publisher
from bench.wire import body

CLAIM = 100
"""Rows the consumer claims per transaction."""
LEASE = 30.0
"""Seconds a claimed row stays invisible to other claims: after a crash it is delivered again."""
BUSY_TIMEOUT = 30.0
"""Seconds a writer waits for the file's write lock (SQLite's busy handler) before failing."""
IDLE = 0.001
"""Seconds the consumer sleeps when the queue is empty."""

QUEUE_TABLE = """CREATE TABLE IF NOT EXISTS queue (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id TEXT NOT NULL,
    body BLOB NOT NULL,
    leased_until REAL NOT NULL DEFAULT 0
)"""
INBOX_TABLE = "CREATE TABLE IF NOT EXISTS inbox (message_id TEXT PRIMARY KEY)"
ENQUEUE = "INSERT INTO queue (message_id, body) VALUES (?, ?)"
CLAIM_ROWS = """UPDATE queue SET leased_until = :until
    WHERE id IN (SELECT id FROM queue WHERE leased_until < :now ORDER BY id LIMIT :limit)
    RETURNING id, message_id, body"""
HANDLER_ROW = f"INSERT INTO {TABLE} (seq, product_id, new_price) VALUES (?, ?, ?)"


def connect(path: str) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), WAL, `synchronous=NORMAL`; usable from
    one thread at a time, whichever it is."""
    db = sqlite3.connect(path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    return db


def write(db: sqlite3.Connection, statement: str, rows: Iterable[tuple[object, ...]]) -> None:
    """`statement` for each of `rows` in one write transaction."""
    db.execute("BEGIN IMMEDIATE")
    try:
        db.executemany(statement, rows)
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


async def publish(job: Job, conn: Connection) -> None:
    """ProductService: `job.per_unit` events per transaction, `job.window` transactions at once."""
    setup = connect(job.url)
    setup.execute(QUEUE_TABLE)
    setup.close()
    idle: asyncio.Queue[sqlite3.Connection] = asyncio.Queue()
    for _ in range(job.window):
        idle.put_nowait(connect(job.url))

    def insert(db: sqlite3.Connection, unit: int) -> None:
        first = unit * job.per_unit
        rows = [(uuid.uuid4().hex, body(seq, time.time_ns())) for seq in range(first, first + job.per_unit)]
        write(db, ENQUEUE, rows)

    async def send(unit: int) -> None:
        db = await idle.get()
        try:
            await asyncio.to_thread(insert, db, unit)
        finally:
            idle.put_nowait(db)

    async def close() -> None:
        while not idle.empty():
            idle.get_nowait().close()

    await serve_publisher(job, conn, send, close)


def handle(db: sqlite3.Connection, message_id: str, raw: bytes) -> tuple[int, int] | None:
    """The inbox record and the handler's row, in the caller's transaction; None for a duplicate."""
    if db.execute("INSERT OR IGNORE INTO inbox (message_id) VALUES (?)", (message_id,)).rowcount == 0:
        return None
    data = json.loads(raw)
    db.execute(HANDLER_ROW, (data["seq"], data["product_id"], data["new_price"]))
    return int(data["seq"]), int(data["sent_ns"])


def take(queue: sqlite3.Connection, own: sqlite3.Connection) -> list[tuple[int, int]]:
    """One turn of the consumer: claim, handle in one transaction, ack. The `(seq, sent_ns)` handled."""
    now = time.time()
    queue.execute("BEGIN IMMEDIATE")
    try:
        claimed = queue.execute(CLAIM_ROWS, {"until": now + LEASE, "now": now, "limit": CLAIM}).fetchall()
        queue.execute("COMMIT")
    except BaseException:
        queue.execute("ROLLBACK")
        raise
    if not claimed:
        return []
    claimed.sort()  # RETURNING gives no order; handle in queue order
    handled = []
    own.execute("BEGIN IMMEDIATE")
    try:
        for _, message_id, raw in claimed:
            stamp = handle(own, message_id, raw)
            if stamp is not None:
                handled.append(stamp)
        own.execute("COMMIT")
    except BaseException:
        own.execute("ROLLBACK")
        raise
    write(queue, "DELETE FROM queue WHERE id = ?", [(row_id,) for row_id, _, _ in claimed])
    return handled


async def consume(job: Job, conn: Connection) -> None:
    """OrderService: the claim-handle-ack loop, counting each event once its transaction committed; then the
    rows check."""
    database = job.database
    assert database is not None, "the bare sqlite3 consumer needs its own file"
    tally = Tally(job)
    queue, own = connect(job.url), connect(database)
    queue.execute(QUEUE_TABLE)
    own.execute(INBOX_TABLE)
    own.execute(CREATE_TABLE)
    stopping = asyncio.Event()

    async def loop() -> None:
        while not stopping.is_set():
            handled = await asyncio.to_thread(take, queue, own)
            for seq, sent_ns in handled:
                tally.record(seq, sent_ns)
            if not handled:
                await asyncio.sleep(IDLE)

    task = asyncio.create_task(loop())
    task.add_done_callback(lambda _: tally.complete.set())  # a failed loop ends the wait; rows() says why

    async def rows() -> dict[str, int]:
        if task.done():
            task.result()
        counting = connect(database)  # `own` may be in the loop's transaction, in its thread
        try:
            return {"rows": int(counting.execute(f"SELECT count(*) FROM {TABLE}").fetchone()[0])}
        finally:
            counting.close()

    async def close() -> None:
        stopping.set()
        await task
        queue.close()
        own.close()

    await serve_consumer(job, conn, tally, close, rows)
