"""A minimal HTTP/1.1 server on asyncio streams, for `/metrics` and the dashboard: no framework.

One request per connection (`Connection: close`), bounded reads (head, body, time), and a handler that is
an async function from `Request` to `Response`. It is meant for operators' tools on a trusted network or
behind a proxy, not as a general web server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.cookies import CookieError, SimpleCookie
from urllib.parse import parse_qs, urlsplit

logger = logging.getLogger(__name__)

MAX_HEAD = 16 * 1024
MAX_BODY = 1024 * 1024
READ_TIMEOUT = 10.0


@dataclass(frozen=True)
class Request:
    """One parsed request. Header names are lowercase; `query` and `form()` map names to value lists."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes = b""

    @property
    def cookies(self) -> dict[str, str]:
        """The request's cookies (empty when the header is malformed)."""
        jar: SimpleCookie = SimpleCookie()
        with contextlib.suppress(CookieError):
            jar.load(self.headers.get("cookie", ""))
        return {name: morsel.value for name, morsel in jar.items()}

    def form(self) -> dict[str, list[str]]:
        """The body of an `application/x-www-form-urlencoded` POST."""
        if not self.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
            return {}
        return parse_qs(self.body.decode("utf-8", errors="replace"), keep_blank_values=True)


@dataclass
class Response:
    """What a handler returns. `body` may be text (sent as UTF-8)."""

    status: int = 200
    body: bytes | str = b""
    content_type: str = "text/html; charset=utf-8"
    headers: list[tuple[str, str]] = field(default_factory=list)

    def encode(self) -> bytes:
        body = self.body.encode() if isinstance(self.body, str) else self.body
        reason = HTTPStatus(self.status).phrase
        lines = [
            f"HTTP/1.1 {self.status} {reason}",
            f"Content-Type: {self.content_type}",
            f"Content-Length: {len(body)}",
            "Connection: close",
            *(f"{name}: {value}" for name, value in self.headers),
        ]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


Handler = Callable[[Request], Awaitable[Response]]


def text(status: int, message: str) -> Response:
    """A plain-text response."""
    return Response(status, message + "\n", "text/plain; charset=utf-8")


async def serve(handler: Handler, host: str, port: int) -> asyncio.Server:
    """Start serving `handler` on `host:port` (port 0: any free port); close the returned server to stop."""

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                request = await asyncio.wait_for(_read(reader), READ_TIMEOUT)
            except (TimeoutError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
                response = text(400, f"Bad request: {exc or type(exc).__name__}")
            else:
                try:
                    response = await handler(request)
                except Exception:
                    logger.exception("Handling %s %s failed", request.method, request.path)
                    response = text(500, "Internal error; see the server's log")
            writer.write(response.encode())
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    return await asyncio.start_server(connection, host, port, limit=MAX_HEAD)


async def _read(reader: asyncio.StreamReader) -> Request:
    head = await reader.readuntil(b"\r\n\r\n")
    if len(head) > MAX_HEAD:
        raise ValueError("request head too large")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise ValueError("not an HTTP/1.x request line")
    method, target, _ = parts
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, sep, value = line.partition(":")
            if not sep:
                raise ValueError("malformed header line")
            headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0") or "0")
    if not 0 <= length <= MAX_BODY:
        raise ValueError(f"body over {MAX_BODY} bytes")
    body = await reader.readexactly(length) if length else b""
    url = urlsplit(target)
    return Request(method.upper(), url.path or "/", parse_qs(url.query), headers, body)
