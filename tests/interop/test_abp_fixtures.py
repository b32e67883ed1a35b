"""ABP interop both ways, on the real RabbitMQ, from fixtures written from ABP's source (tests/fixtures/abp).

ABP to Python: each fixture's exact body and AMQP properties go out with raw aio-pika, as
`RabbitMqDistributedEventBus.PublishAsync` sends them, to a direct durable exchange; a Python service on the
ABP profile (`profile=abp`, `json_style="abp"`) handles them, and the handler must see the fixture's
`expected` values.

Python to ABP: the same ETO, published by a Python service, lands in a queue declared as an ABP consumer
declares its `ClientName` queue; its routing key, properties and body (parsed: member names, casing, JSON
types, values) must be what the fixture says ABP writes, so that ABP's System.Text.Json reads every member.

Every test uses an exchange and queues of its own and deletes them afterwards.
"""

from __future__ import annotations

import asyncio
import enum
import json
import re
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import UUID

import aio_pika
import pytest
from aiormq import spec
from examples.bookstore.identity_contracts import UserEto
from examples.bookstore.product_contracts import ProductPriceChangedEto

from eventrelay import Context, DistributedEventBus, Event, Settings
from eventrelay.entity_events import EntityCreatedEto, EntityDeletedEto, EntityEto, EntityUpdatedEto
from eventrelay.events import event_name
from eventrelay.testing import wait_until_idle
from tests.brokers.abp_side import declare_as_abp_consumer, publish_as_abp
from tests.brokers.contract import PATIENCE
from tests.brokers.test_rabbitmq_broker import PORT, SERVER, Topology, exchange_name
from tests.servers import require_server

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "abp"
CASES = sorted(path.stem for path in FIXTURES.glob("*.json"))

# ABP's JSON convention: camelCase out, case-insensitive in, the entity version inside the entity.
ABP_JSON = Settings(json_style="abp")


# --- the ETOs of fixtures that the sample has no class for (the C# classes are named in each fixture) ------


class OrderStatus(enum.IntEnum):
    PLACED = 0
    SHIPPED = 1
    DELIVERED = 2
    CANCELLED = 3


class OrderPlacedEto(Event, name="BookStore.Order.Placed"):
    order_id: UUID
    placed_at: datetime
    requested_at: datetime
    due_on: datetime


class OrderStatusChangedEto(Event, name="BookStore.Order.StatusChanged"):
    order_id: UUID
    old_status: OrderStatus
    new_status: OrderStatus


class OrderShippedEto(Event, name="BookStore.Order.Shipped"):
    order_id: UUID
    tracking_number: str | None
    delivered_at: datetime | None
    carrier_id: UUID | None
    shipping_cost: Decimal | None


ETOS: dict[str, type[Event]] = {
    "entity_created_user": EntityCreatedEto[UserEto],
    "entity_updated_user": EntityUpdatedEto[UserEto],
    "entity_deleted_user": EntityDeletedEto[UserEto],
    "entity_created_entity_eto": EntityCreatedEto[EntityEto],
    "product_price_changed": ProductPriceChangedEto,
    "no_correlation_id": ProductPriceChangedEto,
    "datetime_7_digits": OrderPlacedEto,
    "enum": OrderStatusChangedEto,
    "nullable": OrderShippedEto,
    "tenant": EntityUpdatedEto[UserEto],
}


def fixture(case: str) -> dict[str, Any]:
    data = json.loads((FIXTURES / f"{case}.json").read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def expected_event(case: str) -> Event:
    return ETOS[case].model_validate(fixture(case)["expected"])


# --- the fixtures themselves (no server) -------------------------------------------------------------------


def test_every_fixture_has_a_python_class() -> None:
    assert set(CASES) == set(ETOS)


@pytest.mark.parametrize("case", CASES)
def test_a_fixture_is_complete_and_names_its_abp_sources(case: str) -> None:
    data = fixture(case)
    assert data["case"] == case
    assert data["sources"], "a fixture names the ABP files it follows"
    for source in data["sources"]:
        assert source["repo"] == "abpframework/abp"
        assert re.fullmatch(r"[0-9a-f]{40}", source["commit"]), source
        assert source["path"]
        assert source["what"]
    properties = data["properties"]
    assert set(properties) == {"delivery_mode", "message_id", "correlation_id", "content_type", "headers"}
    assert properties["delivery_mode"] == 2
    assert re.fullmatch(r"[0-9a-f]{32}", properties["message_id"])  # Guid.ToString("N")
    assert json.loads(data["body"]) is not None
    assert data["routing_key"] == event_name(ETOS[case])  # ABP's event name is ours
    expected_event(case)  # `expected` fits the Python class


# --- ABP to Python -----------------------------------------------------------------------------------------


@pytest.fixture
async def topology() -> AsyncIterator[Topology]:
    require_server("RabbitMQ", PORT)
    topology = Topology()
    yield topology
    await topology.delete()


async def publish_fixture(exchange: str, data: dict[str, Any]) -> None:
    """The fixture's body and properties, sent as ABP sends them."""
    properties = {name: value for name, value in data["properties"].items() if value is not None}
    body, routing_key = data["body"].encode("utf-8"), data["routing_key"]
    await publish_as_abp(SERVER, exchange, routing_key, body, spec.Basic.Properties(**properties))


@pytest.mark.rabbitmq
@pytest.mark.parametrize("case", CASES)
async def test_a_python_service_handles_what_abp_publishes(topology: Topology, case: str) -> None:
    data, eto = fixture(case), ETOS[case]
    exchange, service = exchange_name(), f"BookStore_PythonService_{uuid.uuid4().hex[:8]}"
    handled: list[tuple[Event, Context]] = []

    async def record(event: Event, context: Context) -> None:
        handled.append((event, context))

    async with (
        topology.broker("profile=abp", exchange=exchange) as broker,
        DistributedEventBus(service, broker=broker, settings=ABP_JSON) as bus,
    ):
        await bus.subscribe(record, event=eto)
        await publish_fixture(exchange, data)
        await wait_until_idle(bus, timeout=PATIENCE)

    assert len(handled) == 1, f"{case}: not handled (a dead letter: the body did not decode?)"
    [(event, context)] = handled
    assert type(event) is eto
    assert event == expected_event(case)
    assert context.event_name == data["routing_key"]
    assert context.message_id == data["properties"]["message_id"]  # ABP's inbox id is ours
    if data["properties"]["correlation_id"] is not None:
        assert context.correlation_id == data["properties"]["correlation_id"]


@pytest.mark.rabbitmq
async def test_the_tenant_of_an_abp_entity_event_reaches_the_handler(topology: Topology) -> None:
    data = fixture("tenant")
    exchange, service = exchange_name(), f"BookStore_PythonService_{uuid.uuid4().hex[:8]}"
    tenants: list[str | None] = []

    async def record(event: Event, context: Context) -> None:
        tenants.append(context.tenant_id)

    async with (
        topology.broker("profile=abp", exchange=exchange) as broker,
        DistributedEventBus(service, broker=broker, settings=ABP_JSON) as bus,
    ):
        await bus.subscribe(record, event=ETOS["tenant"])
        await publish_fixture(exchange, data)
        await wait_until_idle(bus, timeout=PATIENCE)

    assert tenants == [data["tenant_id"]]


# --- Python to ABP -----------------------------------------------------------------------------------------

ISO_DATETIME = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,7}))?(Z|[+-]\d\d:\d\d)?")


def as_datetime(text: str) -> datetime | None:
    """An ISO 8601 date-time as either side writes it (ABP: up to 7 fractional digits), to the microsecond."""
    match = ISO_DATETIME.fullmatch(text)
    if match is None:
        return None
    seconds, fraction, zone = match.groups()
    micro = (fraction or "").ljust(6, "0")[:6]
    return datetime.fromisoformat(f"{seconds}.{micro}{'+00:00' if zone == 'Z' else zone or ''}")


def assert_same_json(ours: Any, abp: Any, path: str = "", may_omit: frozenset[str] = frozenset()) -> None:
    """`ours` (what Python wrote) reads in ABP as `abp` (what ABP writes): the same member names with the same
    casing, the same JSON types, equal values (numbers by value, date-times to the microsecond)."""
    where = path or "the body"
    if isinstance(abp, dict):
        assert isinstance(ours, dict), f"{where}: {ours!r} is not an object"
        missing = {k for k in abp if k not in ours and f"{path}.{k}".lstrip(".") not in may_omit}
        assert not missing, f"{where}: members ABP writes and Python does not: {sorted(missing)}"
        extra = set(ours) - set(abp)
        assert not extra, f"{where}: members ABP does not know (or spells otherwise): {sorted(extra)}"
        for name, value in ours.items():
            assert_same_json(value, abp[name], f"{path}.{name}".lstrip("."), may_omit)
    elif isinstance(abp, list):
        assert isinstance(ours, list), f"{where}: {ours!r} is not an array"
        assert len(ours) == len(abp), f"{where}: {ours!r} != {abp!r}"
        for i, (mine, theirs) in enumerate(zip(ours, abp, strict=True)):
            assert_same_json(mine, theirs, f"{path}[{i}]", may_omit)
    elif isinstance(abp, bool) or abp is None:
        assert ours is abp, f"{where}: {ours!r} != {abp!r}"
    elif isinstance(abp, int | float):
        assert isinstance(ours, int | float), f"{where}: {ours!r} is not a number"
        assert not isinstance(ours, bool), f"{where}: {ours!r} is not a number"
        assert Decimal(str(ours)) == Decimal(str(abp)), f"{where}: {ours!r} != {abp!r}"
    else:
        assert isinstance(ours, str), f"{where}: {ours!r} is not a string"
        when = as_datetime(abp)
        if when is None:
            assert ours == abp, f"{where}: {ours!r} != {abp!r}"
        else:
            mine = as_datetime(ours)
            assert mine is not None, f"{where}: {ours!r} is not an ISO 8601 date-time"
            assert (mine.utcoffset(), mine) == (when.utcoffset(), when), f"{where}: {ours!r} != {abp!r}"


@pytest.mark.rabbitmq
@pytest.mark.parametrize("case", CASES)
async def test_abp_reads_what_a_python_service_publishes(topology: Topology, case: str) -> None:
    data = fixture(case)
    exchange, abp_queue = exchange_name(), f"BookStore_AbpService_{uuid.uuid4().hex[:8]}"
    topology.queues.add(abp_queue)
    correlation_id = data["properties"]["correlation_id"]

    async with (
        topology.broker("profile=abp", exchange=exchange) as broker,
        DistributedEventBus("BookStore_PythonService", broker=broker, settings=ABP_JSON) as bus,
        await aio_pika.connect(SERVER) as connection,
    ):
        queue = await declare_as_abp_consumer(connection, exchange, abp_queue, data["routing_key"])

        sent_id = await bus.publish(expected_event(case), use_outbox=False, correlation_id=correlation_id)
        await wait_until_idle(bus, timeout=PATIENCE)
        received = await next_message(queue)

    assert received.routing_key == data["routing_key"]
    assert received.delivery_mode == aio_pika.DeliveryMode.PERSISTENT == data["properties"]["delivery_mode"]
    assert received.message_id == sent_id
    assert re.fullmatch(r"[0-9a-f]{32}", sent_id)  # Guid.ToString("N"): ABP's inbox takes it
    if correlation_id is not None:
        assert received.correlation_id == correlation_id
    # ABP reads neither the content type nor the headers: Python's (application/json, x-correlation-id and
    # the like) do no harm, and ABP sets none itself.
    assert received.content_type in {None, "application/json"}
    assert_same_json(
        json.loads(received.body.decode("utf-8")),
        json.loads(data["body"]),
        may_omit=frozenset(data.get("python_may_omit", ())),
    )


async def next_message(queue: aio_pika.abc.AbstractQueue) -> aio_pika.abc.AbstractIncomingMessage:
    for _ in range(int(PATIENCE / 0.05)):
        message = await queue.get(fail=False)
        if message is not None:
            await message.ack()
            return message
        await asyncio.sleep(0.05)
    raise AssertionError(f"nothing arrived in {queue.name}")
