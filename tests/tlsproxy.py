"""A TLS-terminating proxy of our own: the shared servers have no TLS listener, so a test puts this in front
of one to see that a client really speaks TLS, verifies the server's certificate and works through it.

```python
certificates = make_certificates(tmp_path)  # a throwaway CA and a server certificate for 127.0.0.1
async with TlsProxy(6379, certificates) as proxy:
    broker = RedisBroker(f"rediss://127.0.0.1:{proxy.port}?ssl_ca_certs={certificates.ca}")
    ...
    await proxy.settled()  # every handshake begun is over, done or failed
    assert proxy.handshakes >= 1  # the client spoke TLS, not plaintext
    assert proxy.failed_handshakes == 0
```

It is a `FaultProxy`, so `reset()`, `stall()` and `down()` work through TLS as well.

The client side is TLS, the server side the plain bytes. `protocol` says how a connection starts:

- `"tls"` (amqps, rediss, NATS with `tls_handshake_first`): TLS from the first byte.
- `"postgresql"`: the client sends an SSLRequest in plaintext, the proxy answers `S` and then does the
  handshake; the server never sees the request. A client that does not ask for TLS is refused (`refused`).
- `"nats"`: the server's `INFO` line goes to the client in plaintext, rewritten to say `"tls_required":true`,
  then the client upgrades to TLS, as a NATS server with TLS configured does.

Certificates come from `tests/certificates.py`, made anew in a temporary folder (a session fixture's).
"""

from __future__ import annotations

import asyncio
import json
import ssl
import struct
from typing import Literal, Self

from tests.certificates import Certificates, make_certificates
from tests.faultproxy import FaultProxy

Protocol = Literal["tls", "postgresql", "nats"]

SSL_REQUEST = struct.pack("!ii", 8, 80877103)  # PostgreSQL: length 8, then the SSLRequest code
HANDSHAKE_TIMEOUT = 5.0

__all__ = ["Certificates", "Protocol", "TlsProxy", "make_certificates"]


class TlsProxy(FaultProxy):
    """Terminates TLS on 127.0.0.1:`port` and forwards the plaintext to 127.0.0.1:`target_port`; the faults of
    `FaultProxy` (reset, stall, down) work on it too."""

    def __init__(
        self,
        target_port: int,
        certificates: Certificates,
        protocol: Protocol = "tls",
        target_host: str = "127.0.0.1",
    ) -> None:
        super().__init__(target_port, target_host)
        self.protocol = protocol
        self.handshakes = 0  # TLS handshakes completed: the client spoke TLS
        self.failed_handshakes = 0  # e.g. the client did not trust the certificate
        self.refused = 0  # PostgreSQL clients that did not ask for TLS
        self._context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._context.load_cert_chain(certificates.server_cert, certificates.server_key)
        self._starting: set[asyncio.Task[None]] = set()  # accepted, handshake not over yet

    async def settled(self) -> None:
        """Wait until every connection accepted so far has finished its handshake, or failed it: a client may
        give up on a certificate before the proxy has seen its alert."""
        await asyncio.gather(*self._starting, return_exceptions=True)

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._start, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def _start(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        # Called as the connection is made, before anything is read: a ClientHello read now into the stream's
        # buffer would never reach the TLS layer, so reading waits for `_serve` (start_tls resumes it).
        _transport(client_writer).pause_reading()
        task = asyncio.create_task(self._serve(client_reader, client_writer))  # ours, so cancelled at exit
        self._tasks.add(task)
        self._starting.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(self._starting.discard)

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self._writers.add(client_writer)
        server_writer: asyncio.StreamWriter | None = None
        try:
            if self._refusing:
                raise ConnectionRefusedError("the proxy is down")
            if self.protocol == "postgresql":
                _transport(client_writer).resume_reading()
                if await client_reader.readexactly(len(SSL_REQUEST)) != SSL_REQUEST:
                    self.refused += 1
                    raise ConnectionRefusedError("the client did not ask for TLS")
                client_writer.write(b"S")
                await self._handshake(client_writer)
                server_reader, server_writer = await asyncio.open_connection(*self.target)
            elif self.protocol == "nats":
                server_reader, server_writer = await asyncio.open_connection(*self.target)
                client_writer.write(_require_tls(await server_reader.readline()))
                await self._handshake(client_writer)
            else:
                await self._handshake(client_writer)
                server_reader, server_writer = await asyncio.open_connection(*self.target)
        except (OSError, EOFError, ValueError):  # ssl.SSLError is an OSError; IncompleteReadError an EOFError
            self._writers.discard(client_writer)
            for writer in (client_writer, server_writer):
                if writer is not None:
                    writer.transport.abort()
            return
        self.connections += 1
        self._writers.add(server_writer)
        for reader, writer in ((client_reader, server_writer), (server_reader, client_writer)):
            pump = asyncio.create_task(self._pump(reader, writer))
            self._tasks.add(pump)
            pump.add_done_callback(self._tasks.discard)

    async def _handshake(self, client_writer: asyncio.StreamWriter) -> None:
        try:
            await client_writer.start_tls(self._context, ssl_handshake_timeout=HANDSHAKE_TIMEOUT)
        except (OSError, TimeoutError):
            self.failed_handshakes += 1
            raise
        self.handshakes += 1


def _transport(writer: asyncio.StreamWriter) -> asyncio.Transport:
    transport = writer.transport
    assert isinstance(transport, asyncio.Transport)  # a TCP connection: it reads as well as writes
    return transport


def _require_tls(line: bytes) -> bytes:
    """A NATS server's `INFO {...}` line, saying that the client must upgrade to TLS."""
    op, _, body = line.partition(b" ")
    if op != b"INFO":
        raise ValueError(f"expected the NATS server's INFO, got {line[:40]!r}")
    info = json.loads(body)
    info["tls_required"] = True
    return b"INFO " + json.dumps(info, separators=(",", ":")).encode() + b"\r\n"
