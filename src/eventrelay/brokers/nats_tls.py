"""nats-py's client, refusing to send its CONNECT (and the credentials in it) in plaintext when TLS was asked.

A NATS server sends its `INFO` in plaintext and says in it whether the client must upgrade to TLS. nats-py
(2.16) upgrades only when the INFO says so; otherwise it goes on in plaintext and writes its CONNECT, user and
password or token included, to whoever answered. `SecureClient` checks the INFO in `_process_info`, which
nats-py's `_process_connect_init` calls with `initial_connection=True` after reading the INFO and before
writing CONNECT, on the first connection and on every reconnection (a private hook: the test with a fake
plaintext server in `tests/brokers/test_tls_servers.py` fails if nats-py stops calling it there). With
`tls_handshake_first` TLS comes before the INFO, so there is nothing to check.
"""

from __future__ import annotations

from typing import Any

import nats.errors
from nats.aio.client import Client


class PlaintextRefused(nats.errors.Error):
    """The server did not ask for TLS though the URL did; CONNECT was not sent."""

    def __init__(self, server: str) -> None:
        super().__init__(
            f"the server at {server} did not ask for TLS, so its credentials were not sent: give it a `tls` "
            "block, or use nats:// without tls_* options if plaintext is meant"
        )


class SecureClient(Client):
    """nats-py's `Client`; with `require_tls`, a server whose INFO does not ask for TLS is refused before
    CONNECT (like the Go client's "secure connection required")."""

    def __init__(self, require_tls: bool) -> None:
        super().__init__()
        self.require_tls = require_tls

    async def _process_info(self, info: dict[str, Any], initial_connection: bool = False) -> None:
        wanted = self.require_tls and initial_connection and not self.options.get("tls_handshake_first")
        if wanted and not info.get("tls_required"):
            server = self._current_server
            where = f"{server.uri.hostname}:{server.uri.port}" if server is not None else "?"
            if self._transport is not None:  # nats-py leaves it open after a failed reconnection
                self._transport.close()  # type: ignore[no-untyped-call]  # nats-py's is untyped
            raise PlaintextRefused(
                where
            )  # nats-py tries again (or the next server) after reconnect_time_wait
        await super()._process_info(info, initial_connection)


__all__ = ["PlaintextRefused", "SecureClient"]
