"""The dashboard at the HTTP level, on a real socket: numbers, escaped dead letters, the token, CSRF, and
replay and discard (one and in bulk) through the confirmation step, against real dead letters in SQLite."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest

from eventrelay.dashboard import run_dashboard
from eventrelay.errors import ConfigurationError
from tests.dashboard.support import XSS, Client, Shop, dashboard, make_dead_letters, service


@pytest.fixture
async def database(tmp_path: Path) -> str:
    url = f"sqlite+aiosqlite:///{tmp_path}/orders.db"
    await make_dead_letters(url, Shop())
    return url


def letter_ids(page: str) -> list[int]:
    return [int(i) for i in re.findall(r'name="id" value="(\d+)"', page)]


async def test_the_overview_shows_each_service_and_refreshes(database: str) -> None:
    async with dashboard([service(database, Shop())]) as client:
        page = await client.get("/")
    assert page.status == 200
    assert '<meta http-equiv="refresh" content="5">' in page.body
    assert '<a href="/services/Orders">Orders</a>' in page.body
    cells = re.findall(r'<td class="num[^"]*">([^<]*)</td>', page.body)
    assert cells == [
        "0",
        "3",
        "3",
        "3",
        "3",
    ]  # outbox, inbox records, of them last minute, dead, dead recently


async def test_dead_letters_are_listed_with_reasons_and_payloads_escaped(database: str) -> None:
    async with dashboard([service(database, Shop())]) as client:
        listing = await client.get("/services/Orders")
        ids = letter_ids(listing.body)
        details = [await client.get(f"/services/Orders/letters/{i}") for i in ids]
    assert len(ids) == 3
    assert "warehouse API down" in details[0].body
    assert "cannot ship poison&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in listing.body
    assert (
        "&quot;item&quot;: &quot;&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;&quot;" in details[2].body
    )
    assert "cannot decode" in details[2].body
    for page in [listing, *details]:
        assert XSS not in page.body
        assert "<script" not in page.body
        csp = page.header("Content-Security-Policy") or ""
        assert "default-src 'none'" in csp
        assert "script-src" not in csp  # no script may run at all
        assert page.header("X-Frame-Options") == "DENY"


async def test_the_session_cookie_is_http_only_and_same_site_strict(database: str) -> None:
    async with dashboard([service(database, Shop())]) as client:
        page = await client.get("/")
    cookie = page.header("Set-Cookie") or ""
    assert cookie.startswith("eventrelay_session=")
    assert "HttpOnly" in cookie
    assert "SameSite=Strict" in cookie


async def test_replay_through_the_ui_confirms_then_handles_the_message(database: str) -> None:
    shop = Shop(fixed=True)  # the fix is deployed
    async with dashboard([service(database, shop)]) as client:
        listing = await client.get("/services/Orders")
        book = letter_ids(listing.body)[0]
        confirm = await client.post(
            "/services/Orders/confirm", [("csrf", listing.csrf()), ("action", "replay"), ("id", str(book))]
        )
        assert confirm.status == 200
        assert "Replay 1 dead letter(s) of Orders?" in confirm.body
        assert shop.shipped == []  # nothing happens before the confirmation
        done = await client.post(
            "/services/Orders/apply", [("csrf", confirm.csrf()), ("action", "replay"), ("id", str(book))]
        )
        assert "1 of 1 dead letter(s) replayed" in done.body
        assert shop.shipped == ["book"]
        assert book not in letter_ids((await client.get("/services/Orders")).body)
        gone = await client.get(f"/services/Orders/letters/{book}")
        assert gone.status == 404


async def test_a_replay_that_fails_again_says_why_and_keeps_the_letter(database: str) -> None:
    async with dashboard([service(database, Shop(fixed=False))]) as client:
        listing = await client.get("/services/Orders")
        book = letter_ids(listing.body)[0]
        form = [("csrf", listing.csrf()), ("action", "replay"), ("id", str(book))]
        done = await client.post("/services/Orders/apply", form)
        assert "0 of 1 dead letter(s) replayed" in done.body
        assert "RuntimeError: warehouse API down" in done.body
        assert book in letter_ids((await client.get("/services/Orders")).body)


async def test_discard_all_lists_every_letter_then_deletes_them(database: str) -> None:
    shop = Shop()
    async with dashboard([service(database, shop)]) as client:
        listing = await client.get("/services/Orders")
        confirm = await client.post(
            "/services/Orders/confirm", [("csrf", listing.csrf()), ("action", "discard-all")]
        )
        assert "Discard 3 dead letter(s) of Orders?" in confirm.body
        assert "This cannot be undone" in confirm.body
        ids = letter_ids(confirm.body)
        done = await client.post(
            "/services/Orders/apply",
            [("csrf", confirm.csrf()), ("action", "discard"), *(("id", str(i)) for i in ids)],
        )
        assert "3 of 3 dead letter(s) discarded" in done.body
        assert "No dead letters." in (await client.get("/services/Orders")).body
    assert shop.shipped == []


@pytest.mark.parametrize(
    ("csrf", "origin"),
    [
        pytest.param(None, None, id="no-token"),
        pytest.param("forged", None, id="wrong-token"),
        pytest.param("right", "http://evil.example", id="other-origin"),
    ],
)
async def test_an_action_without_this_sessions_csrf_token_is_refused(
    database: str, csrf: str | None, origin: str | None
) -> None:
    async with dashboard([service(database, Shop(fixed=True))]) as client:
        listing = await client.get("/services/Orders")
        ids = letter_ids(listing.body)
        form = [("action", "discard"), *(("id", str(i)) for i in ids)]
        if csrf is not None:
            form.append(("csrf", listing.csrf() if csrf == "right" else csrf))
        refused = await client.post("/services/Orders/apply", form, origin=origin)
        assert refused.status == 403
        assert "CSRF check failed" in refused.body
        other = Client(client.port)  # a token from another session does not work either
        await other.get("/")
        assert (await other.post("/services/Orders/apply", [*form, ("csrf", listing.csrf())])).status == 403
        assert letter_ids((await client.get("/services/Orders")).body) == ids


async def test_with_a_token_every_page_needs_a_log_in(database: str) -> None:
    async with dashboard([service(database, Shop())], token="s3cret-token") as client:
        assert (await client.get("/")).status == 303
        assert (await client.get("/services/Orders")).header("Location") == "/login"
        login = await client.get("/login")
        before = client.cookie
        wrong = await client.post("/login", [("csrf", login.csrf()), ("token", "guess")])
        assert wrong.status == 401
        assert (await client.get("/")).status == 303
        right = await client.post("/login", [("csrf", login.csrf()), ("token", "s3cret-token")])
        assert right.status == 303
        assert client.cookie != before  # a new session id once logged in
        page = await client.get("/services/Orders")
        assert page.status == 200
        assert 'action="/logout"' in page.body
        await client.post("/logout", [("csrf", page.csrf())])
        assert (await client.get("/")).status == 303
        stranger = Client(client.port)
        assert (await stranger.post("/login", [("csrf", "x"), ("token", "s3cret-token")])).status == 403


async def test_the_dashboard_needs_a_token_unless_it_listens_on_loopback(database: str) -> None:
    with pytest.raises(ConfigurationError, match="needs --token"):
        await run_dashboard([service(database, Shop())], "0.0.0.0", 0, None)


async def test_run_dashboard_says_where_it_listens(database: str) -> None:
    urls: list[str] = []

    def listening(url: str) -> None:
        urls.append(url)
        signal.raise_signal(signal.SIGTERM)  # it stops on that as on Ctrl-C

    await run_dashboard([service(database, Shop())], "127.0.0.1", 0, None, on_listening=listening)

    (url,) = urls
    assert re.fullmatch(r"http://127\.0\.0\.1:[1-9][0-9]*/", url), url  # port 0: the port it was given


async def test_without_a_token_only_a_loopback_host_name_is_answered(database: str) -> None:
    async with dashboard([service(database, Shop())]) as client:
        rebound = await client.request("GET", "/", host="attacker.example:8090")  # DNS rebinding
        assert rebound.status == 403
        assert client.cookie is None  # no session was made for it
        assert (await client.request("GET", "/", host=f"localhost:{client.port}")).status == 200


async def test_unknown_pages_and_letters_are_not_found(database: str) -> None:
    async with dashboard([service(database, Shop())]) as client:
        assert (await client.get("/services/Nobody")).status == 404
        assert (await client.get("/services/Orders/letters/999")).status == 404
        assert (await client.get("/services/Orders/letters/x")).status == 404
