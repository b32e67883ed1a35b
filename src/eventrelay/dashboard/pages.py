"""The dashboard's HTML, rendered on the server. Every value from outside passes through `h` (escaped)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from html import escape
from urllib.parse import quote

from eventrelay.saga import SagaRecord
from eventrelay.stores.base import DeadLetter, utcnow
from eventrelay.tracing import trace_id

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 0; color: #1d2430; background: #f6f7f9; }
header { background: #1d2430; color: #fff; padding: 10px 24px; display: flex; gap: 24px; }
header { align-items: center; min-height: 32px; }
td.time { white-space: nowrap; }
td code { word-break: break-all; }
header a { color: #fff; text-decoration: none; font-weight: 600; }
header form { margin-left: auto; }
main { padding: 16px 24px; max-width: 1200px; }
h1 { font-size: 20px; margin: 8px 0 16px; }
h2 { font-size: 16px; margin: 24px 0 8px; }
table { border-collapse: collapse; width: 100%; background: #fff; }
th, td { border-bottom: 1px solid #e3e6ea; padding: 6px 8px; text-align: left; vertical-align: top; }
th { background: #eef0f3; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
pre { background: #fff; border: 1px solid #e3e6ea; padding: 10px; overflow-x: auto; white-space: pre-wrap; }
.bad { color: #b42318; font-weight: 600; }
.ok { color: #067647; font-weight: 600; }
.muted { color: #667085; }
.note { background: #fffaeb; border: 1px solid #fedf89; padding: 8px 12px; margin: 12px 0; }
.actions { margin: 12px 0; display: flex; gap: 8px; }
button { font: inherit; padding: 5px 12px; border-radius: 4px; border: 1px solid #98a2b3; background: #fff; }
button.danger { border-color: #b42318; color: #b42318; }
button.primary { border-color: #1d2430; background: #1d2430; color: #fff; }
"""


STATE_SHOWN = 1000
"""How many characters of a saga's state (JSON) its row shows."""
CUT_NOTE = (
    f" States are cut at {STATE_SHOWN} characters: <code>eventrelay sagas SERVICE --json</code> shows them"
    " whole."
)


def h(value: object) -> str:
    """Escape anything for HTML text and attribute values."""
    return escape(str(value), quote=True)


def service_url(name: str, *rest: object) -> str:
    """The dashboard path of a service (names are URL-quoted whole)."""
    return "/".join(["/services", quote(name, safe=""), *(quote(str(r), safe="") for r in rest)])


@dataclass(frozen=True)
class ServiceStats:
    """What the overview shows of one service."""

    name: str
    outbox: int
    oldest_age: float | None
    inbox: int | None
    handled_last_minute: int | None
    dead_letters: int
    dead_last_minute: int
    tenants: Sequence[TenantStats] = ()
    """With a database per tenant: each tenant database's numbers."""


@dataclass(frozen=True)
class TenantStats:
    """One tenant database's numbers: its outbox backlog and dead letters (None: the default database)."""

    tenant: str | None
    outbox: int
    oldest_age: float | None
    dead_letters: int


def layout(title: str, body: str, csrf: str | None = None, refresh: int | None = None) -> str:
    """A whole page. `csrf` adds the log-out form (only when a token protects the dashboard)."""
    logout = (
        f'<form method="post" action="/logout"><input type="hidden" name="csrf" value="{h(csrf)}">'
        '<button type="submit">Log out</button></form>'
        if csrf is not None
        else ""
    )
    meta = f'<meta http-equiv="refresh" content="{refresh}">' if refresh else ""
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width">{meta}<title>{h(title)} · eventrelay</title>'
        '<link rel="stylesheet" href="/style.css"></head><body>'
        f'<header><a href="/">eventrelay dashboard</a>{logout}</header><main>{body}</main></body></html>'
    )


def _age(seconds: float | None) -> str:
    if seconds is None:
        return '<span class="muted">-</span>'
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _count(value: int | None) -> str:
    return '<span class="muted">n/a</span>' if value is None else h(value)


def overview(stats: Sequence[ServiceStats]) -> str:
    """The services: outbox, inbox, rates of the last minute, dead letters. Refreshes every 5 s."""
    rows = "".join(
        f'<tr><td><a href="{h(service_url(s.name))}">{h(s.name)}</a></td>'
        f'<td class="num">{h(s.outbox)}</td><td class="num">{_age(s.oldest_age)}</td>'
        f'<td class="num">{_count(s.inbox)}</td><td class="num">{_count(s.handled_last_minute)}</td>'
        f'<td class="num{" bad" if s.dead_letters else ""}">{h(s.dead_letters)}</td>'
        f'<td class="num">{_count(s.dead_last_minute)}</td></tr>'
        for s in stats
    )
    return (
        "<h1>Services</h1><table><thead><tr><th>service</th><th>outbox waiting</th><th>oldest waits</th>"
        "<th>inbox records</th><th>handled, last minute</th><th>dead letters</th>"
        "<th>dead, last minute</th></tr></thead>"
        f"<tbody>{rows}</tbody></table>"
        '<p class="muted">Live: this page refreshes every 5 seconds. Handled counts the inbox records '
        "written in the last minute (one per handler and message).</p>"
    )


def _letter_rows(letters: Iterable[DeadLetter], service: str, checkboxes: bool) -> str:
    rows = []
    for d in letters:
        box = f'<td><input type="checkbox" name="id" value="{h(d.id)}" aria-label="select {h(d.id)}"></td>'
        rows.append(
            f"<tr>{box if checkboxes else ''}"
            f'<td><a href="{h(service_url(service, "letters", d.id))}">{h(d.id)}</a></td>'
            f"<td>{h(d.message.name)}</td><td>{h(d.handler or '(none took it)')}</td>"
            f'<td class="num">{h(d.attempts)}</td><td>{h(d.reason)}</td>'
            f'<td class="time">{h(d.created_at.isoformat(sep=" ", timespec="seconds"))}</td></tr>'
        )
    return "".join(rows)


LETTER_HEAD = "<th>id</th><th>event</th><th>handler</th><th>attempts</th><th>reason</th><th>since (UTC)</th>"


def sagas_section(sagas: Sequence[SagaRecord], limit: int) -> str:
    """Open sagas, oldest first: state as JSON (cut at `STATE_SHOWN` characters), age, last update, next
    timeout; each time relative, the UTC one in its title."""
    if not sagas:
        return '<h2>Open sagas</h2><p class="muted">No open sagas.</p>'
    now = utcnow()
    rows, cut = [], False
    for r in sagas:
        state = json.dumps(dict(r.state), separators=(",", ":"), ensure_ascii=False)
        if len(state) > STATE_SHOWN:
            state, cut = state[:STATE_SHOWN] + "…", True
        timeout = (
            '<td class="muted">none</td>'
            if r.timeout_at is None
            else _time(r.timeout_at, _due((r.timeout_at - now).total_seconds()))
        )
        rows.append(
            f"<tr><td>{h(r.saga)}</td><td>{h(r.key)}</td><td><code>{h(state)}</code></td>"
            f"{_time(r.created_at, _age((now - r.created_at).total_seconds()))}"
            f"{_time(r.updated_at, _age((now - r.updated_at).total_seconds()) + ' ago')}{timeout}</tr>"
        )
    more = f" (the oldest {limit} of a saga)" if limit in Counter(r.saga for r in sagas).values() else ""
    return (
        "<h2>Open sagas</h2><table><thead><tr><th>saga</th><th>key</th><th>state</th><th>age</th>"
        f"<th>updated</th><th>next timeout</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
        f'<p class="muted">{h(len(sagas))} open saga(s){h(more)}.{CUT_NOTE if cut else ""}</p>'
    )


def _time(at: datetime, shown: str) -> str:
    return f'<td class="time" title="{h(at.isoformat(sep=" ", timespec="seconds"))} UTC">{shown}</td>'


def _due(seconds: float) -> str:
    return f"in {_age(seconds)}" if seconds >= 0 else f'<span class="bad">overdue by {_age(-seconds)}</span>'


def service_page(
    stats: ServiceStats,
    letters: Sequence[DeadLetter],
    csrf: str,
    limit: int,
    sagas: Sequence[SagaRecord] | None = None,
) -> str:
    """One service: its numbers, its open sagas (`None`: it has no saga) and its dead letters, with replay
    and discard (one, some or all)."""
    name = stats.name
    if not letters:
        listing = '<p class="ok">No dead letters.</p>'
    else:
        more = f" (the oldest {limit}; act on them first)" if len(letters) >= limit else ""
        listing = (
            f'<form method="post" action="{h(service_url(name, "confirm"))}">'
            f'<input type="hidden" name="csrf" value="{h(csrf)}">'
            f"<table><thead><tr><th></th>{LETTER_HEAD}</tr></thead>"
            f"<tbody>{_letter_rows(letters, name, checkboxes=True)}</tbody></table>"
            '<div class="actions"><button type="submit" name="action" value="replay">Replay selected</button>'
            '<button type="submit" name="action" value="discard" class="danger">Discard selected</button>'
            '<button type="submit" name="action" value="replay-all">Replay all</button>'
            '<button type="submit" name="action" value="discard-all" class="danger">Discard all</button>'
            f'</div></form><p class="muted">{h(len(letters))} dead letter(s){h(more)}.</p>'
        )
    outbox = (
        f"Outbox: {h(stats.outbox)} waiting, the oldest for {_age(stats.oldest_age)}."
        if stats.outbox
        else "Outbox: empty."
    )
    return (
        f"<h1>{h(name)}</h1><p>{outbox} Inbox: {_count(stats.inbox)} records, "
        f"{_count(stats.handled_last_minute)} in the last minute.</p>{tenants_section(stats.tenants)}"
        f"{'' if sagas is None else sagas_section(sagas, limit)}<h2>Dead letters</h2>{listing}"
    )


def tenants_section(tenants: Sequence[TenantStats]) -> str:
    """The tenant databases' outboxes and dead letters; nothing without a database per tenant."""
    if not tenants:
        return ""
    default = '<span class="muted">default</span>'
    rows = "".join(
        f"<tr><td>{default if t.tenant is None else h(t.tenant)}</td>"
        f'<td class="num">{h(t.outbox)}</td><td class="num">{_age(t.oldest_age)}</td>'
        f'<td class="num{" bad" if t.dead_letters else ""}">{h(t.dead_letters)}</td></tr>'
        for t in tenants
    )
    return (
        "<h2>Tenant databases</h2><table><thead><tr><th>tenant</th><th>outbox waiting</th>"
        f"<th>oldest waits</th><th>dead letters</th></tr></thead><tbody>{rows}</tbody></table>"
        '<p class="muted">The dead letters listed below are the default database\'s; '
        "a tenant's are listed with <code>eventrelay dead-letters --tenant</code>.</p>"
    )


def _body_text(body: bytes) -> str:
    try:
        return json.dumps(json.loads(body), indent=2, ensure_ascii=False)
    except (UnicodeDecodeError, ValueError):
        return body.decode("utf-8", errors="replace")


def letter_page(service: str, letter: DeadLetter, csrf: str) -> str:
    """One dead letter: why, its headers, its payload and the error, with replay and discard."""
    headers = "".join(
        f"<tr><th>{h(k)}</th><td>{h(v)}</td></tr>" for k, v in sorted(letter.message.headers.items())
    )
    trace = trace_id(letter.message.headers)
    trace_note = (
        f"<p>Trace id <code>{h(trace)}</code>: search for it in your tracing backend.</p>" if trace else ""
    )
    form = (
        f'<form method="post" action="{h(service_url(service, "confirm"))}">'
        f'<input type="hidden" name="csrf" value="{h(csrf)}">'
        f'<input type="hidden" name="id" value="{h(letter.id)}">'
        '<div class="actions"><button type="submit" name="action" value="replay">Replay</button>'
        '<button type="submit" name="action" value="discard" class="danger">Discard</button></div></form>'
    )
    return (
        f'<p><a href="{h(service_url(service))}">&larr; {h(service)}</a></p>'
        f"<h1>Dead letter {h(letter.id)}: {h(letter.message.name)}</h1>"
        f'<p class="bad">{h(letter.reason)}</p>{trace_note}{form}'
        "<table>"
        f"<tr><th>handler</th><td>{h(letter.handler or '(none took it)')}</td></tr>"
        f"<tr><th>attempts</th><td>{h(letter.attempts)}</td></tr>"
        f"<tr><th>message id</th><td>{h(letter.message.id)}</td></tr>"
        f"<tr><th>key</th><td>{h(letter.message.key or '-')}</td></tr>"
        f"<tr><th>since (UTC)</th><td>{h(letter.created_at.isoformat(sep=' '))}</td></tr></table>"
        f"<h2>Headers</h2><table>{headers}</table>"
        f"<h2>Payload</h2><pre>{h(_body_text(letter.message.body))}</pre>"
        f"<h2>Error</h2><pre>{h(letter.error or letter.reason)}</pre>"
    )


def confirm_page(service: str, action: str, letters: Sequence[DeadLetter], csrf: str) -> str:
    """Ask before acting: what will be replayed or discarded, and a button that does it."""
    verb = "Replay" if action == "replay" else "Discard"
    consequence = (
        "Each one is handled again now by this dashboard's process, with the service's code; a letter goes "
        "when its handler succeeds."
        if action == "replay"
        else "They are deleted without being handled. This cannot be undone."
    )
    ids = "".join(f'<input type="hidden" name="id" value="{h(d.id)}">' for d in letters)
    return (
        f"<h1>{h(verb)} {h(len(letters))} dead letter(s) of {h(service)}?</h1>"
        f'<p class="note">{h(consequence)}</p>'
        f"<table><thead><tr>{LETTER_HEAD}</tr></thead>"
        f"<tbody>{_letter_rows(letters, service, checkboxes=False)}</tbody></table>"
        f'<form method="post" action="{h(service_url(service, "apply"))}">'
        f'<input type="hidden" name="csrf" value="{h(csrf)}">'
        f'<input type="hidden" name="action" value="{h(action)}">{ids}'
        f'<div class="actions"><button type="submit" class="{"primary" if action == "replay" else "danger"}">'
        f"Yes, {h(verb.lower())} {h(len(letters))}</button>"
        f'<a href="{h(service_url(service))}">Cancel</a></div></form>'
    )


def result_page(service: str, action: str, results: Sequence[tuple[int, str | None]]) -> str:
    """What an action did, letter by letter."""
    done = "replayed" if action == "replay" else "discarded"
    rows = "".join(
        f"<tr><td>{h(i)}</td>"
        + (
            f'<td class="ok">{h(done)}</td>'
            if error is None
            else f'<td class="bad">not {h(done)}: {h(error)}</td>'
        )
        + "</tr>"
        for i, error in results
    )
    ok = sum(1 for _, error in results if error is None)
    return (
        f"<h1>{h(ok)} of {h(len(results))} dead letter(s) {h(done)}</h1>"
        f"<table><thead><tr><th>id</th><th>result</th></tr></thead><tbody>{rows}</tbody></table>"
        f'<p><a href="{h(service_url(service))}">Back to {h(service)}</a></p>'
    )


def login_page(csrf: str, error: str | None = None) -> str:
    """The token form."""
    problem = f'<p class="bad">{h(error)}</p>' if error else ""
    return (
        f"<h1>Log in</h1>{problem}"
        '<form method="post" action="/login">'
        f'<input type="hidden" name="csrf" value="{h(csrf)}">'
        '<label>Token <input type="password" name="token" autocomplete="current-password" autofocus></label> '
        '<button type="submit" class="primary">Log in</button></form>'
        '<p class="muted">The token is the one the dashboard was started with (--token).</p>'
    )
