"""Outages through the fault proxy (`tests/faultproxy.py`) between both services and the broker: a connection
reset, a stall longer than the heartbeat, the broker gone for a while and back (under 2 competing instances of
the subscriber, each of which must resume). The publisher keeps committing events through its outbox all
along; afterwards everything catches up, and the consumers resume by themselves (no process is restarted). The
SQLite broker is a local file, with no network to cut: it has no outage scenario. Kafka's clients connect to
the address the broker advertises, so each Kafka test starts a Tansu of its own behind its proxy, advertising
the proxy's address, and checks that Tansu accepted no other connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import pytest

from eventrelay import DistributedEventBus, Settings
from eventrelay.testing import wait_until_idle
from tests.brokers.kafka_server import accepted_connections
from tests.conftest import POSTGRESQL_PORT
from tests.faultproxy import FaultProxy
from tests.reliability.harness import FULL, SIZES, Report, Scenario, subscribe_ahead
from tests.reliability.under_test import BrokerUnderTest, server_behind

pytestmark = pytest.mark.reliability

LEAD = 0.5  # seconds of traffic before the fault
TAIL = 0.5  # seconds of traffic after it
HUNG = 3.0  # seconds a unit of work may wait while the broker hangs (a commit takes milliseconds)


# (fault, seconds, instances of the subscriber): a "down" outage hits competing instances, 2 in CI, 1 to 3 in
# the full run.
OUTAGES = [
    pytest.param("reset", 0.0, 1, id="reset"),
    pytest.param("stall", SIZES.stall, 1, id="stall"),
    *(pytest.param("down", SIZES.outage, n, id=f"down-{n}") for n in ((1, 2, 3) if FULL else (2,))),
]
KEYS = 60  # ordering keys of the events under competing instances: every Kafka partition gets some
MORE = 30  # events published after the outage while an instance has handled none since (Kafka: a late rejoin)


@pytest.mark.parametrize(("fault", "seconds", "instances"), OUTAGES)
async def test_an_outage_loses_nothing_and_everything_catches_up(
    fault: str,
    seconds: float,
    instances: int,
    network_broker: BrokerUnderTest,
    tmp_path_factory: pytest.TempPathFactory,
    report: Report,
) -> None:
    broker = network_broker
    events = int(SIZES.rate * (LEAD + seconds + TAIL))
    # A 1 s heartbeat (RabbitMQ) and ping interval (NATS), so that the stall outlasts it and the client drops
    # the connection. PostgreSQL and Redis have none: their connections wait out the stall.
    options = {"rabbitmq": {"heartbeat": 1}, "nats": {"ping_interval": 1}}.get(broker.kind, {})
    tansu = tmp_path_factory.mktemp("tansu")
    async with FaultProxy(broker.server_port or 0) as proxy, contextlib.AsyncExitStack() as stack:
        stack.enter_context(server_behind(proxy, broker, tansu))
        run = Scenario(
            tmp_path_factory.mktemp("outage"),
            broker,
            broker_url=broker.url(proxy.port, **options),
            # Competing instances get keyed events, spread over every partition: on Kafka a name's unkeyed
            # events share one partition (their order), which one member owns, and the others would idle.
            env={
                "RELIABILITY_RATE": str(SIZES.rate),
                **({"RELIABILITY_KEYS": str(KEYS)} if instances > 1 else {}),
            },
        )
        try:
            await subscribe_ahead(broker.url(proxy.port), broker.subscriber)
            # The publisher starts only once the subscriber has, so that the fault comes while it still
            # commits (a subscriber slow to start under load once let it commit every event before the fault).
            await run.subscribers(instances)
            before = await run.flowing(events, SIZES.rate * LEAD, "the fault")
            if fault != "reset":  # commits must go on during the fault: it comes while the publisher commits
                assert before.sent < events, "the publisher had committed every event before the fault"
            connections = proxy.connections
            if fault == "reset":
                proxy.reset()
            elif fault == "stall":
                proxy.stall()
                await asyncio.sleep(seconds)
                proxy.resume()
            else:
                async with proxy.down():
                    await asyncio.sleep(seconds)
            fault_end = time.time()
            during = await run.count()
            await run.all_delivered(events)
            resumed: list[int] = []
            if instances > 1:  # each competing instance resumes by itself
                events, resumed = await _every_instance_resumed(run, events, fault_end)
            codes, counts, recovery = await run.finish(events, fault_end)
        finally:
            await run.close()

    assert set(codes) == {0}, run.logs()[-3000:]
    assert all(not child.restarts for child in run.children), "a process had to be restarted"
    if fault != "reset":  # the relay holds no lock while the broker is away or hangs: commits go on
        assert during.sent > before.sent, "publishing through the outbox stopped during the outage"
    if fault == "down":
        assert during.outbox > 0, "events waited in the outbox"
    assert not broker.leaks(run.logs()), "a password reached a log"
    if broker.kind == "kafka":  # Tansu saw its readiness check, then the proxy's connections only
        accepted = accepted_connections(tansu)
        assert len(accepted) == 1 + proxy.connections, (
            f"a client went round the proxy: Tansu accepted {len(accepted)} connections, the proxy made "
            f"{proxy.connections} and the readiness check 1"
        )
    if fault != "stall":  # a stall shorter than a client's timeouts is waited out on the same connection
        assert proxy.connections > connections, "the services never reconnected"
    assert (counts.sent, counts.delivered) == (events, events), "an event was lost"
    assert counts.duplicates == 0, "an event took effect twice"
    assert counts.dead_letters == 0
    committed = during.sent - before.sent
    title = f"outage: {fault}" + (f" {seconds:g} s" if seconds else "")
    notes = f"{committed} committed during the fault; {proxy.connections - connections} new connections"
    if instances > 1:
        title += f", {instances} instances"
        notes = (
            f"{instances} instances, each handled events after it ({', '.join(map(str, resumed))}); {notes}"
        )
    report.counted(title, broker.kind, counts, recovery, notes)


async def _every_instance_resumed(run: Scenario, events: int, fault_end: float) -> tuple[int, list[int]]:
    """Wait until each instance of the subscriber has handled an event committed after the fault, publishing
    `MORE` at a time while one has not (a Kafka member that rejoins its group late gets its partitions after
    the others took the tail); the events committed in all, and the events each instance handled after it."""
    pids = [child.pid for child in run.children if child.name.startswith("subscriber")]
    rounds = 0

    async def resumed() -> list[int]:
        rows = dict(
            await run.rows(f"SELECT pid, count(*) FROM effects WHERE handled_at > {fault_end} GROUP BY pid")
        )
        return [int(rows.get(pid, 0)) for pid in pids]

    async def all_resumed() -> bool:
        nonlocal events, rounds
        if all(await resumed()):
            return True
        if (await run.count()).delivered >= events:  # all handled: publish more
            rounds += 1
            events += MORE
            run.publisher(events, name=f"publisher-more-{rounds}")
        return False

    await run.supervise(all_resumed, timeout=60, what="every instance handling events after the fault")
    return events, await resumed()


@pytest.mark.postgresql
@pytest.mark.parametrize(
    "database",
    ["sqlite", "postgresql"],
)
async def test_units_of_work_commit_while_the_broker_hangs(
    database: str, postgresql_url: str, tmp_path: Path
) -> None:
    """A stalled broker (a hung network: no reset, no refusal) must not hold up the service's own writes."""
    store = postgresql_url if database == "postgresql" else f"sqlite+aiosqlite:///{tmp_path}/service.db"
    async with FaultProxy(POSTGRESQL_PORT) as proxy:
        broker = postgresql_url.replace(f":{POSTGRESQL_PORT}/", f":{proxy.port}/")
        bus = DistributedEventBus("Hung", broker=broker, database=store, settings=Settings(fetch_timeout=0.2))
        async with bus:
            await bus.publish("Reliability.Ping", {"n": 0})  # the broker's connection is open and used
            await wait_until_idle(bus, timeout=30)
            proxy.stall()
            await bus.publish("Reliability.Ping", {"n": 1})  # the relay takes it and hangs in the broker
            await asyncio.sleep(0.5)
            writing = asyncio.create_task(bus.publish("Reliability.Ping", {"n": 2}))  # a unit of work
            done, _ = await asyncio.wait({writing}, timeout=HUNG)
            proxy.resume()
            await writing
    assert done, f"a unit of work waited more than {HUNG}s for a broker that hangs"
