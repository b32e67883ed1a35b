"""A fake server of our own without TLS that records every byte a client sends it: a client that asked for TLS
must never send it a password.

```python
async with Impostor("nats") as impostor:  # greets with a NATS INFO that does not ask for TLS
    ...  # point a client with a tls:// URL at 127.0.0.1:impostor.port
    assert SECRET.encode() not in impostor.received
```

`protocol` says how it answers:

- `"nats"`: sends a plain `INFO` (no `tls_required`, `auth_required`), as a NATS server without TLS does, and
  then listens: a client that goes on in plaintext writes its `CONNECT`, credentials included.
- `"postgresql"`: answers an `SSLRequest` with `N` (no TLS here), and anything else with a request for the
  password in cleartext (`AuthenticationCleartextPassword`).
- `"tls"` (rediss, amqps): says nothing and hangs up after the first bytes (a TLS client's `ClientHello`).
"""

from __future__ import annotations

import asyncio
import json
import struct
from types import TracebackType
from typing import Literal, Self

from tests.tlsproxy import SSL_REQUEST

INFO = {"server_id": "impostor", "version": "2.9.10", "proto": 1, "headers": True, "max_payload": 1048576}
NATS_INFO = b"INFO " + json.dumps(INFO | {"auth_required": True}).encode() + b"\r\n"
CLEARTEXT_PASSWORD = b"R" + struct.pack("!ii", 8, 3)  # PostgreSQL's AuthenticationCleartextPassword


class Impostor:
    """Listens on 127.0.0.1:`port` (a free one if 0), answers as `protocol` says, records what it receives."""

    def __init__(self, protocol: Literal["nats", "postgresql", "tls"], port: int = 0) -> None:
        self.protocol = protocol
        self.port = port
        self.connections = 0  # accepted so far
        self.received = bytearray()  # every byte from every connection, in order of arrival
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._accepted = asyncio.Condition()

    async def accepted(self, count: int) -> None:
        """Wait until `count` connections were accepted in all (bound it with a timeout)."""
        async with self._accepted:
            await self._accepted.wait_for(lambda: self.connections >= count)

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for writer in self._writers:  # a task cancelled before it ran did not close its own
            writer.transport.abort()
        # abort() closes the socket at the loop's next turn: wait for it, or a test ending now leaks it
        await asyncio.gather(*(writer.wait_closed() for writer in self._writers), return_exceptions=True)
        await self._server.wait_closed()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        task = asyncio.create_task(self._serve(reader, writer))  # ours, so cancelled and awaited at exit
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async with self._accepted:
            self.connections += 1
            self._accepted.notify_all()
        try:
            if self.protocol == "nats":
                writer.write(NATS_INFO)
            while data := await reader.read(65536):
                self.received += data
                if self.protocol == "tls":
                    break
                if self.protocol == "postgresql":
                    writer.write(b"N" if data == SSL_REQUEST else CLEARTEXT_PASSWORD)
                await writer.drain()
        except OSError:
            pass  # the client hung up
        finally:
            writer.transport.abort()
