"""The dashboard's requests: sessions, the token, CSRF checks, and the actions on dead letters.

Security, in one place:
- A token protects every page when given; `eventrelay dashboard` requires one unless it listens on the
  loopback interface only. Logging in compares it in constant time and starts a new session. Without a
  token, a request's Host must be a literal loopback address or `localhost` (`Host: 127.0.0.1:8090`): a
  DNS name rebound to 127.0.0.1 (even `127.x.attacker.example`) is refused.
- Every POST carries the session's CSRF token in its form, compared in constant time; a request whose
  `Origin` is another site is refused too. The session cookie is `HttpOnly` and `SameSite=Strict`.
- Every value on a page is HTML-escaped (`pages.h`); a Content-Security-Policy allows no script at all.
- Replay and discard go through a confirmation page that lists exactly the letters concerned.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from urllib.parse import unquote, urlsplit

from eventrelay.dashboard import pages
from eventrelay.http import Request, Response, text
from eventrelay.service import Service
from eventrelay.stores.base import DeadLetter, utcnow

logger = logging.getLogger(__name__)

COOKIE = "eventrelay_session"
MAX_SESSIONS = 10_000
SESSION_SECONDS = 12 * 3600
LIST_LIMIT = 500
COUNT_LIMIT = 10_000
MINUTE = timedelta(minutes=1)
# An IPv6 address in brackets, or a name or IPv4 address; then an optional port.
HOST_HEADER = re.compile(r"(?P<host>\[[0-9A-Fa-f:.]+\]|[^\[\]:@/#?]*)(?::[0-9]{1,5})?")
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


@dataclass
class Session:
    csrf: str
    authenticated: bool
    expires: float


class Dashboard:
    """Serves the dashboard of `services` (their stores opened by `open()`); `token` None: no login."""

    def __init__(self, services: Sequence[Service], token: str | None = None) -> None:
        self.services = {s.name: s for s in services}
        self.token = token
        self.sessions: OrderedDict[str, Session] = OrderedDict()

    async def open(self) -> None:
        """Subscribe each service's handlers (for replay) and make sure its tables exist."""
        for service in self.services.values():
            await service.prepare()
            if service.bus.settings.create_tables:
                await service.bus.store.create_tables()

    async def close(self) -> None:
        for service in self.services.values():
            await service.bus.store.close()

    # --- sessions ------------------------------------------------------------------------------------

    def _session(self, request: Request) -> tuple[str, Session, bool]:
        """The request's session, or a new one; True when new (the response must set the cookie)."""
        sid = request.cookies.get(COOKIE, "")
        session = self.sessions.get(sid)
        if session is not None and session.expires > time.monotonic():
            return sid, session, False
        return (*self._new_session(authenticated=self.token is None), True)

    def _new_session(self, authenticated: bool) -> tuple[str, Session]:
        sid = secrets.token_urlsafe(32)
        self.sessions[sid] = Session(
            secrets.token_urlsafe(32), authenticated, time.monotonic() + SESSION_SECONDS
        )
        while len(self.sessions) > MAX_SESSIONS:
            self.sessions.popitem(last=False)
        return sid, self.sessions[sid]

    @staticmethod
    def _cookie(sid: str, max_age: int = SESSION_SECONDS) -> tuple[str, str]:
        return ("Set-Cookie", f"{COOKIE}={sid}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}")

    # --- requests ------------------------------------------------------------------------------------

    async def handle(self, request: Request) -> Response:
        """Answer one request."""
        if request.path == "/style.css":
            return Response(200, pages.STYLE, "text/css; charset=utf-8", [("Cache-Control", "max-age=300")])
        if self.token is None and not names_loopback(request.headers.get("host", "")):
            # Without a token only this machine may ask, by a loopback address: a rebound DNS name is refused.
            return text(403, "Without a token the dashboard answers only to http://127.0.0.1 or localhost")
        sid, session, new = self._session(request)
        if request.method == "POST" and not self._same_origin(request, session):
            response = text(403, "CSRF check failed: reload the page and try again")
        elif request.path == "/login":
            response, sid = await self._login(request, sid, session)
            new = True
        elif not session.authenticated:
            response = Response(303, "", headers=[("Location", "/login")])
        else:
            response = await self._route(request, session)
            if request.path == "/logout" and request.method == "POST":
                self.sessions.pop(sid, None)
                response.headers.append(self._cookie("", 0))
                new = False
        if new:
            response.headers.append(self._cookie(sid))
        response.headers.extend(HEADERS)
        return response

    def _same_origin(self, request: Request, session: Session) -> bool:
        """A POST must carry this session's CSRF token, and come from this site if it says where from."""
        origin = request.headers.get("origin")
        if origin is not None and urlsplit(origin).netloc != request.headers.get("host"):
            return False
        sent = (request.form().get("csrf") or [""])[0]
        return hmac.compare_digest(sent.encode(), session.csrf.encode())

    async def _login(self, request: Request, sid: str, session: Session) -> tuple[Response, str]:
        if self.token is None or session.authenticated:
            return Response(303, "", headers=[("Location", "/")]), sid
        if request.method != "POST":
            return Response(200, pages.layout("Log in", pages.login_page(session.csrf))), sid
        given = (request.form().get("token") or [""])[0]
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            logger.warning("Dashboard: a wrong token was given")
            page = pages.layout("Log in", pages.login_page(session.csrf, "That token is not right."))
            return Response(401, page), sid
        self.sessions.pop(sid, None)  # a new session id once logged in
        new_sid, _ = self._new_session(authenticated=True)
        return Response(303, "", headers=[("Location", "/")]), new_sid

    async def _route(self, request: Request, session: Session) -> Response:
        csrf = session.csrf if self.token is not None else None
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
            body = pages.service_page(await self.stats(service), letters, session.csrf, LIST_LIMIT)
            return Response(200, pages.layout(service.name, body, csrf, refresh=None))
        if len(rest) == 2 and rest[0] == "letters" and rest[1].isdigit() and request.method == "GET":
            letter = await service.bus.store.dead_letter(int(rest[1]))
            if letter is None or letter.subscriber != service.name:
                return text(404, f"No dead letter {rest[1]} in {service.name}: replayed or discarded since?")
            body = pages.letter_page(service.name, letter, session.csrf)
            return Response(200, pages.layout(f"Dead letter {letter.id}", body, csrf))
        if rest in (["confirm"], ["apply"]) and request.method == "POST":
            return await self._act(request, service, rest[0] == "apply", csrf, session.csrf)
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
            ids = [int(i) for i in form.get("id", []) if i.isdigit()]
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

    async def _letters(self, service: Service, ids: list[int]) -> list[DeadLetter]:
        found = [await service.bus.store.dead_letter(i) for i in ids]
        return [d for d in found if d is not None and d.subscriber == service.name]

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
        letters = await store.dead_letters(service.name, COUNT_LIMIT + 1)  # every 5 s: bounded
        capped = len(letters) > COUNT_LIMIT
        return pages.ServiceStats(
            service.name,
            count,
            (now - oldest).total_seconds() if oldest is not None else None,
            inbox,
            recent,
            f"{COUNT_LIMIT}+" if capped else str(len(letters)),
            None if capped else sum(1 for d in letters if d.created_at >= minute_ago),
        )


def is_loopback(host: str) -> bool:
    """Whether `host` (given to `--host`) is `localhost` or a loopback address: 127.0.0.0/8 or ::1."""
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
    """Whether a Host header is `localhost` or a literal loopback address, with or without a port."""
    match = HOST_HEADER.fullmatch(host_header)
    return match is not None and is_loopback(match["host"])
