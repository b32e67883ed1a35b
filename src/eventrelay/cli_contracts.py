"""The commands that describe a service's contracts: `eventrelay events`, `asyncapi` and `schema`, with
`schema --check FILE` and `--write FILE` against a committed snapshot (the rules are in
`eventrelay.contracts`). Each shows an event's version, and the older versions its upcasters read."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from eventrelay.cli_base import JSON, TARGET, cell, load_service, print_json, run_async
from eventrelay.contracts import Change, compare, dumps, loads, service_schemas, snapshot, versions
from eventrelay.errors import ConfigurationError
from eventrelay.events import Event, event_name, event_version
from eventrelay.upcasting import upcast_versions


@click.command()
@TARGET
@JSON
def events(target: str, as_json: bool) -> None:
    """The event names a service publishes and handles (with the handlers), and their versions.

    Example: eventrelay events orders.app:service
    """
    from eventrelay.asyncapi import handled_events

    service = load_service(target)
    run_async(service.prepare)
    handled = handled_events(service)
    classes: dict[str, type[Event] | None] = {event_name(c): c for c in service.publishes}
    classes.update((name, cls) for name, (cls, _) in handled.items() if classes.get(name) is None)
    upcasts = {name: upcast_versions(cls) for name, cls in classes.items() if cls}
    if as_json:
        print_json(
            {
                "service": service.name,
                "publishes": service.published_events,
                "handles": {name: handlers for name, (_, handlers) in handled.items()},
                "versions": {name: event_version(cls) for name, cls in sorted(classes.items()) if cls},
                "upcasts_from": {name: older for name, older in sorted(upcasts.items()) if older},
            }
        )
        return
    table = Table(title=cell(f"Events of {service.name}"))
    table.add_column("event", overflow="fold")
    table.add_column("version")
    table.add_column("direction")
    table.add_column("handlers", overflow="fold")
    for name in service.published_events:
        table.add_row(cell(name), _version(classes[name]), "publishes", "")
    for name, (_, handlers) in handled.items():
        table.add_row(
            cell(name), _version(classes[name]), "handles", Text("\n").join(cell(h) for h in handlers)
        )
    Console().print(table)


def _version(cls: type[Event] | None) -> str:
    """The class's version and the older ones its upcasters read, "2 (upcasts 1)"; "-" for a dynamic event."""
    if cls is None:
        return "-"
    older = ", ".join(map(str, upcast_versions(cls)))
    return f"{event_version(cls)} (upcasts {older})" if older else str(event_version(cls))


@click.command()
@TARGET
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write to this file, not stdout.")
@click.option("--version", "api_version", default="1.0.0", show_default=True, help="info.version.")
@click.option(
    "--json", "as_json", is_flag=True, help="With -o, say what was written as JSON (the document is JSON)."
)
def asyncapi(target: str, output: str | None, api_version: str, as_json: bool) -> None:
    """Write the AsyncAPI 3.0 document (JSON) of what a service publishes and handles.

    Example: eventrelay asyncapi orders.app:service -o orders.asyncapi.json
    """
    from eventrelay.asyncapi import asyncapi_document

    service = load_service(target)
    run_async(service.prepare)
    text = json.dumps(asyncapi_document(service, api_version), indent=2) + "\n"
    if output is None:
        click.echo(text, nl=False)
    else:
        with open(output, "w", encoding="utf-8") as file:
            file.write(text)
        if as_json:
            print_json({"service": service.name, "written": output})
        else:
            click.echo(f"Wrote the AsyncAPI document of {service.name} to {output}", err=True)


@click.command()
@TARGET
@click.option("--json", "as_json", is_flag=True, help="JSON for scripts (the schemas are JSON either way).")
@click.option("--check", metavar="FILE", help="Exit 1 on a change that breaks a consumer of this snapshot.")
@click.option("--write", metavar="FILE", help="Write the schemas to this snapshot (other services' stay).")
def schema(target: str, as_json: bool, check: str | None, write: str | None) -> None:
    """Print the JSON Schema of each event a service publishes or handles (with its version when over 1);
    or check or write a snapshot.

    Example: eventrelay schema products.app:service --check contracts.lock.json
    """
    from eventrelay.asyncapi import event_schemas

    service = load_service(target)
    run_async(service.prepare)
    schemas = event_schemas(service)
    if check or write:
        check_or_write(service.name, schemas, check, write, as_json)
    else:
        click.echo(json.dumps(schemas, indent=2))


def check_or_write(
    service: str, schemas: Mapping[str, Any], check: str | None, write: str | None, as_json: bool
) -> None:
    """Write the snapshot, or check against it: exit 1 listing each breaking change, else 0."""
    if check and write:
        raise click.UsageError("Give --check FILE or --write FILE, not both")
    try:
        if write:
            _write(Path(write), service, schemas, as_json)
        elif check:
            _check(Path(check), service, schemas, as_json)
    except (OSError, ConfigurationError) as exc:
        raise click.ClickException(str(exc)) from exc


def _write(path: Path, service: str, schemas: Mapping[str, Any], as_json: bool) -> None:
    previous = loads(path.read_text(encoding="utf-8"), str(path)) if path.exists() else None
    path.write_text(dumps(snapshot(service, schemas, previous)), encoding="utf-8")
    if as_json:
        written = {"service": service, "written": str(path), "events": sorted(schemas)}
        click.echo(json.dumps({**written, "versions": versions(schemas)}))
    else:
        above = "".join(f", {name} at version {v}" for name, v in versions(schemas).items() if v > 1)
        click.echo(f"Wrote the contracts of {service} ({len(schemas)} event(s){above}) to {path}")


def _check(path: Path, service: str, schemas: Mapping[str, Any], as_json: bool) -> None:
    old = service_schemas(loads(path.read_text(encoding="utf-8"), str(path)), service, str(path))
    changes = compare(old, schemas)
    breaking = [c for c in changes if c.breaking]
    safe = [c for c in changes if not c.breaking]
    if as_json:
        click.echo(
            json.dumps(
                {
                    "service": service,
                    "compatible": not breaking,
                    "breaking": [c.as_dict() for c in breaking],
                    "safe": [c.as_dict() for c in safe],
                }
            )
        )
    else:
        _say_checked(path, service, breaking, safe)
    if breaking:
        sys.exit(1)


def _say_checked(path: Path, service: str, breaking: list[Change], safe: list[Change]) -> None:
    if breaking:
        click.echo(f"{len(breaking)} breaking change(s) in the contracts of {service} against {path}:")
    else:
        compatible = f"The contracts of {service} are compatible with {path}"
        click.echo(compatible + ("; safe changes:" if safe else " (no change)"))
    for change in breaking:
        click.echo(f"  - {change}")
    if safe and breaking:
        click.echo("Safe changes:")
    for change in safe:
        click.echo(f"  - {change}")
    if safe and not breaking:
        click.echo(f"Record them with --write {path}")
