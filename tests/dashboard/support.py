"""A shop service with real dead letters, and an HTTP client that keeps cookies and reads CSRF tokens."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from html import unescape
from urllib.parse import urlencode

from eventrelay import Context, Event, MemoryBroker, Reject, RetryPolicy, Settings
from eventrelay.dashboard import Dashboard
from eventrelay.envelope import Message, new_message_id
from eventrelay.service import Service
from tests.bus.helpers import eventually

SETTINGS = Settings(retry=RetryPolicy(max_attempts=1), fetch_timeout=0.1, relay_poll_interval=0.05)
XSS = "<script>alert('x')</script>"


class OrderPlaced(Event, name="DashboardTests.OrderPlaced"):
    item: str
    quantity: int = 1


@dataclass
class Shop:
    """What the handler did, and whether its bug is fixed."""

    fixed: bool = False
    shipped: list[str] = field(default_factory=list)

    async def ship(self, event: OrderPlaced, context: Context) -> None:
        if event.item.startswith("poison"):
            raise Reject(f"cannot ship {event.item}")
        if not self.fixed:
            raise RuntimeError("warehouse API down")
        self.shipped.append(event.item)


def service(database: str, shop: Shop, broker: MemoryBroker | None = None, name: str = "Orders") -> Service:
    made = Service(name, database=database, broker=broker or MemoryBroker(), settings=SETTINGS)
    made.subscribe(shop.ship, event=OrderPlaced, name="ship")
    return made


async def make_dead_letters(database: str, shop: Shop, name: str = "Orders") -> None:
    """Run the service: `book` fails (the bug), `poison<XSS>` is rejected, a malformed body is undecodable.

    One after another, so the dead letters' ids come in that order.
    """
    broker = MemoryBroker()
    body = ('{"item": "' + XSS.replace('"', '\\"') + '", "quantity": "many"}').encode()
    malformed = Message(new_message_id(), "DashboardTests.OrderPlaced", body, {})
    async with service(database, shop, broker, name) as running:

        async def dead(count: int) -> None:
            async def reached() -> bool:
                return len(await running.bus.dead_letters()) == count

            await eventually(reached, timeout=20)

        await running.bus.publish(OrderPlaced(item="book", quantity=2))
        await dead(1)
        await running.bus.publish(OrderPlaced(item=f"poison{XSS}"))
        await dead(2)
        await broker.publish([malformed])
        await dead(3)


@dataclass
class Reply:
    status: int
    headers: list[tuple[str, str]]
    body: str

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    def csrf(self) -> str:
        found = re.search(r'name="csrf" value="([^"]+)"', self.body)
        assert found, self.body
        return unescape(found.group(1))


async def exchange(port: int, data: bytes, end: bool = True) -> Reply:
    """Send `data` as it is on a new connection to `port` (then end the sending side, unless `end` is false),
    and read the whole answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    if end:
        writer.write_eof()
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 30)
    writer.close()
    head, _, content = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = [(k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in header_lines)]
    return Reply(int(status_line.split()[1]), headers, content.decode())


class Client:
    """HTTP/1.1 over a real socket to the dashboard, keeping its session cookie like a browser."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.cookie: str | None = None

    async def request(
        self,
        method: str,
        path: str,
        form: list[tuple[str, str]] | None = None,
        origin: str | None = None,
        host: str | None = None,
        headers: list[tuple[str, str]] | None = None,
    ) -> Reply:
        body = urlencode(form or []).encode()
        lines = [f"{method} {path} HTTP/1.1", f"Host: {host or f'127.0.0.1:{self.port}'}"]
        if self.cookie:
            lines.append(f"Cookie: {self.cookie}")
        if origin:
            lines.append(f"Origin: {origin}")
        lines += [f"{name}: {value}" for name, value in headers or []]
        if form is not None:
            lines += ["Content-Type: application/x-www-form-urlencoded", f"Content-Length: {len(body)}"]
        reply = await exchange(self.port, ("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        for name, value in reply.headers:
            if name.lower() == "set-cookie":
                pair = value.split(";", 1)[0]
                self.cookie = pair if pair.split("=", 1)[1] else None
        return reply

    async def get(self, path: str) -> Reply:
        return await self.request("GET", path)

    async def post(self, path: str, form: list[tuple[str, str]], origin: str | None = None) -> Reply:
        return await self.request("POST", path, form, origin)


@asynccontextmanager
async def dashboard(services: list[Service], token: str | None = None) -> AsyncIterator[Client]:
    """The dashboard of `services`, served on a free port; a client for it."""
    board = Dashboard(services, token)
    await board.open()
    server = await board.serve("127.0.0.1", 0)
    try:
        yield Client(server.sockets[0].getsockname()[1])
    finally:
        server.close()
        await server.wait_closed()
        await board.close()
