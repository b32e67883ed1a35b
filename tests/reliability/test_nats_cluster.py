"""A node of a three-node NATS JetStream cluster (`tests/nats_cluster.py`) dies by SIGKILL while the publisher
commits, and comes back on its store folder: the services reach the cluster through a multi-host URL, the
stream (and so its consumers) has three replicas. The publisher keeps committing, nothing is lost, nothing
takes effect twice, and no process is restarted.

Two victims: the stream's leader (the worst case: every publish and every consumer on it must wait for a new
leader), and the node the services are connected to (their connections break; nats-py reconnects to another
host of the URL).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import nats
import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client
from nats.js import api

from tests.nats_cluster import NatsCluster, nats_cluster
from tests.reliability.harness import FULL, SIZES, Report, Scenario, subscribe_ahead
from tests.reliability.under_test import BrokerUnderTest

pytestmark = [pytest.mark.reliability, pytest.mark.nats]

LEAD = 0.5  # seconds of traffic before the kill (events: rate x (LEAD + outage + TAIL))
TAIL = 1.0  # seconds of traffic after the node is back
RESYNC = 60.0  # the most seconds a node back may take to hold a current copy of the stream again


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    """The session's cluster, started by the first test that needs it; stopped and removed at the end."""
    yield from nats_cluster(tmp_path_factory.mktemp("nats-cluster"))


@pytest.fixture
async def cluster_broker(cluster: NatsCluster) -> AsyncIterator[BrokerUnderTest]:
    """A stream of its own with three replicas, on every host of the cluster; deleted after."""
    uid = uuid.uuid4().hex[:10]
    stream, secret = f"er_cluster_{uid}", f"pw-{uuid.uuid4().hex[:16]}"
    options = {"stream": stream, "prefix": f"t.{stream}", "ack_wait": "1", "replicas": "3"}
    address = f"nats://reliability:{secret}@{cluster.hosts()}"
    names = {"publisher": f"RelPublisher-{uid}", "subscriber": f"RelSubscriber-{uid}"}
    try:
        yield BrokerUnderTest("nats", address, None, options, **names, secret=secret)
    finally:
        cluster.heal()  # a test that failed with a node down
        async with _client(cluster) as client:
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await client.jetstream().delete_stream(stream)


@contextlib.asynccontextmanager
async def _client(cluster: NatsCluster) -> AsyncIterator[Client]:
    """A client of the test's own on the running nodes."""
    servers = [f"nats://127.0.0.1:{node.port}" for node in cluster.nodes if node.running()]
    client = await nats.connect(servers, connect_timeout=5, max_reconnect_attempts=5, error_cb=_quiet)
    try:
        yield client
    finally:
        await client.close()


async def _quiet(exc: Exception) -> None:
    """nats-py's errors of the test's own client (a node still starting refuses it): it tries the next."""


async def _stream_cluster(cluster: NatsCluster, stream: str) -> api.ClusterInfo:
    """The stream's leader and replicas as JetStream reports them (`STREAM.INFO`); waits for a leader."""
    deadline = time.monotonic() + RESYNC
    async with _client(cluster) as client:
        while True:
            with contextlib.suppress(nats.errors.Error):  # no leader yet: "no responders", a timeout
                info: api.ClusterInfo | None = (await client.jetstream().stream_info(stream)).cluster
                if info is not None and info.leader:
                    return info
            assert time.monotonic() < deadline, f"stream {stream} has no leader:\n{cluster.logs()}"
            await asyncio.sleep(0.2)


def _services_on(cluster: NatsCluster, k: int) -> int:
    return cluster.clients_of(k, name="eventrelay")


# The stream's leader is the worst case and runs in CI; the services' node under EVENTRELAY_RELIABILITY_FULL.
VICTIMS = ["leader", "connected"] if FULL else ["leader"]


@pytest.mark.parametrize("victim", VICTIMS)
async def test_a_node_killed_and_back_loses_nothing(
    victim: str,
    cluster: NatsCluster,
    cluster_broker: BrokerUnderTest,
    tmp_path_factory: pytest.TempPathFactory,
    report: Report,
) -> None:
    broker, down = cluster_broker, SIZES.outage
    events = int(SIZES.rate * (LEAD + down + TAIL))
    stream = broker.options["stream"]
    run = Scenario(tmp_path_factory.mktemp("cluster"), broker, env={"RELIABILITY_RATE": str(SIZES.rate)})
    try:
        await subscribe_ahead(broker.url(), broker.subscriber)  # makes the R3 stream and the consumer
        info = await _stream_cluster(cluster, stream)
        assert len(info.replicas or []) == 2, f"the stream is not on three nodes: {info}"
        await run.subscribers()
        await run.flowing(events, SIZES.rate * LEAD, "the kill")
        leader_name = (await _stream_cluster(cluster, stream)).leader or ""
        leader = cluster.nodes.index(cluster.node_named(leader_name))
        services = [_services_on(cluster, k) for k in range(len(cluster.nodes))]
        if victim == "leader":
            k = leader
        else:  # the node with most of the services' connections; not the leader when another has some
            k = max(range(len(services)), key=lambda i: (services[i], i != leader))
        before = await run.count()
        assert before.sent < events, "the publisher had committed every event before the kill"
        killed_at, began = time.time(), time.monotonic()
        cluster.kill(k)
        at_kill = await run.count()

        async def resumed() -> bool:  # an event committed after the kill took effect: the cluster serves
            return (await run.count()).delivered > at_kill.sent

        failover = await run.supervise(resumed, timeout=RESYNC, what="delivery going on without the node")
        await asyncio.sleep(max(0.0, down - (time.monotonic() - began)))
        during, downtime = await run.count(), time.monotonic() - began
        cluster.restart(k)

        async def in_sync() -> bool:  # the node back holds a current copy of the stream again
            found = await _stream_cluster(cluster, stream)
            peers = [found.leader, *(p.name for p in found.replicas or [] if p.current)]
            return cluster.nodes[k].name in peers and len(peers) == len(cluster.nodes)

        resync = await run.supervise(in_sync, timeout=RESYNC, what="the node back in sync", interval=0.2)
        codes, counts, recovery = await run.finish(events, killed_at)
        recovery = max(failover, recovery)
        new_leader = (await _stream_cluster(cluster, stream)).leader
    finally:
        await run.close()

    publisher_log = next(child for child in run.children if child.name == "publisher").tail(10**7)
    assert codes == [0, 0], run.logs()[-3000:]
    assert all(not child.restarts for child in run.children), "a process had to be restarted"
    assert during.sent > before.sent, "publishing through the outbox stopped while the node was down"
    assert not broker.leaks(run.logs()), "a password reached a log"
    assert (counts.sent, counts.delivered) == (events, events), "an event was lost"
    assert counts.duplicates == 0, "an event took effect twice"
    assert counts.dead_letters == 0
    what = "leader" if victim == "leader" else "the services' node" + (" (leader)" if k == leader else "")
    report.counted(
        f"cluster: {what} SIGKILLed, back after {down:g} s or more (3 nodes, R3)",
        broker.kind,
        counts,
        recovery,
        f"recovery: from the kill until all events committed before it and one after it took effect; "
        f"down {downtime:.1f} s, {during.sent - before.sent} committed meanwhile; {services[k]} of "
        f"{sum(services)} service connections on it; leader after: "
        f"{'same' if new_leader == cluster.nodes[k].name else 'another'}; back in sync {resync:.1f} s; "
        f"relay pauses {publisher_log.count('Relay pauses')}; cluster up in {cluster.started_in:.1f} s",
    )
