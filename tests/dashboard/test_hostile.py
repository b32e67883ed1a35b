"""Hostile requests to the dashboard (issue 15, items 4, 5 and 8): before log-in nothing is stored and no form
but the log-in form is read, a huge cookie is refused, a CSRF token from another site does not work, a wrong
token waits, odd letter ids are not found, HEAD has no body, and the overview counts its dead letters."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from urllib.parse import unquote

import pytest

from eventrelay.dashboard import Dashboard
from eventrelay.envelope import Message, new_message_id
from eventrelay.http import Request, serve
from eventrelay.stores.base import NewDeadLetter
from tests.dashboard.support import Client, Shop, dashboard, make_dead_letters, service

TOKEN = "s3cret-token"


@pytest.fixture
async def database(tmp_path: Path) -> str:
    url = f"sqlite+aiosqlite:///{tmp_path}/orders.db"
    await make_dead_letters(url, Shop())
    return url


async def log_in(client: Client) -> None:
    login = await client.get("/login")
    assert (await client.post("/login", [("csrf", login.csrf()), ("token", TOKEN)])).status == 303


# --- item 4: before log-in ----------------------------------------------------------------------------


async def test_requests_without_a_session_store_nothing_and_evict_no_operator(database: str) -> None:
    board = Dashboard([service(database, Shop())], TOKEN)
    await board.open()
    server = await serve(board.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        operator = Client(port)
        await log_in(operator)
        for _ in range(10_001):  # more than the table holds: before issue 15 each one made a session
            await board.handle(Request("GET", "/login", {}, {"host": f"127.0.0.1:{port}"}))
        assert len(board.sessions) == 1
        assert (await operator.get("/")).status == 200  # still logged in
    finally:
        server.close()
        await server.wait_closed()
        await board.close()


async def test_the_log_in_form_works_without_a_session_and_only_with_its_own_csrf_token(
    database: str,
) -> None:
    async with dashboard([service(database, Shop())], TOKEN) as client:
        login = await client.get("/login")
        assert login.header("Set-Cookie")  # an id for the browser, not a session
        other = Client(client.port)
        await other.get("/login")
        stolen = await other.post("/login", [("csrf", login.csrf()), ("token", TOKEN)])
        assert stolen.status == 403  # the form's token belongs to the browser it was given to
        assert (await client.post("/login", [("csrf", login.csrf()), ("token", TOKEN)])).status == 303
        assert (await client.get("/services/Orders")).status == 200


async def test_a_huge_cookie_is_refused_with_431_not_parsed(database: str) -> None:
    async with dashboard([service(database, Shop())], TOKEN) as client:
        client.cookie = "; ".join(f'c{n}="{"x" * 80}"' for n in range(140))  # 12 KB
        refused = await client.get("/login")
    assert refused.status == 431
    assert "A header line is over 8192 bytes" in refused.body


async def test_before_log_in_no_form_but_the_log_in_form_is_read(database: str) -> None:
    big = [("csrf", "x"), ("action", "discard"), *[("id", str(n)) for n in range(60_000)]]  # ~500 KB
    async with dashboard([service(database, Shop())], TOKEN) as client:
        refused = await client.post("/services/Orders/apply", big)
        small = await client.post("/services/Orders/apply", [("csrf", "x"), ("action", "discard")])
        huge_login = await client.post("/login", [("csrf", "x"), ("token", "t" * 64 * 1024)])
        await log_in(client)
        listing = await client.get("/services/Orders")
    assert refused.status == 413
    assert "over this request's limit of 4096" in refused.body
    assert small.status == 303  # to the log-in page; its form unread
    assert small.header("Location") == "/login"
    assert huge_login.status == 413
    assert len(re.findall(r'name="id" value="(\d+)"', listing.body)) == 3  # nothing was discarded


# --- item 5: the overview counts -----------------------------------------------------------------------


async def test_the_overview_counts_dead_letters_in_the_store_past_ten_thousand(tmp_path: Path) -> None:
    orders = service(f"sqlite+aiosqlite:///{tmp_path}/orders.db", Shop())
    async with dashboard([orders]) as client:
        store = orders.bus.store
        tx = store.begin()
        for n in range(10_050):
            message = Message(new_message_id(), "DashboardTests.OrderPlaced", b"{}", {})
            await store.add_dead_letter(tx, NewDeadLetter("Orders", "ship", message, 1, f"reason {n}"))
        await tx.commit()
        page = await client.get("/")
    cells = re.findall(r'<td class="num[^"]*">([^<]*)</td>', page.body)
    assert cells[-2:] == ["10050", "10050"]  # every one, and every one of the last minute: counted


# --- item 8 ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        pytest.param([("Referer", "http://evil.example/page")], 403, id="cross-site-referer"),
        pytest.param([("Sec-Fetch-Site", "cross-site")], 403, id="cross-site-fetch"),
        pytest.param([("Sec-Fetch-Site", "same-site")], 403, id="another-port-of-localhost"),
        pytest.param([("Origin", "null")], 403, id="null-origin"),
        pytest.param([("Referer", "http://127.0.0.1:{port}/services/Orders")], 200, id="own-referer"),
        pytest.param([("Sec-Fetch-Site", "same-origin")], 200, id="same-origin-fetch"),
        pytest.param([("Sec-Fetch-Site", "none")], 200, id="typed-by-the-user"),
    ],
)
async def test_a_valid_csrf_token_counts_only_from_the_dashboards_own_pages(
    database: str, headers: list[tuple[str, str]], status: int
) -> None:
    async with dashboard([service(database, Shop())]) as client:
        listing = await client.get("/services/Orders")
        form = [("csrf", listing.csrf()), ("action", "discard-all")]
        sent = [(name, value.format(port=client.port)) for name, value in headers]
        answer = await client.request("POST", "/services/Orders/confirm", form, headers=sent)
    assert answer.status == status
    if status == 403:
        assert "CSRF check failed: this form came from another site" in answer.body
    else:
        assert "Discard 3 dead letter(s) of Orders?" in answer.body


async def test_a_wrong_token_is_answered_late_while_other_requests_go_on(database: str) -> None:
    async with dashboard([service(database, Shop())], TOKEN) as guesser:
        login = await guesser.get("/login")
        wrong = asyncio.create_task(guesser.post("/login", [("csrf", login.csrf()), ("token", "guess")]))
        operator = Client(guesser.port)
        await log_in(operator)
        assert (await operator.get("/services/Orders")).status == 200
        assert not wrong.done()  # a second's delay after a wrong token; the server went on meanwhile
        assert (await wrong).status == 401


async def test_the_cookie_is_secure_when_a_tls_proxy_says_the_browser_used_https(database: str) -> None:
    async with dashboard([service(database, Shop())], TOKEN) as client:
        proxied = await client.request("GET", "/login", headers=[("X-Forwarded-Proto", "https")])
        login = [("csrf", proxied.csrf()), ("token", TOKEN)]
        logged_in = await client.request("POST", "/login", login, headers=[("X-Forwarded-Proto", "https")])
        direct = await Client(client.port).get("/login")
    assert "; Secure" in (proxied.header("Set-Cookie") or "")
    assert "; Secure" in (logged_in.header("Set-Cookie") or "")
    assert "Secure" not in (direct.header("Set-Cookie") or "")  # plain HTTP on loopback: the browser drops it


@pytest.mark.parametrize("letter", ["%C2%B2", "%D9%A1", "%EF%BC%91", "99999999999999999999999", "-1", "1.0"])
async def test_a_letter_id_that_is_not_ascii_digits_is_not_found(database: str, letter: str) -> None:
    async with dashboard([service(database, Shop())]) as client:
        page = await client.get(f"/services/Orders/letters/{letter}")
        listing = await client.get("/services/Orders")
        form = [("csrf", listing.csrf()), ("action", "discard"), ("id", unquote(letter))]
        confirm = await client.post("/services/Orders/confirm", form)
    assert page.status == 404
    assert confirm.status == 400
    assert "Select at least one dead letter" in confirm.body


async def test_head_answers_headers_without_a_body(database: str) -> None:
    async with dashboard([service(database, Shop())]) as client:
        page = await client.request("HEAD", "/")
    assert page.status == 200
    assert int(page.header("Content-Length") or 0) > 0
    assert page.body == ""
