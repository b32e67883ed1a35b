"""The dashboard's requests: sessions, the token, CSRF checks, and the actions on dead letters.

Security, in one place:
- A token protects every page when given; `eventrelay dashboard` requires one unless it listens on the
  loopback interface only. Logging in compares it in constant time, after a wrong one waits a second before
  answering (other requests go on), and starts a new session. Without a token, a request's Host must be a
  literal loopback address or `localhost` (`Host: 127.0.0.1:8090`): a DNS name rebound to 127.0.0.1 (even
  `127.x.attacker.example`) is refused.
- A browser is known by a random id in its cookie; only a log-in with the token keeps it in the session
  table. Before log-in nothing is stored (a form's CSRF token is an HMAC of the id under this process's key),
  so requests without a session never evict a logged-in one, and no form but the log-in form (a few KiB) is
  read before log-in.
- Every POST carries the browser's CSRF token in its form, compared in constant time; a request whose
  `Origin` or `Referer` is another site, or whose `Sec-Fetch-Site` is not `same-origin`, is refused too.
  The cookie is `HttpOnly` and `SameSite=Strict`, and `Secure` when a TLS-terminating proxy says the browser
  used https (`X-Forwarded-Proto: https`): the dashboard itself serves plain HTTP.
- Every value on a page is HTML-escaped (`pages.h`); a Content-Security-Policy allows no script at all.
- Replay and discard go through a confirmation page that lists exactly the letters concerned.
- The HTTP layer (`eventrelay.http`) bounds what a request may cost: sizes, time, open connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Sequence
from datetime import timedelta
from urllib.parse import unquote, urlsplit

from eventrelay.dashboard import pages
from eventrelay.errors import ConfigurationError
from eventrelay.http import MAX_BODY, Request, Response, names_loopback, serve, text
from eventrelay.service import Service
from eventrelay.stores.base import DeadLetter, utcnow
from eventrelay.tenancy import TenantStore

logger = logging.getLogger(__name__)

COOKIE = "eventrelay_session"
MAX_SESSIONS = 10_000
SESSION_SECONDS = 12 * 3600
LOGIN_BODY = 4 * 1024  # a log-in form is two short fields
LOGIN_DELAY = 1.0
LIST_LIMIT = 500
MINUTE = timedelta(minutes=1)
BROWSER_ID = re.compile(r"[A-Za-z0-9_-]{43}")  # what secrets.token_urlsafe(32) makes
LETTER_ID = re.compile(r"[0-9]{1,18}")  # ASCII: str.isdigit() also takes "²", which int() refuses
HEADERS = [
    (
        "Content-Security-Policy",
        "default-src 'none'; style-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    ),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "same-origin"),  # "no-referrer" would make browsers send Origin: null
    ("Cache-Control", "no-store"),
]


class Dashboard:
    """Serves the dashboard of `services` (their stores opened by `open()`); `token` None: no log-in."""

    def __init__(self, services: Sequence[Service], token: str | None = None) -> None:
        self.services = {s.name: s for s in services}
        self.token = token
        self.sessions: OrderedDict[str, float] = OrderedDict()
        """The logged-in browsers' ids, each with when its session ends (`time.monotonic()`), oldest first."""
        self._key = secrets.token_bytes(32)
        self._opened = contextlib.AsyncExitStack()

    async def open(self) -> None:
        """Open the services as `eventrelay` does: handlers subscribed (to replay), tables made (the sagas'
        too)."""
        for service in self.services.values():
            await self._opened.enter_async_context(service.opened())

    async def close(self) -> None:
        """Close the services' stores."""
        await self._opened.aclose()

    async def serve(self, host: str, port: int) -> asyncio.Server:
        """Serve the dashboard on `host:port` (port 0: any free port); close the returned server to stop."""
        return await serve(self.handle, host, port, body_limit=self.body_limit)

    def body_limit(self, request: Request) -> int:
        """How large a request's body may be: before log-in, only a log-in form's."""
        return MAX_BODY if self._logged_in(self._browser(request)) else LOGIN_BODY

    # --- sessions ------------------------------------------------------------------------------------

    @staticmethod
    def _browser(request: Request) -> str | None:
        """The browser's id from its cookie, when it has the shape of one this dashboard makes."""
        sid = request.cookies.get(COOKIE, "")
        return sid if BROWSER_ID.fullmatch(sid) else None

    def _logged_in(self, sid: str | None) -> bool:
        if self.token is None:
            return True
        ends = self.sessions.get(sid) if sid is not None else None
        return ends is not None and ends > time.monotonic()

    def _csrf(self, sid: str) -> str:
        """The CSRF token of a browser's forms: derived from its id, so that no table needs to hold it."""
        return hmac.new(self._key, sid.encode(), hashlib.sha256).hexdigest()

    def _start_session(self) -> str:
        sid = secrets.token_urlsafe(32)
        now = time.monotonic()
        self.sessions[sid] = now + SESSION_SECONDS
        # Oldest first, all of the same length: the ended ones are at the front.
        while len(self.sessions) > MAX_SESSIONS or next(iter(self.sessions.values())) <= now:
            self.sessions.popitem(last=False)
        return sid

    @staticmethod
    def _cookie(request: Request, sid: str, max_age: int = SESSION_SECONDS) -> tuple[str, str]:
        secure = "; Secure" if over_tls(request) else ""
        return (
            "Set-Cookie",
            f"{COOKIE}={sid}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}",
        )

    # --- requests ------------------------------------------------------------------------------------

    async def handle(self, request: Request) -> Response:
        """Answer one request."""
        if request.path == "/style.css":
            return Response(200, pages.STYLE, "text/css; charset=utf-8", [("Cache-Control", "max-age=300")])
        if self.token is None and not names_loopback(request.headers.get("host", "")):
            # Without a token only this machine may ask, by a loopback address: a rebound DNS name is refused.
            return text(403, "Without a token the dashboard answers only to http://127.0.0.1 or localhost")
        known = self._browser(request)
        sid = known or secrets.token_urlsafe(32)  # a new browser: nothing is stored until it logs in
        cookie: tuple[str, str] | None = None if known else self._cookie(request, sid)
        logged_in = self._logged_in(sid)
        if request.method == "POST" and not same_site(request):
            response = text(403, "CSRF check failed: this form came from another site")
        elif not logged_in and request.path != "/login":
            response = Response(303, "", headers=[("Location", "/login")])  # its form is never read
        elif not logged_in and len(request.body) > LOGIN_BODY:
            response = text(413, f"Log in first: before log-in a request body may hold {LOGIN_BODY} bytes")
        elif request.method == "POST" and not self._csrf_matches(request, sid):
            response = text(403, "CSRF check failed: reload the page and try again")
        elif request.path == "/login":
            response, session = await self._login(request, sid, logged_in)
            if session is not None:
                cookie = self._cookie(request, session)
        else:
            response = await self._route(request, self._csrf(sid))
            if request.path == "/logout" and request.method == "POST":
                self.sessions.pop(sid, None)
                cookie = self._cookie(request, "", 0)
        if cookie is not None:
            response.headers.append(cookie)
        response.headers.extend(HEADERS)
        return response

    def _csrf_matches(self, request: Request, sid: str) -> bool:
        sent = (request.form().get("csrf") or [""])[0]
        return hmac.compare_digest(sent.encode(), self._csrf(sid).encode())

    async def _login(self, request: Request, sid: str, logged_in: bool) -> tuple[Response, str | None]:
        """The log-in page, or the answer to its form and the new session's id (a new id: no fixation)."""
        if self.token is None or logged_in:
            return Response(303, "", headers=[("Location", "/")]), None
        if request.method != "POST":
            return Response(200, pages.layout("Log in", pages.login_page(self._csrf(sid)))), None
        given = (request.form().get("token") or [""])[0]
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            logger.warning("Dashboard: a wrong token was given")
            await asyncio.sleep(LOGIN_DELAY)  # slows guessing down; other requests are answered meanwhile
            page = pages.layout("Log in", pages.login_page(self._csrf(sid), "That token is not right."))
            return Response(401, page), None
        return Response(303, "", headers=[("Location", "/")]), self._start_session()

    async def _route(self, request: Request, form_csrf: str) -> Response:
        csrf = form_csrf if self.token is not None else None
        parts = [unquote(p) for p in request.path.strip("/").split("/")] if request.path != "/" else []
        if not parts and request.method == "GET":
            stats = [await self.stats(s) for s in self.services.values()]
            return Response(200, pages.layout("Services", pages.overview(stats), csrf, refresh=5))
        if parts == ["logout"] and request.method == "POST":
            return Response(303, "", headers=[("Location", "/login" if self.token else "/")])
        if len(parts) < 2 or parts[0] != "services" or parts[1] not in self.services:
            return text(404, f"Not found: {request.path}")
        service = self.services[parts[1]]
        rest = parts[2:]
        if rest == [] and request.method == "GET":
            letters = await service.bus.dead_letters(LIST_LIMIT)
            sagas = await service.bus.saga_records(limit=LIST_LIMIT) if service.bus.sagas else None
            body = pages.service_page(await self.stats(service), letters, form_csrf, LIST_LIMIT, sagas)
            return Response(200, pages.layout(service.name, body, csrf, refresh=None))
        if len(rest) == 2 and rest[0] == "letters" and request.method == "GET":
            letter_id = parse_letter_id(rest[1])
            found = await self._letters(service, [letter_id] if letter_id is not None else [])
            if not found:
                return text(404, f"No dead letter {rest[1]} in {service.name}: replayed or discarded since?")
            letter = found[0]
            body = pages.letter_page(service.name, letter, form_csrf)
            return Response(200, pages.layout(f"Dead letter {letter.id}", body, csrf))
        if rest in (["confirm"], ["apply"]) and request.method == "POST":
            return await self._act(request, service, rest[0] == "apply", csrf, form_csrf)
        return text(404, f"Not found: {request.method} {request.path}")

    async def _act(
        self, request: Request, service: Service, apply: bool, csrf: str | None, form_csrf: str
    ) -> Response:
        form = request.form()
        action = (form.get("action") or [""])[0]
        if action in ("replay-all", "discard-all") and not apply:
            action = action.removesuffix("-all")
            letters = await service.bus.dead_letters(1_000_000)
        elif action in ("replay", "discard"):
            ids = [i for i in map(parse_letter_id, form.get("id", [])) if i is not None]
            if not ids:
                return text(400, "Select at least one dead letter")
            letters = await self._letters(service, ids)
        else:
            return text(400, f"Unknown action {action!r}: use replay or discard")
        if not apply:
            body = pages.confirm_page(service.name, action, letters, form_csrf)
            return Response(200, pages.layout(f"{action.title()}?", body, csrf))
        results: list[tuple[int, str | None]] = []
        for letter in letters:
            try:
                await (service.bus.replay if action == "replay" else service.bus.discard)(letter.id)
                results.append((letter.id, None))
            except Exception as exc:  # each failure is reported; the letter stays
                results.append((letter.id, f"{type(exc).__name__}: {exc}"))
        logger.info("Dashboard: %s %s of %s: %s", action, [i for i, _ in results], service.name, results)
        body = pages.result_page(service.name, action, results)
        return Response(200, pages.layout("Done", body, csrf))

    @staticmethod
    async def _letters(service: Service, ids: list[int]) -> list[DeadLetter]:
        """Those of `ids` that are the service's dead letters (the others: replayed or discarded since)."""
        letters = []
        for letter_id in ids:
            with contextlib.suppress(ConfigurationError):
                letters.append(await service.bus.dead_letter(letter_id))
        return letters

    async def stats(self, service: Service) -> pages.ServiceStats:
        """The numbers of one service, read now."""
        store = service.bus.store
        count, oldest = await store.outbox_backlog()
        now = utcnow()
        minute_ago = now - MINUTE
        try:
            inbox: int | None = await store.inbox_count(service.name)
            recent: int | None = await store.inbox_count(service.name, since=minute_ago)
        except NotImplementedError:
            inbox = recent = None
        return pages.ServiceStats(
            service.name,
            count,
            (now - oldest).total_seconds() if oldest is not None else None,
            inbox,
            recent,
            await store.count_dead_letters(service.name),  # counted in the store: no letter is loaded
            await store.count_dead_letters(service.name, since=minute_ago),
            await self._tenants(service) if isinstance(store, TenantStore) else (),
        )

    @staticmethod
    async def _tenants(service: Service) -> list[pages.TenantStats]:
        """Each tenant database's outbox backlog and dead letters."""
        store = service.bus.store
        assert isinstance(store, TenantStore)
        now, tenants = utcnow(), []
        for tenant, (count, oldest) in (await store.outbox_backlogs()).items():
            async with service.bus.tenant(tenant):
                letters = await store.count_dead_letters(service.name)
            age = (now - oldest).total_seconds() if oldest is not None else None
            tenants.append(pages.TenantStats(tenant, count, age, letters))
        return tenants


def parse_letter_id(text: str) -> int | None:
    """A dead letter's id from a URL or a form, or None when `text` cannot be one."""
    return int(text) if LETTER_ID.fullmatch(text) else None


def same_site(request: Request) -> bool:
    """Whether a request comes from this site's own pages, by what the browser says of where it comes from.

    `Origin` and `Referer` must name this Host and `Sec-Fetch-Site` must be `same-origin` (or `none`: typed
    by the user), each when given; a request that names none of them is left to the CSRF token.
    """
    host = request.headers.get("host")
    origin = request.headers.get("origin")
    referer = request.headers.get("referer")
    fetch_site = request.headers.get("sec-fetch-site")
    return (
        (origin is None or urlsplit(origin).netloc == host)
        and (referer is None or urlsplit(referer).netloc == host)
        and (fetch_site is None or fetch_site in ("same-origin", "none"))
    )


def over_tls(request: Request) -> bool:
    """Whether the browser used https, as a TLS-terminating proxy in front says (`X-Forwarded-Proto`)."""
    proto = request.headers.get("x-forwarded-proto", "").partition(",")[0].strip()
    return proto.lower() == "https"
