"""A minimal HTTP/1.1 server on asyncio streams, for `/metrics` and the dashboard: no framework.

One request per connection (`Connection: close`), and a handler that is an async function from `Request` to
`Response`. It keeps the limits of a real server, each answered with its status:
- a strict parser (400): the request line is `METHOD /target HTTP/1.x`, header names are tokens, values
  hold no control characters, HTTP/1.1 has exactly one Host, `Content-Length` is ASCII digits and given once;
  `Transfer-Encoding` (chunked bodies) is not supported (501);
- bounded sizes: the head (431), each header line, the Cookie header included (431), and the body (413, before
  it is read; `body_limit` may lower it per request, e.g. before log-in);
- time: the whole request within the read timeout (408), the whole answer within the write timeout (else the
  connection is dropped);
- a cap on open connections: past it a connection is answered 503 at once and closed.
HEAD is answered as GET without the body. Meant for operators' tools on loopback or behind a proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

from eventrelay.metrics import Scraped, scrape

logger = logging.getLogger(__name__)

MAX_HEAD = 16 * 1024
MAX_HEADER_LINE = 8 * 1024  # nginx's and Apache's default: a browser's Cookie header fits, a crafted one not
MAX_BODY = 1024 * 1024
MAX_CONNECTIONS = 100
READ_TIMEOUT = 10.0
WRITE_TIMEOUT = 10.0
LINGER = 2.0  # after refusing a request: read what the client still sends, so it gets the answer, not a reset

_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
REQUEST_LINE = re.compile(rf"(?P<method>{_TOKEN}) (?P<target>/[!-~]*) HTTP/1\.(?P<minor>[01])")
HEADER_NAME = re.compile(_TOKEN)
BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # control characters; a tab is allowed
DIGITS = re.compile(r"[0-9]+")  # ASCII only: int() also takes "+5", " 5", "1_000" and other scripts' digits
SINGLE = ("host", "content-length")  # given twice, a proxy and this server could read different requests
# An IPv6 address in brackets, or a name or IPv4 address; then an optional port.
HOST_HEADER = re.compile(r"(?P<host>\[[0-9A-Fa-f:.]+\]|[^\[\]:@/#?]*)(?::[0-9]{1,5})?")


class HTTPError(Exception):
    """A request refused before it reached the handler, with the status to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


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
        """The request's cookies, the first of each name (split in linear time, not by `SimpleCookie`)."""
        found: dict[str, str] = {}
        for pair in self.headers.get("cookie", "").split(";"):
            name, sep, value = pair.strip().partition("=")
            if sep and name:
                value = value.strip()
                if len(value) > 1 and value[0] == value[-1] == '"':
                    value = value[1:-1]
                found.setdefault(name, value)
        return found

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

    def encode(self, with_body: bool = True) -> bytes:
        """The response as sent; without the body (for HEAD) it keeps the body's Content-Length."""
        body = self.body.encode() if isinstance(self.body, str) else self.body
        reason = HTTPStatus(self.status).phrase
        lines = [
            f"HTTP/1.1 {self.status} {reason}",
            f"Content-Type: {self.content_type}",
            f"Content-Length: {len(body)}",
            "Connection: close",
            *(f"{name}: {value}" for name, value in self.headers),
        ]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body if with_body else b"")


Handler = Callable[[Request], Awaitable[Response]]
BodyLimit = Callable[[Request], int]


@dataclass(frozen=True)
class Limits:
    """What one server allows: body size, open connections, and the time to read a request and to answer."""

    max_body: int = MAX_BODY
    max_connections: int = MAX_CONNECTIONS
    read_timeout: float = READ_TIMEOUT
    write_timeout: float = WRITE_TIMEOUT


def text(status: int, message: str) -> Response:
    """A plain-text response."""
    return Response(status, message + "\n", "text/plain; charset=utf-8")


async def serve(
    handler: Handler,
    host: str,
    port: int,
    *,
    limits: Limits = Limits(),  # frozen: one shared default is safe
    body_limit: BodyLimit | None = None,
) -> asyncio.Server:
    """Start serving `handler` on `host:port` (port 0: any free port); close the returned server to stop.

    `body_limit(request)`, given the request's line and headers, says how large its body may be (at most
    `limits.max_body`): a larger one is refused with 413 before it is read.
    """
    open_connections = 0

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal open_connections
        try:
            if open_connections >= limits.max_connections:
                # Refused at once, not queued: a queue would let slow clients hold up everyone behind them.
                busy = text(503, "Too many connections: try again in a moment")
                await _send(reader, writer, busy.encode(), limits.write_timeout, unread=True)
                return
            open_connections += 1
            try:
                await _answer(handler, body_limit, limits, reader, writer)
            finally:
                open_connections -= 1
        except asyncio.CancelledError:
            # The loop is closing. Not re-raised: nothing awaits this task, and Python 3.11 would log the
            # cancellation as an error of the connection.
            writer.transport.abort()

    return await asyncio.start_server(connection, host, port, limit=MAX_HEAD)


async def _answer(
    handler: Handler,
    body_limit: BodyLimit | None,
    limits: Limits,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
) -> None:
    """Read one request, answer it, close the connection."""
    unread = False  # whether the client may still be sending what was not read
    head = False
    try:
        async with asyncio.timeout(limits.read_timeout):
            request = await _read(reader, limits.max_body, body_limit)
    except HTTPError as exc:
        response, unread = text(exc.status, str(exc)), True
    except TimeoutError:
        response = text(408, f"Request timeout: send the whole request within {limits.read_timeout:g} s")
    except asyncio.LimitOverrunError:
        response, unread = text(431, f"Request head over {MAX_HEAD} bytes"), True
    except asyncio.IncompleteReadError:
        response = text(400, "The request ended early: send the whole head and Content-Length bytes")
    except OSError:
        writer.transport.abort()  # the client went away
        return
    else:
        head = request.method == "HEAD"
        try:
            response = await handler(replace(request, method="GET") if head else request)
        except Exception:
            logger.exception("Handling %s %s failed", request.method, request.path)
            response = text(500, "Internal error; see the server's log")
    await _send(reader, writer, response.encode(with_body=not head), limits.write_timeout, unread)


async def _send(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes, timeout: float, unread: bool
) -> None:
    """Send an answer and close the connection within `timeout`; `unread`: the client may still be sending."""
    deadline = asyncio.get_running_loop().time() + timeout
    try:
        async with asyncio.timeout_at(deadline):
            writer.write(data)
            await writer.drain()
        if unread:
            await _linger(reader, writer)
        writer.close()
        async with asyncio.timeout_at(deadline):
            await writer.wait_closed()
    except (TimeoutError, OSError):
        writer.transport.abort()  # a client that does not take its answer in time loses the connection


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Say the answer is complete, then read and drop what the client still sends for a moment: closing with
    unread data resets the connection, and the client could lose the answer it has not read yet."""
    writer.write_eof()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(LINGER):
            while await reader.read(64 * 1024):
                pass


async def _read(reader: asyncio.StreamReader, max_body: int, body_limit: BodyLimit | None) -> Request:
    head = await reader.readuntil(b"\r\n\r\n")
    if len(head) > MAX_HEAD:
        raise HTTPError(431, f"Request head over {MAX_HEAD} bytes")
    lines = head[:-4].decode("latin-1").split("\r\n")
    match = REQUEST_LINE.fullmatch(lines[0])
    if match is None:
        raise HTTPError(400, "Bad request line: send `METHOD /path HTTP/1.1`")
    headers = _headers(lines[1:])
    if match["minor"] == "1" and "host" not in headers:
        raise HTTPError(400, "An HTTP/1.1 request needs a Host header")
    if "transfer-encoding" in headers:
        raise HTTPError(501, "Transfer-Encoding is not supported: send the body with a Content-Length")
    length_text = headers.get("content-length", "0")
    if not DIGITS.fullmatch(length_text):
        raise HTTPError(400, f"Content-Length must be decimal digits, not {length_text[:40]!r}")
    length = int(length_text) if len(length_text) < 20 else max_body + 1
    url = urlsplit(match["target"])
    request = Request(match["method"], url.path, parse_qs(url.query), headers)
    limit = min(max_body, body_limit(request)) if body_limit else max_body
    if length > limit:
        raise HTTPError(413, f"Request body of {length} bytes is over this request's limit of {limit}")
    return replace(request, body=await reader.readexactly(length)) if length else request


def _headers(lines: list[str]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in lines:
        if len(line) > MAX_HEADER_LINE:
            raise HTTPError(431, f"A header line is over {MAX_HEADER_LINE} bytes: {line[:40]!r}...")
        name, sep, value = line.partition(":")
        if not sep or not HEADER_NAME.fullmatch(name):  # also refuses "Name :" and folded lines
            raise HTTPError(400, f"Malformed header line {line[:80]!r}: send `Name: value`")
        value = value.strip(" \t")
        if BAD_VALUE.search(value):
            raise HTTPError(400, f"The {name} header holds a control character")
        name = name.lower()
        if name in headers:
            if name in SINGLE:
                raise HTTPError(400, f"The {name} header is given twice: give it once")
            value = f"{headers[name]}{'; ' if name == 'cookie' else ', '}{value}"
        headers[name] = value
    return headers


def is_loopback(host: str) -> bool:
    """Whether `host` (an address to listen on) is `localhost` or a loopback address: 127.0.0.0/8 or ::1."""
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False  # a name: `127.attacker.example` resolves wherever its owner says
    return address.is_loopback if address.version == 4 else address == ipaddress.IPv6Address("::1")


def names_loopback(host_header: str) -> bool:
    """Whether a Host header is `localhost` or a literal loopback address, with or without a port.

    A server on loopback that answers only such a Host cannot be read by a web page through DNS rebinding:
    the page's own name, rebound to 127.0.0.1, is what its browser sends.
    """
    match = HOST_HEADER.fullmatch(host_header)
    return match is not None and is_loopback(match["host"])


async def serve_metrics(bus: Scraped, host: str, port: int) -> asyncio.Server:
    """Serve `GET /metrics` for `bus` (`eventrelay.metrics`) on `host:port`; close the returned server to end.

    On a loopback `host` it answers only to a loopback Host (`127.0.0.1:9464`, `localhost:9464`), so that no
    web page can read it through a DNS name rebound to 127.0.0.1.
    """
    loopback = is_loopback(host)

    async def handle(request: Request) -> Response:
        if loopback and not names_loopback(request.headers.get("host", "")):
            return text(403, f"Listening on {host}, the metrics answer only to http://127.0.0.1 or localhost")
        if request.path != "/metrics":
            return text(404, "Not found: the metrics are at /metrics")
        if request.method not in ("GET", "HEAD"):
            return text(405, "Use GET")
        body, content_type = await scrape(bus)
        return Response(200, body, content_type)

    server = await serve(handle, host, port)
    logger.info("Metrics of %s at http://%s:%d/metrics", bus.service, host, port)
    return server
