"""A three-node RabbitMQ cluster of the test's own (`tests/rabbitmq_nodes.py`) with quorum queues: the node
that leads the subscriber's queue, which both services are connected to, is SIGKILLed while events flow, stays
down, and comes back on its data. The services reach the cluster through a multi-host URL and are never
restarted: they go on through the other nodes while it is down, the publisher committing and the subscriber
handling; nothing is lost and nothing takes effect twice.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator

import pytest

from tests.rabbitmq_nodes import RabbitNode, rabbitmq_cluster
from tests.reliability.harness import FULL, SIZES, Report, Scenario, subscribe_ahead
from tests.reliability.under_test import BrokerUnderTest

pytestmark = [pytest.mark.reliability, pytest.mark.rabbitmq]

LEAD = 1.0  # seconds of traffic before the kill
DOWN = 10.0 if FULL else 1.0  # seconds the node stays down before its restart begins (it then boots for ~6 s)
TAIL = 20.0 if FULL else 3.0  # seconds of traffic the publisher has left after the restart begins


@pytest.fixture(scope="module")
def cluster() -> Iterator[list[RabbitNode]]:
    with rabbitmq_cluster(3) as nodes:
        yield nodes


def _leader(nodes: list[RabbitNode], queue: str) -> RabbitNode:
    """The node that leads quorum queue `queue` (asked of a node that stays up)."""
    for line in nodes[-1].ctl("list_queues", "name", "leader", "--no-table-headers").splitlines():
        name, _, leader = line.rpartition("\t")
        if name == queue:
            return next(node for node in nodes if node.name == leader.strip())
    raise AssertionError(f"no quorum queue {queue} on the cluster")


async def test_a_node_sigkilled_and_back_loses_nothing(
    cluster: list[RabbitNode], tmp_path_factory: pytest.TempPathFactory, report: Report
) -> None:
    uid = uuid.uuid4().hex[:10]
    hosts = ",".join(f"127.0.0.1:{node.port}" for node in cluster)
    broker = BrokerUnderTest(
        "rabbitmq",
        f"amqp://guest:guest@{hosts}/",
        None,
        {"exchange": f"er-cluster-{uid}", "queue_type": "quorum", "heartbeat": "2"},
        f"ClusterPublisher-{uid}",
        f"ClusterSubscriber-{uid}",
        secret="guest",
    )
    events = int(SIZES.rate * (LEAD + DOWN + TAIL))
    run = Scenario(tmp_path_factory.mktemp("cluster"), broker, env={"RELIABILITY_RATE": str(SIZES.rate)})
    try:
        # Declared through the first host, as the services connect to it: the queue's leader is local to the
        # declaring client, so the node killed is both the leader and the services' node (the worst case).
        await subscribe_ahead(broker.url(), broker.subscriber)
        victim = _leader(cluster, broker.subscriber)
        await run.subscribers()
        before = await run.flowing(events, SIZES.rate * LEAD, "the kill")
        assert before.sent < events, "the publisher had committed every event before the kill"
        victim.kill()
        killed_at = time.time()

        async def failed_over() -> bool:  # events committed after the kill took effect, through other nodes
            return (await run.count()).delivered >= before.sent + 10

        failover = await run.supervise(failed_over, timeout=60, what="events handled while the node is down")
        await asyncio.sleep(max(0.0, killed_at + DOWN - time.time()))
        victim.start()
        boot = await asyncio.to_thread(victim.wait_started)
        down = time.time() - killed_at
        running = victim.ctl("eval", "length(rabbit_nodes:all_running()).").strip()
        during = await run.count()  # committed while the node was down, its boot included
        rss = [node.rss_kib() // 1024 for node in cluster]
        codes, counts, recovery = await run.finish(events, killed_at)
    finally:
        await run.close()

    assert codes == [0, 0], run.logs()[-3000:]
    assert all(not child.restarts for child in run.children), "a process had to be restarted"
    assert running == "3", f"the node came back to a cluster of {running} running nodes"
    assert during.sent > before.sent, "publishing through the outbox stopped while the node was down"
    assert not broker.leaks(run.logs()), "a password reached a log"
    assert (counts.sent, counts.delivered) == (events, events), "an event was lost"
    assert counts.duplicates == 0, "an event took effect twice"
    assert counts.dead_letters == 0
    which = "and the services' first host" if victim is cluster[0] else "(not the services' first host)"
    report.counted(
        "cluster: node SIGKILLed and back (3 nodes, quorum)",
        "rabbitmq",
        counts,
        recovery,
        f"the queue's leader {which}, down {down:.1f} s ("
        f"{boot:.1f} s of it booting); {during.sent - before.sent} committed meanwhile; handled through"
        f" other nodes {failover:.1f} s after the kill; recovery from the kill; nodes' RSS {rss} MiB",
    )
