"""The session-end leftover check: a test deletes what it made on the shared servers, and a run proves it.

At session start (on the xdist controller, or the only process) :func:`take` lists what each server holds:
RabbitMQ queues and exchanges of the default vhost (by ``rabbitmqctl``: AMQP cannot list), NATS JetStream
streams (KV buckets and object stores are streams too), Redis keys in every database, PostgreSQL and MariaDB
databases, and the tables of their shared ``test`` databases. At session end :func:`check` lists them again;
anything new is a leftover, printed by server. Under ``CI=true`` the run then fails.

Only servers that answer are listed; one that does not is skipped quietly, unless servers are required
(``CI=true`` or ``EVENTRELAY_REQUIRE_SERVERS=1``), when that is reported (and fails under CI) too.

Limitation: the servers are shared, and the names the tests (and ``bench/``) make follow no single prefix, so
the check cannot tell this run's objects from those of another process working at the same time (another
test run, a developer's ``make bench``). Under CI it waits up to :data:`LINGER` seconds for new objects to go
away before it reports them, which lets another run finish the tests it had in flight; what another process
leaves behind during this run (or keeps longer) is still reported here.

``python -m tests.leftovers`` prints what the servers hold now.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import asyncmy
import asyncpg
import nats
import redis.asyncio as aioredis

from tests.server_process import accepts
from tests.servers import servers_required

HOST = "127.0.0.1"
LINGER = 60.0
"""Seconds (under CI) that new objects may take to go away before they count as leftovers."""
SHOWN = 20
"""Names printed per kind; the rest are counted."""

Inventory = dict[str, frozenset[str]]
"""Kind of objects (``"RabbitMQ queues"``) -> the names the server holds."""


@dataclass
class Snapshot:
    """What the servers that answered hold, and why any server could not be listed."""

    objects: Inventory = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


@dataclass
class Leftovers:
    """New objects by kind, and what could not be checked."""

    objects: Inventory
    problems: list[str]

    def __bool__(self) -> bool:
        return bool(self.objects or self.problems)

    def lines(self) -> list[str]:
        """A readable report: each kind of object with its names."""
        found = []
        for kind, names in sorted(self.objects.items()):
            found.append(f"{kind} ({len(names)}):")
            shown = sorted(names)
            found += [f"    {name}" for name in shown[:SHOWN]]
            if len(shown) > SHOWN:
                found.append(f"    ... and {len(shown) - SHOWN} more")
        found += [f"not checked: {problem}" for problem in self.problems]
        return found


async def _rabbitmqctl(what: str) -> frozenset[str]:
    command = shutil.which("rabbitmqctl")
    if command is None:
        raise RuntimeError("rabbitmqctl is not on PATH (AMQP cannot list queues)")
    process = await asyncio.create_subprocess_exec(
        command, "-q", what, "name", "--formatter", "json",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(process.communicate(), 60)
    except TimeoutError:
        process.kill()
        raise
    if process.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {what} failed: {err.decode(errors='replace').strip()}")
    return frozenset(str(row["name"]) for row in json.loads(out or b"[]"))


async def _rabbitmq() -> Inventory:
    queues, exchanges = await asyncio.gather(_rabbitmqctl("list_queues"), _rabbitmqctl("list_exchanges"))
    return {"RabbitMQ queues": queues, "RabbitMQ exchanges": exchanges}


async def _nats() -> Inventory:
    client = await nats.connect(f"nats://{HOST}:4222", connect_timeout=5, allow_reconnect=False)
    try:
        streams: set[str] = set()
        while page := await client.jetstream().streams_info(offset=len(streams)):  # pages of 256
            if not {info.config.name or "" for info in page} - streams:
                break
            streams |= {info.config.name or "" for info in page}
        return {"NATS streams": frozenset(streams)}
    finally:
        await client.close()


async def _redis() -> Inventory:
    keys: set[str] = set()
    client = aioredis.from_url(f"redis://{HOST}:6379/0")
    try:
        databases = [int(db.removeprefix("db")) for db in await client.info("keyspace")]
    finally:
        await client.aclose()
    for db in databases:
        client = aioredis.from_url(f"redis://{HOST}:6379/{db}")
        try:
            prefix = "" if db == 0 else f"(db {db}) "
            keys |= {
                prefix + key.decode(errors="backslashreplace") async for key in client.scan_iter(count=1000)
            }
        finally:
            await client.aclose()
    return {"Redis keys": frozenset(keys)}


async def _postgresql() -> Inventory:
    errors = []
    for user in ("postgres", "root"):  # as tests/conftest.py: the superuser's name differs by set-up
        try:
            admin = await asyncpg.connect(host=HOST, port=5432, user=user, database="postgres", timeout=5)
        except (OSError, asyncpg.PostgresError) as exc:
            errors.append(f"{user}: {exc}")
            continue
        try:
            databases = frozenset(
                row["datname"] for row in await admin.fetch("SELECT datname FROM pg_database")
            )
        finally:
            await admin.close()
        tables = []
        if "test" in databases:
            test = await asyncpg.connect(host=HOST, port=5432, user=user, database="test", timeout=5)
            try:
                tables = await test.fetch(
                    "SELECT schemaname || '.' || tablename AS name FROM pg_tables"
                    " WHERE schemaname NOT IN ('pg_catalog', 'information_schema')"
                )
            finally:
                await test.close()
        return {
            "PostgreSQL databases": databases,
            "PostgreSQL tables in database test": frozenset(row["name"] for row in tables),
        }
    raise RuntimeError(f"cannot log in: {'; '.join(errors)}")


async def _mariadb() -> Inventory:
    connection = await asyncmy.connect(host=HOST, port=3306, user="root", password="", connect_timeout=5)
    try:
        async with connection.cursor() as cursor:
            await cursor.execute("SHOW DATABASES")
            databases = frozenset(str(row[0]) for row in await cursor.fetchall())
            await cursor.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'test'"
            )
            tables = frozenset(str(row[0]) for row in await cursor.fetchall())
    finally:
        await connection.ensure_closed()
    return {"MariaDB databases": databases, "MariaDB tables in database test": tables}


SERVERS: dict[str, tuple[int, Callable[[], Awaitable[Inventory]]]] = {
    "RabbitMQ": (5672, _rabbitmq),
    "NATS": (4222, _nats),
    "Redis": (6379, _redis),
    "PostgreSQL": (5432, _postgresql),
    "MariaDB": (3306, _mariadb),
}


async def _snapshot() -> Snapshot:
    snapshot = Snapshot()
    up = {name: list_ for name, (port, list_) in SERVERS.items() if accepts(port, timeout=1.0)}
    if servers_required():
        snapshot.problems += [f"{name} is not reachable" for name in SERVERS if name not in up]
    results = await asyncio.gather(*(list_() for list_ in up.values()), return_exceptions=True)
    for name, result in zip(up, results, strict=True):
        if isinstance(result, BaseException):
            snapshot.problems.append(f"could not list {name}'s objects: {result!r}")
        else:
            snapshot.objects |= result
    return snapshot


def take() -> Snapshot:
    """What the servers hold now (listed in a thread of its own, away from any test's event loop)."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, _snapshot()).result()


def check(before: Snapshot, *, linger: float = 0.0) -> Leftovers:
    """What the servers hold that they did not hold at `before`; with `linger`, what is still there after
    waiting up to that many seconds for new objects to go away (another process's, still at work)."""
    deadline = time.monotonic() + linger
    while True:
        now = take()
        new = {
            kind: names - before.objects[kind]
            for kind, names in now.objects.items()
            if kind in before.objects and names - before.objects[kind]
        }
        if not new or time.monotonic() >= deadline:
            return Leftovers(new, list(dict.fromkeys(before.problems + now.problems)))
        time.sleep(2.0)


def under_ci() -> bool:
    return os.environ.get("CI") == "true"


if __name__ == "__main__":
    snapshot = take()
    for kind, names in sorted(snapshot.objects.items()):
        print(f"{kind} ({len(names)}): {', '.join(sorted(names))}")
    for problem in snapshot.problems:
        print(problem)
