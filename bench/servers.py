"""The servers a run talks to, all on 127.0.0.1: per-round names and their clean-up, Tansu for Kafka, and
the versions the report names. Nothing here stops or reconfigures the shared servers."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import redis.asyncio as aioredis

HOST = "127.0.0.1"
AMQP = f"amqp://guest:guest@{HOST}:5672/"
NATS = f"nats://{HOST}:4222"
REDIS = f"redis://{HOST}:6379/0"
POSTGRES = f"postgresql://postgres@{HOST}:5432/test"


def postgres_url(database: str) -> str:
    """The SQLAlchemy URL of a database on the shared PostgreSQL server."""
    return f"postgresql+asyncpg://postgres@{HOST}:5432/{database}"


def postgres_dsn(database: str) -> str:
    """The libpq URL of a database on the shared PostgreSQL server (for asyncpg itself)."""
    return f"postgresql://postgres@{HOST}:5432/{database}"


async def create_databases(*names: str) -> None:
    """Fresh PostgreSQL databases for one round."""
    await _postgres([f'CREATE DATABASE "{name}"' for name in names])


async def drop_databases(*names: str) -> None:
    """Drop a round's databases, closing what still holds them."""
    await _postgres([f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)' for name in names])


async def _postgres(statements: list[str]) -> None:
    connection = await asyncpg.connect(POSTGRES)
    try:
        for statement in statements:
            await connection.execute(statement)
    finally:
        await connection.close()


async def delete_rabbitmq(queues: list[str], exchanges: list[str]) -> None:
    """Delete a round's queues and exchanges (deleting one that is not there is fine on RabbitMQ 3.x)."""
    import aio_pika

    connection = await aio_pika.connect(AMQP)
    try:
        channel = await connection.channel()
        for queue in queues:
            await channel.queue_delete(queue)
        for exchange in exchanges:
            await channel.exchange_delete(exchange)
    finally:
        await connection.close()


async def delete_nats_stream(stream: str) -> None:
    """Delete a round's JetStream stream, if it is there."""
    import nats
    from nats.js.errors import NotFoundError

    client = await nats.connect(NATS)
    try:
        with contextlib.suppress(NotFoundError):
            await client.jetstream().delete_stream(stream)
    finally:
        await client.close()


async def delete_redis_keys(prefix: str) -> None:
    """Delete a round's Redis keys (everything under its prefix)."""
    client = aioredis.from_url(REDIS)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@contextlib.contextmanager
def tansu(log_dir: Path) -> Iterator[str]:
    """Tansu, the Kafka-protocol broker the tests use (in memory, a free port of 127.0.0.1), for the run."""
    from tests.brokers.kafka_server import tansu_server

    yield from tansu_server(log_dir)


async def versions() -> dict[str, str]:
    """The version of each server, as it reports it ("?" when it cannot be asked)."""
    found: dict[str, str] = {}
    with contextlib.suppress(Exception):
        connection = await asyncpg.connect(POSTGRES)
        found["PostgreSQL"] = str(await connection.fetchval("SHOW server_version"))
        await connection.close()
    with contextlib.suppress(Exception):
        import aio_pika

        amqp = await aio_pika.connect(AMQP)
        properties: Any = amqp.transport.connection.server_properties if amqp.transport else {}
        found["RabbitMQ"] = str(properties.get("version", "?"))
        await amqp.close()
    with contextlib.suppress(Exception):
        client = aioredis.from_url(REDIS)
        found["Redis"] = str((await client.info("server"))["redis_version"])
        await client.aclose()
    with contextlib.suppress(Exception):
        import nats

        nc = await nats.connect(NATS)
        found["NATS"] = str(nc.connected_server_version)
        await nc.close()
    from tests.brokers.kafka_server import tansu_binary

    binary = tansu_binary()
    if binary is not None:
        with contextlib.suppress(Exception):
            out = await asyncio.to_thread(
                subprocess.run, [str(binary), "--version"], capture_output=True, text=True, timeout=5
            )
            found["Tansu"] = (out.stdout or out.stderr).strip().splitlines()[0]
    return found
