"""The `eventrelay` command: a thin shell over the library (click for parsing, rich for tables).

The commands that describe a service's contracts (`events`, `asyncapi`, `schema`) live in `cli_contracts.py`,
what every command shares in `cli_base.py`."""

from __future__ import annotations

import json
import logging
import sys
from collections import Counter
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from eventrelay.cli_base import JSON, TARGET, TENANT, cell, load_service, opened, print_json, run_async
from eventrelay.cli_contracts import asyncapi, events, schema
from eventrelay.config import redact_url
from eventrelay.envelope import printable
from eventrelay.errors import ConfigurationError, EventRelayError
from eventrelay.saga import SagaRecord
from eventrelay.service import Service
from eventrelay.stores.base import DeadLetter, Store, utcnow
from eventrelay.tenancy import TenantStore


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Log at DEBUG level.")
@click.version_option(package_name="eventrelay", prog_name="eventrelay")
def main(verbose: bool) -> None:
    """Run and inspect eventrelay services.

    MODULE:SERVICE names a `Service` object, e.g. `bookstore.orders.app:service`.
    """
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


@main.command()
@TARGET
@click.option("--json", "as_json", is_flag=True, help="Print a JSON line when started and when stopped.")
def run(target: str, as_json: bool) -> None:
    """Consume and relay until SIGINT or SIGTERM, then stop gracefully and exit 0.

    Example: eventrelay run orders.app:service
    """
    service = load_service(target)

    def started() -> None:
        database = service.database_url
        print_json(
            {
                "service": service.name,
                "started": True,
                "broker": redact_url(service.bus.broker_url),
                "database": redact_url(database) if database else None,
                "handles": service.handled_events,
            }
        )

    run_async(lambda: service.run(started if as_json else None))
    if as_json:
        print_json({"service": service.name, "stopped": True})


@main.group()
def db() -> None:
    """The outbox, inbox and dead-letter tables."""


@db.command("init")
@click.argument("database", metavar="URL|MODULE:SERVICE")
@click.option("--prefix", default="eventrelay_", show_default=True, help="Table name prefix (with a URL).")
@JSON
def db_init(database: str, prefix: str, as_json: bool) -> None:
    """Create the tables (if they do not exist) in a database URL or a service's database (with the
    service's saga tables).

    Example: eventrelay db init sqlite+aiosqlite:///order.db
    """
    from eventrelay.stores.sqlalchemy import SqlStore

    store: Store
    service: Service | None = None
    if "://" in database:
        try:  # a wrong scheme or a missing driver is one line, not a traceback
            url, store = database, SqlStore(database, prefix=prefix)
        except EventRelayError as exc:
            raise click.ClickException(str(exc)) from exc
    else:
        service = load_service(database)
        if service.database_url is None:
            raise click.ClickException(f"{service.name} has no database: its outbox and inbox live in memory")
        url, store = service.database_url, service.bus.store

    async def create() -> None:
        try:
            if service is None:
                await store.create_tables()
            else:
                await service.prepare()  # subscribes its sagas, whose tables the bus makes too
                await service.bus.create_tables()
        finally:
            await store.close()

    run_async(create)
    if as_json:
        print_json({"database": redact_url(url), "ready": True})
    else:
        click.echo(f"The eventrelay tables are ready in {redact_url(url)}")


@main.command()
@TARGET
@JSON
def outbox(target: str, as_json: bool) -> None:
    """How many events wait in the service's outbox, and how old the oldest is; with a database per
    tenant, also in each tenant database's.

    Example: eventrelay outbox products.app:service
    """
    service = load_service(target)

    Backlog = tuple[int, datetime | None]

    async def backlogs(s: Service) -> tuple[Backlog, dict[str | None, Backlog]]:
        store = s.bus.store
        if not isinstance(store, TenantStore):
            return await store.outbox_backlog(), {}
        await store.refresh()
        return await store.outbox_backlog(), await store.outbox_backlogs()

    (count, oldest), tenants = opened(service, backlogs)
    now = utcnow()
    age = (now - oldest).total_seconds() if oldest else None
    ages = {t: (now - o).total_seconds() if o else None for t, (_, o) in tenants.items()}
    if as_json:
        data: dict[str, Any] = {"service": service.name, "waiting": count, "oldest_age_seconds": age}
        if tenants:
            data["tenants"] = [
                {"tenant": t, "waiting": n, "oldest_age_seconds": ages[t]} for t, (n, _) in tenants.items()
            ]
        print_json(data)
        return
    click.echo(f"{service.name}: {count} event(s) waiting{_oldest(age)}")
    for tenant, (waiting, _) in tenants.items():
        where = "the default database" if tenant is None else f"tenant {printable(tenant)}"
        click.echo(f"  {where}: {waiting} event(s) waiting{_oldest(ages[tenant])}")


def _oldest(age: float | None) -> str:
    return f", the oldest for {age:.1f}s" if age is not None else ""


@main.group("dead-letters")
def dead_letters() -> None:
    """List, show, replay and purge the messages a service gave up on."""


def _letter_dict(letter: DeadLetter, full: bool) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": letter.id,
        "event": letter.message.name,
        "handler": letter.handler,
        "attempts": letter.attempts,
        "reason": letter.reason,
        "created_at": letter.created_at.isoformat(),
        "message_id": letter.message.id,
    }
    if full:
        data.update(
            headers=dict(letter.message.headers),
            key=letter.message.key,
            body=letter.message.body.decode("utf-8", errors="replace"),
            error=letter.error,
        )
    return data


@dead_letters.command("list")
@TARGET
@click.option("--limit", default=100, show_default=True, help="At most this many, oldest first.")
@TENANT
@JSON
def dead_letters_list(target: str, limit: int, tenant: str | None, as_json: bool) -> None:
    """List dead letters, oldest first.

    Example: eventrelay dead-letters list orders.app:service
    """
    letters = opened(load_service(target), lambda s: s.bus.dead_letters(limit), tenant)
    if as_json:
        print_json([_letter_dict(letter, full=False) for letter in letters])
        return
    more = " (the oldest; --limit shows more)" if len(letters) == limit else ""
    table = Table(title=cell(f"{len(letters)} dead letter(s) of {target}{more}"))
    for column in ("id", "event", "handler", "attempts", "reason", "created_at"):
        table.add_column(column, overflow="fold")
    for letter in letters:
        row = _letter_dict(letter, full=False)
        table.add_row(*(cell(row[c]) for c in list(row)[:6]))
    Console().print(table)


@dead_letters.command("show")
@TARGET
@click.argument("letter_id", type=int)
@TENANT
@JSON
def dead_letters_show(target: str, letter_id: int, tenant: str | None, as_json: bool) -> None:
    """Show one dead letter with its headers, body and error.

    Example: eventrelay dead-letters show orders.app:service 7
    """
    letter = opened(load_service(target), lambda s: s.bus.dead_letter(letter_id), tenant)
    data = _letter_dict(letter, full=True)
    if as_json:
        print_json(data)
        return
    for field, value in data.items():  # a body or a traceback keeps its lines; the rest is one line each
        click.echo(f"{field}: {printable(value, lines=field in ('body', 'error'))}")


@dead_letters.command("replay")
@TARGET
@click.argument("letter_ids", type=int, nargs=-1)
@click.option("--all", "replay_all", is_flag=True, help="Replay every dead letter of the service.")
@TENANT
@JSON
def dead_letters_replay(
    target: str, letter_ids: Sequence[int], replay_all: bool, tenant: str | None, as_json: bool
) -> None:
    """Handle dead letters again now; each one goes when its handler succeeds.

    Example: eventrelay dead-letters replay orders.app:service 7 8   (or --all)
    """
    if bool(letter_ids) == replay_all:
        raise click.UsageError("Give dead-letter ids, or --all (not both)")
    service = load_service(target)

    async def replay(s: Service) -> list[tuple[int, str | None]]:
        ids = [d.id for d in await s.bus.dead_letters(limit=1_000_000)] if replay_all else list(letter_ids)
        results: list[tuple[int, str | None]] = []
        for letter_id in ids:
            try:
                await s.bus.replay(letter_id)
                results.append((letter_id, None))
            except Exception as exc:  # report each failure; the letter stays
                results.append((letter_id, f"{type(exc).__name__}: {exc}"))
        return results

    results = opened(service, replay, tenant)
    if as_json:
        print_json([{"id": i, "replayed": e is None, "error": e} for i, e in results])
    else:
        for letter_id, error in results:
            outcome = "replayed" if error is None else f"not replayed: {printable(error)}"
            click.echo(f"{letter_id}: {outcome}")
    if any(error for _, error in results):
        sys.exit(1)


@dead_letters.command("purge")
@TARGET
@click.argument("letter_ids", type=int, nargs=-1)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@TENANT
@JSON
def dead_letters_purge(
    target: str, letter_ids: Sequence[int], yes: bool, tenant: str | None, as_json: bool
) -> None:
    """Delete dead letters without handling them: the given ids, or all of the service's.

    Example: eventrelay dead-letters purge orders.app:service --yes
    """
    service = load_service(target)
    what = f"dead letters {', '.join(map(str, letter_ids))}" if letter_ids else "ALL dead letters"
    if not yes:
        click.confirm(f"Delete {what} of {service.name}?", abort=True, err=as_json)  # stdout holds the JSON

    async def purge(s: Service) -> list[int]:
        ids = list(letter_ids) or [d.id for d in await s.bus.dead_letters(limit=1_000_000)]
        missing = []
        for letter_id in ids:  # check them all before deleting any
            try:
                await s.bus.dead_letter(letter_id)
            except ConfigurationError:
                missing.append(letter_id)
        if missing:
            raise click.ClickException(
                f"No dead letter {', '.join(map(str, missing))} in {s.name}; nothing deleted"
            )
        for letter_id in ids:
            await s.bus.discard(letter_id)
        return ids

    deleted = opened(service, purge, tenant)
    if as_json:
        print_json({"service": service.name, "deleted": deleted})
    else:
        click.echo(f"Deleted {len(deleted)} dead letter(s) of {service.name}")


@main.command()
@TARGET
@click.option("--completed", is_flag=True, help="Include the completed sagas (those whose rows are kept).")
@click.option("--limit", default=100, show_default=True, help="At most this many of each saga, oldest first.")
@TENANT
@JSON
def sagas(target: str, completed: bool, limit: int, tenant: str | None, as_json: bool) -> None:
    """List a service's open sagas: state, age, last update and next timeout.

    Example: eventrelay sagas orders.app:service --completed
    """
    service = load_service(target)
    records = opened(service, lambda s: s.bus.saga_records(limit=limit, completed=completed), tenant)
    now = utcnow()
    if as_json:
        print_json([_saga_dict(record, now) for record in records])
        return
    which = "saga" if completed else "open saga"
    if not service.bus.sagas:
        click.echo(f"{service.name} has no sagas: it subscribes no Saga class")
        return
    if not records:
        click.echo(f"{service.name} has no {which}s ({', '.join(s.__name__ for s in service.bus.sagas)})")
        return
    table = Table(title=cell(f"{len(records)} {which}(s) of {service.name}"))
    table.add_column("saga", overflow="fold")
    table.add_column("key", overflow="fold")
    table.add_column("state", max_width=60, no_wrap=True, overflow="ellipsis")
    for column in ("age", "updated", "next timeout", "status"):
        table.add_column(column, no_wrap=True)
    for r in records:
        table.add_row(
            cell(r.saga),
            cell(r.key),
            cell(json.dumps(r.state, separators=(",", ":"), ensure_ascii=False)),
            _duration(now - r.created_at),
            _duration(now - r.updated_at) + " ago",
            "none" if r.timeout_at is None else _until(r.timeout_at - now),
            "completed" if r.completed else "open",
        )
    Console().print(table)
    if limit in Counter(r.saga for r in records).values():
        click.echo(f"Only the oldest {limit} of each saga are shown: --limit shows more")


def _saga_dict(record: SagaRecord, now: datetime) -> dict[str, Any]:
    timeout = record.timeout_at
    return {
        "saga": record.saga,
        "key": record.key,
        "state": dict(record.state),
        "completed": record.completed,
        "version": record.version,
        "created_at": record.created_at.isoformat(),
        "updated_at": record.updated_at.isoformat(),
        "timeout_at": timeout.isoformat() if timeout else None,
        "age_seconds": (now - record.created_at).total_seconds(),
        "timeout_in_seconds": (timeout - now).total_seconds() if timeout else None,
    }


def _duration(span: timedelta) -> str:
    """A duration for a person: 42.0s, 5.2 min, 3.1 h, 2.0 d."""
    seconds = span.total_seconds()
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h" if seconds < 172_800 else f"{seconds / 86_400:.1f} d"


def _until(span: timedelta) -> str:
    """When a timeout is due, `span` from now: "in 5.0 min", or "overdue by 2.0s" when it has passed."""
    return f"in {_duration(span)}" if span >= timedelta(0) else f"overdue by {_duration(-span)}"


@main.command()
@click.argument("targets", metavar="MODULE:SERVICE...", nargs=-1, required=True)
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", default=8090, show_default=True, help="Port to listen on.")
@click.option(
    "--token",
    envvar="EVENTRELAY_DASHBOARD_TOKEN",
    help="Log-in token (or EVENTRELAY_DASHBOARD_TOKEN); required unless --host is 127.0.0.1 or localhost.",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON line with the URL once listening.")
def dashboard(targets: Sequence[str], host: str, port: int, token: str | None, as_json: bool) -> None:
    """Serve a web dashboard of services: outbox, inbox, rates, open sagas, dead letters; replay and discard.

    Example: eventrelay dashboard orders.app:service products.app:service --port 8090
    """
    from eventrelay.dashboard import run_dashboard

    services = [load_service(target) for target in targets]

    def listening(url: str) -> None:
        print_json({"url": url, "services": [s.name for s in services]})

    run_async(lambda: run_dashboard(services, host, port, token, on_listening=listening if as_json else None))


for command in (events, asyncapi, schema):  # what a service publishes and handles: cli_contracts.py
    main.add_command(command)
