"""The fault proxy does what the outage tests rely on (against a small echo server of the test's own)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from tests.faultproxy import FaultProxy


@pytest.fixture
async def echo_port() -> AsyncIterator[int]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1024):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()


async def _roundtrip(
    port: int, payload: bytes = b"ping"
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(payload)
    await writer.drain()
    assert await asyncio.wait_for(reader.readexactly(len(payload)), 5) == payload
    return reader, writer


async def test_forwards_then_resets_stalls_and_refuses(echo_port: int) -> None:
    async with FaultProxy(echo_port) as proxy:
        reader, writer = await _roundtrip(proxy.port)

        proxy.stall()
        writer.write(b"held")
        await writer.drain()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.readexactly(4), 0.3)
        proxy.resume()
        assert await asyncio.wait_for(reader.readexactly(4), 5) == b"held"

        proxy.reset()
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            await asyncio.wait_for(reader.readexactly(1), 5)
        writer.close()

        async with proxy.down():
            with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
                await _roundtrip(proxy.port)
        _, again = await _roundtrip(proxy.port)  # back after the outage
        again.close()
        assert proxy.connections == 2
