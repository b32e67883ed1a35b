"""The scenarios of issue 9, their sizes, and what one round of each needs on the servers."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path

from bench import servers
from bench.child import Job
from eventrelay.brokers.rabbitmq import RabbitMQBroker

RAW, FASTSTREAM, EVENTRELAY = "raw aio-pika", "FastStream", "eventrelay"
SYSTEMS = (RAW, FASTSTREAM, EVENTRELAY)
"""The systems of the E1 rows."""
BARE_SQLITE = "bare sqlite3"
"""The E3 job written by hand with stdlib `sqlite3` (bench/bare_sqlite.py)."""
HAND_WRITTEN = "hand-written asyncpg+aio-pika"
"""The E2 job written by hand with asyncpg and aio-pika (bench/hand_written.py)."""
PLOTTED = (*SYSTEMS, BARE_SQLITE, HAND_WRITTEN)
"""Every system, in the order of the plot's bars."""
E1_RATE = 500.0
"""Events/s of the E1 latency runs: well under every system's throughput here, so latency is not queueing."""
DURABLE_RATE = 200.0
"""Events/s of the first latency row of each durable system (issue 16: a rate each system sustains); the
second runs at half the throughput of the same system's 1 event/UoW row in the same round."""
AT_RATE, AT_HALF = f"latency{DURABLE_RATE:.0f}", "latency-half"
"""The last part of the keys of those two rows, e.g. `e2.rabbitmq.latency200`, `e3.sqlite.latency-half`."""
IN_FLIGHT = 32
"""Requests awaiting their reply at once in the concurrent request/reply rows."""


@dataclass(frozen=True)
class Scenario:
    """One row of the table: a system measured one way on one broker, `n` events a round."""

    key: str
    """Stable id, e.g. `e2.rabbitmq.uow1` (select with `--only`)."""
    title: str
    """What the row measures, e.g. `E2 durable, 1 event/UoW, 8 publishers`."""
    measure: str
    """`throughput` (events/s end to end), `latency` (p50/p99 at a fixed rate), `backlog` (drain rate) or
    `requests` (request/reply round trips: their rate and their p50/p99, `window` at once)."""
    system: str
    broker: str
    """`rabbitmq`, `nats`, `redis`, `kafka` or `sqlite` (eventrelay's SQL broker on a SQLite file)."""
    n: int
    durable: bool = False
    per_unit: int = 1
    window: int = 500
    rate: float | None = None
    batch: bool = True
    """The consumer's `subscribe(..., batch=...)`: True (the default) handles the messages of one fetch in one
    unit of work; False gives each message a unit of work of its own."""
    half_of: str | None = None
    """For a latency row paced at half a measured throughput: the key of that throughput row (same system),
    which runs before it in each round. Its `rate` is None until the runner sets it (bench/run.py)."""

    @property
    def timeout(self) -> float:
        """How long a round may wait for its events: generous, but bounded (and longer by the time that
        pacing takes)."""
        return 60.0 + self.n / 250 + (self.n / self.rate if self.rate else 0.0)

    def scaled(self, factor: float) -> Scenario:
        """The same scenario with `factor` times the events (whole units of work, at least one per window)."""
        units = max(self.window, round(self.n * factor / self.per_unit))
        return replace(self, n=units * self.per_unit)


def _rabbitmq_direct() -> list[Scenario]:
    throughput = [
        Scenario("e1.rabbitmq.throughput", "E1 direct, throughput", "throughput", s, "rabbitmq", 20_000)
        for s in SYSTEMS
    ]
    latency = [
        Scenario(
            "e1.rabbitmq.latency",
            f"E1 direct, latency at {E1_RATE:,.0f}/s",
            "latency",
            s,
            "rabbitmq",
            int(6 * E1_RATE),
            window=100,
            rate=E1_RATE,
        )
        for s in SYSTEMS
    ]
    return throughput + latency


def _durable(broker: str, label: str, n: int, one_by_one: bool = False) -> list[Scenario]:
    """E2 (or E3) on `broker` with the default subscribe: throughput at 1 and 100 events/UoW, then commit to
    handler at `DURABLE_RATE` and at half the 1 event/UoW row's throughput (as many events as that row, so
    about twice its time). With `one_by_one`, the consumer's `batch=False` (a unit of work per message) again:
    its throughput rows and its latency at `DURABLE_RATE`."""
    uow1 = f"{label}.{broker}.uow1"
    latency = Scenario(
        f"{label}.{broker}.{AT_RATE}",
        f"{label.upper()} durable, commit to handler at {DURABLE_RATE:,.0f}/s",
        "latency",
        EVENTRELAY,
        broker,
        int(3 * DURABLE_RATE),
        durable=True,
        window=64,
        rate=DURABLE_RATE,
    )
    plain = [
        Scenario(
            uow1,
            f"{label.upper()} durable, 1 event/UoW, 8 publishers",
            "throughput",
            EVENTRELAY,
            broker,
            n,
            durable=True,
            window=8,
        ),
        Scenario(
            f"{label}.{broker}.uow100",
            f"{label.upper()} durable, 100 events/UoW, 2 publishers",
            "throughput",
            EVENTRELAY,
            broker,
            2 * n,
            durable=True,
            per_unit=100,
            window=2,
        ),
        latency,
        replace(
            latency,
            key=f"{label}.{broker}.{AT_HALF}",
            title=f"{label.upper()} durable, commit to handler at half the 1 event/UoW throughput",
            n=n,
            rate=None,
            half_of=uow1,
        ),
    ]
    if not one_by_one:
        return plain
    return plain + [
        replace(s, key=f"{s.key}.one-by-one", title=f"{s.title}, batch=False", batch=False)
        for s in plain
        if s.half_of is None
    ]


def _bare_sqlite(n: int) -> list[Scenario]:
    """The E3 throughput rows again, written by hand with stdlib `sqlite3`: same events, same windows."""
    return [
        Scenario(
            f"e3.sqlite.bare.uow{per_unit}",
            f"E3 durable, {per_unit} event{'s' if per_unit > 1 else ''}/UoW, {window} publishers",
            "throughput",
            BARE_SQLITE,
            "sqlite",
            n * (2 if per_unit > 1 else 1),
            durable=True,
            per_unit=per_unit,
            window=window,
        )
        for per_unit, window in ((1, 8), (100, 2))
    ]


def _hand_written(n: int) -> list[Scenario]:
    """The E2 rows on RabbitMQ again, written by hand with asyncpg and aio-pika: same events, same windows,
    with the per-fetch consumer (its half-rate latency row halves its own throughput); the throughput rows
    again with the per-message one."""

    def hand(key: str) -> str:
        return key.replace("e2.rabbitmq.", "e2.rabbitmq.hand.")

    per_fetch = [
        replace(s, key=hand(s.key), system=HAND_WRITTEN, half_of=hand(s.half_of) if s.half_of else None)
        for s in _durable("rabbitmq", "e2", n)
    ]
    return per_fetch + [
        replace(s, key=f"{s.key}.per-message", title=f"{s.title}, per message", batch=False)
        for s in per_fetch
        if s.measure == "throughput"
    ]


def _direct(broker: str) -> list[Scenario]:
    return [
        # A window of 64: eventrelay's Redis adapter fails past 100 publishes at once (redis-py's pool limit).
        Scenario(
            f"e1.{broker}.throughput",
            "E1 direct, throughput",
            "throughput",
            EVENTRELAY,
            broker,
            10_000,
            window=64,
        ),
        Scenario(
            f"e1.{broker}.latency",
            f"E1 direct, latency at {E1_RATE:,.0f}/s",
            "latency",
            EVENTRELAY,
            broker,
            int(6 * E1_RATE),
            window=64,  # as above
            rate=E1_RATE,
        ),
    ]


def _requests() -> list[Scenario]:
    """Issue 19: request/reply round trips, one at a time (their p50/p99 without queueing) and `IN_FLIGHT` at
    once (their rate); eventrelay's `bus.request` on RabbitMQ and NATS, FastStream's RPC on RabbitMQ."""
    modes = (
        ("sequential", "Request/reply, one at a time", 1_000, 1),
        ("concurrent", f"Request/reply, {IN_FLIGHT} in flight", 5_000, IN_FLIGHT),
    )
    return [
        Scenario(f"request.{broker}.{mode}", title, "requests", system, broker, n, window=window)
        for broker, systems in (("rabbitmq", (FASTSTREAM, EVENTRELAY)), ("nats", (EVENTRELAY,)))
        for mode, title, n, window in modes
        for system in systems
    ]


def all_scenarios(backlog: int) -> list[Scenario]:
    """Every scenario at its default size, in the order the table shows them."""
    found = (
        _rabbitmq_direct()
        + _durable("rabbitmq", "e2", 2_000, one_by_one=True)
        + _hand_written(2_000)
        + _durable("sqlite", "e3", 2_000, one_by_one=True)
        + _bare_sqlite(2_000)
    )
    for broker in ("nats", "redis", "kafka"):
        found += _direct(broker) + _durable(broker, "e2", 1_500)
    found += _requests()
    found.append(
        Scenario(
            "backlog.rabbitmq",
            f"Backlog of {backlog:,} drained",
            "backlog",
            EVENTRELAY,
            "rabbitmq",
            backlog,
            window=1000,
        )
    )
    return found


@dataclass
class Setup:
    """The jobs of one round, and what to delete after it."""

    consumer: Job
    publisher: Job
    databases: list[str]
    queues: list[str]
    exchanges: list[str]
    stream: str | None = None
    redis_prefix: str | None = None


def setup(scenario: Scenario, suffix: str, folder: Path, kafka: str | None) -> Setup:
    """Fresh names for one round of `scenario` (`suffix` is unique to the round)."""
    databases: list[str] = []
    queues: list[str] = []
    exchanges: list[str] = []
    stream = redis_prefix = None
    service, publisher = f"Bench.Order.{suffix}", f"Bench.Product.{suffix}"
    if scenario.system == BARE_SQLITE:
        url, destination = f"{folder}/broker.db", "queue"
    elif scenario.system == HAND_WRITTEN:
        url, destination = servers.AMQP, f"bench.hand.{suffix}"
        queues.append(destination)
    elif scenario.system != EVENTRELAY:
        url, destination = servers.AMQP, f"bench.{scenario.system.split()[0].lower()}.{suffix}"
        queues.append(destination)
    else:
        destination = service
        if scenario.broker == "rabbitmq":
            exchange = f"bench.{suffix}"
            url = f"{servers.AMQP}?exchange={exchange}&prefetch=1000"
            # Each bus declares its service's queue and retry queues, the publisher's too (its consumer runs
            # even without a handler): the adapter names the retry queues.
            retry_queues = RabbitMQBroker(url).retry_queues
            queues += [
                f"{exchange}.unrouted",
                service,
                *retry_queues(service),
                publisher,
                *retry_queues(publisher),
            ]
            exchanges += [exchange, f"{exchange}.unrouted"]
        elif scenario.broker == "nats":
            stream = f"BENCH_{suffix}"
            url = f"{servers.NATS}?stream={stream}&prefix=bench{suffix}"
        elif scenario.broker == "redis":
            redis_prefix = f"bench:{suffix}:"
            url = f"{servers.REDIS}?prefix={redis_prefix}"
        elif scenario.broker == "kafka":
            if kafka is None:
                raise RuntimeError("Kafka scenarios need Tansu running")
            # A 2 s session, as the tests use on Tansu: a new group waits a whole session to settle.
            url = f"kafka://{kafka}?topic_prefix=bench.{suffix}.&session_timeout=2"
        else:
            url = f"sqlite+aiosqlite:///{folder}/broker.db"
    consumer_db = publisher_db = None
    if scenario.system == BARE_SQLITE:
        consumer_db = f"{folder}/order.db"
    elif scenario.system == HAND_WRITTEN:
        databases = [f"bench_{suffix}_order", f"bench_{suffix}_product"]
        consumer_db, publisher_db = servers.postgres_dsn(databases[0]), servers.postgres_dsn(databases[1])
    elif scenario.durable and scenario.broker == "sqlite":
        consumer_db, publisher_db = (
            f"sqlite+aiosqlite:///{folder}/order.db",
            f"sqlite+aiosqlite:///{folder}/product.db",
        )
    elif scenario.durable:
        databases = [f"bench_{suffix}_order", f"bench_{suffix}_product"]
        consumer_db, publisher_db = servers.postgres_url(databases[0]), servers.postgres_url(databases[1])
    common = Job(
        batch=scenario.batch,
        n=scenario.n,
        url=url,
        destination=destination,
        publisher=publisher,
        timeout=scenario.timeout,
        latencies=scenario.measure == "latency",
    )
    return Setup(
        consumer=replace(common, database=consumer_db, go=scenario.measure != "backlog"),
        publisher=replace(
            common,
            publisher_database=publisher_db,
            per_unit=scenario.per_unit,
            window=scenario.window,
            rate=scenario.rate,
        ),
        databases=databases,
        queues=queues,
        exchanges=exchanges,
        stream=stream,
        redis_prefix=redis_prefix,
    )


@contextlib.asynccontextmanager
async def provisioned(plan: Setup) -> AsyncIterator[Setup]:
    """Create what a round needs on the servers, and delete all of it afterwards (each deletion is tried,
    even when one before it failed)."""
    async with contextlib.AsyncExitStack() as cleanup:
        if plan.redis_prefix:
            cleanup.push_async_callback(servers.delete_redis_keys, plan.redis_prefix)
        if plan.stream:
            cleanup.push_async_callback(servers.delete_nats_stream, plan.stream)
        if plan.queues or plan.exchanges:
            cleanup.push_async_callback(servers.delete_rabbitmq, plan.queues, plan.exchanges)
        if plan.databases:
            cleanup.push_async_callback(servers.drop_databases, *plan.databases)
            await servers.create_databases(*plan.databases)
        yield plan
