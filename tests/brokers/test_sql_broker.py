"""The broker contract on the SQL broker (a SQLite file, a PostgreSQL database), and what is SQL-only."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

import pytest
from sqlalchemy import func, select, union_all

from eventrelay.brokers import broker_from_url
from eventrelay.brokers.base import Broker
from eventrelay.brokers.sql import SqlBroker
from eventrelay.envelope import Delivery, Message, new_message_id
from eventrelay.errors import BrokerUnavailable, ConfigurationError
from eventrelay.stores.base import utcnow
from tests.brokers.contract import OUTAGES, PATIENCE, SERVER, BrokerContract, MakeBroker, collect
from tests.brokers.contract_replies import ReplyContract
from tests.conftest import POSTGRESQL_PORT
from tests.faultproxy import FaultProxy


def _with(url: str, options: str) -> str:
    return f"{url}?{options}" if options else url


async def _reply_rows(broker: Broker, address: str) -> bool:
    """Whether the generic reply channel at `address` has a binding or a delivery row left."""
    assert isinstance(broker, SqlBroker)
    bindings, deliveries = broker.bindings, broker.deliveries
    rows = union_all(
        select(bindings.c.subscriber).where(bindings.c.subscriber == address),
        select(deliveries.c.subscriber).where(deliveries.c.subscriber == address),
    ).subquery()
    async with broker.engine.connect() as conn:
        return bool(await conn.scalar(select(func.count()).select_from(rows)))


class TestSqliteBroker(BrokerContract, ReplyContract):
    cannot: ClassVar[Mapping[str, str]] = {
        SERVER: "a file: there is no server, and its URL has no password",
        OUTAGES: "a file: there is no server to lose",
    }
    short_lease = "lease=0.3"

    @pytest.fixture
    def make_broker(self, tmp_path: Path) -> MakeBroker:
        def make(options: str = "", *, port: int | None = None) -> SqlBroker:
            return SqlBroker(_with(f"sqlite+aiosqlite:///{tmp_path}/broker.db", options))

        return make

    async def reply_channel_exists(self, broker: Broker, address: str) -> bool:
        return await _reply_rows(broker, address)


@pytest.mark.postgresql
class TestPostgresqlBroker(BrokerContract, ReplyContract):
    unreachable_urls = ("postgresql+asyncpg://someone:secret@127.0.0.1:9/nowhere",)
    server_port = POSTGRESQL_PORT
    short_lease = "lease=0.3"

    @pytest.fixture
    def make_broker(self, postgresql_url: str) -> MakeBroker:
        def make(options: str = "", *, port: int | None = None) -> SqlBroker:
            url = postgresql_url.replace(f":{POSTGRESQL_PORT}/", f":{port}/") if port else postgresql_url
            return SqlBroker(_with(url, options))

        return make

    async def reply_channel_exists(self, broker: Broker, address: str) -> bool:
        return await _reply_rows(broker, address)


def test_urls_choose_the_sql_broker(tmp_path: Path) -> None:
    assert isinstance(broker_from_url(f"sqlite+aiosqlite:///{tmp_path}/b.db"), SqlBroker)
    with pytest.raises(ConfigurationError, match="lease takes a number above 0, not 'soon'"):
        SqlBroker(f"sqlite+aiosqlite:///{tmp_path}/b.db?lease=soon")


def _sizes(path: Path) -> tuple[int, int]:
    """The sizes of a SQLite database file and of its write-ahead log."""
    wal = Path(f"{path}-wal")
    return os.path.getsize(path), wal.stat().st_size if wal.exists() else 0


async def test_files_stay_bounded_under_steady_traffic(tmp_path: Path) -> None:
    path = tmp_path / "broker.db"
    body = b"x" * 1024
    sizes: list[tuple[int, int]] = []
    async with SqlBroker(f"sqlite+aiosqlite:///{path}") as broker:
        await broker.bind("svc", "e")
        for _ in range(8):  # 8 x 300 KiB of bodies pass through
            await broker.publish([Message(new_message_id(), "e", body) for _ in range(300)])
            got: list[Delivery] = await collect(broker, "svc", 300, max_count=100)
            assert len(got) == 300
            sizes.append(_sizes(path))
    database_sizes = [db for db, _ in sizes]
    assert max(database_sizes) < 2 * 1024 * 1024, sizes  # delivered rows are deleted and their pages reused
    assert database_sizes[-1] <= database_sizes[1], sizes  # no growth after the first rounds
    assert max(wal for _, wal in sizes) <= 9 * 1024 * 1024, sizes  # checkpointed and capped


@pytest.mark.postgresql
async def test_services_starting_at_once_on_one_postgresql_database_all_start(postgresql_url: str) -> None:
    # Without turns, PostgreSQL's CREATE TABLE IF NOT EXISTS fails when run twice at once.
    from eventrelay.stores.sqlalchemy import SqlStore

    brokers = [SqlBroker(postgresql_url) for _ in range(6)]
    stores = [SqlStore(postgresql_url) for _ in range(6)]
    try:
        starts = [*(b.start() for b in brokers), *(s.create_tables() for s in stores)]
        failed = [repr(r) for r in await asyncio.gather(*starts, return_exceptions=True) if r is not None]
        assert failed == [], "not every service started"
        # Each works on the tables the others made: a subscriber bound through each gets what one published,
        sent = Message(new_message_id(), "Sql.Started", b"{}")
        for n, broker in enumerate(brokers):
            await broker.bind(f"svc-{n}", "Sql.Started")
        await brokers[0].publish([sent])
        for n, broker in enumerate(brokers):
            assert [d.message.id for d in await collect(broker, f"svc-{n}", 1)] == [sent.id]
        # ...and the outbox holds a row written through each store.
        for store in stores:
            tx = store.begin()
            await store.add_outbox(tx, [Message(new_message_id(), "Sql.Started", b"{}")], utcnow())
            await tx.commit()
        assert [(await store.outbox_backlog())[0] for store in stores] == [len(stores)] * len(stores)
    finally:
        for broker in brokers:
            await broker.close()
        for store in stores:
            await store.close()


@pytest.mark.postgresql
async def test_a_fetcher_listens_again_after_a_connection_reset(postgresql_url: str) -> None:
    """With polling slowed to a minute, only NOTIFY can bring a message within seconds: after a reset too."""
    async with FaultProxy(POSTGRESQL_PORT) as proxy:
        through_proxy = postgresql_url.replace(f":{POSTGRESQL_PORT}/", f":{proxy.port}/")
        async with (
            SqlBroker(f"{through_proxy}?poll_max=60&poll_min=60") as fetcher,
            SqlBroker(postgresql_url) as publisher,
        ):
            await fetcher.bind("Listener", "Sql.Ping")
            proxy.reset()  # every connection through the proxy, the LISTEN one included, is cut
            with pytest.raises(BrokerUnavailable):  # (the pool's connection was cut too)
                await fetcher.fetch("Listener", 10, 0.1)
            assert await fetcher.fetch("Listener", 10, 0.1) == []  # reconnected; LISTENs again
            waiting = asyncio.create_task(fetcher.fetch("Listener", 10, 50))
            await asyncio.sleep(0.5)  # the fetcher found nothing and waits: for a minute, or a NOTIFY
            sent = Message(new_message_id(), "Sql.Ping", b"{}")
            await publisher.publish([sent])  # another process: only its NOTIFY reaches the fetcher
            got = await asyncio.wait_for(waiting, 10)
    assert [d.message.id for d in got] == [sent.id]


@pytest.mark.postgresql
async def test_fetchers_that_find_the_listen_connection_lost_together_open_one(postgresql_url: str) -> None:
    """Fetchers (a consumer and a reply channel) that see the LISTEN connection gone at once must not each
    open one: the one overwritten was never closed (the garbage collector's warning about a connection not
    checked in made `test_an_asker_that_lost_its_connection_gets_replies_again` fail now and then)."""
    async with FaultProxy(POSTGRESQL_PORT) as proxy:
        through_proxy = postgresql_url.replace(f":{POSTGRESQL_PORT}/", f":{proxy.port}/")
        async with SqlBroker(f"{through_proxy}?poll_max=0.05") as fetcher:
            await fetcher.bind("Listener", "Sql.Ping")
            proxy.reset()  # the LISTEN connection too
            with pytest.raises(BrokerUnavailable):
                await fetcher.fetch("Listener", 10, 0.1)
            lost = fetcher._notified  # what each fetcher that claimed rows now sees closed
            assert lost is not None
            assert lost.is_closed()
            await asyncio.gather(*(fetcher._listen_again() for _ in range(4)))  # as four fetchers at once
            assert fetcher.engine.pool.checkedout() == 1  # type: ignore[attr-defined]  # the LISTEN one


@pytest.mark.postgresql
async def test_a_big_publish_cancelled_anywhere_ends_at_once_and_the_broker_goes_on(
    postgresql_url: str,
) -> None:
    """The relay cancels a publish whose lease ran out: wherever the cancel lands in a batch bigger than the
    socket's buffers (500 x 32 KiB), it must end, not hang (asyncpg's executemany hung for good)."""
    async with SqlBroker(postgresql_url) as broker:
        await broker.bind("sub", "big")
        body = b"x" * 32768
        for cut in (0.005, 0.02, 0.05, 0.1, 0.2) * 4:
            messages = [Message(new_message_id(), "big", body, {}) for _ in range(500)]
            async with asyncio.timeout(
                PATIENCE
            ):  # a cancel ends at once; this only turns a hang into a failure
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(cut):
                        await broker.publish(messages)
        await broker.publish([after := Message(new_message_id(), "big", b'{"after": 1}', {})])
        async with asyncio.timeout(PATIENCE):  # behind what the publishes that went through left
            while after.id not in {d.message.id for d in await broker.fetch("sub", 1000, 0.5)}:
                pass
