"""`eventrelay schema --check FILE` and `--write FILE`: a service's ETO schemas against a committed snapshot
(the rules are in `eventrelay.contracts`)."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click

from eventrelay.contracts import compare, dumps, loads, service_schemas, snapshot
from eventrelay.errors import ConfigurationError


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
        click.echo(json.dumps({"service": service, "written": str(path), "events": sorted(schemas)}))
    else:
        click.echo(f"Wrote the contracts of {service} ({len(schemas)} event(s)) to {path}")


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
    if breaking:
        sys.exit(1)
