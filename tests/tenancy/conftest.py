"""Databases for a database per tenant: the service's own (shared by tenants without one) and three tenants'
(acme, globex, initech), as SQLite files or as PostgreSQL databases created for the test and dropped after."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, func, select, text

from eventrelay.sql import create_engine
from tests.conftest import HOST, POSTGRESQL_PORT, _database_name, _postgresql_admin
from tests.servers import require_server

TENANTS = ("acme", "globex", "initech")

metadata = MetaData()
effects = Table(
    "effects",
    metadata,
    Column("n", Integer, nullable=False),
    Column("tenant", String(50), nullable=False),
    Column("message_id", String(64), nullable=False),
)
orders = Table("orders", metadata, Column("n", Integer, nullable=False), Column("tenant", String(50)))


@dataclass(frozen=True)
class Databases:
    """The default database's URL, each tenant's, and one more made for a tenant added later."""

    default: str
    tenants: dict[str, str]
    spare: str

    @property
    def all(self) -> list[str]:
        return [self.default, *self.tenants.values(), self.spare]


async def create_app_tables(*urls: str) -> None:
    """The application's own tables (what its migrations make) in each database."""
    for url in urls:
        engine = create_engine(url)
        try:
            async with engine.begin() as connection:
                await connection.run_sync(metadata.create_all)
        finally:
            await engine.dispose()


async def rows(url: str, statement: str) -> list[tuple[object, ...]]:
    """What `statement` returns in the database at `url`."""
    engine = create_engine(url)
    try:
        async with engine.connect() as connection:
            return [tuple(r) for r in await connection.execute(text(statement))]
    finally:
        await engine.dispose()


async def count(url: str, table: Table) -> int:
    engine = create_engine(url)
    try:
        async with engine.connect() as connection:
            return int((await connection.execute(select(func.count()).select_from(table))).scalar_one())
    finally:
        await engine.dispose()


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgresql", id="postgresql", marks=pytest.mark.postgresql),
    ]
)
async def databases(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Databases]:
    names = ["default", *TENANTS, "spare"]
    if request.param == "sqlite":
        urls = [f"sqlite+aiosqlite:///{tmp_path}/{name}.db" for name in names]
        yield Databases(urls[0], dict(zip(TENANTS, urls[1:4], strict=True)), urls[4])
        return
    require_server("PostgreSQL", POSTGRESQL_PORT, HOST)
    created = [_database_name() for _ in names]
    user, admin = await _postgresql_admin()
    try:
        for name in created:
            await admin.execute(f'CREATE DATABASE "{name}"')
        urls = [f"postgresql+asyncpg://{user}@{HOST}:{POSTGRESQL_PORT}/{name}" for name in created]
        yield Databases(urls[0], dict(zip(TENANTS, urls[1:4], strict=True)), urls[4])
    finally:
        for name in created:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
