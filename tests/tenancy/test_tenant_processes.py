"""A database per tenant across real OS processes: the publisher is killed with SIGKILL while its relays drain
the tenants' outboxes; restarted, it sends what was left, and every committed event of every tenant takes
effect exactly once, in that tenant's database."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tests.tenancy.conftest import TENANTS, Databases, rows

EVENTS = 100  # per tenant, and as many for the host

APP = """
import asyncio
import json
import os
import sys

from sqlalchemy import Column, Integer, MetaData, String, Table, insert

from eventrelay import Context, Event, Settings, TenantDatabases
from eventrelay.service import Service
from eventrelay.sql import create_engine

DEFAULT = os.environ["TEST_DEFAULT_URL"]
TENANTS = json.loads(os.environ["TEST_TENANT_URLS"])
metadata = MetaData()
sent = Table("sent", metadata, Column("n", Integer, nullable=False), Column("tenant", String(50)))
effects = Table(
    "effects", metadata, Column("n", Integer, nullable=False), Column("tenant", String(50), nullable=False)
)


class Numbered(Event, name="TenantProcesses.Numbered"):
    n: int


async def apply(event: Numbered, context: Context) -> None:
    await context.session.execute(insert(effects).values(n=event.n, tenant=context.tenant_id or ""))
    await asyncio.sleep(0.001)


quick = Settings(relay_poll_interval=0.2, fetch_timeout=0.2, relay_batch_size=10)
common = dict(broker="sqlite+aiosqlite:///broker.db", database=DEFAULT, settings=quick)
publisher = Service("Publisher", tenants=TenantDatabases(TENANTS), **common)
subscriber = Service("Subscriber", tenants=TenantDatabases(TENANTS), handlers=[apply], **common)


async def create_tables() -> None:
    for url in [DEFAULT, *TENANTS.values()]:
        engine = create_engine(url)
        async with engine.begin() as connection:
            await connection.run_sync(metadata.create_all)
        await engine.dispose()


async def publish_all(count: int) -> None:
    bus = publisher.bus
    async with publisher:
        for n in range(count):
            for tenant in [None, *TENANTS]:
                async with bus.tenant(tenant), bus.unit_of_work() as uow:
                    await uow.session.execute(insert(sent).values(n=n, tenant=tenant))
                    await bus.publish(Numbered(n=n))
        while (await bus.store.outbox_backlog())[0]:
            await asyncio.sleep(0.05)


if __name__ == "__main__":
    asyncio.run(create_tables() if sys.argv[1] == "tables" else publish_all(int(sys.argv[2])))
"""


def _counts(dbs: Databases, table: str) -> dict[str | None, list[tuple[object, ...]]]:
    """The rows of `table` in each database, by tenant (None: the default database)."""

    async def read() -> dict[str | None, list[tuple[object, ...]]]:
        urls: dict[str | None, str] = {None: dbs.default}
        urls.update(dbs.tenants)
        return {t: await rows(url, f"SELECT * FROM {table}") for t, url in urls.items()}

    return asyncio.run(read())


def _wait_for(what: str, timeout: float, check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def test_a_publisher_killed_mid_drain_sends_every_tenant_s_events_once(
    databases: Databases, tmp_path: Path
) -> None:
    (tmp_path / "app.py").write_text(APP)
    env = {
        **os.environ,
        "PYTHONPATH": str(tmp_path),
        "TEST_DEFAULT_URL": databases.default,
        "TEST_TENANT_URLS": json.dumps(databases.tenants),
    }

    def app(*args: str) -> list[str]:
        return [sys.executable, "app.py", *args]

    subprocess.run(app("tables"), check=True, timeout=60, cwd=tmp_path, env=env)
    log = tmp_path / "subscriber.log"
    with open(log, "ab") as err:
        subscriber = [sys.executable, "-m", "eventrelay", "run", "app:subscriber"]
        consumer = subprocess.Popen(subscriber, stderr=err, cwd=tmp_path, env=env)
    try:
        _wait_for("the subscriber to start", 60, lambda: "Subscriber started" in log.read_text())
        publisher = subprocess.Popen(app("publish", str(EVENTS)), cwd=tmp_path, env=env)

        def a_third() -> bool:
            return sum(map(len, _counts(databases, "effects").values())) >= EVENTS * 4 // 3

        _wait_for("a third of the effects", 120, a_third)
        publisher.send_signal(signal.SIGKILL)  # mid-drain: rows committed, some sent, some not
        publisher.wait(timeout=30)
        # Restarted, it publishes nothing new: its relays send what the outboxes still hold.
        subprocess.run(app("publish", "0"), check=True, timeout=120, cwd=tmp_path, env=env)

        def all_applied() -> bool:
            sent, effects = _counts(databases, "sent"), _counts(databases, "effects")
            return all(len(effects[t]) >= len(sent[t]) for t in sent)

        _wait_for("every committed event's effect", 120, all_applied)
        time.sleep(1.0)  # a duplicate still under way would land now
    finally:
        consumer.send_signal(signal.SIGTERM)
        consumer.wait(timeout=30)
    sent, effects = _counts(databases, "sent"), _counts(databases, "effects")
    for tenant in (None, *TENANTS):
        committed = sorted(int(str(n)) for n, _ in sent[tenant])
        assert sorted(int(str(n)) for n, _ in effects[tenant]) == committed, (
            f"{tenant}: lost or applied twice"
        )
        assert {t for _, t in effects[tenant]} == {tenant or ""}  # none of another tenant's
        assert len(committed) >= EVENTS // 3
