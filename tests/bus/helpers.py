"""What the bus tests share: fast settings, an event, a business table of the test's own, small waits."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import Column, Integer, MetaData, String, Table, func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from eventrelay import DistributedEventBus, Event, RetryPolicy, Settings, UnitOfWork
from eventrelay.brokers.base import Broker
from eventrelay.sql import READ_ONLY, create_engine
from eventrelay.stores.sqlalchemy import SqlStore

FAST = Settings(
    retry=RetryPolicy(initial_delay=0.01, max_delay=0.05),
    relay_poll_interval=0.05,
    fetch_timeout=0.1,
    shutdown_timeout=10.0,
)


class OrderPlaced(Event, name="BusTests.OrderPlaced"):
    order_id: int
    note: str = ""


def settings(**changes: Any) -> Settings:
    """FAST with some fields changed."""
    return dataclasses.replace(FAST, **changes)


def make_bus(service: str, broker: Broker, database: str | None, **changes: Any) -> DistributedEventBus:
    return DistributedEventBus(service, broker=broker, database=database, settings=settings(**changes))


@asynccontextmanager
async def not_started(bus: DistributedEventBus) -> AsyncIterator[DistributedEventBus]:
    """A bus whose consumer and relay never run (its tables exist); its connections are closed after."""
    await bus.store.create_tables()
    try:
        yield bus
    finally:
        await bus.store.close()


def business_table() -> Table:
    """A table of the test's own, as a user's service would have next to the eventrelay tables."""
    return Table(
        f"orders_{uuid.uuid4().hex[:10]}",
        MetaData(),
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("note", String(100), nullable=False),
    )


@asynccontextmanager
async def engine(url: str) -> AsyncIterator[AsyncEngine]:
    """An engine of the test's own on `url`, disposed after."""
    made = create_engine(url)
    try:
        yield made
    finally:
        await made.dispose()


async def create_table(url: str, table: Table) -> None:
    async with engine(url) as made, made.begin() as conn:
        await conn.run_sync(table.metadata.create_all)


async def count_rows(url: str, table: Table, *where: Any) -> int:
    """Committed rows of `table`, read on a connection of its own (a plain read, no write lock on SQLite)."""
    async with engine(url) as made, made.connect() as conn:
        conn = await conn.execution_options(**READ_ONLY)
        result = await conn.execute(select(func.count()).select_from(table).where(*where))
        return int(result.scalar_one())


def sql_store(bus: DistributedEventBus) -> SqlStore:
    assert isinstance(bus.store, SqlStore)
    return bus.store


async def outbox_size(bus: DistributedEventBus) -> int:
    waiting, _ = await bus.store.outbox_backlog()
    return waiting


async def eventually(condition: Callable[[], bool | Awaitable[bool]], timeout: float = 5.0) -> None:
    """Wait until `condition()` holds (it may be async); TimeoutError after `timeout` seconds."""
    async with asyncio.timeout(timeout):
        while True:
            result = condition()
            if await result if isinstance(result, Awaitable) else result:
                return
            await asyncio.sleep(0.005)


class Rollback(Exception):
    """Raised at the end of a `rolled_back` block."""


@asynccontextmanager
async def rolled_back(bus: DistributedEventBus) -> AsyncIterator[UnitOfWork]:
    """A unit of work whose block ends with an exception (`Rollback`, swallowed once it left the unit)."""
    try:
        async with bus.unit_of_work() as uow:
            yield uow
            raise Rollback
    except Rollback:
        pass
