"""eventrelay's side: a ProductService that publishes (direct or through its outbox) and an OrderService that
consumes (with its inbox and a row written per event when it has a database), each in its own process; for
the request/reply rows, a service that answers `GetProductEto` and one that asks with `bus.request`."""

from __future__ import annotations

import asyncio
import time
from multiprocessing.connection import Connection

from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from bench.child import (
    CREATE_TABLE,
    REQUEST_TIMEOUT,
    TABLE,
    WARM_UP,
    Job,
    RoundTrips,
    Tally,
    serve_consumer,
    serve_publisher,
    until,
)
from bench.payload import GetProductEto, ProductEto, ProductPriceChangedEto, answer, event, question
from eventrelay import DistributedEventBus, DistributedEventHandler, event_name
from eventrelay.brokers import broker_from_url
from eventrelay.codec import encode_body
from eventrelay.envelope import Message, new_message_id

INSERT = text(f"INSERT INTO {TABLE} (seq, product_id, new_price) VALUES (:seq, :product_id, :new_price)")
FILL_BATCH = 1000


class RecordPriceChange(DistributedEventHandler[ProductPriceChangedEto]):
    """OrderService's handler: notes the arrival, then (durable runs) writes a row in its unit of work."""

    def __init__(self, tally: Tally, write: bool) -> None:
        self.tally = tally
        self.write = write

    async def handle_event(self, event: ProductPriceChangedEto) -> None:
        self.tally.record(event.seq, event.sent_ns)
        if self.write:
            values = {"seq": event.seq, "product_id": event.product_id, "new_price": str(event.new_price)}
            await self.context.session.execute(INSERT, values)


async def consume(job: Job, conn: Connection) -> None:
    """OrderService: subscribe, count every event, and (with a database) check that every row is there."""
    tally = Tally(job)
    if job.database is not None:
        await _sql(job.database, CREATE_TABLE)
    bus = DistributedEventBus(job.destination, broker=job.url, database=job.database)
    await bus.start()
    await bus.subscribe(
        RecordPriceChange,
        factory=lambda: RecordPriceChange(tally, job.database is not None),
        batch=job.batch,
    )

    async def rows() -> dict[str, int | None]:
        return {"rows": await _rows(job.database, job.n) if job.database is not None else None}

    await serve_consumer(job, conn, tally, bus.stop, rows)


async def publish(job: Job, conn: Connection) -> None:
    """ProductService: `bus.publish` straight to the broker, or in units of work through the outbox."""
    durable = job.publisher_database is not None
    bus = DistributedEventBus(job.publisher, broker=job.url, database=job.publisher_database)
    await bus.start()

    async def send(unit: int) -> None:
        if not durable:
            await bus.publish(event(unit, time.time_ns()), use_outbox=False)
            return
        async with bus.unit_of_work():
            for seq in range(unit * job.per_unit, (unit + 1) * job.per_unit):
                await bus.publish(event(seq, time.time_ns()))  # stamped just before the commit

    await serve_publisher(job, conn, send, bus.stop)


async def fill(job: Job, conn: Connection) -> None:
    """The backlog: bind OrderService's subscription, then put `job.n` events in it, a confirmed batch at a
    time, through eventrelay's own broker adapter (the wire format the consumer expects)."""
    broker = broker_from_url(job.url)
    await broker.start()
    name = event_name(ProductPriceChangedEto)
    await broker.bind(job.destination, name)
    conn.send(("ready", None))
    await until(conn, "go")
    slots = asyncio.Semaphore(4)  # a few batches awaiting their confirms at once

    async def batch(first: int) -> None:
        async with slots:
            await broker.publish(
                [
                    Message(new_message_id(), name, encode_body(event(seq, 0)))
                    for seq in range(first, min(job.n, first + FILL_BATCH))
                ]
            )

    start_ns, cpu_started = time.time_ns(), time.process_time()
    await asyncio.gather(*(batch(first) for first in range(0, job.n, FILL_BATCH)))
    cpu_s = time.process_time() - cpu_started  # its part ends here: the consumer starts after it
    conn.send(("published", {"start_ns": start_ns, "end_ns": time.time_ns()}))
    await until(conn, "stop")
    await broker.close()
    conn.send(("stopped", {"cpu_s": cpu_s}))


async def answer_requests(job: Job, conn: Connection) -> None:
    """The answering service: a handler that returns the product asked for, counting each request."""
    tally = Tally(job)
    bus = DistributedEventBus(job.destination, broker=job.url)

    async def get_product(request: GetProductEto) -> ProductEto:
        if request.seq != WARM_UP:
            tally.record(request.seq, request.sent_ns)
        return answer(request)

    await bus.start()
    await bus.subscribe(get_product)
    await serve_consumer(job, conn, tally, bus.stop)


async def ask(job: Job, conn: Connection) -> None:
    """The asking service: `bus.request` for each product, `job.window` awaiting their reply at once."""
    bus = DistributedEventBus(job.publisher, broker=job.url)
    await bus.start()
    trips = RoundTrips()

    async def request(seq: int) -> int:
        reply = await bus.request(question(seq, time.time_ns()), reply=ProductEto, timeout=REQUEST_TIMEOUT)
        return reply.seq

    await request(WARM_UP)  # opens the reply channel, outside the clock

    async def send(seq: int) -> None:
        await trips.time(seq, request(seq))

    await serve_publisher(job, conn, send, bus.stop, figures=trips.figures)


async def _sql(url: str, statement: str) -> None:
    engine = create_async_engine(url)
    try:
        async with engine.begin() as connection:
            await connection.execute(text(statement))
    finally:
        await engine.dispose()


async def _rows(url: str, expected: int, patience: float = 10.0) -> int:
    """Rows in the handler's table, once the last handlers' transactions committed (or `patience` ran out)."""
    engine = create_async_engine(url)
    try:
        deadline = time.monotonic() + patience
        while True:
            async with engine.connect() as connection:
                rows = int((await connection.execute(text(f"SELECT count(*) FROM {TABLE}"))).scalar_one())
            if rows >= expected or time.monotonic() > deadline:
                return rows
            await asyncio.sleep(0.05)
    finally:
        await engine.dispose()
