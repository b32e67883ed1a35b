"""The CLI with a database per tenant, on real SQLite files: `eventrelay outbox` shows each tenant database's
backlog, and `--tenant` lists, shows, replays and purges that tenant's dead letters and lists its sagas."""

from __future__ import annotations

import importlib
import json
import re
import uuid
from pathlib import Path

from eventrelay.service import Service
from tests.bus.helpers import eventually
from tests.cli.test_cli import cli, succeeded, write_module

APP = """
from eventrelay import Event, Reject, Service, Settings, TenantDatabases

FOLDER = {folder!r}


class Shipped(Event, name="{prefix}.Shipped"):
    item: str


async def ship(event: Shipped) -> None:
    if event.item == "poison":
        raise Reject("cannot ship poison")


def make_orders() -> Service:
    return Service(
        "Orders",
        database=f"sqlite+aiosqlite:///{{FOLDER}}/orders.db",
        broker="memory://",
        tenants=TenantDatabases({{"acme": f"sqlite+aiosqlite:///{{FOLDER}}/acme.db"}}),
        handlers=[ship],
        settings=Settings(fetch_timeout=0.05, relay_poll_interval=0.05),
    )


orders = make_orders()
"""


async def test_outbox_and_dead_letters_by_tenant(app_folder: Path) -> None:
    name = f"tenants_{uuid.uuid4().hex[:10]}"
    write_module(app_folder, name, APP.format(folder=str(app_folder), prefix=f"Cli{name}"))
    module = importlib.import_module(name)
    running: Service = module.make_orders()
    async with running:
        bus = running.bus
        async with bus.tenant("acme"):
            await bus.publish(module.Shipped(item="later"), delay=3600)
            await bus.publish(module.Shipped(item="poison"))

        async def rejected() -> bool:
            async with bus.tenant("acme"):
                return len(await bus.dead_letters()) == 1

        await eventually(rejected, timeout=10)
    target = f"{name}:orders"

    lines = succeeded(await cli("outbox", target)).splitlines()
    assert len(lines) == 3
    assert re.fullmatch(r"Orders: 1 event\(s\) waiting, the oldest for \d+\.\ds", lines[0])
    assert lines[1] == "  the default database: 0 event(s) waiting"
    assert re.fullmatch(r"  tenant acme: 1 event\(s\) waiting, the oldest for \d+\.\ds", lines[2])
    data = json.loads(succeeded(await cli("outbox", target, "--json")))
    assert data["waiting"] == 1
    assert [(t["tenant"], t["waiting"]) for t in data["tenants"]] == [(None, 0), ("acme", 1)]

    assert json.loads(succeeded(await cli("dead-letters", "list", target, "--json"))) == []
    [letter] = json.loads(succeeded(await cli("dead-letters", "list", target, "--tenant", "acme", "--json")))
    assert letter["reason"] == "rejected by handler: cannot ship poison"
    one = json.loads(
        succeeded(await cli("dead-letters", "show", target, str(letter["id"]), "--tenant", "acme", "--json"))
    )
    assert one["headers"]["x-tenant-id"] == "acme"
    purged = await cli("dead-letters", "purge", target, "--tenant", "acme", "--yes", "--json")
    assert json.loads(succeeded(purged)) == {"service": "Orders", "deleted": [letter["id"]]}
    assert (
        json.loads(succeeded(await cli("dead-letters", "list", target, "--tenant", "acme", "--json"))) == []
    )
