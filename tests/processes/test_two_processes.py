"""Two services as real OS processes on one broker: the subscriber is killed with SIGKILL mid-stream and
restarted, and still every committed event takes effect exactly once."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

EVENTS = 300

APP = """
import asyncio
import os

from sqlalchemy import Column, Integer, MetaData, String, Table, insert

from eventrelay import Context, Event, Settings
from eventrelay.service import Service

BROKER = os.environ["TEST_BROKER_URL"]
metadata = MetaData()
sent = Table("sent", metadata, Column("n", Integer, nullable=False))
effects = Table("effects", metadata, Column("n", Integer, nullable=False), Column("message_id", String(64)))


class Numbered(Event, name="Test.Numbered"):
    n: int


async def apply(event: Numbered, context: Context) -> None:
    await context.session.execute(insert(effects).values(n=event.n, message_id=context.message_id))
    await asyncio.sleep(0.002)  # a handler that takes a moment, so a kill lands inside one


quick = Settings(relay_poll_interval=0.2, fetch_timeout=0.2)
publisher = Service("Publisher", database="sqlite+aiosqlite:///publisher.db", broker=BROKER, settings=quick)
subscriber = Service(
    "Subscriber",
    database="sqlite+aiosqlite:///subscriber.db",
    broker=BROKER,
    handlers=[apply],
    settings=quick,
)


async def create_tables(service: Service) -> None:
    async with service.bus.store.engine.begin() as conn:  # type: ignore[attr-defined]
        await conn.run_sync(metadata.create_all)


async def publish_all(count: int) -> None:
    await create_tables(publisher)
    async with publisher:
        for n in range(count):
            async with publisher.bus.unit_of_work() as uow:
                await uow.session.execute(insert(sent).values(n=n))
                await publisher.bus.publish(Numbered(n=n))


if __name__ == "__main__":
    import sys

    if sys.argv[1] == "tables":
        asyncio.run(create_tables(subscriber))
    else:
        asyncio.run(publish_all(int(sys.argv[2])))
"""


def _count(db: Path, query: str) -> int:
    if not db.exists():
        return 0
    with sqlite3.connect(db, timeout=30) as conn:
        try:
            return int(conn.execute(query).fetchone()[0])
        except sqlite3.OperationalError:  # the table is not there yet
            return 0


def _wait_for(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _start_subscriber(cwd: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with open(cwd / "subscriber.log", "ab") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "eventrelay", "run", "app:subscriber"],
            cwd=cwd,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )


def _scenario(tmp_path: Path, broker_url: str) -> None:
    (tmp_path / "app.py").write_text(APP)
    env = {**os.environ, "TEST_BROKER_URL": broker_url, "PYTHONPATH": str(tmp_path)}
    subscriber_db = tmp_path / "subscriber.db"
    subprocess.run([sys.executable, "app.py", "tables"], cwd=tmp_path, env=env, check=True, timeout=60)

    consumer = _start_subscriber(tmp_path, env)
    # Its subscription exists from its first start on (as a RabbitMQ queue does); publish after that.
    log = tmp_path / "subscriber.log"
    _wait_for(lambda: "Subscriber started" in log.read_text(), 60, "the subscriber to start")
    publisher = subprocess.Popen([sys.executable, "app.py", "publish", str(EVENTS)], cwd=tmp_path, env=env)
    try:
        _wait_for(lambda: _count(subscriber_db, "SELECT count(*) FROM effects") >= EVENTS // 3, 60, "a third")
        consumer.send_signal(signal.SIGKILL)  # mid-stream, most likely mid-handler
        consumer.wait(timeout=10)
        consumer = _start_subscriber(tmp_path, env)
        assert publisher.wait(timeout=120) == 0
        distinct = "SELECT count(DISTINCT n) FROM effects"
        _wait_for(
            lambda: _count(subscriber_db, distinct) == EVENTS,
            120,
            "every event",
        )
    finally:
        publisher.kill()
        consumer.send_signal(signal.SIGTERM)
        stopped = consumer.wait(timeout=60)
    assert stopped == 0, (tmp_path / "subscriber.log").read_text()[-3000:]
    assert "locked" not in log.read_text()  # SQLite's "database is locked" never reaches a user
    assert _count(tmp_path / "publisher.db", "SELECT count(*) FROM sent") == EVENTS
    assert _count(subscriber_db, "SELECT count(*) FROM effects") == EVENTS  # none applied twice
    assert _count(subscriber_db, "SELECT count(DISTINCT message_id) FROM effects") == EVENTS


@pytest.mark.slow
def test_sigkilled_subscriber_loses_nothing_on_the_sqlite_broker(tmp_path: Path) -> None:
    _scenario(tmp_path, f"sqlite+aiosqlite:///{tmp_path}/broker.db?lease=2")


@pytest.mark.slow
@pytest.mark.postgresql
def test_sigkilled_subscriber_loses_nothing_on_the_postgresql_broker(
    tmp_path: Path, postgresql_url: str
) -> None:
    _scenario(tmp_path, f"{postgresql_url}?lease=2")
