"""A TCP fault proxy of our own: sits between a client and a server on 127.0.0.1 and lets a test reset,
stall or refuse connections, to simulate outages without touching the shared servers.

```python
async with FaultProxy(5672) as proxy:
    broker = RabbitMQBroker(f"amqp://guest:guest@127.0.0.1:{proxy.port}/")
    ...
    proxy.reset()             # every open connection gets a TCP RST
    proxy.stall()             # bytes stop flowing both ways; connections stay open
    proxy.resume()
    async with proxy.down():  # new connections are refused and open ones reset, until the block ends
        ...
```
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Self


class FaultProxy:
    """Forwards 127.0.0.1:`port` to 127.0.0.1:`target_port`, with faults on demand."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.connections = 0  # accepted so far, to see that a client reconnected
        self._server: asyncio.Server | None = None
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._refusing = False
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._server is not None
        self._server.close()
        self.reset()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    @property
    def idle(self) -> bool:
        """True when no connection through the proxy is open."""
        return not self._writers

    def reset(self) -> None:
        """Abort every open connection with a TCP RST, both towards the client and the server."""
        for writer in list(self._writers):
            _abort(writer)
        self._writers.clear()

    def stall(self) -> None:
        """Stop forwarding bytes; the connections stay open (a hung network)."""
        self._flowing.clear()

    def resume(self) -> None:
        """Forward bytes again after `stall`."""
        self._flowing.set()

    @contextlib.asynccontextmanager
    async def down(self) -> AsyncIterator[None]:
        """The server is gone for the duration of the block: resets what is open and refuses what comes."""
        self._refusing = True
        self.reset()
        try:
            yield
        finally:
            self._refusing = False

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        if self._refusing:
            _abort(client_writer)
            return
        try:
            server_reader, server_writer = await asyncio.open_connection(*self.target)
        except OSError:
            _abort(client_writer)
            return
        self.connections += 1
        self._writers.update((client_writer, server_writer))
        for reader, writer in ((client_reader, server_writer), (server_reader, client_writer)):
            task = asyncio.create_task(self._pump(reader, writer))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                await self._flowing.wait()
                if writer.is_closing():
                    return
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self._writers.discard(writer)
            with contextlib.suppress(Exception):
                writer.close()


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with SO_LINGER 0, so the peer sees a reset, not an orderly close."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
