"""The NATS broker on a three-node JetStream cluster of the session's own (`tests/nats_cluster.py`): stream
replicas, and a start while the cluster has no quorum. Every test has a stream of its own, deleted afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Iterator

import nats
import nats.js.errors
import pytest

from eventrelay.brokers import nats_topology
from eventrelay.brokers.nats import NatsBroker, consumer_info, durable
from eventrelay.errors import ConfigurationError
from tests.brokers.contract import PATIENCE, collect, message, publish_when_back
from tests.brokers.test_nats_broker import _with
from tests.nats_cluster import NatsCluster, nats_cluster

pytestmark = pytest.mark.nats


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    """A three-node JetStream cluster of the session's own (`tests/nats_cluster.py`)."""
    yield from nats_cluster(tmp_path_factory.mktemp("nats-cluster"))


@pytest.fixture
async def cluster_url(cluster: NatsCluster) -> AsyncIterator[str]:
    """A multi-host URL (with credentials: the cluster takes any) of a stream of this test's own, deleted
    afterwards."""
    stream = f"er_{uuid.uuid4().hex[:12]}"
    yield f"nats://app:pw-{stream}@{cluster.hosts()}?stream={stream}&prefix=t.{stream}"
    client = await nats.connect([f"nats://127.0.0.1:{node.port}" for node in cluster.nodes])
    try:
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await client.jetstream().delete_stream(stream)
    finally:
        await client.close()


async def test_a_stream_has_the_replicas_asked_and_its_consumers_follow(
    cluster_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with NatsBroker(_with(cluster_url, replicas=3)) as broker:
        await broker.bind("svc", "e")
        sent = message("e")
        await broker.publish([sent])
        [got] = await collect(broker, "svc", 1)
        stream = await broker._js.stream_info(broker.stream)
        consumer = await consumer_info(broker._js, broker.stream, durable("svc", "e"))
    assert got.message.id == sent.id
    assert stream.config.num_replicas == 3
    assert stream.cluster is not None
    assert len(stream.cluster.replicas or []) == 2  # and the leader: on all three nodes
    assert consumer.config.num_replicas in (0, None)  # JetStream's default: the stream's replicas
    assert len(consumer.cluster.replicas or []) == 2
    with caplog.at_level(logging.WARNING, "eventrelay.brokers.nats_topology"):
        async with NatsBroker(cluster_url) as fewer:  # asks 1: the stream keeps its 3, and no warning
            await fewer.publish([message("e")])
            assert (await fewer._js.stream_info(fewer.stream)).config.num_replicas == 3
    assert not [r for r in caplog.records if "replicas" in r.getMessage()]


async def test_a_stream_with_fewer_replicas_is_used_as_it_is_with_a_warning(
    cluster_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with NatsBroker(cluster_url) as one:  # replicas=1, the default
        await one.bind("svc", "e")
    with caplog.at_level(logging.WARNING, "eventrelay.brokers.nats_topology"):
        async with NatsBroker(_with(cluster_url, replicas=3)) as three:
            await three.publish([message("e")])
            assert len(await collect(three, "svc", 1)) == 1
            assert (await three._js.stream_info(three.stream)).config.num_replicas == 1
    [warning] = [r.getMessage() for r in caplog.records if "replicas" in r.getMessage()]
    assert "exists with 1 replicas, fewer than the 3 asked" in warning
    assert "--replicas 3" in warning


async def test_more_replicas_than_the_cluster_has_are_refused(cluster_url: str) -> None:
    for replicas, why in ((4, "no suitable peers for placement"), (6, "maximum replicas is 5")):
        broker = NatsBroker(_with(cluster_url, replicas=replicas))
        with pytest.raises(ConfigurationError, match=rf"with {replicas} replicas \({why}\): ask for at most"):
            await broker.start()


async def test_a_broker_started_while_the_cluster_has_no_quorum_starts_once_it_has(
    cluster: NatsCluster, cluster_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Two nodes of three down: JetStream has no meta leader and cannot create the stream. `start` tries
    again (with a warning) instead of failing, and the broker works once the nodes are back."""
    cluster.kill(1)
    cluster.kill(2)
    try:
        broker = NatsBroker(_with(cluster_url, replicas=3))
        with caplog.at_level(logging.WARNING, "eventrelay.brokers.nats_topology"):
            starting = asyncio.create_task(broker.start())
            async with asyncio.timeout(PATIENCE):
                while not [r for r in caplog.records if "did not create stream" in r.getMessage()]:
                    if starting.done():  # its error, or a start with no quorum: both wrong
                        pytest.fail(f"start ended before JetStream answered: {starting.result()!r}")
                    await asyncio.sleep(0.05)
            cluster.restart(1)
            cluster.restart(2)
            await starting
        try:
            await broker.bind("svc", "e")
            sent = message("e")
            # The new stream's replicas may still be electing their leader: as long as a creation may take.
            await publish_when_back(broker, [sent], nats_topology.PATIENCE)
            assert [d.message.id for d in await collect(broker, "svc", 1)] == [sent.id]
            assert (await broker._js.stream_info(broker.stream)).config.num_replicas == 3
        finally:
            await broker.close()
    finally:
        cluster.heal()
