"""The "hand-written asyncpg+aio-pika" baseline: the E2 job as a team would write it by hand, an outbox and an
inbox on PostgreSQL around RabbitMQ, no eventrelay and no SQLAlchemy. The yardstick for the durable path
(issue 16).

- ProductService (publisher process): a pool of `job.window` asyncpg connections, at most 8 (8 at 1 event
  per transaction, 2 at 100); each unit of work is one transaction that inserts `job.per_unit` rows into
  `outbox` (message id, the same JSON bytes eventrelay publishes) and says `NOTIFY outbox`.
- Its relay, in the same process as eventrelay's relay is: `LISTEN outbox` on a connection of its own; in
  one transaction, claim up to 100 rows in id order `FOR UPDATE SKIP LOCKED`, publish each as a persistent
  message on a confirmed channel (the batch's publishes awaiting their confirms at once: a window of up to
  100), delete them, commit. With nothing to claim it waits for a notification, or 1 s.
- OrderService (consumer process): a durable queue, prefetch 1000; in its own database the inbox (primary key:
  the message id) and the handler's table (bench/child.py `TABLE`, a row per event). Two modes:
  per fetch (`job.batch`, the default): the deliveries at hand, up to 100, in one transaction (the inbox rows
  `ON CONFLICT DO NOTHING RETURNING`, then the handler rows of the new ones), commit, then ack them;
  per message (`batch=False`): for each delivery, concurrently on a pool of connections, a transaction with
  its inbox row and (if new) its handler row, commit, ack.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from decimal import Decimal
from multiprocessing.connection import Connection
from typing import Any

import aio_pika
import asyncpg
from aio_pika.abc import AbstractIncomingMessage

from bench.child import CREATE_TABLE, TABLE, Job, Tally, serve_consumer, serve_publisher
from bench.wire import body

PREFETCH = 1000
BATCH = 100
"""Rows the relay claims, and deliveries the per-fetch consumer handles, per transaction."""
POLL = 1.0
"""Seconds the relay waits for a notification before it looks again anyway."""
PUBLISHER_POOL = 8
"""Connections of the publisher at most (units of work in flight at once)."""
CONSUMER_POOL = 10
"""Connections of the per-message consumer (deliveries handled at once)."""

OUTBOX_TABLE = """CREATE TABLE IF NOT EXISTS outbox (
    id bigserial PRIMARY KEY, message_id text NOT NULL, body bytea NOT NULL
)"""
ENQUEUE = "INSERT INTO outbox (message_id, body) VALUES ($1, $2)"
CLAIM = "SELECT id, message_id, body FROM outbox ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED"
INBOX_TABLE = "CREATE TABLE IF NOT EXISTS inbox (message_id text PRIMARY KEY)"
INBOX_ONE = "INSERT INTO inbox (message_id) VALUES ($1) ON CONFLICT DO NOTHING RETURNING true"
INBOX_MANY = (
    "INSERT INTO inbox (message_id) SELECT unnest($1::text[]) ON CONFLICT DO NOTHING RETURNING message_id"
)
HANDLER_ONE = f"INSERT INTO {TABLE} (seq, product_id, new_price) VALUES ($1, $2, $3)"
HANDLER_MANY = (
    f"INSERT INTO {TABLE} (seq, product_id, new_price)"
    " SELECT * FROM unnest($1::int[], $2::text[], $3::numeric[])"
)


async def publish(job: Job, conn: Connection) -> None:
    """ProductService: units of work through the outbox, and the relay beside them."""
    assert job.publisher_database is not None, "the hand-written publisher needs its database"
    dsn = job.publisher_database
    connections = min(job.window, PUBLISHER_POOL)  # the latency row's window of 64 shares 8
    pool = await asyncpg.create_pool(dsn, min_size=connections, max_size=connections)
    await pool.execute(OUTBOX_TABLE)
    relay = Relay(job, dsn)
    await relay.start()

    async def send(unit: int) -> None:
        first = unit * job.per_unit
        async with pool.acquire() as db, db.transaction():
            rows = [
                (uuid.uuid4().hex, body(seq, time.time_ns())) for seq in range(first, first + job.per_unit)
            ]
            await db.executemany(ENQUEUE, rows)
            await db.execute("NOTIFY outbox")

    async def close() -> None:
        await relay.stop()
        await pool.close()

    await serve_publisher(job, conn, send, close)


class Relay:
    """Outbox -> RabbitMQ: claim a batch, publish it with confirms, delete it, in one transaction."""

    def __init__(self, job: Job, dsn: str) -> None:
        self.job, self.dsn = job, dsn
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.listener = await asyncpg.connect(self.dsn)
        await self.listener.add_listener("outbox", lambda *_: self.wake.set())
        self.db = await asyncpg.connect(self.dsn)
        self.amqp = await aio_pika.connect(self.job.url)
        channel = await self.amqp.channel(publisher_confirms=True)
        self.exchange = channel.default_exchange
        self.task = asyncio.create_task(self.run())

    async def run(self) -> None:
        while True:
            self.wake.clear()  # a commit from here on wakes the wait below
            if not await self.relay_batch():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), POLL)

    async def relay_batch(self) -> int:
        async with self.db.transaction():
            rows = await self.db.fetch(CLAIM, BATCH)
            if rows:
                await asyncio.gather(*(self.send(row) for row in rows))
                await self.db.execute(
                    "DELETE FROM outbox WHERE id = ANY($1::bigint[])", [r["id"] for r in rows]
                )
        return len(rows)

    async def send(self, row: Any) -> None:
        message = aio_pika.Message(
            row["body"],
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            content_type="application/json",
            message_id=row["message_id"],
        )
        await self.exchange.publish(message, routing_key=self.job.destination)

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        await self.amqp.close()
        await self.db.close()
        await self.listener.close()


async def consume(job: Job, conn: Connection) -> None:
    """OrderService: per fetch (default) or per message, then the rows check."""
    assert job.database is not None, "the hand-written consumer needs its database"
    tally = Tally(job)
    pool = await asyncpg.create_pool(job.database, min_size=1, max_size=CONSUMER_POOL)
    await pool.execute(INBOX_TABLE)
    await pool.execute(CREATE_TABLE)
    connection = await aio_pika.connect(job.url)
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=PREFETCH)
    queue = await channel.declare_queue(job.destination, durable=True)
    arrived: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
    failures: list[BaseException] = []

    async def per_message(message: AbstractIncomingMessage) -> None:
        data = json.loads(message.body)
        async with pool.acquire() as db, db.transaction():
            new = await db.fetchval(INBOX_ONE, message.message_id)
            if new:
                await db.execute(HANDLER_ONE, data["seq"], data["product_id"], Decimal(data["new_price"]))
        await message.ack()
        if new:
            tally.record(int(data["seq"]), int(data["sent_ns"]))

    async def per_fetch() -> None:
        while True:
            batch = [await arrived.get()]
            while len(batch) < BATCH and not arrived.empty():
                batch.append(arrived.get_nowait())
            async with pool.acquire() as db, db.transaction():
                new = {r[0] for r in await db.fetch(INBOX_MANY, [m.message_id for m in batch])}
                handled = [json.loads(m.body) for m in batch if m.message_id in new]
                await db.execute(
                    HANDLER_MANY,
                    [d["seq"] for d in handled],
                    [d["product_id"] for d in handled],
                    [Decimal(d["new_price"]) for d in handled],
                )
            for message in batch:
                await message.ack()
            for data in handled:
                tally.record(int(data["seq"]), int(data["sent_ns"]))

    def failed(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            failures.append(task.exception())  # type: ignore[arg-type]
            tally.complete.set()  # end the wait; rows() says why

    loop: asyncio.Task[None] | None = None
    if job.batch:
        loop = asyncio.create_task(per_fetch())
        loop.add_done_callback(failed)

        async def enqueue(message: AbstractIncomingMessage) -> None:
            arrived.put_nowait(message)

        tag = await queue.consume(enqueue)
    else:
        tag = await queue.consume(per_message)

    async def rows() -> dict[str, int]:
        if failures:
            raise failures[0]
        async with pool.acquire() as db:
            return {"rows": int(await db.fetchval(f"SELECT count(*) FROM {TABLE}"))}

    async def close() -> None:
        await queue.cancel(tag)
        if loop is not None:
            loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loop
        await connection.close()
        await pool.close()

    await serve_consumer(job, conn, tally, close, rows)
