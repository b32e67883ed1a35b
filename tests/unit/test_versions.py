"""Event versions and upcasters: declaring a version, registering upcasters, and decoding a message of
another version (`codec.decode`), including what cannot be decoded and why."""

from __future__ import annotations

from decimal import Decimal
from typing import Any, Generic, TypeVar

import pytest

from eventrelay import (
    ConfigurationError,
    DecodeError,
    DistributedEventBus,
    Event,
    Message,
    event_name,
    event_version,
    upcaster,
)
from eventrelay.codec import decode
from eventrelay.envelope import VERSION
from eventrelay.json_style import JsonStyle
from eventrelay.requests import answer
from eventrelay.upcasting import message_version, upcast

PREFIX = "tests.unit.test_versions"
LIMIT = 1 << 20


class PriceChanged(Event, name=f"{PREFIX}.PriceChanged", version=3):
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


def message(event_type: type[Event], body: bytes, version: str | None = None) -> Message:
    headers = {} if version is None else {VERSION: version}
    return Message("0" * 32, event_name(event_type), body, headers)


def test_a_class_is_version_1_unless_it_declares_another() -> None:
    class Plain(Event, name=f"{PREFIX}.Plain"):
        pass

    assert event_version(Plain) == 1
    assert event_version(PriceChanged) == 3
    assert event_version(PriceChanged(product_id=1, new_price=Decimal(1), currency="EUR")) == 3


@pytest.mark.parametrize("version", [0, -1, "2", True, 1.0])
def test_a_version_is_an_integer_from_1(version: object) -> None:
    with pytest.raises(ConfigurationError, match="version= must be an integer from 1 up"):

        class Bad(Event, name=f"{PREFIX}.Bad", version=version):
            pass


def test_a_generic_events_parametrization_has_its_version() -> None:
    E = TypeVar("E", bound=Event)

    class Renamed(Event, Generic[E], name_postfix=".Renamed", version=2):
        entity: E

    class Shelf(Event, name=f"{PREFIX}.Shelf"):
        code: str

    assert event_version(Renamed[Shelf]) == 2
    assert event_name(Renamed[Shelf]) == f"{PREFIX}.Shelf.Renamed"


@pytest.mark.parametrize("style", ["eventrelay", "abp"])
@pytest.mark.parametrize(
    ("body", "version", "expected"),
    [
        (b'{"product_id":1,"price":"20.5"}', None, (1, "20.5")),
        (b'{"product_id":2,"price":"9"}', "1", (2, "9")),
        (b'{"product_id":3,"new_price":"15"}', "2", (3, "15")),
    ],
)
def test_a_chain_brings_v1_and_v2_up_to_v3(
    body: bytes, version: str | None, expected: tuple[int, str], style: JsonStyle
) -> None:
    event = decode(message(PriceChanged, body, version), PriceChanged, LIMIT, style)
    assert event == PriceChanged(product_id=expected[0], new_price=Decimal(expected[1]), currency="EUR")


def test_upcasters_see_the_body_as_sent_in_abp_style() -> None:
    seen: list[dict[str, Any]] = []

    class Moved(Event, name=f"{PREFIX}.Moved", version=2):
        shelf_code: str
        weight: Decimal

    @upcaster(Moved, from_version=1)
    def keep(body: dict[str, Any]) -> dict[str, Any]:
        seen.append(dict(body))
        return {"shelfCode": body["shelf"], "weight": body["weight"]}

    event = decode(message(Moved, b'{"shelf":"A1","weight":0.1}'), Moved, LIMIT, "abp")
    assert seen == [{"shelf": "A1", "weight": Decimal("0.1")}]  # camelCase on the wire, decimals exact
    assert event == Moved(shelf_code="A1", weight=Decimal("0.1"))


def test_a_message_as_new_as_the_class_is_not_parsed_for_upcasting() -> None:
    class Unversioned(Event, name=f"{PREFIX}.Unversioned"):
        sku: str

    assert upcast(message(Unversioned, b"not even JSON"), Unversioned, "eventrelay") is None
    assert upcast(message(PriceChanged, b"not even JSON", "3"), PriceChanged, "eventrelay") is None


def test_a_newer_message_is_decoded_with_its_unknown_fields_ignored() -> None:
    body = b'{"product_id":1,"new_price":"2","currency":"USD","channel":"web"}'
    event = decode(message(PriceChanged, body, "4"), PriceChanged, LIMIT)
    assert event == PriceChanged(product_id=1, new_price=Decimal(2), currency="USD")


def test_a_missing_link_names_the_upcaster_to_register() -> None:
    class Gapped(Event, name=f"{PREFIX}.Gapped", version=3):
        sku: str

    @upcaster(Gapped, from_version=1)
    def first(body: dict[str, Any]) -> dict[str, Any]:
        return body

    with pytest.raises(DecodeError) as raised:
        decode(message(Gapped, b'{"sku":"a"}'), Gapped, LIMIT)
    assert str(raised.value) == (
        f"'{PREFIX}.Gapped' is version 1 and Gapped version 3, with no upcaster from version 2: "
        "register @upcaster(Gapped, from_version=2)"
    )


def test_an_upcaster_that_raises_or_returns_no_dict_is_a_decode_error() -> None:
    class Counted(Event, name=f"{PREFIX}.Counted", version=3):
        sku: str

    @upcaster(Counted, from_version=1)
    def explode(body: dict[str, Any]) -> dict[str, Any]:
        raise LookupError("no sku")

    @upcaster(Counted, from_version=2)
    def nothing(body: dict[str, Any]) -> dict[str, Any]:
        return None  # type: ignore[return-value]

    with pytest.raises(
        DecodeError, match=r"upcaster .*explode of .* from version 1 raised LookupError: no sku"
    ):
        decode(message(Counted, b"{}"), Counted, LIMIT)
    with pytest.raises(DecodeError, match=r"upcaster .*nothing of .* from version 2 returned NoneType"):
        decode(message(Counted, b"{}", "2"), Counted, LIMIT)


@pytest.mark.parametrize("body", [b"[1]", b"{", b"\xff"])
def test_a_body_to_upcast_must_be_a_json_object(body: bytes) -> None:
    with pytest.raises(DecodeError, match=r"not JSON|not a JSON object"):
        decode(message(PriceChanged, body, "1"), PriceChanged, LIMIT)


def test_an_upcast_body_that_does_not_fit_says_so() -> None:
    with pytest.raises(DecodeError, match="does not fit PriceChanged"):
        decode(message(PriceChanged, b'{"product_id":"x","price":"1"}'), PriceChanged, LIMIT)


@pytest.mark.parametrize("header", ["0", "-1", "1.0", "two", "", " 2", "²"])
def test_a_version_header_must_be_a_positive_integer(header: str) -> None:
    with pytest.raises(DecodeError, match=r"x-eventrelay-version header .* is not a positive integer"):
        message_version(message(PriceChanged, b"{}", header))
    with pytest.raises(DecodeError, match="not a positive integer"):
        decode(message(PriceChanged, b"{}", header), PriceChanged, LIMIT)


@pytest.mark.parametrize("from_version", [0, 3, "1", True])
def test_an_upcaster_goes_from_a_version_below_the_classes(from_version: Any) -> None:
    with pytest.raises(ConfigurationError, match="from_version must be an integer from 1 to 2"):
        upcaster(PriceChanged, from_version=from_version)


def test_a_second_upcaster_from_one_version_is_refused() -> None:
    def other(body: dict[str, Any]) -> dict[str, Any]:
        return body

    with pytest.raises(ConfigurationError, match=r"two upcasters from version 1: .*rename_price and .*other"):
        upcaster(PriceChanged, from_version=1)(other)
    assert upcaster(PriceChanged, from_version=1)(rename_price) is rename_price  # the same again: a no-op


async def test_the_version_header_is_the_buses_own() -> None:
    bus = DistributedEventBus("Products")
    event = PriceChanged(product_id=1, new_price=Decimal(1), currency="EUR")
    assert bus.outbox.message(event).headers[VERSION] == "3"
    with pytest.raises(ConfigurationError, match="set from the event class's version="):
        bus.outbox.message(event, headers={VERSION: "1"})
    with pytest.raises(ConfigurationError, match="set from the event class's version="):
        bus.outbox.message("Name", {}, headers={VERSION: "2"})


def test_a_reply_carries_its_events_version() -> None:
    request = Message("1" * 32, "Ask", b"{}", {})
    reply = answer(request, PriceChanged(product_id=1, new_price=Decimal(1), currency="EUR"), "eventrelay")
    assert reply.headers[VERSION] == "3"
