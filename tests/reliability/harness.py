"""The scenario harness of the reliability suite: services as real OS processes, faults, and the figures.

A `Scenario` copies `scenario_app.py` into the test's folder as `app.py`, creates the business tables, and
runs the publisher and the subscriber as processes (`Child`). `Scenario.supervise` restarts a process that
killed itself at one of its kill points (SIGKILL, see `scenario_app.py`) until a condition holds.
`Scenario.count` reads the two databases: events committed (`sent`), effects present, effects applied more
than once, dead letters. A test asserts the exact expectation and records `Figures`, which `conftest.py`
writes to a JSON file and prints as a table at the end of the run; `report.py` renders that file for
`docs/reliability.md`.

Sizes: the CI run (`make test`) is bounded; `EVENTRELAY_RELIABILITY_FULL=1` (`make reliability`) runs the
sizes of issues 8 and 21 (a 10 s outage, a 1,000,000-event backlog). `SIZES` holds the ones in force.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from eventrelay.brokers import broker_from_url
from eventrelay.envelope import Message
from eventrelay.sql import READ_ONLY, create_engine
from tests.reliability.children import Child
from tests.reliability.under_test import BrokerUnderTest

EVENT = "Reliability.Numbered"
APP = Path(__file__).with_name("scenario_app.py")
FULL = os.environ.get("EVENTRELAY_RELIABILITY_FULL") == "1"
REPORT_ENV = "EVENTRELAY_RELIABILITY_REPORT"


@dataclass(frozen=True)
class Sizes:
    """How big each scenario is. CI keeps the suite within minutes; the full run is issues 8 and 21's."""

    events: int  # numbered events per crash, graceful-stop and poison scenario
    kills: int  # SIGKILLs per crash scenario, at distinct points
    rate: float  # events per second published during an outage scenario
    outage: float  # seconds the broker is gone
    stall: float  # seconds no byte flows (longer than the RabbitMQ heartbeat of 1 s)
    backlog: int  # events waiting before the subscriber starts
    backlog_pad: int  # bytes of padding per backlog event
    fuzz_examples: int  # hypothesis examples per broker adapter


CI_SIZES = Sizes(
    events=120, kills=2, rate=100, outage=3.0, stall=3.0, backlog=600, backlog_pad=32768, fuzz_examples=30
)
FULL_SIZES = Sizes(
    events=1000,
    kills=4,
    rate=100,
    outage=10.0,
    stall=10.0,
    backlog=1_000_000,
    backlog_pad=1024,
    fuzz_examples=200,
)
SIZES = FULL_SIZES if FULL else CI_SIZES


def report_path() -> Path:
    """Where the suite writes its figures (JSON): `$EVENTRELAY_RELIABILITY_REPORT` or a fixed temp file."""
    default = Path(os.environ.get("TMPDIR", "/tmp")) / "eventrelay-reliability.json"
    return Path(os.environ.get(REPORT_ENV, default))


# --- figures ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Figures:
    """One row of the report: a scenario on a broker."""

    scenario: str
    broker: str
    sent: int  # events committed (or injected)
    delivered: int  # events whose effect exists
    duplicates: int  # effects applied more than once
    dead_letters: int
    recovery_s: float | None  # from the end of the fault until everything committed before it took effect
    notes: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Report:
    """The figures of one pytest session, with the sizes they were measured at.

    Kept in the config's stash (`REPORT`). Under pytest-xdist each worker hands its rows to the controller,
    which writes the JSON file and prints the table (`tests/conftest.py`).
    """

    rows: list[Figures] = field(default_factory=list)

    def add(self, figures: Figures) -> Figures:
        self.rows.append(figures)
        print(f"figures: {json.dumps(figures.as_dict())}")  # also in the test's own output
        return figures

    def counted(self, scenario: str, broker: str, counts: Counts, recovery: float, notes: str) -> Figures:
        """Add the row of a scenario whose figures are a `Scenario.count()`."""
        return self.add(
            Figures(
                scenario,
                broker,
                counts.sent,
                counts.delivered,
                counts.duplicates,
                counts.dead_letters,
                round(recovery, 2),
                notes,
            )
        )

    def rows_json(self) -> str:
        return json.dumps([row.as_dict() for row in self.rows])

    def add_json(self, rows: str) -> None:
        self.rows.extend(Figures(**row) for row in json.loads(rows))

    def as_dict(self) -> dict[str, Any]:
        return {
            "full": FULL,
            "sizes": asdict(SIZES),
            "rows": [row.as_dict() for row in self.rows],
        }


REPORT = pytest.StashKey[Report]()


# --- processes --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Counts:
    sent: int
    effects: int  # rows in `effects`
    delivered: int  # distinct events with an effect
    dead_letters: int
    outbox: int

    @property
    def duplicates(self) -> int:
        return self.effects - self.delivered


BUSINESS_TABLES = {
    "publisher.db": "CREATE TABLE sent (n INTEGER PRIMARY KEY, committed_at FLOAT NOT NULL)",
    "subscriber.db": (
        "CREATE TABLE effects (id INTEGER PRIMARY KEY AUTOINCREMENT, n INTEGER NOT NULL, "
        "message_id VARCHAR(64) NOT NULL, attempt INTEGER NOT NULL, handled_at FLOAT NOT NULL, "
        "pid INTEGER NOT NULL)"
    ),
}


class Scenario:
    """The publisher and the subscriber of one test, as processes in `folder` on `broker_url`."""

    def __init__(
        self,
        folder: Path,
        broker: BrokerUnderTest,
        *,
        broker_url: str | None = None,
        kill: str = "",
        publisher_settings: Mapping[str, Any] | None = None,
        subscriber_settings: Mapping[str, Any] | None = None,
        subscriber_database: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.folder = folder
        self.broker = broker
        self.broker_url = broker_url or broker.url()
        shutil.copy(APP, folder / "app.py")
        for name, ddl in BUSINESS_TABLES.items():
            if name == "subscriber.db" and subscriber_database is not None:
                continue
            with sqlite3.connect(folder / name) as conn:
                conn.execute(ddl)
        self.env = {
            **os.environ,
            "PYTHONPATH": str(folder),
            "RELIABILITY_DIR": str(folder),
            "RELIABILITY_BROKER_URL": self.broker_url,
            "RELIABILITY_PUBLISHER": broker.publisher,
            "RELIABILITY_SUBSCRIBER": broker.subscriber,
            "RELIABILITY_KILL": kill,
            "RELIABILITY_PUBLISHER_SETTINGS": json.dumps(dict(publisher_settings or {})),
            "RELIABILITY_SUBSCRIBER_SETTINGS": json.dumps(dict(subscriber_settings or {})),
            **(env or {}),
        }
        if subscriber_database is not None:
            self.env["RELIABILITY_SUBSCRIBER_DATABASE"] = subscriber_database
        self.publisher_db = create_engine(f"sqlite+aiosqlite:///{folder / 'publisher.db'}")
        self.subscriber_db = create_engine(
            subscriber_database or f"sqlite+aiosqlite:///{folder}/subscriber.db"
        )
        self.children: list[Child] = []

    # --- the processes -----------------------------------------------------------------------------------

    def _child(self, name: str, argv: list[str], env: Mapping[str, str], finite: bool = False) -> Child:
        child = Child(name, argv, self.folder, {**self.env, **env}, finite)
        self.children.append(child)
        return child.start()

    def subscriber(self, name: str = "subscriber", **env: str) -> Child:
        """`eventrelay run app:subscriber`."""
        return self._child(name, [sys.executable, "-m", "eventrelay", "run", "app:subscriber"], env)

    async def subscribers(self, instances: int = 1) -> list[Child]:
        """Start `instances` subscribers (`subscriber`, or `subscriber-0`, `subscriber-1`, ...); return once
        each has started, so that events flow as soon as they are committed and none joins while they flow."""
        names = ["subscriber"] if instances == 1 else [f"subscriber-{i}" for i in range(instances)]
        children = [self.subscriber(name) for name in names]

        async def started() -> bool:
            return all(" started: " in child.tail(10**8) for child in children)

        await self.supervise(started, timeout=60, what=f"{instances} subscriber(s) started")
        return children

    async def flowing(self, events: int, before: float, what: str) -> Counts:
        """Start the publisher of `events` and return the counts once `before` of them took effect: a fault
        that comes then comes while the publisher still commits."""
        self.publisher(events)

        async def flowed() -> bool:
            return (await self.count()).delivered >= before

        await self.supervise(flowed, timeout=60, what=f"events flowing before {what}")
        return await self.count()

    def relay(self, name: str = "relay", **env: str) -> Child:
        """`eventrelay run app:publisher`: the publisher's relay."""
        return self._child(name, [sys.executable, "-m", "eventrelay", "run", "app:publisher"], env)

    def publisher(self, count: int, *, relay: bool = True, name: str = "publisher", **env: str) -> Child:
        """`python app.py publish COUNT`: commits the events not committed yet, then waits for its relay."""
        argv = [sys.executable, "app.py", "publish", str(count), *([] if relay else ["--no-relay"])]
        return self._child(name, argv, env, finite=True)

    async def cli(self, *args: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run the `eventrelay` command in the scenario's folder (stdout and stderr captured), in a thread:
        the event loop goes on serving the fault proxies meanwhile."""
        return await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "eventrelay", *args],
            cwd=self.folder,
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=120,
        )

    async def supervise(
        self,
        done: Callable[[], Awaitable[bool]],
        *,
        timeout: float,
        what: str,
        on_kill: Callable[[Child], Awaitable[None]] | None = None,
        interval: float = 0.05,
    ) -> float:
        """Restart the processes that killed themselves (but those not `supervised`) until `done()`; return
        the seconds it took.

        `on_kill(child)` runs when a kill is noticed, before the restart: to look at what the kill left.
        `done()` is asked every `interval` seconds.
        """
        started = time.monotonic()
        while True:
            for child in self.children:
                if child.killed() and child.supervised:
                    if on_kill is not None:
                        await on_kill(child)
                    child.restart()
            if await done():
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                logs = "\n".join(f"--- {c.name}:\n{c.tail(2500)}" for c in self.children)
                raise AssertionError(
                    f"timed out after {timeout}s waiting for {what}: {await self.count()}\n{logs}"
                )
            await asyncio.sleep(interval)

    async def all_delivered(
        self,
        count: int,
        timeout: float = 120.0,
        on_kill: Callable[[Child], Awaitable[None]] | None = None,
        kills: int = 0,
    ) -> float:
        """Supervise until `count` events are committed and each has its effect, and the processes have
        taken `kills` kills and been restarted after each (a kill after a commit, before the ack, can come
        when every effect is there already)."""

        async def done() -> bool:
            if sum(len(child.restarts) for child in self.children) < kills:
                return False
            if any(child.restarts and not child.started_again() for child in self.children):
                return False  # a SIGTERM before its signal handlers are set would end it with -15
            [effects] = await _scalars(self.subscriber_db, "SELECT count(*) FROM effects")
            if effects < count:  # the cheap question first: a big backlog makes the exact one slow
                return False
            counts = await self.count()
            return counts.sent >= count and counts.delivered >= counts.sent

        interval = 0.05 if count < 10_000 else 0.5  # asking costs the machine's CPU too
        return await self.supervise(
            done, timeout=timeout, what=f"{count} events delivered", on_kill=on_kill, interval=interval
        )

    async def finish(self, events: int, fault_end: float) -> tuple[list[int], Counts, float]:
        """Once all `events` took effect: stop the processes; their exit codes, the counts, and the recovery
        from `fault_end`."""
        await self.all_delivered(events)
        codes = await self.stop()
        return codes, await self.count(), await self.recovery(fault_end)

    async def stop(self, *children: Child) -> list[int]:
        """SIGTERM `children` at once; their exit codes. By default: wait for the commands that end by
        themselves (the publisher), then stop the services; the exit codes of all."""
        if children:
            return list(await asyncio.gather(*(child.stop() for child in children)))
        codes = {child: await child.wait(120) for child in self.children if child.finite}
        services = [child for child in self.children if not child.finite]
        codes |= dict(zip(services, await asyncio.gather(*(child.stop() for child in services)), strict=True))
        return [codes[child] for child in self.children]

    async def close(self) -> None:
        for child in self.children:
            child.kill()
        await self.publisher_db.dispose()
        await self.subscriber_db.dispose()

    def logs(self) -> str:
        return "".join(child.log.read_text(errors="replace") for child in self.children if child.log.exists())

    # --- what happened -----------------------------------------------------------------------------------

    async def count(self) -> Counts:
        sent, outbox = await _scalars(
            self.publisher_db, "SELECT count(*) FROM sent", "SELECT count(*) FROM eventrelay_outbox"
        )
        effects, delivered, dead = await _scalars(
            self.subscriber_db,
            "SELECT count(*) FROM effects",
            "SELECT count(DISTINCT n) FROM effects",
            "SELECT count(*) FROM eventrelay_dead_letters",
        )
        return Counts(sent, effects, delivered, dead, outbox)

    async def rows(self, query: str, database: str = "subscriber") -> list[tuple[Any, ...]]:
        engine = self.subscriber_db if database == "subscriber" else self.publisher_db
        async with engine.connect() as conn:
            conn = await conn.execution_options(**READ_ONLY)
            return [tuple(row) for row in await conn.execute(text(query))]

    async def outbox_numbers(self) -> set[int]:
        """The numbers of the events still in the publisher's outbox."""
        return {
            json.loads(body)["n"]
            for (body,) in await self.rows("SELECT body FROM eventrelay_outbox", "publisher")
        }

    async def effects_of(self, n: int) -> int:
        """How many times event `n` took effect."""
        [(count,)] = await self.rows(f"SELECT count(*) FROM effects WHERE n = {int(n)}")
        return int(count)

    def kills(self, point: str) -> list[dict[str, Any]]:
        """The kill points taken (`scenario_app.die_if`), oldest first, each with its `n` and `time`."""
        taken = []
        for marker in self.folder.glob(f"killed-{point}-*.json"):
            details = json.loads(marker.read_text())
            taken.append({"n": int(marker.stem.rpartition("-")[2]), **details})
        return sorted(taken, key=lambda k: float(k["time"]))

    async def recovery(self, fault_end: float) -> float:
        """Seconds from `fault_end` (epoch) until every event committed before it had taken effect."""
        committed = await self.rows("SELECT n, committed_at FROM sent", "publisher")
        handled = dict(await self.rows("SELECT n, min(handled_at) FROM effects GROUP BY n"))
        before = [n for n, at in committed if at <= fault_end]
        missing = [n for n in before if n not in handled]
        assert not missing, f"events committed before the fault never took effect: {missing[:10]}"
        return float(max([0.0, *(handled[n] - fault_end for n in before)]))


async def _scalars(engine: AsyncEngine, *queries: str) -> list[int]:
    """Each query's single number; 0 while its table does not exist yet (the service has not started)."""
    values = []
    async with engine.connect() as conn:
        conn = await conn.execution_options(**READ_ONLY)
        for query in queries:
            try:
                values.append(int((await conn.execute(text(query))).scalar_one()))
            except Exception as exc:
                if "no such table" not in str(exc) and "does not exist" not in str(exc):
                    raise
                values.append(0)
                await conn.rollback()
    return values


def adapter_kind(url: str) -> str:
    """The broker kind of a URL, as the report names it (`amqp://` is rabbitmq, `sqlite+aiosqlite` sqlite)."""
    scheme = url.partition(":")[0].partition("+")[0]
    return {"amqp": "rabbitmq"}.get(scheme, scheme)


async def subscribe_ahead(url: str, subscriber: str, *names: str) -> None:
    """Create `subscriber`'s subscription now, as its first start would, so that publishing may start at once
    (a subscription exists from a service's first start on; what is published before is not kept for it)."""
    async with broker_from_url(url) as broker:
        for name in names or (EVENT,):
            await broker.bind(subscriber, name)


async def inject(url: str, messages: Sequence[Message]) -> None:
    """Publish `messages` raw through the broker adapter of `url`, as a foreign or broken publisher would."""
    async with broker_from_url(url) as broker:
        await broker.publish(messages)


def spread(count: int, among: int, *, align: int = 1, offset: int = 0) -> list[int]:
    """`among` event numbers spread evenly over `count` (each rounded down to `align`, plus `offset`)."""
    return [(count * (i + 1) // (among + 1)) // align * align + offset for i in range(among)]


def kill_spec(**points: list[int]) -> str:
    """`RELIABILITY_KILL` for `scenario_app`: e.g. kill_spec(handler=[40, 130]) -> "handler:40,130"."""
    return ";".join(f"{point}:{','.join(map(str, numbers))}" for point, numbers in points.items())
