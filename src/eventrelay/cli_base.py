"""What every `eventrelay` command shares: loading MODULE:SERVICE, running the library, printing safely."""

from __future__ import annotations

import asyncio
import importlib
import json
import sys
from collections.abc import Awaitable, Callable
from typing import TypeVar

import click
from rich.text import Text

from eventrelay.envelope import printable
from eventrelay.errors import EventRelayError
from eventrelay.service import Service

T = TypeVar("T")
TARGET = click.argument("target", metavar="MODULE:SERVICE")
JSON = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts instead of a table.")
TENANT = click.option(
    "--tenant", default=None, help="With a database per tenant: act on this tenant's database."
)


def load_service(target: str) -> Service:
    """Import `module:attribute` and check that it is a `Service`."""
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise click.ClickException(f"{target!r} is not MODULE:SERVICE, e.g. orders.app:service")
    sys.path.insert(0, ".")
    try:
        module = importlib.import_module(module_name)
    except (ImportError, SyntaxError, EventRelayError) as exc:  # e.g. a Service with a wrong broker URL
        raise click.ClickException(f"Cannot import {module_name!r}: {exc}") from exc
    finally:
        sys.path.remove(".")
    service = getattr(module, attribute, None)
    if not isinstance(service, Service):
        found = "nothing" if service is None else type(service).__name__
        raise click.ClickException(f"{target} must be an eventrelay Service; found {found}")
    return service


def print_json(data: object) -> None:
    click.echo(json.dumps(data))


def cell(value: object) -> Text:
    """Text for rich, from another service or a message: never read as markup (`[/]` would crash the table,
    `[link=...]` would render), with its control characters escaped so none reaches the terminal."""
    return Text(printable("-" if value is None else value))


def run_async(coro: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine; library errors become one line and exit code 1."""
    try:
        return asyncio.run(coro())  # type: ignore[arg-type]
    except EventRelayError as exc:  # its text may quote a message's fields
        raise click.ClickException(printable(exc)) from exc


def opened(service: Service, action: Callable[[Service], Awaitable[T]], tenant: str | None = None) -> T:
    """Run `action` on the service prepared, with its tables made, not started (`Service.opened`), with
    `tenant` in scope (`bus.tenant`)."""

    async def go() -> T:
        async with service.opened(), service.bus.tenant(tenant):
            return await action(service)

    return run_async(go)
