"""Events that evolve, through the bus: messages an older publisher sent are upcast to the subscriber's
version; one that cannot be waits as a dead letter until its upcaster is deployed, then replays."""

from __future__ import annotations

import gc
import weakref
from decimal import Decimal
from typing import Any

import pytest

from eventrelay import (
    DistributedEventBus,
    DistributedEventHandler,
    Event,
    MemoryBroker,
    Message,
    event_name,
    event_version,
    upcaster,
)
from eventrelay.envelope import VERSION
from eventrelay.json_style import JsonStyle
from eventrelay.testing import RecordingBroker, wait_until_idle
from tests.bus.helpers import make_bus, settings

PREFIX = "BusTests.Versions"


async def _sent_by_old_publisher(
    name: str, version: int, style: JsonStyle
) -> tuple[list[Message], weakref.ref[type[Event]]]:
    """What a publisher still on `version` of `name` sent: messages as they sit in a queue. Its class is
    gone once this returns, so the subscriber can declare the current one under the same name."""
    if version == 1:

        class PriceChangedV1(Event, name=name):  # the price, no currency
            product_id: int
            price: Decimal

        event: Event = PriceChangedV1(product_id=1, price=Decimal("20.5"))
    else:

        class PriceChangedV2(Event, name=name, version=2):  # the price renamed to new_price
            product_id: int
            new_price: Decimal

        event = PriceChangedV2(product_id=2, new_price=Decimal("15"))
    broker = RecordingBroker()
    async with DistributedEventBus(
        "ProductService", broker=broker, settings=settings(json_style=style)
    ) as bus:
        await bus.publish(event, use_outbox=False)
    return broker.published, weakref.ref(type(event))


@pytest.mark.parametrize("style", ["eventrelay", "abp"])
async def test_messages_of_v1_and_v2_are_upcast_to_the_subscribers_v3(
    sqlite_url: str, style: JsonStyle
) -> None:
    name = f"{PREFIX}.Chain.{style}"
    v1, v1_class = await _sent_by_old_publisher(name, 1, style)
    gc.collect()
    assert v1_class() is None, "the v1 class is still alive; its name would be taken"
    v2, v2_class = await _sent_by_old_publisher(name, 2, style)
    gc.collect()
    assert v2_class() is None, "the v2 class is still alive; its name would be taken"
    assert VERSION not in v1[0].headers
    assert v2[0].headers[VERSION] == "2"

    class PriceChanged(Event, name=name, version=3):  # the subscriber's, deployed since
        product_id: int
        new_price: Decimal
        currency: str

    @upcaster(PriceChanged, from_version=1)
    def rename_price(body: dict[str, Any]) -> dict[str, Any]:
        body = dict(body)
        body["new_price"] = body.pop("price")
        return body

    @upcaster(PriceChanged, from_version=2)
    def add_currency(body: dict[str, Any]) -> dict[str, Any]:
        return {**body, "currency": "EUR"}

    handled: list[PriceChanged] = []

    class Record(DistributedEventHandler[PriceChanged]):  # a class: the event is local, out of a hint's reach
        async def handle_event(self, event: PriceChanged) -> None:
            handled.append(event)

    broker = MemoryBroker()
    bus = make_bus("OrderService", broker, sqlite_url, json_style=style)
    await bus.subscribe(Record)
    async with bus:
        await broker.publish([*v1, *v2])
        await wait_until_idle(bus)
        assert await bus.dead_letters() == []
    assert sorted(handled, key=lambda e: e.product_id) == [
        PriceChanged(product_id=1, new_price=Decimal("20.5"), currency="EUR"),
        PriceChanged(product_id=2, new_price=Decimal("15"), currency="EUR"),
    ]


class StockCounted(Event, name=f"{PREFIX}.StockCounted", version=2):
    sku: str
    quantity: int


async def test_the_version_is_stamped_above_1_only(sqlite_url: str) -> None:
    class Plain(Event, name=f"{PREFIX}.Plain"):
        sku: str

    broker = RecordingBroker()
    async with make_bus("Stock", broker, sqlite_url) as bus:
        await bus.publish(StockCounted(sku="a", quantity=1))
        await bus.publish(Plain(sku="a"))
        await wait_until_idle(bus)
    counted, plain = broker.published
    assert counted.headers[VERSION] == "2" == str(event_version(StockCounted))
    assert VERSION not in plain.headers


class ShelfMoved(Event, name=f"{PREFIX}.ShelfMoved", version=2):
    sku: str
    shelf: str


def shelf_message(headers: dict[str, str], body: bytes = b'{"sku":"a","aisle":7}') -> Message:
    return Message("0" * 31 + "1", event_name(ShelfMoved), body, headers)


async def test_a_missing_upcaster_dead_letters_and_the_letter_replays_once_it_is_registered(
    sqlite_url: str,
) -> None:
    handled: list[ShelfMoved] = []

    async def record(event: ShelfMoved) -> None:
        handled.append(event)

    broker = MemoryBroker()
    bus = make_bus("Warehouse", broker, sqlite_url)
    await bus.subscribe(record)
    async with bus:
        await broker.publish([shelf_message({})])  # no header: version 1
        await wait_until_idle(bus)
        (letter,) = await bus.dead_letters()
        assert letter.reason == (
            f"cannot decode: '{PREFIX}.ShelfMoved' is version 1 and ShelfMoved version 2, with no upcaster "
            "from version 1: register @upcaster(ShelfMoved, from_version=1)"
        )
        assert handled == []

        @upcaster(ShelfMoved, from_version=1)
        def aisle_to_shelf(body: dict[str, Any]) -> dict[str, Any]:
            return {"sku": body["sku"], "shelf": f"A{body['aisle']}"}

        await bus.replay(letter.id)
        assert await bus.dead_letters() == []
    assert handled == [ShelfMoved(sku="a", shelf="A7")]


class BinEmptied(Event, name=f"{PREFIX}.BinEmptied", version=2):
    bin: str


@upcaster(BinEmptied, from_version=1)
def bin_from_number(body: dict[str, Any]) -> dict[str, Any]:
    return {"bin": body["number"]}  # a v1 body without "number" makes it raise KeyError


async def test_an_upcaster_that_raises_dead_letters_the_message_naming_it(sqlite_url: str) -> None:
    handled: list[BinEmptied] = []

    async def record(event: BinEmptied) -> None:
        handled.append(event)

    broker = MemoryBroker()
    bus = make_bus("Warehouse", broker, sqlite_url)
    await bus.subscribe(record)
    async with bus:
        old = Message("0" * 31 + "2", event_name(BinEmptied), b'{"label":"x"}', {VERSION: "1"})
        await broker.publish([old])
        await wait_until_idle(bus)
        (letter,) = await bus.dead_letters()
    assert "bin_from_number" in letter.reason
    assert "from version 1 raised KeyError: 'number'" in letter.reason
    assert handled == []


async def test_a_newer_message_decodes_with_its_unknown_fields_ignored(sqlite_url: str) -> None:
    handled: list[ShelfMoved] = []

    async def record(event: ShelfMoved) -> None:
        handled.append(event)

    broker = MemoryBroker()
    bus = make_bus("Warehouse", broker, sqlite_url)
    await bus.subscribe(record)
    async with bus:
        body = b'{"sku":"b","shelf":"B2","bay":4}'  # version 5 of a later publisher: a field more
        await broker.publish([shelf_message({VERSION: "5"}, body)])
        await wait_until_idle(bus)
        assert await bus.dead_letters() == []
    assert handled == [ShelfMoved(sku="b", shelf="B2")]
