"""The HTTP layer under the dashboard and `/metrics` (issue 15): a strict parser, bounded sizes, a read and a
write timeout, a cap on open connections, HEAD without a body. A real server on a free port, real sockets."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from eventrelay.http import BodyLimit, Limits, Request, Response, serve, text
from tests.bus.helpers import eventually
from tests.dashboard.support import exchange

BIG = 32 * 1024 * 1024  # more than the socket buffers of both ends hold


async def echo(request: Request) -> Response:
    if request.path == "/big":
        return Response(200, b"x" * BIG, "application/octet-stream")
    return text(200, f"{request.method} {request.path}: {request.body.decode()}")


@asynccontextmanager
async def server(limits: Limits | None = None, body_limit: BodyLimit | None = None) -> AsyncIterator[int]:
    started = await serve(echo, "127.0.0.1", 0, limits=limits or Limits(), body_limit=body_limit)
    try:
        yield started.sockets[0].getsockname()[1]
    finally:
        started.close()
        await started.wait_closed()


def request(*lines: str, body: bytes = b"") -> bytes:
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


HOST = "Host: 127.0.0.1"


async def test_a_well_formed_request_is_answered() -> None:
    async with server() as port:
        data = request("POST /x?a=1 HTTP/1.1", HOST, "Content-Length:\t 5", body=b"hello")
        reply = await exchange(port, data)
    assert (reply.status, reply.body) == (200, "POST /x: hello\n")


@pytest.mark.parametrize(
    ("length", "body"),
    [
        pytest.param("+5", b"hello", id="plus"),
        pytest.param("1_0", b"0123456789", id="underscore"),
        pytest.param("\xa05", b"hello", id="no-break-space"),
        pytest.param("5 5", b"hello", id="two-numbers"),
        pytest.param("-1", b"", id="negative"),
        pytest.param("0x5", b"hello", id="hex"),
    ],
)
async def test_content_length_must_be_ascii_digits(length: str, body: bytes) -> None:
    async with server() as port:
        reply = await exchange(port, request("POST / HTTP/1.1", HOST, f"Content-Length: {length}", body=body))
    assert reply.status == 400
    assert "Content-Length must be decimal digits" in reply.body


@pytest.mark.parametrize("second", ["5", "6"])
async def test_content_length_given_twice_is_refused(second: str) -> None:
    async with server() as port:
        lengths = ["Content-Length: 5", f"Content-Length: {second}"]
        data = request("POST / HTTP/1.1", HOST, *lengths, body=b"hello")
        reply = await exchange(port, data)
    assert reply.status == 400
    assert "The content-length header is given twice: give it once" in reply.body


async def test_a_chunked_body_is_refused_not_ignored() -> None:
    async with server() as port:
        data = request("POST / HTTP/1.1", HOST, "Transfer-Encoding: chunked", body=b"5\r\nhello\r\n0\r\n\r\n")
        reply = await exchange(port, data)
    assert reply.status == 501
    assert "send the body with a Content-Length" in reply.body


@pytest.mark.parametrize(
    "line",
    [
        pytest.param("Bad Name: x", id="space-in-name"),
        pytest.param("Name : x", id="space-before-colon"),
        pytest.param(" X-Folded: x", id="folded"),
        pytest.param("(x): y", id="separator-in-name"),
        pytest.param("X-Value: a\x00b", id="nul-in-value"),
        pytest.param("X-Value: a\x1bb", id="escape-in-value"),
        pytest.param("no colon", id="no-colon"),
    ],
)
async def test_header_lines_must_be_a_token_a_colon_and_a_clean_value(line: str) -> None:
    async with server() as port:
        reply = await exchange(port, request("GET / HTTP/1.1", HOST, line))
    assert reply.status == 400


@pytest.mark.parametrize(
    "line",
    [
        pytest.param("GET / HTTP/1.9", id="version"),
        pytest.param("GET / HTTP/2.0", id="version-2"),
        pytest.param("GET http://evil.example/ HTTP/1.1", id="absolute-form"),
        pytest.param("G(T / HTTP/1.1", id="method-not-a-token"),
        pytest.param("GET /\x7f HTTP/1.1", id="control-in-target"),
        pytest.param("GET /\xe9 HTTP/1.1", id="non-ascii-target"),
        pytest.param("GET  / HTTP/1.1", id="two-spaces"),
        pytest.param("GET / HTTP/1.1 x", id="trailing"),
    ],
)
async def test_the_request_line_is_method_path_version(line: str) -> None:
    async with server() as port:
        reply = await exchange(port, request(line, HOST))
    assert reply.status == 400
    assert "Bad request line" in reply.body


@pytest.mark.parametrize("hosts", [[], [HOST, HOST]], ids=["none", "twice"])
async def test_http_1_1_needs_exactly_one_host(hosts: list[str]) -> None:
    async with server() as port:
        reply = await exchange(port, request("GET / HTTP/1.1", *hosts))
    assert reply.status == 400


async def test_a_header_line_over_8_kib_is_refused_before_it_is_parsed() -> None:
    cookie = "; ".join(f"c{n}={'v' * 90}" for n in range(100))  # about 9.5 KB: a crafted, not a real, Cookie
    async with server() as port:
        refused = await exchange(port, request("GET / HTTP/1.1", HOST, f"Cookie: {cookie}"))
        fine = await exchange(port, request("GET / HTTP/1.1", HOST, f"Cookie: {cookie[:7000]}"))
    assert refused.status == 431
    assert "A header line is over 8192 bytes" in refused.body
    assert fine.status == 200


def test_cookies_are_split_in_linear_time_first_of_each_name() -> None:
    header = 'theme="dark"; broken; =x; sid=abc; lang=en; sid=second; odd"name=1'
    cookies = Request("GET", "/", {}, {"cookie": header}).cookies
    assert cookies == {"theme": "dark", "sid": "abc", "lang": "en", 'odd"name': "1"}


async def test_a_body_over_the_limit_is_refused_before_it_is_read() -> None:
    async with server(body_limit=lambda request: 10 if request.path == "/small" else 1_000_000) as port:
        # Only the head is sent: a server that waited for the body would time out instead.
        too_big = await exchange(port, request("POST / HTTP/1.1", HOST, "Content-Length: 2000000"))
        over = await exchange(port, request("POST /small HTTP/1.1", HOST, "Content-Length: 11"))
        sent_anyway = await exchange(
            port, request("POST /small HTTP/1.1", HOST, "Content-Length: 100000", body=b"x" * 100_000)
        )
        under = await exchange(port, request("POST /small HTTP/1.1", HOST, "Content-Length: 2", body=b"ok"))
    assert too_big.status == 413
    assert "over this request's limit of 1000000" in too_big.body
    assert over.status == 413
    assert sent_anyway.status == 413  # the answer arrives, not a reset: the rest was read and dropped
    assert under.status == 200


async def test_head_answers_the_headers_of_get_without_the_body() -> None:
    async with server() as port:
        reply = await exchange(port, request("HEAD /x HTTP/1.1", HOST))
    assert reply.status == 200
    assert reply.header("Content-Length") == str(len("GET /x: \n"))
    assert reply.body == ""


async def test_a_request_not_sent_in_time_is_answered_408() -> None:
    async with server(Limits(read_timeout=0.2)) as port:
        unfinished = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n"  # the head's blank line never comes
        reply = await exchange(port, unfinished, end=False)
    assert reply.status == 408


async def test_a_client_that_does_not_read_its_answer_loses_the_connection() -> None:
    async with server(Limits(write_timeout=0.2)) as port:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request("GET /big HTTP/1.1", HOST))
        await writer.drain()

        async def reset() -> bool:
            # Never reading: the answer fills both sockets' buffers. Once the server drops the connection,
            # writing to it fails.
            try:
                writer.write(b"x")
                await writer.drain()
            except ConnectionError:
                return True
            return writer.is_closing()

        await eventually(reset, timeout=20)
        writer.close()


async def test_connections_past_the_cap_are_refused_at_once() -> None:
    async with server(Limits(max_connections=2)) as port:
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]  # they send nothing
        refused = await exchange(port, request("GET / HTTP/1.1", HOST))
        assert refused.status == 503
        assert "Too many connections" in refused.body
        for _, writer in idle:
            writer.close()

        async def answered() -> bool:
            return (await exchange(port, request("GET / HTTP/1.1", HOST))).status == 200

        await eventually(answered, timeout=20)  # a closed connection frees its place
