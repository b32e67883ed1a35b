"""The `eventrelay` command: a thin shell over the library."""

from __future__ import annotations

import asyncio
import logging
import sys

import click

from eventrelay.config import redact_url
from eventrelay.errors import EventRelayError


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Log at DEBUG level.")
def main(verbose: bool) -> None:
    """Run and inspect eventrelay services."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


@main.group()
def db() -> None:
    """The outbox, inbox and dead-letter tables."""


@db.command("init")
@click.argument("database_url")
@click.option("--prefix", default="eventrelay_", show_default=True, help="Table name prefix.")
def db_init(database_url: str, prefix: str) -> None:
    """Create the tables in DATABASE_URL if they do not exist.

    Example: eventrelay db init sqlite+aiosqlite:///order.db
    """
    from eventrelay.stores.sqlalchemy import SqlStore

    async def create() -> None:
        store = SqlStore(database_url, prefix=prefix)
        try:
            await store.create_tables()
        finally:
            await store.close()

    try:
        asyncio.run(create())
    except EventRelayError as exc:
        raise click.ClickException(str(exc)) from exc
    tables = f"{prefix}outbox, {prefix}inbox, {prefix}dead_letters"
    click.echo(f"Tables {tables} are ready in {redact_url(database_url)}")
