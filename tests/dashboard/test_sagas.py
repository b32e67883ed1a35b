"""The service page lists its open sagas (state, age, update, next timeout), escaped, from a real SQLite
database where events published through the bus started and completed them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from eventrelay import Event, MemoryBroker, Saga, step
from eventrelay.dashboard.pages import STATE_SHOWN
from eventrelay.service import Service
from tests.bus.helpers import eventually
from tests.dashboard.support import SETTINGS, XSS, Shop, dashboard, service

KEY = "<b>o-3</b>"


class OrderPlaced(Event, name="DashboardSagaTests.OrderPlaced"):
    order_id: str
    item: str


class PaymentTaken(Event, name="DashboardSagaTests.PaymentTaken"):
    order_id: str


class ShipBy(Event, name="DashboardSagaTests.ShipBy"):
    order_id: str


class FulfilmentState(BaseModel):
    item: str
    paid: bool = False


class Fulfilment(Saga[FulfilmentState]):
    @step(correlate="order_id", starts=True)
    async def placed(self, event: OrderPlaced) -> None:
        self.state = FulfilmentState(item=event.item)
        if not event.item.startswith("gift"):
            await self.schedule(ShipBy(order_id=event.order_id), delay=3600)

    @step(correlate="order_id")
    async def paid(self, event: PaymentTaken) -> None:
        self.state.paid = True
        self.complete()

    @step(correlate="order_id")
    async def ship_by(self, event: ShipBy) -> None:
        self.complete()


def orders(database: str) -> Service:
    return Service(
        "Orders", database=database, broker=MemoryBroker(), handlers=[Fulfilment], settings=SETTINGS
    )


@pytest.fixture
async def database(tmp_path: Path) -> str:
    """o-1 completed, o-2 waiting for its deadline, `KEY` (a gift, `XSS`) without one, o-4 a long state."""
    url = f"sqlite+aiosqlite:///{tmp_path}/orders.db"
    async with orders(url) as running:
        for key, item in [
            ("o-1", "book"),
            ("o-2", "pen"),
            (KEY, f"gift{XSS}"),
            ("o-4", "x" * 2 * STATE_SHOWN),
        ]:
            await running.bus.publish(OrderPlaced(order_id=key, item=item))
        await running.bus.publish(PaymentTaken(order_id="o-1"))

        async def done() -> bool:
            sagas = await running.bus.saga_records(completed=True)
            return len(sagas) == 4 and sagas[0].completed

        await eventually(done, timeout=30)
    return url


def rows(page: str) -> list[str]:
    section = page.partition("<h2>Open sagas</h2>")[2].partition("<h2>Dead letters</h2>")[0]
    return re.findall(r"<tr><td>.*?</tr>", section)


async def test_the_service_page_lists_the_open_sagas(database: str) -> None:
    async with dashboard([orders(database)]) as client:
        page = await client.get("/services/Orders")

    assert page.status == 200
    pen, gift, long = rows(page.body)
    assert "<td>Fulfilment</td><td>o-2</td>" in pen
    assert "<code>{&quot;item&quot;:&quot;pen&quot;,&quot;paid&quot;:false}</code>" in pen
    assert re.search(r'<td class="time" title="[0-9-]{10} [0-9:]{8} UTC">in (59\.\d|60\.0) min</td>', pen)
    assert " s ago</td>" in pen
    assert '<td class="muted">none</td>' in gift
    assert "o-1" not in page.body  # completed
    start = "{&quot;item&quot;:&quot;"  # {"item":" then x: STATE_SHOWN characters in all
    assert f"<code>{start}{'x' * (STATE_SHOWN - 9)}…</code>" in long
    assert "3 open saga(s). States are cut at" in page.body


async def test_keys_and_states_are_escaped(database: str) -> None:
    async with dashboard([orders(database)]) as client:
        page = await client.get("/services/Orders")

    gift = rows(page.body)[1]
    assert "<td>&lt;b&gt;o-3&lt;/b&gt;</td>" in gift
    assert "gift&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in gift
    assert KEY not in page.body
    assert XSS not in page.body
    assert "<script" not in page.body


async def test_no_open_sagas_says_so_and_a_service_without_sagas_shows_none(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/fresh.db"
    async with dashboard([orders(url)]) as client:  # never ran: the saga table is made on opening
        fresh = await client.get("/services/Orders")
    async with dashboard([service(url, Shop(), name="Plain")]) as client:
        plain = await client.get("/services/Plain")

    assert '<h2>Open sagas</h2><p class="muted">No open sagas.</p>' in fresh.body
    assert plain.status == 200
    assert "sagas" not in plain.body
