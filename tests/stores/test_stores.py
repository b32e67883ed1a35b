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

    async def test_the_inbox_keeps_only_its_newest_records(self) -> None:
        """A process without a database that handles millions of messages must not grow with them."""
        async with started(MemoryStore(inbox_limit=3)) as store:
            for n in range(4):
                assert await self.claim_inbox(store, "Orders", "h", f"m{n}")
            assert await store.inbox_count("Orders") == 3
            assert not await self.claim_inbox(store, "Orders", "h", "m3")  # kept: a duplicate
            assert await self.claim_inbox(store, "Orders", "h", "m0")  # forgotten: it takes effect again


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
