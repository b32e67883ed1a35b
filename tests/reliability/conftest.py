"""Fixtures of the reliability suite: a broker of each kind with names of its own (cleaned up after), and the
report that collects every scenario's figures, written to JSON and printed as a table at the end of the run.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aio_pika
import nats
import nats.js.errors
import pytest

from eventrelay.brokers.rabbitmq import RabbitMQBroker
from tests.brokers.kafka_server import tansu_server
from tests.brokers.test_redis_broker import delete_keys
from tests.reliability.harness import REPORT, Report, Scenario
from tests.reliability.under_test import ADAPTERS, BROKERS, NETWORK_BROKERS, BrokerUnderTest
from tests.server_process import free_port
from tests.servers import require_server

RABBITMQ_PORT, REDIS_PORT, POSTGRESQL_PORT, NATS_PORT = 5672, 6379, 5432, 4222
# Seconds a delivery stays leased to a consumer that stopped renewing it (SQL lease, Redis visibility timeout,
# NATS ack_wait): short, so that a killed subscriber's messages come back soon. RabbitMQ needs none (its
# leases go with the connection).
LEASE = "1"


@pytest.fixture
def report(pytestconfig: pytest.Config) -> Report:
    """The session's figures (kept in the config's stash, written at the end of the session)."""
    return pytestconfig.stash.setdefault(REPORT, Report())


async def _delete_rabbitmq(broker: BrokerUnderTest, exchange: str) -> None:
    names = RabbitMQBroker(broker.url())
    queues = {f"{exchange}.unrouted"}
    for service in (broker.publisher, broker.subscriber):
        queues |= {service, *names.retry_queues(service)}
    async with await aio_pika.connect(f"amqp://guest:guest@127.0.0.1:{RABBITMQ_PORT}/") as connection:
        channel = await connection.channel()
        for queue in queues:
            await channel.queue_delete(queue)
        for name in (exchange, f"{exchange}.unrouted"):
            await channel.exchange_delete(name)


@pytest.fixture
def names() -> dict[str, str]:
    """Service names of the test's own (RabbitMQ queues and Redis streams are named after them)."""
    uid = uuid.uuid4().hex[:10]
    return {"publisher": f"RelPublisher-{uid}", "subscriber": f"RelSubscriber-{uid}"}


def _secret() -> str:
    """A password for a URL: the servers here do not check it (PostgreSQL trusts 127.0.0.1, Redis's default
    user and NATS take any), so every test can show that it never reaches a log, an error or the CLI."""
    return f"pw-{uuid.uuid4().hex[:16]}"


@pytest.fixture
def sqlite_broker(tmp_path: Path, names: dict[str, str]) -> BrokerUnderTest:
    return BrokerUnderTest(
        "sqlite", f"sqlite+aiosqlite:///{tmp_path}/broker.db", None, {"lease": LEASE}, **names
    )


@pytest.fixture
def postgresql_broker(postgresql_url: str, names: dict[str, str]) -> BrokerUnderTest:
    """A database of its own (dropped after, by `postgresql_url`)."""
    secret = _secret()
    scheme, _, rest = postgresql_url.partition("://")
    user, _, place = rest.partition("@")
    address = f"{scheme}://{user}:{secret}@{place}".replace(f":{POSTGRESQL_PORT}/", ":{port}/")
    return BrokerUnderTest("postgresql", address, POSTGRESQL_PORT, {"lease": LEASE}, **names, secret=secret)


@pytest.fixture
async def rabbitmq_broker(names: dict[str, str]) -> AsyncIterator[BrokerUnderTest]:
    """An exchange of its own; the exchanges and queues are deleted after."""
    require_server("RabbitMQ", RABBITMQ_PORT)
    exchange = f"er-rel-{uuid.uuid4().hex[:10]}"
    address = "amqp://guest:guest@127.0.0.1:{port}/"
    made = BrokerUnderTest(
        "rabbitmq", address, RABBITMQ_PORT, {"exchange": exchange}, **names, secret="guest"
    )
    try:
        yield made
    finally:
        await _delete_rabbitmq(made, exchange)


@pytest.fixture
async def redis_broker(names: dict[str, str]) -> AsyncIterator[BrokerUnderTest]:
    """A key prefix of its own; its keys are deleted after."""
    require_server("Redis", REDIS_PORT)
    prefix, secret = f"eventrelay-rel:{uuid.uuid4().hex[:10]}:", _secret()
    options = {"prefix": prefix, "visibility_timeout": LEASE, "poll": "0.2"}
    address = f"redis://default:{secret}@127.0.0.1:{{port}}/0"
    try:
        yield BrokerUnderTest("redis", address, REDIS_PORT, options, **names, secret=secret)
    finally:
        await delete_keys(prefix)


@pytest.fixture
async def nats_broker(names: dict[str, str]) -> AsyncIterator[BrokerUnderTest]:
    """A stream and subject prefix of its own; the stream is deleted after."""
    require_server("NATS", NATS_PORT)
    stream, secret = f"er_rel_{uuid.uuid4().hex[:10]}", _secret()
    options = {"stream": stream, "prefix": f"t.{stream}", "ack_wait": LEASE}
    address = f"nats://reliability:{secret}@127.0.0.1:{{port}}"
    try:
        yield BrokerUnderTest("nats", address, NATS_PORT, options, **names, secret=secret)
    finally:
        client = await nats.connect(f"nats://127.0.0.1:{NATS_PORT}")
        try:
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await client.jetstream().delete_stream(stream)
        finally:
            await client.close()


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One Tansu (a Kafka-protocol broker in memory) for the session's Kafka scenarios."""
    yield from tansu_server(tmp_path_factory.mktemp("tansu"))


def _kafka_options() -> dict[str, str]:
    """A topic prefix of its own; a session timeout of 2 s is how soon a killed subscriber's partitions go to
    its successor (its lease)."""
    return {"topic_prefix": f"rel{uuid.uuid4().hex[:10]}.", "session_timeout": "2", "partitions": "3"}


@pytest.fixture
def kafka_broker(kafka_bootstrap: str, names: dict[str, str]) -> BrokerUnderTest:
    """A topic prefix of its own (Tansu keeps its topics in memory; they go with it at the end).

    No password: a user in a Kafka URL turns SASL on, which Tansu does not speak.
    """
    return BrokerUnderTest("kafka", f"kafka://{kafka_bootstrap}", None, _kafka_options(), **names)


@pytest.fixture
def kafka_proxied_broker(names: dict[str, str]) -> BrokerUnderTest:
    """For a fault proxy: the address of a Tansu of the test's own, not started yet. A Kafka client connects
    to the addresses the broker advertises, not to the one in its URL, so the test starts its proxy towards
    this port first, then Tansu on it, advertising the proxy (`tansu_server(folder, port, advertised)`)."""
    return BrokerUnderTest("kafka", "kafka://127.0.0.1:{port}", free_port(), _kafka_options(), **names)


@pytest.fixture(params=BROKERS)
def broker(request: pytest.FixtureRequest) -> BrokerUnderTest:
    """Each broker adapter in turn."""
    made = request.getfixturevalue(f"{request.param}_broker")
    assert isinstance(made, BrokerUnderTest)
    return made


@pytest.fixture(params=NETWORK_BROKERS)
def network_broker(request: pytest.FixtureRequest) -> BrokerUnderTest:
    """Each broker adapter reached over TCP (all but SQLite), in turn; Kafka's is `kafka_proxied_broker`."""
    made = request.getfixturevalue(f"{request.param}_{'proxied_' if request.param == 'kafka' else ''}broker")
    assert isinstance(made, BrokerUnderTest)
    return made


@pytest.fixture
async def scenario(broker: BrokerUnderTest, tmp_path: Path) -> AsyncIterator[Callable[..., Scenario]]:
    """Makes the test's `Scenario` (in `tmp_path`, on `broker`); kills what is still running afterwards."""
    made: list[Scenario] = []

    def make(**options: Any) -> Scenario:
        made.append(Scenario(tmp_path, broker, **options))
        return made[-1]

    try:
        yield make
    finally:
        for each in made:
            await each.close()


@pytest.fixture(params=ADAPTERS)
def adapter_url(request: pytest.FixtureRequest) -> str:
    """The URL of each broker adapter in turn, the memory broker included, for tests in this process."""
    if request.param == "memory":
        return "memory://"
    made = request.getfixturevalue(f"{request.param}_broker")
    assert isinstance(made, BrokerUnderTest)
    return made.url()
