"""`eventrelay sagas` on a real SQLite database, with sagas started, advanced and completed by events that a
service of the app module handles through the memory broker (as in `test_cli.py`, the CLI then loads another
`Service` object of the module on the same database, as a separate process would)."""

from __future__ import annotations

import importlib
import json
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from eventrelay.cli import _until
from eventrelay.saga import SagaRecord
from eventrelay.service import Service
from tests.bus.helpers import eventually
from tests.cli.test_cli import HOSTILE, TERMINAL_CODES, cli, succeeded, table_names, write_module

APP = '''
"""Orders fulfils each order in a saga: placed (a deadline to ship, unless a gift), then paid (completed)."""

from pydantic import BaseModel

from eventrelay import Event, Saga, Service, Settings, step

DATABASE = {database!r}


class OrderPlaced(Event, name="{prefix}.OrderPlaced"):
    order_id: str
    item: str


class PaymentTaken(Event, name="{prefix}.PaymentTaken"):
    order_id: str


class ShipBy(Event, name="{prefix}.ShipBy"):
    order_id: str


class FulfilmentState(BaseModel):
    item: str
    paid: bool = False


class Fulfilment(Saga[FulfilmentState]):
    @step(correlate="order_id", starts=True)
    async def placed(self, event: OrderPlaced) -> None:
        self.state = FulfilmentState(item=event.item)
        if event.item != "gift":
            await self.schedule(ShipBy(order_id=event.order_id), delay=3600)

    @step(correlate="order_id")
    async def paid(self, event: PaymentTaken) -> None:
        self.state.paid = True
        self.complete()

    @step(correlate="order_id")
    async def ship_by(self, event: ShipBy) -> None:
        self.complete()


QUICK = Settings(fetch_timeout=0.05, relay_poll_interval=0.05)


def make_orders() -> Service:
    return Service("Orders", database=DATABASE, broker="memory://", handlers=[Fulfilment], settings=QUICK)


orders = make_orders()
plain = Service("Plain", database=DATABASE, broker="memory://")
'''

KEYS = {"saga", "key", "state", "completed", "version", "created_at", "updated_at", "timeout_at"}
KEYS |= {"age_seconds", "timeout_in_seconds"}


@pytest.fixture
def app(app_folder: Path, sqlite_url: str) -> ModuleType:
    unique = uuid.uuid4().hex[:10]
    name = f"sagas_{unique}"
    write_module(app_folder, name, APP.format(database=sqlite_url, prefix=f"Sagas{unique}"))
    return importlib.import_module(name)


async def handle(app: ModuleType, *events: Any, until: Callable[[list[SagaRecord]], bool]) -> None:
    """Run a fresh Orders in-process: publish `events` in order, until `until` holds of its sagas."""
    running: Service = app.make_orders()
    async with running:
        for event in events:
            await running.bus.publish(event)

        async def done() -> bool:
            return until(await running.bus.saga_records(completed=True))

        await eventually(done, timeout=30)


@pytest.fixture
async def shop(app: ModuleType) -> ModuleType:
    """Orders with three sagas: o-1 (a book) completed, o-2 (a pen) waiting for its deadline, o-3 (a gift)
    without one."""
    placed = [
        app.OrderPlaced(order_id=f"o-{i}", item=item) for i, item in enumerate(["book", "pen", "gift"], 1)
    ]
    await handle(app, *placed, until=lambda sagas: len(sagas) == 3)
    await handle(app, app.PaymentTaken(order_id="o-1"), until=lambda sagas: sagas[0].completed)
    return app


async def listed(target: str, *options: str) -> list[dict[str, Any]]:
    data = json.loads(succeeded(await cli("sagas", target, "--json", *options)))
    assert isinstance(data, list)
    return data


async def test_the_table_shows_the_open_sagas_with_state_age_and_next_timeout(shop: ModuleType) -> None:
    table = succeeded(await cli("sagas", f"{shop.__name__}:orders"))

    assert "2 open saga(s) of Orders" in table
    for header in ("saga", "key", "state", "age", "updated", "next timeout", "status"):
        assert header in table
    pen = next(line for line in table.splitlines() if "o-2" in line)
    assert '{"item":"pen","paid":false}' in pen
    assert "in 59." in pen or "in 60.0 min" in pen
    assert "s ago" in pen
    assert "open" in pen
    gift = next(line for line in table.splitlines() if "o-3" in line)
    assert "none" in gift
    assert "o-1" not in table


async def test_json_gives_each_open_saga_whole(shop: ModuleType) -> None:
    pen, gift = await listed(f"{shop.__name__}:orders")

    assert set(pen) == KEYS
    assert (pen["saga"], pen["key"], pen["completed"], pen["version"]) == ("Fulfilment", "o-2", False, 1)
    assert pen["state"] == {"item": "pen", "paid": False}
    assert pen["timeout_at"] is not None
    assert 3500 < pen["timeout_in_seconds"] <= 3600
    assert 0 <= pen["age_seconds"] < 600
    assert pen["created_at"] <= pen["updated_at"]
    assert (gift["key"], gift["state"], gift["timeout_at"], gift["timeout_in_seconds"]) == (
        "o-3",
        {"item": "gift", "paid": False},
        None,
        None,
    )


async def test_completed_adds_the_completed_ones(shop: ModuleType) -> None:
    book, *others = await listed(f"{shop.__name__}:orders", "--completed")

    assert [s["key"] for s in others] == ["o-2", "o-3"]
    assert (book["key"], book["completed"], book["version"]) == ("o-1", True, 2)
    assert book["state"] == {"item": "book", "paid": True}
    assert book["timeout_at"] is None  # completed: its deadline no longer matters
    table = succeeded(await cli("sagas", f"{shop.__name__}:orders", "--completed"))
    assert "3 saga(s) of Orders" in table
    assert "completed" in next(line for line in table.splitlines() if "o-1" in line)


async def test_limit_lists_the_oldest_and_says_there_may_be_more(shop: ModuleType) -> None:
    target = f"{shop.__name__}:orders"

    assert [s["key"] for s in await listed(target, "--limit", "1")] == ["o-2"]
    table = succeeded(await cli("sagas", target, "--limit", "1"))
    assert "1 open saga(s) of Orders" in table
    assert "Only the oldest 1 of each saga are shown: --limit shows more" in table


async def test_a_service_without_sagas_or_without_open_ones_says_so(app: ModuleType) -> None:
    assert (
        succeeded(await cli("sagas", f"{app.__name__}:plain"))
        == "Plain has no sagas: it subscribes no Saga class\n"
    )
    assert await listed(f"{app.__name__}:plain") == []
    # Orders never ran: its saga table is made, and it has none yet.
    assert (
        succeeded(await cli("sagas", f"{app.__name__}:orders")) == "Orders has no open sagas (Fulfilment)\n"
    )
    assert await listed(f"{app.__name__}:orders", "--completed") == []


async def test_db_init_of_a_service_makes_its_saga_tables(app: ModuleType, sqlite_url: str) -> None:
    succeeded(await cli("db", "init", f"{app.__name__}:orders"))

    assert "eventrelay_saga_fulfilment" in await table_names(sqlite_url)


async def test_a_long_state_is_cut_in_the_table_but_whole_in_json(app: ModuleType) -> None:
    item = "long-" + "x" * 400
    await handle(app, app.OrderPlaced(order_id="o-9", item=item), until=lambda sagas: len(sagas) == 1)

    table = succeeded(await cli("sagas", f"{app.__name__}:orders"))
    assert '{"item":"long-xxx' in table
    assert item not in table
    assert "…" in table
    [saga] = await listed(f"{app.__name__}:orders")
    assert saga["state"] == {"item": item, "paid": False}


async def test_hostile_keys_and_states_are_shown_literally(app: ModuleType) -> None:
    await handle(app, app.OrderPlaced(order_id=HOSTILE, item=HOSTILE), until=lambda sagas: len(sagas) == 1)

    table = succeeded(await cli("sagas", f"{app.__name__}:orders", columns=2000))
    for code in TERMINAL_CODES:
        assert code not in table
    assert "[link=https://evil.example]x[/link] [/] \\x1b[2J" in table  # as it came, escaped
    [saga] = await listed(f"{app.__name__}:orders")
    assert saga["key"] == HOSTILE


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (42, "in 42.0s"),
        (300, "in 5.0 min"),
        (3 * 3600, "in 3.0 h"),
        (3 * 86_400, "in 3.0 d"),
        (-2, "overdue by 2.0s"),
    ],
)
def test_a_timeout_is_shown_relative_to_now(seconds: float, shown: str) -> None:
    assert _until(timedelta(seconds=seconds)) == shown
