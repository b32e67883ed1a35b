"""The `eventrelay` command through click's runner, on real stores (SQLite, and PostgreSQL once).

Each test writes a small app module (`shop_<hex>.py`) into its own folder and imports it by a unique name,
so its event classes, handlers and `Service` objects are fresh. Dead letters are real: a service of the module
runs in-process, handles events and gives up on some; then the CLI loads the module's `orders` service (a
different `Service` object on the same database, as a separate process would) and inspects or replays them.

The CLI runs `asyncio.run` itself, so the async tests call it in a worker thread (`asyncio.to_thread`).
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.metadata
import json
import os
import socket
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import click
import pytest
from click import Command
from click.testing import CliRunner, Result
from sqlalchemy import inspect
from sqlalchemy.ext.asyncio import create_async_engine

from eventrelay.cli import main
from eventrelay.cli_base import load_service
from eventrelay.envelope import Message
from eventrelay.service import Service
from eventrelay.testing import wait_until_idle

APP = '''
"""A shop: Orders fulfils orders (rejecting poison) and invoices payments (failing until FIXED)."""

from eventrelay import DistributedEventHandler, Event, Reject, RetryPolicy, Service, Settings

DATABASE = {database!r}
FIXED = False
FULFILLED: list[str] = []
INVOICED: list[str] = []


class OrderPlaced(Event, name="{prefix}.OrderPlaced"):
    item: str


class PaymentTaken(Event, name="{prefix}.PaymentTaken"):
    order: str


class Fulfil(DistributedEventHandler[OrderPlaced]):
    async def handle_event(self, event: OrderPlaced) -> None:
        if event.item == "poison":
            raise Reject(f"cannot ship {{event.item}}")
        FULFILLED.append(event.item)


class Invoice(DistributedEventHandler[PaymentTaken]):
    async def handle_event(self, event: PaymentTaken) -> None:
        if not FIXED:
            raise RuntimeError(f"ledger offline for {{event.order}}")
        INVOICED.append(event.order)


QUICK = Settings(
    retry=RetryPolicy(max_attempts=2, initial_delay=0.0, max_delay=0.0, jitter=0.0),
    relay_poll_interval=0.05,
    fetch_timeout=0.05,
)


def make_orders() -> Service:
    return Service(
        "Orders",
        database=DATABASE,
        broker="memory://",
        handlers=[Fulfil, Invoice],
        publishes=[OrderPlaced, PaymentTaken],
        settings=QUICK,
    )


def make_billing() -> Service:
    return Service("Billing", database=DATABASE, broker="memory://", handlers=[Invoice], settings=QUICK)


orders = make_orders()
billing = make_billing()
scratch = Service("Scratch", broker="memory://")
not_a_service = 42
'''


@dataclass
class Shop:
    """The app module of one test."""

    module: ModuleType
    database: str

    @property
    def name(self) -> str:
        return self.module.__name__

    @property
    def orders(self) -> str:
        return f"{self.name}:orders"

    @property
    def billing(self) -> str:
        return f"{self.name}:billing"

    def fix_the_ledger(self) -> None:
        """From now on, `Invoice` succeeds."""
        self.module.__dict__["FIXED"] = True

    def event(self, cls: str, **fields: str) -> Any:
        return getattr(self.module, cls)(**fields)

    async def produce(self, *events: Any, service: str = "orders") -> None:
        """Run a fresh service of the module in-process until it has handled (or given up on) `events`."""
        running: Service = getattr(self.module, f"make_{service}")()
        async with running:
            for event in events:
                await running.bus.publish(event)
            await wait_until_idle(running.bus, timeout=30)


def write_module(folder: Path, name: str, source: str) -> None:
    (folder / f"{name}.py").write_text(textwrap.dedent(source))
    importlib.invalidate_caches()


@pytest.fixture
def make_shop(app_folder: Path) -> Callable[[str], Shop]:
    def make(database: str) -> Shop:
        unique = uuid.uuid4().hex[:10]
        name = f"shop_{unique}"
        write_module(app_folder, name, APP.format(database=database, prefix=f"Shop{unique}"))
        return Shop(importlib.import_module(name), database)

    return make


@pytest.fixture
def shop(make_shop: Callable[[str], Shop], sqlite_url: str) -> Shop:
    return make_shop(sqlite_url)


async def cli(*args: str, input: str | None = None, columns: int = 250) -> Result:
    """Run `eventrelay ARGS` through click's runner, in a thread (the command runs its own event loop)."""
    runner = CliRunner()
    # A wide terminal, so rich does not fold names in tables.
    env = {"COLUMNS": str(columns)}
    return await asyncio.to_thread(runner.invoke, main, list(args), input=input, env=env)


def succeeded(result: Result) -> str:
    assert result.exception is None, f"{result.exception!r}\n{result.output}"
    assert result.exit_code == 0, result.output
    return result.output


def failed_cleanly(result: Result, exit_code: int = 1) -> str:
    """The command failed with `exit_code`, printing one error line and no traceback."""
    # The runner catches every exception; only SystemExit (what click raises for handled errors) is clean.
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"unhandled {result.exception!r}\n{result.output}"
    )
    assert result.exit_code == exit_code, result.output
    assert "Traceback" not in result.output
    return result.output


def one_error_line(result: Result) -> str:
    output = failed_cleanly(result).strip()
    assert len(output.splitlines()) == 1, output
    assert output.startswith("Error: "), output
    return output


async def letters(target: str) -> list[dict[str, Any]]:
    listed = json.loads(succeeded(await cli("dead-letters", "list", target, "--json")))
    assert isinstance(listed, list)
    return listed


async def letter_ids(target: str, event: str) -> list[int]:
    return [letter["id"] for letter in await letters(target) if letter["event"].endswith(event)]


async def table_names(url: str) -> set[str]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            return set(await conn.run_sync(lambda sync: inspect(sync).get_table_names()))
    finally:
        await engine.dispose()


TABLES = {"eventrelay_outbox", "eventrelay_inbox", "eventrelay_dead_letters"}


# --- db init -----------------------------------------------------------------------------------------


async def test_db_init_url_creates_the_tables_and_is_idempotent(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/fresh.db"

    assert "tables are ready" in succeeded(await cli("db", "init", url))
    assert await table_names(url) >= TABLES
    succeeded(await cli("db", "init", url))  # again: nothing to do, no error


async def test_db_init_json(tmp_path: Path, shop: Shop) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/fresh-json.db"

    assert json.loads(succeeded(await cli("db", "init", url, "--json"))) == {"database": url, "ready": True}
    by_service = json.loads(succeeded(await cli("db", "init", shop.orders, "--json")))
    assert by_service == {"database": shop.database, "ready": True}


async def test_db_init_url_with_a_prefix(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/prefixed.db"

    succeeded(await cli("db", "init", url, "--prefix", "shop_"))

    assert await table_names(url) >= {"shop_outbox", "shop_inbox", "shop_dead_letters"}
    assert not TABLES & await table_names(url)


async def test_db_init_service_creates_the_tables_in_its_database(shop: Shop) -> None:
    output = succeeded(await cli("db", "init", shop.orders))

    assert "tables are ready" in output
    assert await table_names(shop.database) >= TABLES


async def test_db_init_of_a_service_without_a_database(shop: Shop) -> None:
    assert "Scratch has no database" in one_error_line(await cli("db", "init", f"{shop.name}:scratch"))


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("nosuchdb://host/db", "Not a usable database URL"),
        ("postgresql+asyncpg://user:pw@127.0.0.1:notaport/db", "Not a usable database URL"),
    ],
)
async def test_db_init_with_a_wrong_url(url: str, expected: str) -> None:
    assert expected in one_error_line(await cli("db", "init", url))


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_db_init_to_an_unreachable_server_hides_the_password() -> None:
    password = "Sup3r-s3cret-pw"
    url = f"postgresql+asyncpg://shop:{password}@127.0.0.1:{_closed_port()}/shop"

    output = one_error_line(await cli("db", "init", url))

    assert password not in output
    assert "shop:***@127.0.0.1" in output
    assert "Could not create the eventrelay tables" in output


# --- outbox ------------------------------------------------------------------------------------------


async def test_outbox_counts_what_waits(shop: Shop) -> None:
    succeeded(await cli("db", "init", shop.orders))
    empty = json.loads(succeeded(await cli("outbox", shop.orders, "--json")))
    assert empty == {"service": "Orders", "waiting": 0, "oldest_age_seconds": None}
    assert "Orders: 0 event(s) waiting" in succeeded(await cli("outbox", shop.orders))

    idle: Service = shop.module.make_orders()  # not started: its relay does not send what it publishes
    await idle.bus.store.create_tables()
    try:
        await idle.bus.publish(shop.event("OrderPlaced", item="book"))
        await idle.bus.publish(shop.event("PaymentTaken", order="o-1"))
    finally:
        await idle.bus.store.close()

    data = json.loads(succeeded(await cli("outbox", shop.orders, "--json")))
    assert set(data) == {"service", "waiting", "oldest_age_seconds"}
    assert data["service"] == "Orders"
    assert data["waiting"] == 2
    assert isinstance(data["oldest_age_seconds"], float)
    assert 0 <= data["oldest_age_seconds"] < 3600
    assert "Orders: 2 event(s) waiting" in succeeded(await cli("outbox", shop.orders))


# --- events ------------------------------------------------------------------------------------------


async def test_events_table_and_json(shop: Shop) -> None:
    placed = shop.module.OrderPlaced.__event_name__
    taken = shop.module.PaymentTaken.__event_name__

    table = succeeded(await cli("events", shop.orders))
    for text in ("Events of Orders", placed, taken, "publishes", "handles", f"{shop.name}.Fulfil"):
        assert text in table

    data = json.loads(succeeded(await cli("events", shop.orders, "--json")))
    assert data == {
        "service": "Orders",
        "publishes": sorted([placed, taken]),
        "handles": {placed: [f"{shop.name}.Fulfil"], taken: [f"{shop.name}.Invoice"]},
        "versions": {placed: 1, taken: 1},
        "upcasts_from": {},
    }
    billing = json.loads(succeeded(await cli("events", shop.billing, "--json")))
    assert billing == {
        "service": "Billing",
        "publishes": [],
        "handles": {taken: [f"{shop.name}.Invoice"]},
        "versions": {taken: 1},
        "upcasts_from": {},
    }


# --- dead-letters list / show ------------------------------------------------------------------------


async def test_dead_letters_list_table_and_json(shop: Shop) -> None:
    await shop.produce(
        shop.event("OrderPlaced", item="book"),
        shop.event("OrderPlaced", item="poison"),
        shop.event("PaymentTaken", order="o-1"),
    )
    assert shop.module.FULFILLED == ["book"]

    listed = await letters(shop.orders)
    assert len(listed) == 2
    for letter in listed:
        assert set(letter) == {"id", "event", "handler", "attempts", "reason", "created_at", "message_id"}
    by_event = {letter["event"].rpartition(".")[2]: letter for letter in listed}
    assert by_event["OrderPlaced"]["handler"] == f"{shop.name}.Fulfil"
    assert by_event["OrderPlaced"]["reason"] == "rejected by handler: cannot ship poison"
    assert by_event["OrderPlaced"]["attempts"] == 1
    assert by_event["PaymentTaken"]["handler"] == f"{shop.name}.Invoice"
    assert by_event["PaymentTaken"]["attempts"] == 2
    assert "RuntimeError: ledger offline for o-1" in by_event["PaymentTaken"]["reason"]
    assert [letter["id"] for letter in listed] == sorted(letter["id"] for letter in listed)  # oldest first

    table = succeeded(await cli("dead-letters", "list", shop.orders))
    assert "2 dead letter(s)" in table
    for text in ("OrderPlaced", "PaymentTaken", "cannot ship poison", f"{shop.name}.Invoice"):
        assert text in table

    limited = json.loads(succeeded(await cli("dead-letters", "list", shop.orders, "--limit", "1", "--json")))
    assert [letter["id"] for letter in limited] == [listed[0]["id"]]


async def test_dead_letters_belong_to_their_service(shop: Shop) -> None:
    await shop.produce(shop.event("PaymentTaken", order="o-1"))
    await shop.produce(shop.event("PaymentTaken", order="b-1"), service="billing")

    (orders_letter,) = await letters(shop.orders)
    (billing_letter,) = await letters(shop.billing)
    assert orders_letter["id"] != billing_letter["id"]

    # Orders cannot see, replay or purge the letter of Billing, though both live in one database.
    shown = one_error_line(await cli("dead-letters", "show", shop.orders, str(billing_letter["id"])))
    assert f"No dead letter {billing_letter['id']} in service 'Orders'" in shown
    purged = one_error_line(
        await cli("dead-letters", "purge", shop.orders, str(billing_letter["id"]), "--yes")
    )
    assert f"No dead letter {billing_letter['id']} in Orders; nothing deleted" in purged
    succeeded(await cli("dead-letters", "purge", shop.orders, "--yes"))
    assert await letters(shop.orders) == []
    assert [letter["id"] for letter in await letters(shop.billing)] == [billing_letter["id"]]


async def test_dead_letters_show_body_headers_and_error(shop: Shop) -> None:
    await shop.produce(shop.event("PaymentTaken", order="o-42"))
    (letter_id,) = await letter_ids(shop.orders, "PaymentTaken")

    output = succeeded(await cli("dead-letters", "show", shop.orders, str(letter_id)))
    assert f"id: {letter_id}" in output
    assert "body: " in output
    assert "o-42" in output
    assert "headers: " in output
    assert "correlation" in output.lower()
    assert "error: " in output
    assert "RuntimeError: ledger offline for o-42" in output

    data = json.loads(succeeded(await cli("dead-letters", "show", shop.orders, str(letter_id), "--json")))
    assert data["id"] == letter_id
    assert data["event"] == shop.module.PaymentTaken.__event_name__
    assert data["handler"] == f"{shop.name}.Invoice"
    assert json.loads(data["body"]) == {"order": "o-42"}
    assert isinstance(data["headers"], dict)
    assert data["headers"]
    assert data["key"] is None
    assert "RuntimeError: ledger offline for o-42" in data["error"]


# Rich markup (a link, a closing tag that closes nothing), terminal codes (clear screen, an OSC 8 hyperlink,
# a bell), a bidirectional override and a line break that would forge a log line.
HOSTILE = "[link=https://evil.example]x[/link] [/] \x1b[2J\x1b]8;;https://evil.example\x07y \u202ez"
TERMINAL_CODES = ("\x1b", "\x07", "\u202e")


async def test_hostile_text_in_a_dead_letter_is_shown_literally_and_logged_on_one_line(
    shop: Shop, caplog: pytest.LogCaptureFixture
) -> None:
    name = f"{HOSTILE}\nERROR forged"
    running: Service = shop.module.make_orders()
    async with running:  # a message from the broker no event can be declared to match: a dead letter
        await running.bus.broker.bind("Orders", name)
        body = json.dumps({"note": HOSTILE + "\nsecond line"}).encode()
        await running.bus.broker.publish([Message(f"id-{HOSTILE}\n", name, body, {"x-note": HOSTILE})])
        await wait_until_idle(running.bus, timeout=30)
    # Before issue 15: `[/]` crashed `dead-letters list` (MarkupError), `[link=...]` rendered, ESC and OSC
    # sequences reached the terminal, and the log line of the dead letter broke in two.
    listed = succeeded(await cli("dead-letters", "list", shop.orders, columns=2000))
    for code in TERMINAL_CODES:
        assert code not in listed
    assert "[link=https://evil.example]x[/link] [/] \\x1b[2J" in listed  # as it came, escaped
    assert "\\nERROR forged" in listed
    [letter] = await letters(shop.orders)
    assert "has control characters" in letter["reason"]
    shown = succeeded(await cli("dead-letters", "show", shop.orders, str(letter["id"])))
    for code in TERMINAL_CODES:
        assert code not in shown
    lines = shown.splitlines()
    assert not [line for line in lines if line.startswith("ERROR forged")]  # one line per field...
    assert [line for line in lines if line.startswith("body: ")] == [f"body: {body.decode()}"]  # JSON: \n
    assert "[link=https://evil.example]x[/link] [/]" in shown
    logged = [record.getMessage() for record in caplog.records if record.name.startswith("eventrelay")]
    assert [line for line in logged if line.startswith("Dead letter: id-[link=")], logged
    for line in logged:
        assert "\n" not in line, line
        assert "\x1b" not in line, line


async def test_dead_letters_show_of_a_missing_id(shop: Shop) -> None:
    succeeded(await cli("db", "init", shop.orders))

    assert "No dead letter 999 in service 'Orders'" in one_error_line(
        await cli("dead-letters", "show", shop.orders, "999")
    )


# --- dead-letters replay -----------------------------------------------------------------------------


async def test_replay_after_the_handler_is_fixed(shop: Shop) -> None:
    await shop.produce(shop.event("PaymentTaken", order="o-1"))
    (letter_id,) = await letter_ids(shop.orders, "PaymentTaken")
    assert shop.module.INVOICED == []

    shop.fix_the_ledger()
    output = succeeded(await cli("dead-letters", "replay", shop.orders, str(letter_id)))

    assert f"{letter_id}: replayed" in output
    assert shop.module.INVOICED == ["o-1"]
    assert await letters(shop.orders) == []
    # Replaying it again does not run the handler twice: the letter is gone.
    again = failed_cleanly(await cli("dead-letters", "replay", shop.orders, str(letter_id)))
    assert "not replayed" in again
    assert f"No dead letter {letter_id}" in again
    assert shop.module.INVOICED == ["o-1"]


async def test_replay_of_a_still_failing_letter_keeps_it(shop: Shop) -> None:
    await shop.produce(shop.event("OrderPlaced", item="poison"), shop.event("PaymentTaken", order="o-1"))
    (poison,) = await letter_ids(shop.orders, "OrderPlaced")
    (payment,) = await letter_ids(shop.orders, "PaymentTaken")

    output = failed_cleanly(await cli("dead-letters", "replay", shop.orders, str(poison), str(payment)))

    assert f"{poison}: not replayed: Reject: cannot ship poison" in output
    assert f"{payment}: not replayed: RuntimeError: ledger offline for o-1" in output
    assert sorted(letter["id"] for letter in await letters(shop.orders)) == sorted([poison, payment])

    data = json.loads(
        failed_cleanly(await cli("dead-letters", "replay", shop.orders, str(payment), "--json"))
    )
    assert data == [{"id": payment, "replayed": False, "error": "RuntimeError: ledger offline for o-1"}]
    assert shop.module.INVOICED == []


async def test_replay_all(shop: Shop) -> None:
    await shop.produce(
        shop.event("PaymentTaken", order="o-1"),
        shop.event("PaymentTaken", order="o-2"),
        shop.event("OrderPlaced", item="poison"),
    )
    payments = await letter_ids(shop.orders, "PaymentTaken")
    (poison,) = await letter_ids(shop.orders, "OrderPlaced")
    shop.fix_the_ledger()

    output = failed_cleanly(await cli("dead-letters", "replay", shop.orders, "--all"))  # poison still fails

    for letter_id in payments:
        assert f"{letter_id}: replayed" in output
    assert f"{poison}: not replayed" in output
    assert sorted(shop.module.INVOICED) == ["o-1", "o-2"]
    assert [letter["id"] for letter in await letters(shop.orders)] == [poison]

    succeeded(await cli("dead-letters", "purge", shop.orders, "--yes"))
    data = json.loads(succeeded(await cli("dead-letters", "replay", shop.orders, "--all", "--json")))
    assert data == []  # nothing to replay is a success


async def test_replay_all_json_when_every_letter_succeeds(shop: Shop) -> None:
    await shop.produce(shop.event("PaymentTaken", order="o-1"), shop.event("PaymentTaken", order="o-2"))
    payments = await letter_ids(shop.orders, "PaymentTaken")
    shop.fix_the_ledger()

    data = json.loads(succeeded(await cli("dead-letters", "replay", shop.orders, "--all", "--json")))

    assert data == [{"id": i, "replayed": True, "error": None} for i in payments]
    assert sorted(shop.module.INVOICED) == ["o-1", "o-2"]


@pytest.mark.parametrize("args", [(), ("7", "--all")], ids=["neither", "both"])
async def test_replay_needs_ids_or_all(shop: Shop, args: tuple[str, ...]) -> None:
    output = failed_cleanly(await cli("dead-letters", "replay", shop.orders, *args), exit_code=2)

    assert "Give dead-letter ids, or --all" in output


# --- dead-letters purge ------------------------------------------------------------------------------


async def test_purge_yes_deletes_every_letter_without_handling(shop: Shop) -> None:
    await shop.produce(shop.event("PaymentTaken", order="o-1"), shop.event("OrderPlaced", item="poison"))
    assert len(await letters(shop.orders)) == 2

    output = succeeded(await cli("dead-letters", "purge", shop.orders, "--yes"))

    assert "Deleted 2 dead letter(s) of Orders" in output
    assert await letters(shop.orders) == []
    assert shop.module.INVOICED == []


async def test_purge_json_lists_what_it_deleted(shop: Shop) -> None:
    await shop.produce(shop.event("PaymentTaken", order="o-1"), shop.event("OrderPlaced", item="poison"))
    ids = [letter["id"] for letter in await letters(shop.orders)]

    output = succeeded(await cli("dead-letters", "purge", shop.orders, "--yes", "--json"))

    assert json.loads(output) == {"service": "Orders", "deleted": ids}
    assert await letters(shop.orders) == []


async def test_purge_answering_no_deletes_nothing(shop: Shop) -> None:
    await shop.produce(shop.event("PaymentTaken", order="o-1"))

    result = await cli("dead-letters", "purge", shop.orders, input="n\n")

    output = failed_cleanly(result)
    assert "Delete ALL dead letters of Orders?" in output
    assert "Aborted" in output
    assert len(await letters(shop.orders)) == 1


async def test_purge_answering_yes_at_the_prompt(shop: Shop) -> None:
    await shop.produce(shop.event("PaymentTaken", order="o-1"))

    output = succeeded(await cli("dead-letters", "purge", shop.orders, input="y\n"))

    assert "Deleted 1 dead letter(s)" in output
    assert await letters(shop.orders) == []


async def test_purge_by_id(shop: Shop) -> None:
    await shop.produce(shop.event("PaymentTaken", order="o-1"), shop.event("OrderPlaced", item="poison"))
    (payment,) = await letter_ids(shop.orders, "PaymentTaken")
    (poison,) = await letter_ids(shop.orders, "OrderPlaced")

    output = succeeded(await cli("dead-letters", "purge", shop.orders, str(payment), "--yes"))

    assert "Deleted 1 dead letter(s) of Orders" in output
    assert [letter["id"] for letter in await letters(shop.orders)] == [poison]


async def test_purge_of_a_missing_id(shop: Shop) -> None:
    succeeded(await cli("db", "init", shop.orders))

    assert "No dead letter 999" in one_error_line(
        await cli("dead-letters", "purge", shop.orders, "999", "--yes")
    )


async def test_purge_with_one_missing_id_deletes_none(shop: Shop) -> None:
    await shop.produce(shop.event("PaymentTaken", order="o-1"))
    (payment,) = await letter_ids(shop.orders, "PaymentTaken")

    error = one_error_line(await cli("dead-letters", "purge", shop.orders, str(payment), "999", "--yes"))

    assert "No dead letter 999" in error
    assert "nothing deleted" in error
    assert [letter["id"] for letter in await letters(shop.orders)] == [payment]


# --- PostgreSQL --------------------------------------------------------------------------------------


@pytest.mark.postgresql
async def test_dead_letters_on_postgresql(make_shop: Callable[[str], Shop], postgresql_url: str) -> None:
    shop = make_shop(postgresql_url)
    succeeded(await cli("db", "init", shop.orders))
    assert await table_names(postgresql_url) >= TABLES

    await shop.produce(shop.event("PaymentTaken", order="o-1"), shop.event("OrderPlaced", item="poison"))
    (payment,) = await letter_ids(shop.orders, "PaymentTaken")
    (poison,) = await letter_ids(shop.orders, "OrderPlaced")
    shown = json.loads(succeeded(await cli("dead-letters", "show", shop.orders, str(payment), "--json")))
    assert "RuntimeError: ledger offline for o-1" in shown["error"]

    shop.fix_the_ledger()
    assert f"{payment}: replayed" in succeeded(await cli("dead-letters", "replay", shop.orders, str(payment)))
    assert shop.module.INVOICED == ["o-1"]
    succeeded(await cli("dead-letters", "purge", shop.orders, str(poison), "--yes"))
    assert await letters(shop.orders) == []
    assert json.loads(succeeded(await cli("outbox", shop.orders, "--json")))["waiting"] == 0


# --- bad input ---------------------------------------------------------------------------------------

BAD_MODULES = {
    "badbroker": """
        from eventrelay.service import Service

        service = Service("Bad", broker="pulsar://admin:hunter2hunter2@127.0.0.1/x")
    """,
    "baddatabase": """
        from eventrelay.service import Service

        service = Service("Bad", database="nosuchdb://host/db", broker="memory://")
    """,
    "brokenimport": """
        import eventrelay_no_such_dependency

        service = None
    """,
    "badsyntax": """
        service = (
    """,
}


@pytest.fixture
def bad_modules(app_folder: Path) -> str:
    """Write the bad modules under a unique suffix; return the suffix."""
    suffix = uuid.uuid4().hex[:10]
    for name, source in BAD_MODULES.items():
        write_module(app_folder, f"{name}_{suffix}", source)
    return suffix


COMMANDS: list[tuple[str, ...]] = [
    ("db", "init"),
    ("outbox",),
    ("events",),
    ("dead-letters", "list"),
    ("dead-letters", "show"),
    ("dead-letters", "replay"),
    ("dead-letters", "purge"),
    ("sagas",),
]


def _command(command: tuple[str, ...], target: str) -> list[str]:
    extras: dict[tuple[str, ...], list[str]] = {
        ("dead-letters", "show"): ["1"],
        ("dead-letters", "replay"): ["--all"],
        ("dead-letters", "purge"): ["--yes"],
    }
    return [*command, target, *extras.get(command, [])]


@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(c) for c in COMMANDS])
async def test_target_without_a_colon(command: tuple[str, ...], shop: Shop) -> None:
    output = one_error_line(await cli(*_command(command, shop.name)))

    assert f"'{shop.name}' is not MODULE:SERVICE" in output


@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(c) for c in COMMANDS])
async def test_module_that_does_not_exist(command: tuple[str, ...], app_folder: Path) -> None:
    output = one_error_line(await cli(*_command(command, "no_such_shop_module:service")))

    assert "Cannot import 'no_such_shop_module'" in output


@pytest.mark.parametrize(
    ("module", "expected"),
    [
        ("badbroker", "No broker for URL scheme 'pulsar'"),
        ("baddatabase", "Not a usable database URL"),
        ("brokenimport", "No module named 'eventrelay_no_such_dependency'"),
        ("badsyntax", "was never closed"),
    ],
)
async def test_module_that_does_not_import(bad_modules: str, module: str, expected: str) -> None:
    for command in (("events",), ("dead-letters", "list"), ("db", "init")):
        output = one_error_line(await cli(*_command(command, f"{module}_{bad_modules}:service")))
        assert f"Cannot import '{module}_{bad_modules}'" in output
        assert expected in output
        assert "hunter2hunter2" not in output


@pytest.mark.parametrize(
    ("attribute", "found"), [("not_a_service", "int"), ("nothing_here", "nothing"), ("Fulfil", "ABCMeta")]
)
async def test_attribute_that_is_not_a_service(shop: Shop, attribute: str, found: str) -> None:
    output = one_error_line(await cli("events", f"{shop.name}:{attribute}"))

    assert f"{shop.name}:{attribute} must be an eventrelay Service; found {found}" in output


def test_load_service_returns_the_module_service(shop: Shop) -> None:
    assert load_service(shop.orders) is shop.module.orders


async def test_show_needs_an_integer_id(shop: Shop) -> None:
    output = failed_cleanly(await cli("dead-letters", "show", shop.orders, "seven"), exit_code=2)

    assert "'seven' is not a valid integer" in output


def _all_commands() -> list[list[str]]:
    documents = [["asyncapi"], ["schema"], ["dashboard"]]  # tested in tests/observability, tests/dashboard
    return [[], ["run"], ["db"], ["db", "init"], ["dead-letters"], *documents] + [list(c) for c in COMMANDS]


@pytest.mark.parametrize("command", _all_commands(), ids=lambda c: " ".join(c) or "eventrelay")
async def test_help_of_every_command(command: list[str]) -> None:
    output = succeeded(await cli(*command, "--help"))

    assert "Usage:" in output
    if command and command[-1] not in ("db", "dead-letters"):  # groups list their commands instead
        assert "Example: eventrelay " in output


def _leaves(group: click.Group, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Command]]:
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _leaves(command, (*path, name))
        else:
            yield (*path, name), command


def test_every_leaf_command_has_an_example() -> None:
    """No command escapes the help test above: every leaf command's help has an example."""
    found = dict(_leaves(main))
    assert set(found) == {tuple(c) for c in _all_commands() if c and c[-1] not in ("db", "dead-letters")}
    for path, command in found.items():
        assert "Example: eventrelay " + " ".join(path) in (command.help or ""), path


def test_every_command_takes_json() -> None:
    """As the README says: scripts may pass `--json` to any command."""
    for path, command in _leaves(main):
        assert "--json" in {o for p in command.params for o in p.opts}, path


async def test_version() -> None:
    output = succeeded(await cli("--version"))

    assert output == f"eventrelay, version {importlib.metadata.version('eventrelay')}\n"


# --- as a real process: errors are one line on stderr, no traceback ----------------------------------


def _eventrelay(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run(
        [sys.executable, "-m", "eventrelay", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("run", "badbroker_{suffix}:service"), "No broker for URL scheme 'pulsar'"),
        (("events", "no_such_shop_module:service"), "Cannot import 'no_such_shop_module'"),
        (("db", "init", "postgresql+asyncpg://shop:Sup3r-s3cret@127.0.0.1:{port}/x"), "shop:***@"),
    ],
    ids=["bad-broker", "no-module", "unreachable"],
)
def test_errors_of_the_real_command(
    bad_modules: str, app_folder: Path, args: tuple[str, ...], expected: str
) -> None:
    argv = [a.format(suffix=bad_modules, port=_closed_port()) for a in args]

    done = _eventrelay(app_folder, *argv)

    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [done.stderr.strip()], done.stderr
    assert expected in done.stderr
    assert "Sup3r-s3cret" not in done.stderr + done.stdout
    assert "hunter2hunter2" not in done.stderr + done.stdout
