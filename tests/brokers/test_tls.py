"""TLS to RabbitMQ, Redis, NATS and PostgreSQL (as the store and as the SQL broker), set by the URL alone.

The shared servers have no TLS listener, so each test puts our TLS-terminating proxy (`tests/tlsproxy.py`)
in front of the plain server, with a throwaway CA made for this session. A test asserts that the proxy
completed a handshake, so the client really spoke TLS, and that an event went through. A client that does not
trust the CA must fail with an error that says why and does not show the password.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from urllib.parse import quote

import aio_pika
import nats
import nats.js.errors
import pytest
from redis.asyncio import Redis
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from eventrelay import DistributedEventBus
from eventrelay.brokers.nats import NatsBroker
from eventrelay.brokers.rabbitmq import RabbitMQBroker
from eventrelay.errors import BrokerUnavailable, ConfigurationError, EventRelayError, StoreError
from eventrelay.sql import create_engine
from tests.brokers.tls_common import FAST, certificates, deliver, unique
from tests.servers import require_server
from tests.tls_servers import SECRET
from tests.tlsproxy import Certificates, Protocol, TlsProxy

RABBITMQ, REDIS, NATS, POSTGRESQL = 5672, 6379, 4222, 5432
__all__ = ["certificates"]  # the session's certificates, a fixture of this module too


@contextlib.asynccontextmanager
async def _proxy(
    server: str, port: int, certificates: Certificates, protocol: Protocol
) -> AsyncIterator[TlsProxy]:
    require_server(server, port)
    async with TlsProxy(port, certificates, protocol) as proxy:
        yield proxy


async def _spoke_tls(proxy: TlsProxy) -> int:
    """How many TLS connections the proxy carried, once it is sure that none failed its handshake."""
    await proxy.settled()
    assert (proxy.failed_handshakes, proxy.refused) == (0, 0)
    return proxy.handshakes


# --- an event through TLS, the CA verified -------------------------------------------------------------


@pytest.mark.rabbitmq
async def test_rabbitmq_over_amqps_with_the_ca(certificates: Certificates) -> None:
    exchange, service = unique(), unique()
    try:
        async with _proxy("RabbitMQ", RABBITMQ, certificates, "tls") as proxy:
            url = f"amqps://guest:guest@127.0.0.1:{proxy.port}/?cafile={certificates.ca}&exchange={exchange}"
            assert await deliver(url, service=service) == [0, 1, 2]
            assert await _spoke_tls(proxy) >= 1
    finally:
        leftovers = RabbitMQBroker(f"amqp://127.0.0.1/?exchange={exchange}")
        async with await aio_pika.connect(f"amqp://guest:guest@127.0.0.1:{RABBITMQ}/") as connection:
            channel = await connection.channel()
            for queue in (service, leftovers.unrouted, *leftovers.retry_queues(service)):
                await channel.queue_delete(queue)
            for name in (exchange, leftovers.unrouted):
                await channel.exchange_delete(name)


@pytest.mark.redis
async def test_redis_over_rediss_with_the_ca(certificates: Certificates) -> None:
    prefix = f"{unique()}:"
    try:
        async with _proxy("Redis", REDIS, certificates, "tls") as proxy:
            url = f"rediss://127.0.0.1:{proxy.port}/0?ssl_ca_certs={certificates.ca}&prefix={prefix}"
            assert await deliver(url) == [0, 1, 2]
            assert await _spoke_tls(proxy) >= 1
    finally:
        async with Redis(port=REDIS) as client:
            keys = [key async for key in client.scan_iter(f"{prefix}*")]
            if keys:
                await client.delete(*keys)


@pytest.mark.nats
@pytest.mark.parametrize(
    ("protocol", "option"),
    [("nats", ""), ("tls", "&tls_handshake_first=1")],
    ids=["info-then-tls", "tls-handshake-first"],
)
async def test_nats_over_tls_with_the_ca(certificates: Certificates, protocol: Protocol, option: str) -> None:
    # "info-then-tls" is what a NATS server with TLS does; "tls-handshake-first" is its `handshake_first`.
    stream = unique().replace("-", "_")
    try:
        async with _proxy("NATS", NATS, certificates, protocol) as proxy:
            url = f"tls://someone:{SECRET}@127.0.0.1:{proxy.port}?stream={stream}&tls_ca={certificates.ca}"
            assert await deliver(url + option) == [0, 1, 2]
            assert await _spoke_tls(proxy) >= 1
    finally:
        client = await nats.connect(f"nats://127.0.0.1:{NATS}")
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await client.jetstream().delete_stream(stream)
        await client.close()


def _through(url: str, proxy: TlsProxy, query: str) -> str:
    """`url` (a PostgreSQL database of the test's own) by way of the proxy, with a password and `query`."""
    at_proxy = make_url(url).set(port=proxy.port, password=SECRET)  # trust authentication ignores it
    return f"{at_proxy.render_as_string(hide_password=False)}?{query}"


@pytest.mark.postgresql
async def test_postgresql_store_over_tls_with_the_ca(certificates: Certificates, postgresql_url: str) -> None:
    async with _proxy("PostgreSQL", POSTGRESQL, certificates, "postgresql") as proxy:
        database = _through(postgresql_url, proxy, f"ssl=verify-full&sslrootcert={certificates.ca}")
        assert await deliver("memory://", database=database) == [0, 1, 2]  # through the outbox
        assert await _spoke_tls(proxy) >= 1


@pytest.mark.postgresql
async def test_postgresql_sql_broker_over_tls_with_the_ca(
    certificates: Certificates, postgresql_url: str
) -> None:
    async with _proxy("PostgreSQL", POSTGRESQL, certificates, "postgresql") as proxy:
        broker = _through(postgresql_url, proxy, f"sslmode=verify-full&sslrootcert={certificates.ca}&lease=5")
        assert await deliver(broker) == [0, 1, 2]
        assert await _spoke_tls(proxy) >= 2  # the engine's pool and the LISTEN connection


# --- a client that does not trust the server's certificate ---------------------------------------------

Untrusted = Callable[[int, Certificates], tuple[str, str | None]]  # proxy port -> broker and database URLs


def _postgresql(port: int, certificates: Certificates) -> str:
    """A database that is never created: if TLS let the client in, the test would fail on the message."""
    return (
        f"postgresql+asyncpg://postgres:{SECRET}@127.0.0.1:{port}/er_never_created"
        f"?ssl=verify-full&sslrootcert={certificates.other_ca}"
    )


UNTRUSTED: dict[str, tuple[int, Protocol, Untrusted]] = {
    "RabbitMQ": (RABBITMQ, "tls", lambda port, _: (f"amqps://guest:{SECRET}@127.0.0.1:{port}/", None)),
    "Redis": (REDIS, "tls", lambda port, _: (f"rediss://:{SECRET}@127.0.0.1:{port}/0", None)),
    "NATS": (
        NATS,
        "nats",
        lambda port, _: (f"tls://someone:{SECRET}@127.0.0.1:{port}?connect_timeout=1", None),
    ),
    "PostgreSQL broker": (POSTGRESQL, "postgresql", lambda port, certs: (_postgresql(port, certs), None)),
    "PostgreSQL store": (
        POSTGRESQL,
        "postgresql",
        lambda port, certs: ("memory://", _postgresql(port, certs)),
    ),
}


@pytest.mark.parametrize(
    "case",
    [pytest.param(case, marks=getattr(pytest.mark, case.split()[0].lower()), id=case) for case in UNTRUSTED],
)
async def test_a_client_without_the_ca_refuses_the_server_and_says_why(
    certificates: Certificates, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    # RabbitMQ, Redis and NATS verify against the system's CAs here, PostgreSQL against another CA
    port, protocol, urls = UNTRUSTED[case]
    caplog.set_level(logging.DEBUG)
    async with _proxy(case.split()[0], port, certificates, protocol) as proxy:
        broker, database = urls(proxy.port, certificates)
        bus = DistributedEventBus(unique(), broker=broker, database=database, settings=FAST)
        with pytest.raises(EventRelayError) as caught:
            await bus.start()
        await bus.store.close()
        assert isinstance(caught.value, BrokerUnavailable if database is None else StoreError)
        assert "CERTIFICATE_VERIFY_FAILED" in str(caught.value)
        assert SECRET not in str(caught.value)
        assert SECRET not in caplog.text  # our logs and the client libraries', at every level
        await proxy.settled()
        assert proxy.handshakes == 0
        assert proxy.failed_handshakes >= 1


# --- what the proxy and the adapters refuse ---------------------------------------------------------


@pytest.mark.postgresql
async def test_the_proxy_refuses_a_postgresql_client_that_does_not_ask_for_tls(
    certificates: Certificates,
) -> None:
    async with _proxy("PostgreSQL", POSTGRESQL, certificates, "postgresql") as proxy:
        engine = create_engine(f"postgresql+asyncpg://postgres@127.0.0.1:{proxy.port}/postgres?ssl=disable")
        with pytest.raises(DBAPIError, match="connection was closed"):
            async with engine.connect():
                pass
        await engine.dispose()
        await proxy.settled()
        assert (proxy.refused, proxy.handshakes) == (1, 0)


@pytest.mark.nats
async def test_a_nats_tls_url_refuses_a_server_that_does_not_ask_for_tls() -> None:
    require_server("NATS", NATS)
    broker = NatsBroker(f"tls://127.0.0.1:{NATS}?stream={unique().replace('-', '_')}&connect_timeout=1")
    with pytest.raises(BrokerUnavailable, match="did not ask for TLS"):
        await broker.start()


def test_tls_files_that_cannot_be_read_are_a_configuration_error(tmp_path: Path) -> None:
    missing = quote(str(tmp_path / "missing.pem"))
    with pytest.raises(ConfigurationError, match="cannot load its TLS files") as caught:
        NatsBroker(f"tls://someone:{SECRET}@127.0.0.1:4222?tls_ca={missing}")
    assert SECRET not in str(caught.value)
    with pytest.raises(ConfigurationError, match="Cannot load the TLS files") as caught:
        create_engine(f"postgresql+asyncpg://postgres:{SECRET}@127.0.0.1/test?sslrootcert={missing}")
    assert SECRET not in str(caught.value)
    with pytest.raises(ConfigurationError, match="tls_handshake_first takes 0 or 1"):
        NatsBroker("tls://127.0.0.1:4222?tls_handshake_first=yes")


def test_postgresql_tls_files_need_a_mode_that_uses_them(certificates: Certificates) -> None:
    with pytest.raises(ConfigurationError, match="need ssl=verify-full, verify-ca or require, not 'prefer'"):
        create_engine(
            f"postgresql+asyncpg://postgres@127.0.0.1/test?ssl=prefer&sslrootcert={certificates.ca}"
        )
    engine = create_engine(f"postgresql+asyncpg://postgres@127.0.0.1/test?sslrootcert={certificates.ca}")
    assert dict(engine.url.query) == {}  # verify-full by default; the files are in the TLS context
