"""The baselines, end to end on RabbitMQ: raw aio-pika, and FastStream's RabbitMQ broker.

Both publish the benchmark's JSON bytes as persistent messages with publisher confirms, `job.window` awaiting
their confirm at once, straight to a durable queue; both consume with a prefetch of 1000 and ack each message
after its handler ran. FastStream's per-message logging is off (`logger=None`), which only helps it.

For the request/reply rows, FastStream's RPC: `RabbitBroker.request` (RabbitMQ's direct reply-to) sends each
question as a persistent, confirmed message to the answering subscriber's durable queue, whose handler
returns the answer's bytes; FastStream publishes it to the reply-to address.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from bench.child import (
    REQUEST_TIMEOUT,
    WARM_UP,
    Job,
    RoundTrips,
    Tally,
    serve_consumer,
    serve_publisher,
)
from bench.wire import body, request_body, stamp_of

PREFETCH = 1000


async def raw_consume(job: Job, conn: Connection) -> None:
    """aio-pika: consume the queue with manual acks."""
    tally = Tally(job)
    connection = await aio_pika.connect(job.url)
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=PREFETCH)
    queue = await channel.declare_queue(job.destination, durable=True)

    async def on_message(message: AbstractIncomingMessage) -> None:
        tally.record(*stamp_of(message.body))
        await message.ack()

    tag = await queue.consume(on_message)

    async def close() -> None:
        await queue.cancel(tag)
        await connection.close()

    await serve_consumer(job, conn, tally, close)


async def raw_publish(job: Job, conn: Connection) -> None:
    """aio-pika: persistent messages, confirmed, to the queue through the default exchange."""
    connection = await aio_pika.connect(job.url)
    channel = await connection.channel(publisher_confirms=True)
    exchange = channel.default_exchange

    async def send(seq: int) -> None:
        message = aio_pika.Message(
            body(seq, time.time_ns()),
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            content_type="application/json",
            message_id=uuid.uuid4().hex,
        )
        await exchange.publish(message, routing_key=job.destination)

    await serve_publisher(job, conn, send, connection.close)


async def _faststream_consume(job: Job, conn: Connection, tally: Tally, handle: Callable[..., Any]) -> None:
    """Run `handle` as FastStream's subscriber on the queue (prefetch as the others', acking after the
    handler: `AckPolicy.ACK`) for a consumer's part of the talk."""
    from faststream import AckPolicy
    from faststream.rabbit import Channel, RabbitBroker, RabbitQueue

    broker = RabbitBroker(job.url, logger=None)
    queue = RabbitQueue(job.destination, durable=True)
    broker.subscriber(queue, channel=Channel(prefetch_count=PREFETCH), ack_policy=AckPolicy.ACK)(handle)
    await broker.start()
    await serve_consumer(job, conn, tally, broker.stop)


async def faststream_consume(job: Job, conn: Connection) -> None:
    """FastStream: a subscriber on the queue that counts each event."""
    tally = Tally(job)

    async def on_price_changed(message: dict[str, Any]) -> None:
        tally.record(int(message["seq"]), int(message["sent_ns"]))

    await _faststream_consume(job, conn, tally, on_price_changed)


async def faststream_publish(job: Job, conn: Connection) -> None:
    """FastStream: a publisher on the queue, persistent, with the broker's publisher confirms."""
    from faststream.rabbit import RabbitBroker, RabbitQueue

    broker = RabbitBroker(job.url, logger=None)
    publisher = broker.publisher(RabbitQueue(job.destination, durable=True), persist=True)
    await broker.start()

    async def send(seq: int) -> None:
        await publisher.publish(
            body(seq, time.time_ns()), content_type="application/json", message_id=uuid.uuid4().hex
        )

    await serve_publisher(job, conn, send, broker.stop)


async def faststream_answer(job: Job, conn: Connection) -> None:
    """FastStream: a subscriber on the queue that returns the product asked for, counting each request."""
    tally = Tally(job)

    async def get_product(message: dict[str, Any]) -> bytes:
        seq, sent_ns = int(message["seq"]), int(message["sent_ns"])
        if seq != WARM_UP:
            tally.record(seq, sent_ns)
        return body(seq, sent_ns)

    await _faststream_consume(job, conn, tally, get_product)


async def faststream_ask(job: Job, conn: Connection) -> None:
    """FastStream: `broker.request` for each product, `job.window` callers awaiting their reply at once."""
    from faststream.rabbit import RabbitBroker

    broker = RabbitBroker(job.url, logger=None)
    await broker.start()
    trips = RoundTrips()

    async def request(seq: int) -> int:
        reply = await broker.request(
            request_body(seq, time.time_ns()),
            job.destination,
            persist=True,
            timeout=REQUEST_TIMEOUT,
            content_type="application/json",
            message_id=uuid.uuid4().hex,
        )
        return stamp_of(reply.body)[0]

    await request(WARM_UP)  # as eventrelay's asker does

    async def send(seq: int) -> None:
        await trips.time(seq, request(seq))

    await serve_publisher(job, conn, send, broker.stop, figures=trips.figures)
