"""The servers and credentials of a NATS broker URL, one host or several.

`nats://user:password@h1:4222,h2:4223,h3:4224?stream=shop` names the servers of one cluster: the scheme, the
credentials and the options are written once and hold for every host (`user:password`, or a token alone:
`nats://token@h1,h2`), percent-escapes in them decoded. nats-py gets the servers as a list and the
credentials as its own options, so that a server it learns from the cluster (INFO `connect_urls`, which
carry no credentials) is logged in to just the same. A host without a port has 4222.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from eventrelay.config import redact_url
from eventrelay.errors import ConfigurationError

DEFAULT_PORT = 4222
_SEVERAL = "for several hosts write the scheme and the credentials once: nats://user:password@h1:4222,h2:4223"


@dataclass(frozen=True)
class Servers:
    """Where nats-py connects, and how it logs in."""

    urls: list[str]  # `scheme://host:port`, without credentials, in the order given
    user: str | None = None
    password: str | None = None
    token: str | None = None

    def credentials(self) -> dict[str, Any]:
        """nats-py's `connect` keywords for them (none without credentials)."""
        given = {"user": self.user, "password": self.password, "token": self.token}
        return {name: value for name, value in given.items() if value is not None}


def parse_servers(url: str) -> Servers:
    """The servers and credentials of `url` (see the module docstring); a clear error for a bad host list."""
    parts = urlsplit(url)
    if parts.path not in ("", "/"):  # `nats://h1,nats://h2` too: the second `//` begins a path
        raise ConfigurationError(f"{_where(url)}: a NATS URL has no path; {_SEVERAL}")
    userinfo, at, hosts = parts.netloc.rpartition("@")
    if not at:
        userinfo = ""
    urls = [_server(parts.scheme, host, url) for host in hosts.split(",")]
    if not userinfo:
        return Servers(urls)
    user, colon, password = userinfo.partition(":")
    if not colon:
        return Servers(urls, token=unquote(user))
    return Servers(urls, user=unquote(user), password=unquote(password))


def _server(scheme: str, host: str, url: str) -> str:
    """`scheme://host:port` of one host of the list, checked."""
    try:
        parsed = urlsplit(f"//{host}")
        port = parsed.port
    except ValueError:
        parsed, port = None, None
    if parsed is None or not parsed.hostname:
        raise ConfigurationError(f"{_where(url)}: {host!r} is not a host or host:port; {_SEVERAL}")
    return f"{scheme}://{host if port is not None else f'{host}:{DEFAULT_PORT}'}"


def _where(url: str) -> str:
    return f"NATS broker URL {redact_url(url)!r}"
