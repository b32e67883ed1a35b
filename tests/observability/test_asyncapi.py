"""Contracts as documents: `eventrelay asyncapi` writes AsyncAPI 3.0 documents that the official JSON Schema
accepts (checked in under `asyncapi/`, see its SOURCE.md); `eventrelay schema` prints each ETO's schema."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from decimal import Decimal
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from pydantic import ConfigDict
from pydantic.alias_generators import to_camel

from eventrelay import DynamicEvent, Event, upcaster
from eventrelay.asyncapi import asyncapi_document, event_schemas
from eventrelay.service import Service

EXAMPLES = Path(__file__).parent.parent.parent / "examples"
SCHEMA = Path(__file__).parent / "asyncapi" / "asyncapi-3.0.0.json"


@cache
def validator() -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(json.loads(SCHEMA.read_text()))


def errors(document: dict[str, Any]) -> list[str]:
    return [f"{list(e.absolute_path)}: {e.message[:300]}" for e in validator().iter_errors(document)]


def cli(tmp_path: Path, *args: str) -> str:
    """Run the real `eventrelay` command from examples/, with the sample's data in `tmp_path`."""
    result = subprocess.run(
        [sys.executable, "-m", "eventrelay", *args],
        cwd=EXAMPLES,
        env={**os.environ, "PYTHONPATH": str(EXAMPLES), "BOOKSTORE_DATA": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_the_order_service_document_is_valid_asyncapi_3_and_says_what_it_handles(tmp_path: Path) -> None:
    document = json.loads(cli(tmp_path, "asyncapi", "bookstore.order.app:service"))
    assert errors(document) == []
    assert document["asyncapi"] == "3.0.0"
    assert document["info"]["title"] == "OrderService"
    assert document["operations"]["send.BookStore.Order.Placed"]["action"] == "send"  # its saga's events
    price = document["operations"]["receive.BookStore.Product.PriceChanged"]
    assert price["channel"] == {"$ref": "#/channels/BookStore.Product.PriceChanged"}
    assert price["x-eventrelay-handlers"] == ["bookstore.order.app.OrderProductPriceChangedHandler"]
    assert document["channels"]["Volo.Abp.Users.User.Updated"]["address"] == "Volo.Abp.Users.User.Updated"
    message = document["components"]["messages"]["BookStore.Product.PriceChanged"]
    assert message["payload"] == {"$ref": "#/components/schemas/ProductPriceChangedEto"}
    payload = document["components"]["schemas"]["ProductPriceChangedEto"]
    assert payload["required"] == ["product_id", "name", "old_price", "new_price"]
    assert payload["properties"]["product_id"]["format"] == "uuid"
    assert payload["properties"]["new_price"]["type"] == "string"  # a Decimal travels as a string


def test_the_product_service_document_sends_its_events_and_its_entity_events_and_receives_stock_requests(
    tmp_path: Path,
) -> None:
    output = tmp_path / "product.asyncapi.json"
    cli(tmp_path, "asyncapi", "bookstore.product.app:service", "-o", str(output), "--version", "2.1.0")
    document = json.loads(output.read_text())
    assert errors(document) == []
    assert document["info"]["version"] == "2.1.0"
    assert sorted(document["operations"]) == [
        "receive.BookStore.Order.Cancelled",
        "receive.BookStore.Order.StockReservationRequested",
        "send.BookStore.Product.Created",
        "send.BookStore.Product.Deleted",
        "send.BookStore.Product.PriceChanged",
        "send.BookStore.Product.StockRejected",
        "send.BookStore.Product.StockReserved",
        "send.BookStore.Product.Updated",
    ]
    updated = document["components"]["messages"]["BookStore.Product.Updated"]
    entity = document["components"]["schemas"][updated["payload"]["$ref"].rsplit("/", 1)[1]]
    assert entity["properties"]["entity"] == {"$ref": "#/components/schemas/ProductEto"}


def test_asyncapi_json_says_what_it_wrote(tmp_path: Path) -> None:
    output = tmp_path / "notification.asyncapi.json"

    said = cli(tmp_path, "asyncapi", "bookstore.notification.app:service", "-o", str(output), "--json")

    assert json.loads(said) == {"service": "NotificationService", "written": str(output)}
    assert errors(json.loads(output.read_text())) == []


def test_eventrelay_schema_prints_each_eto_schema_by_event_name(tmp_path: Path) -> None:
    schemas = json.loads(cli(tmp_path, "schema", "bookstore.notification.app:service"))
    assert json.loads(cli(tmp_path, "schema", "bookstore.notification.app:service", "--json")) == schemas
    assert list(schemas) == ["BookStore.Product.PriceChanged"]
    assert schemas["BookStore.Product.PriceChanged"]["title"] == "ProductPriceChangedEto"
    assert jsonschema.Draft202012Validator(schemas["BookStore.Product.PriceChanged"]).is_valid(
        {
            "product_id": "3fa85f64-5717-4562-b3fc-2c963f66afa6",
            "name": "A",
            "old_price": "2",
            "new_price": "1",
        }
    )


def test_a_message_says_its_version_and_the_versions_its_upcasters_read(tmp_path: Path) -> None:
    document = json.loads(cli(tmp_path, "asyncapi", "bookstore.payment.app:service"))
    assert errors(document) == []
    messages = document["components"]["messages"]
    requested = messages["BookStore.Order.PaymentRequested"]  # version 2, upcast from 1 (order_contracts)
    assert (requested["x-eventrelay-version"], requested["x-eventrelay-upcasts-from"]) == (2, [1])
    base, stamped = requested["headers"]["allOf"]
    assert base == {"$ref": "#/components/schemas/EventRelayHeaders"}
    assert stamped["properties"]["x-eventrelay-version"]["const"] == "2"
    captured = messages["BookStore.Payment.Captured"]
    assert captured["x-eventrelay-version"] == 1
    assert "x-eventrelay-upcasts-from" not in captured
    assert captured["headers"] == {"$ref": "#/components/schemas/EventRelayHeaders"}
    headers = document["components"]["schemas"]["EventRelayHeaders"]["properties"]
    assert "absent: version 1" in headers["x-eventrelay-version"]["description"]


class ThirdEto(Event, name="AsyncApiTests.Third", version=3):
    """At version 3; an upcaster reads version 2 only (version 1 has none)."""

    total: int


@upcaster(ThirdEto, from_version=2)
def total_from_sum(body: dict[str, Any]) -> dict[str, Any]:
    return {"total": body["sum"]}


async def on_third(event: ThirdEto) -> None:
    """A handler of version 3."""


async def test_only_versions_with_a_whole_chain_of_upcasters_are_said_to_be_read() -> None:
    service = Service("Thirds", broker="memory://")
    service.subscribe(on_third)
    await service.prepare()

    document = asyncapi_document(service)

    assert errors(document) == []
    message = document["components"]["messages"]["AsyncApiTests.Third"]
    assert (message["x-eventrelay-version"], message["x-eventrelay-upcasts-from"]) == (3, [2])
    schema = event_schemas(service)["AsyncApiTests.Third"]
    assert (schema["x-eventrelay-version"], schema["x-eventrelay-upcasts-from"]) == (3, [2])


class CamelEto(Event, name="AsyncApiTests.Shop/Order Placed"):
    """An order was placed (camelCase on the wire, as ABP writes it)."""

    model_config = ConfigDict(alias_generator=to_camel, validate_by_name=True)
    order_id: int
    total_price: Decimal


async def on_anything(event: DynamicEvent) -> None:
    """A handler of an event known only by name."""


async def test_aliases_dynamic_events_and_unusual_names_make_a_valid_document() -> None:
    service = Service("Shop", broker="memory://", publishes=[CamelEto])
    service.subscribe(on_anything, event="AsyncApiTests.Legacy")
    await service.prepare()
    document = asyncapi_document(service)
    assert errors(document) == []
    key = "AsyncApiTests.Shop_Order_Placed"  # a component key allows letters, digits, . _ - only
    assert document["channels"][key]["address"] == "AsyncApiTests.Shop/Order Placed"
    assert document["components"]["messages"][key]["summary"].startswith("An order was placed")
    assert set(document["components"]["schemas"]["CamelEto"]["properties"]) == {"orderId", "totalPrice"}
    legacy = document["components"]["messages"]["AsyncApiTests.Legacy"]
    assert legacy["payload"] == {"type": "object"}
    assert "x-eventrelay-version" not in legacy  # known by name only: no class, no version
    assert set(event_schemas(service)) == {"AsyncApiTests.Shop/Order Placed"}  # no class, no schema


def test_the_official_schema_rejects_a_broken_document() -> None:
    broken = {
        "asyncapi": "3.0.0",
        "info": {"title": "x", "version": "1"},
        "operations": {"o": {"action": "publish"}},
    }
    assert errors(broken)
    with pytest.raises(jsonschema.ValidationError):
        validator().validate({"asyncapi": "2.6.0", "info": {"title": "x", "version": "1"}})
