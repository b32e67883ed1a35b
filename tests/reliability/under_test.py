"""The brokers of the reliability suite: each adapter as a pytest parameter, and `BrokerUnderTest`, one broker
for one test (its URL, with a place for a fault proxy's port, and service names of its own)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

import pytest

from tests.brokers.kafka_server import tansu_server
from tests.faultproxy import FaultProxy

# Every broker adapter; `conftest.py` makes each one.
BROKERS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgresql", id="postgresql", marks=pytest.mark.postgresql),
    pytest.param("rabbitmq", id="rabbitmq", marks=pytest.mark.rabbitmq),
    pytest.param("redis", id="redis", marks=pytest.mark.redis),
    pytest.param("nats", id="nats", marks=pytest.mark.nats),
    pytest.param("kafka", id="kafka", marks=pytest.mark.kafka),
]
# A TCP link a fault proxy can cut: not SQLite (a file). Kafka's clients connect to the addresses the broker
# advertises in its metadata, not to the one in the URL: its outage tests start a Tansu of their own that
# advertises the proxy's address.
NETWORK_BROKERS = [param for param in BROKERS if param.id != "sqlite"]
ADAPTERS = [pytest.param("memory", id="memory"), *BROKERS]  # in-process tests also run on the memory broker


@dataclass(frozen=True)
class BrokerUnderTest:
    """A broker for one test: its URL (with a place for a proxy's port) and service names of its own."""

    kind: str  # sqlite, postgresql, rabbitmq, redis, nats, kafka
    address: str  # the URL before the query, with "{port}" where the server's port goes
    server_port: int | None  # None: no fault proxy can sit between the services and the broker
    options: Mapping[str, str]
    publisher: str
    subscriber: str
    secret: str | None = None  # the password in the URL, which must never show

    def leaks(self, text: str) -> bool:
        """Whether `text` shows the URL's password."""
        if self.secret is None:
            return False
        if self.secret == "guest":  # RabbitMQ's guest:guest: the password is also the user name
            return "guest:guest" in text or ":guest@" in text
        return self.secret in text

    def url(self, port: int | None = None, **options: object) -> str:
        """The broker's URL, through `port` (a fault proxy) if given, with `options` added to the query."""
        address = self.address.format(port=port or self.server_port)
        query = urlencode({**self.options, **{k: str(v) for k, v in options.items()}})
        return f"{address}?{query}" if query else address


@contextlib.contextmanager
def server_behind(proxy: FaultProxy, broker: BrokerUnderTest, folder: Path) -> Iterator[str | None]:
    """Kafka's broker for the block: a Tansu in `folder` on the broker's port, advertising `proxy` (yields its
    address). The other brokers' servers run already (yields None)."""
    if broker.kind != "kafka":
        yield None
        return
    assert broker.server_port is not None
    yield from tansu_server(folder, broker.server_port, advertised=f"127.0.0.1:{proxy.port}")
