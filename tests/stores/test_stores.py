"""The store contract on each adapter: memory, and SQL on SQLite, PostgreSQL and MariaDB."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from eventrelay.stores.base import Store
from eventrelay.stores.memory import MemoryStore
from eventrelay.stores.sqlalchemy import SqlStore
from tests.stores.contract import StoreContract, started


class TestMemoryStore(StoreContract):
    concurrent_claims = "serialised"

    @pytest.fixture
    async def store(self) -> AsyncIterator[Store]:
        async with started(MemoryStore()) as store:
            yield store


class TestSqliteStore(StoreContract):
    concurrent_claims = "serialised"  # BEGIN IMMEDIATE: a second writer waits for the lock

    @pytest.fixture
    async def store(self, sqlite_url: str) -> AsyncIterator[Store]:
        async with started(SqlStore(sqlite_url)) as store:
            yield store


@pytest.mark.postgresql
class TestPostgresqlStore(StoreContract):
    concurrent_claims = "skip_locked"

    @pytest.fixture
    async def store(self, postgresql_url: str) -> AsyncIterator[Store]:
        async with started(SqlStore(postgresql_url)) as store:
            yield store


@pytest.mark.mariadb
class TestMariadbStore(StoreContract):
    concurrent_claims = "skip_locked"

    @pytest.fixture
    async def store(self, mariadb_url: str) -> AsyncIterator[Store]:
        async with started(SqlStore(mariadb_url)) as store:
            yield store
