"""TLS against the servers' own listeners: PostgreSQL (the store and the SQL broker), Redis and NATS.

Each server is a process of the test session's own (`tests/tls_servers.py`) with a certificate from a CA made
for the session. For each: an event goes through a bus that verifies the server; with mutual TLS it goes
through with a client certificate, and without one the server refuses; a client refuses a server it cannot
verify (another CA, an expired certificate, a certificate for another host) with an error that says why.
Neither an error nor a log record holds the password, and a client that asked for TLS never sends the password
to a server that answers in plaintext (`tests/impostor.py`), NATS's reconnections included.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import pytest

from eventrelay import DistributedEventBus, Message
from eventrelay.brokers.nats import NatsBroker
from eventrelay.errors import BrokerUnavailable, EventRelayError, StoreError
from tests.brokers.contract import PATIENCE
from tests.brokers.tls_common import FAST, certificates, deliver, unique
from tests.certificates import Certificates
from tests.impostor import Impostor
from tests.server_process import HOST
from tests.tls_servers import MTLS_ROLE, SECRET, USER, Setup, TlsServers
from tests.tlsproxy import SSL_REQUEST

__all__ = ["certificates"]  # the session's certificates, a fixture of this module too

Server = Literal["PostgreSQL store", "PostgreSQL broker", "Redis", "NATS"]
MARKS = {"PostgreSQL store": pytest.mark.postgresql, "PostgreSQL broker": pytest.mark.postgresql}
MARKS |= {"Redis": pytest.mark.redis, "NATS": pytest.mark.nats}
SERVERS = [pytest.param(server, marks=mark, id=server) for server, mark in MARKS.items()]
NEVER_CREATED = "er_never_created"  # a refused client never gets as far as the database's absence


@pytest.fixture(scope="session")
def tls_servers(certificates: Certificates) -> Iterator[TlsServers]:
    servers = TlsServers(certificates)
    try:
        yield servers
    finally:
        servers.close()


def _urls(
    server: Server,
    servers: TlsServers,
    setup: Setup,
    ca: Path,
    client: bool,
    database: str = NEVER_CREATED,
    port: int | None = None,
) -> tuple[str, str | None]:
    """The bus's broker and database URLs for `server` started with `setup` (or at `port`, if given), trusting
    `ca`, with the password `SECRET` and (if `client`) the client certificate."""
    certs = servers.certificates
    if server == "Redis":
        query = f"ssl_ca_certs={ca}&prefix={unique()}:&socket_connect_timeout=5"
        query += f"&ssl_certfile={certs.client_cert}&ssl_keyfile={certs.client_key}" if client else ""
        return f"rediss://:{SECRET}@{HOST}:{port or servers.redis(setup)}/0?{query}", None
    if server == "NATS":
        query = f"tls_ca={ca}&stream={unique().replace('-', '_')}&connect_timeout=1"
        query += f"&tls_cert={certs.client_cert}&tls_key={certs.client_key}" if client else ""
        return f"tls://{USER}:{SECRET}@{HOST}:{port or servers.nats(setup)}?{query}", None
    user = MTLS_ROLE if setup == "mutual" else "postgres"
    query = f"ssl=verify-full&sslrootcert={ca}"
    query += f"&sslcert={certs.client_cert}&sslkey={certs.client_key}" if client else ""
    url = (
        f"postgresql+asyncpg://{user}:{SECRET}@{HOST}:{port or servers.postgresql(setup)}/{database}?{query}"
    )
    return (f"{url}&lease=5", None) if server == "PostgreSQL broker" else ("memory://", url)


def _database(server: Server, servers: TlsServers) -> str:
    """A database of the test's own in the PostgreSQL cluster, if `server` uses it."""
    name = unique().replace("-", "_")
    if server.startswith("PostgreSQL"):
        servers.create_database(servers.postgresql("verify"), name)
    return name


# --- an event through the server's own TLS listener ----------------------------------------------------


@pytest.mark.parametrize("server", SERVERS)
@pytest.mark.parametrize("setup", ["verify", "mutual"], ids=["server verified", "mutual TLS"])
async def test_an_event_goes_through_a_server_the_client_verified(
    tls_servers: TlsServers, server: Server, setup: Setup
) -> None:
    # "mutual TLS": the server demands a client certificate, and the client gives one.
    ca, database = tls_servers.certificates.ca, _database(server, tls_servers)
    urls = _urls(server, tls_servers, setup, ca, client=setup == "mutual", database=database)
    assert await deliver(*urls) == [0, 1, 2]


# --- what a client or the server refuses ----------------------------------------------------------------

Refusal = tuple[
    Setup, bool, str
]  # the server's setup, whether the client trusts other_ca, what the error says
REFUSALS: dict[str, Refusal] = {
    "wrong CA": ("verify", True, r"\[SSL: CERTIFICATE_VERIFY_FAILED\] certificate verify failed"),
    "expired": ("expired", False, "certificate verify failed: certificate has expired"),
    "wrong host": ("wrong_host", False, "certificate verify failed: IP address mismatch"),
    # Redis and NATS send an alert, or (TLS 1.3) close the connection after the handshake (a reset, a broken
    # pipe, an EOF, as timing has it): the adapters add a hint (`brokers/tls_hints.py`).
    "mutual TLS without a client certificate": (
        "mutual",
        False,
        r"connection requires a valid client certificate"
        r"|if the server demands a client certificate \(mutual TLS\), give (ssl_certfile|tls_cert)",
    ),
}


def _refused_with(server: Server) -> type[EventRelayError]:
    if server == "PostgreSQL store":
        return StoreError
    return BrokerUnavailable


@pytest.mark.parametrize("server", SERVERS)
@pytest.mark.parametrize("refusal", list(REFUSALS))
async def test_a_connection_that_cannot_be_trusted_is_refused_with_a_clear_error(
    tls_servers: TlsServers, server: Server, refusal: str, caplog: pytest.LogCaptureFixture
) -> None:
    setup, other_ca, says = REFUSALS[refusal]
    certs = tls_servers.certificates
    broker, database = _urls(server, tls_servers, setup, certs.other_ca if other_ca else certs.ca, False)
    caplog.set_level(logging.DEBUG)
    before = _open_files()
    bus = DistributedEventBus(unique(), broker=broker, database=database, settings=FAST)
    with pytest.raises(EventRelayError) as caught:
        await bus.start()
    await bus.store.close()
    await _closed(before)  # the refused connections, before the test's event loop ends
    assert type(caught.value) is _refused_with(server)
    assert re.search(says, str(caught.value))
    assert "does not exist" not in str(caught.value)  # refused before the database was looked for
    assert SECRET not in str(caught.value)
    assert SECRET not in caplog.text  # our logs and the client libraries', at every level


def _open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


async def _closed(before: int) -> None:
    """Wait (bounded) until this process has no more open files than `before`: asyncpg finishes closing a
    connection the server refused after the TLS handshake a few turns of the event loop after the error, and
    a socket still open when the test's loop ends is a ResourceWarning in a later test."""
    async with asyncio.timeout(PATIENCE):
        while True:
            if _open_files() <= before:
                return
            await asyncio.sleep(0.01)


# --- a client that asked for TLS never sends the password in plaintext -----------------------------------


@pytest.mark.parametrize("server", SERVERS)
async def test_a_client_that_asked_for_tls_sends_no_password_to_a_plaintext_server(
    tls_servers: TlsServers, server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    protocol: Literal["nats", "postgresql", "tls"] = "postgresql"
    if server == "Redis":
        protocol = "tls"
    elif server == "NATS":
        protocol = "nats"
    caplog.set_level(logging.DEBUG)
    async with Impostor(protocol) as impostor:
        ca = tls_servers.certificates.ca
        broker, database = _urls(server, tls_servers, "verify", ca, client=False, port=impostor.port)
        bus = DistributedEventBus(unique(), broker=broker, database=database, settings=FAST)
        with pytest.raises(EventRelayError) as caught:
            await bus.start()
        await bus.store.close()
    assert impostor.connections >= 1
    assert SECRET.encode() not in impostor.received
    assert SECRET not in str(caught.value)
    assert SECRET not in caplog.text
    if protocol == "postgresql":  # asked for TLS, was told no, and stopped there
        assert impostor.received == SSL_REQUEST * impostor.connections
    elif protocol == "tls":
        assert impostor.received[:1] == b"\x16"  # a TLS handshake record: TLS from the first byte
    else:
        assert b"CONNECT" not in impostor.received
        assert "did not ask for TLS" in str(caught.value)


@pytest.mark.nats
async def test_a_nats_client_that_reconnects_sends_no_password_to_a_plaintext_server(
    tls_servers: TlsServers, caplog: pytest.LogCaptureFixture
) -> None:
    # The same check on nats-py's reconnection: the TLS server goes away, and what answers at its address when
    # the client comes back is the impostor.
    caplog.set_level(logging.DEBUG)
    ca = tls_servers.certificates.ca
    with tls_servers.own_nats("verify") as port:
        broker = NatsBroker(_urls("NATS", tls_servers, "verify", ca, client=False, port=port)[0])
        await broker.start()
    try:
        async with Impostor("nats", port) as impostor:
            async with asyncio.timeout(PATIENCE):
                await impostor.accepted(2)  # nats-py tried again after the refusal
            with pytest.raises(BrokerUnavailable):
                await broker.publish([Message(id=unique(), name="TlsTests.PriceChanged", body=b"{}")])
    finally:
        await broker.close()
    assert SECRET.encode() not in impostor.received
    assert b"CONNECT" not in impostor.received
    assert "did not ask for TLS" in caplog.text
    assert SECRET not in caplog.text
