"""DNS rebinding (issue 15, items 1 and 8): without a token the dashboard answers only to a Host that is a
literal loopback address or `localhost`, and starts without a token only on such a host; metrics served on
loopback answer only such a Host too. A name that merely starts with `127.` can resolve anywhere, or be
rebound to 127.0.0.1 by whoever owns it."""

from __future__ import annotations

from pathlib import Path

import pytest

from eventrelay import DistributedEventBus, MemoryBroker, Settings
from eventrelay.dashboard import run_dashboard
from eventrelay.errors import ConfigurationError
from eventrelay.http import is_loopback, names_loopback, serve_metrics
from tests.dashboard.support import Shop, dashboard, exchange, service

HOSTILE_HOSTS = [
    "127.attacker.example",
    "127.attacker.example:8090",
    "127.0.0.1.evil.com",
    "127.0.0.1.evil.com:8090",
    "127.1.evil.com",
    "127.0.0.1.",
    "localhost.evil.com",
    "localhost.",
    "127.0.0.1@evil.com",
    "evil.com#127.0.0.1",
    "[::1].evil.com",
    "[::1]:8090@evil.com",
    "[::ffff:7f00:1]:8090",
    "::1",  # an IPv6 Host must be bracketed
    "127.0.0.1:80:80",
    "127.0.0.1:port",
    "",
]
LOOPBACK_HOSTS = ["127.0.0.1", "127.0.0.1:8000", "127.0.0.2:8000", "[::1]", "[::1]:8000", "localhost:8000"]


@pytest.mark.parametrize("host", HOSTILE_HOSTS)
def test_a_host_header_that_is_not_a_literal_loopback_address_is_refused(host: str) -> None:
    assert not names_loopback(host)


@pytest.mark.parametrize("host", [*LOOPBACK_HOSTS, "LOCALHOST:8000"])
def test_a_literal_loopback_host_header_is_accepted(host: str) -> None:
    assert names_loopback(host)


@pytest.mark.parametrize("host", ["127.foo", "127.0.0.1.evil.com", "0.0.0.0", "::", "example.com", ""])
def test_only_a_loopback_address_or_localhost_is_a_loopback_listening_host(host: str) -> None:
    assert not is_loopback(host)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.3.2.1", "::1", "[::1]", "localhost"])
def test_loopback_listening_hosts(host: str) -> None:
    assert is_loopback(host)


@pytest.fixture
def database(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path}/orders.db"


async def test_without_a_token_a_rebound_name_starting_with_127_is_refused(database: str) -> None:
    async with dashboard([service(database, Shop())]) as client:
        for host in ["127.attacker.example", "127.0.0.1.evil.com", f"127.0.0.1.evil.com:{client.port}"]:
            rebound = await client.request("GET", "/", host=host)
            assert rebound.status == 403, host
            assert client.cookie is None  # no session was made for it
        for host in [f"127.0.0.1:{client.port}", f"[::1]:{client.port}", f"localhost:{client.port}"]:
            assert (await client.request("GET", "/", host=host)).status == 200, host


async def test_starting_on_a_name_that_starts_with_127_demands_a_token(database: str) -> None:
    with pytest.raises(ConfigurationError, match="needs --token"):
        await run_dashboard([service(database, Shop())], "127.foo", 0, None)


async def test_metrics_on_loopback_answer_only_a_loopback_host() -> None:
    async with DistributedEventBus("Rebound", broker=MemoryBroker(), settings=Settings(metrics=True)) as bus:
        server = await serve_metrics(bus, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            for host in ["127.attacker.example", f"127.0.0.1.evil.com:{port}", f"attacker.example:{port}"]:
                rebound = await exchange(port, f"GET /metrics HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
                assert rebound.status == 403, host
                assert "eventrelay_" not in rebound.body
            for host in [f"127.0.0.1:{port}", f"localhost:{port}"]:
                scrape = await exchange(port, f"GET /metrics HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
                assert scrape.status == 200, host
        finally:
            server.close()
            await server.wait_closed()
