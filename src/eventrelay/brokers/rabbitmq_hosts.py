"""The hosts of a RabbitMQ URL, one or several (a cluster's nodes), and connecting to the first that answers.

`amqp://user:pass@host1:5672,host2:5673,host3/vhost?options` names three nodes with the same credentials,
virtual host and options (as Spring's `addresses` list does); a host without a port has the
scheme's (5672, or 5671 for `amqps://`). `split_hosts` makes one URL per host. `Hosts.connect` tries them in
turn, beginning with the host after the one whose connection was lost (`lost`), so that a reconnection goes to
a node still up first; when every host fails, its error names each host with its own failure.
"""

from __future__ import annotations

import aio_pika
from aio_pika.abc import AbstractConnection
from yarl import URL

from eventrelay.config import redact_url
from eventrelay.errors import ConfigurationError


def split_hosts(url: str) -> list[str]:
    """One URL per host named in `url`'s authority (hosts separated by commas), in the order given."""
    scheme, separator, rest = url.partition("://")
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    authority, tail = rest[:end], rest[end:]
    userinfo, at, places = authority.rpartition("@")
    hosts = places.split(",")
    if not separator or len(hosts) == 1:
        return [url]
    if not all(hosts):
        raise ConfigurationError(
            f"RabbitMQ URL {redact_url(url)!r} has an empty host in its list; separate hosts by single "
            "commas: amqp://user:pass@host1:5672,host2:5672/vhost"
        )
    return [f"{scheme}://{userinfo}{at}{host}{tail}" for host in hosts]


class Hosts:
    """The URLs of the hosts to connect to, each with the client library's options, tried in turn."""

    def __init__(self, urls: list[str]) -> None:
        self.urls = urls
        self.names = [_name(URL(url)) for url in urls]
        self.current = 0  # the host connected to last: the first one tried

    async def connect(self, timeout: float) -> AbstractConnection:
        """A connection to the first host that accepts one; with one host, its own error as it is."""
        failures = []
        for step in range(len(self.urls)):
            index = (self.current + step) % len(self.urls)
            try:
                connection = await aio_pika.connect(self.urls[index], timeout=timeout)
            except Exception as exc:
                if len(self.urls) == 1:
                    raise
                failures.append(f"{self.names[index]}: {type(exc).__name__}: {exc}")
                continue
            self.current = index
            return connection
        raise ConnectionError(
            f"none of the {len(self.urls)} hosts accepted a connection: {'; '.join(failures)}"
        )

    def lost(self) -> None:
        """The connection to the current host was lost: try the next host first."""
        self.current = (self.current + 1) % len(self.urls)


def _name(url: URL) -> str:
    """`host:port` for messages (yarl knows no AMQP port; aiormq's defaults are these)."""
    return f"{url.host}:{url.port or (5671 if url.scheme == 'amqps' else 5672)}"


def gone(conn: AbstractConnection | None) -> bool:
    """Whether `conn` is closed or lost: aio-pika's `is_closed` only says we closed it; aiormq knows of a lost
    connection some event-loop rounds before aio-pika's callback tells the supervisor."""
    transport = None if conn is None or conn.is_closed else conn.transport
    return transport is None or transport.connection.is_closed
