"""Events (ETOs): wire names, generic names, declaration errors, immutability, tolerant decoding, dynamic
events."""

from __future__ import annotations

import gc
import weakref
from decimal import Decimal
from typing import Any, Generic, TypeVar

import pytest
from pydantic import ValidationError

from eventrelay import (
    ConfigurationError,
    DistributedEventBus,
    DistributedEventHandler,
    DynamicEvent,
    Event,
    Message,
    event_name,
)
from eventrelay.codec import encode_body
from eventrelay.envelope import new_message_id
from eventrelay.events import MAX_NAME_LENGTH
from eventrelay.testing import RecordingBroker, wait_until_idle

PREFIX = "tests.unit.test_events"


class ProductPriceChangedEto(Event, name="Shop.Product.PriceChanged"):
    product_id: int
    old_price: Decimal
    new_price: Decimal


class UnnamedEto(Event):
    value: int


class UserEto(Event, name=f"{PREFIX}.Identity.User"):
    id: int
    user_name: str


class RoleEto(Event, name=f"{PREFIX}.Identity.Role"):
    id: int


EtoT = TypeVar("EtoT", bound=Event)


class EntityUpdatedEto(Event, Generic[EtoT], name_postfix=".Updated"):
    """A small generic event shaped like ABP's `EntityUpdatedEto<T>`."""

    entity: EtoT


class EntityChangedEto(Event, Generic[EtoT], name_prefix="Changed:", name_postfix="!"):
    entity: EtoT


# --- wire names ------------------------------------------------------------------------------------


def test_an_explicit_name_is_the_wire_name() -> None:
    assert event_name(ProductPriceChangedEto) == "Shop.Product.PriceChanged"
    event = ProductPriceChangedEto(product_id=1, old_price=Decimal(10), new_price=Decimal(8))
    assert event_name(event) == "Shop.Product.PriceChanged"


def test_without_a_name_the_wire_name_is_module_and_qualified_name() -> None:
    assert event_name(UnnamedEto) == "tests.unit.test_events.UnnamedEto"


def test_a_nested_class_is_named_by_its_qualified_name() -> None:
    class Inner(Event):
        value: int

    assert event_name(Inner) == (
        "tests.unit.test_events.test_a_nested_class_is_named_by_its_qualified_name.<locals>.Inner"
    )


def test_a_subclass_of_a_named_event_does_not_inherit_its_name() -> None:
    class Special(ProductPriceChangedEto):
        reason: str = ""

    assert event_name(Special).endswith(".<locals>.Special")
    assert event_name(ProductPriceChangedEto) == "Shop.Product.PriceChanged"


def test_a_generic_event_is_named_after_its_type_argument() -> None:
    assert event_name(EntityUpdatedEto[UserEto]) == f"{PREFIX}.Identity.User.Updated"
    assert event_name(EntityUpdatedEto[RoleEto]) == f"{PREFIX}.Identity.Role.Updated"
    assert event_name(EntityChangedEto[UserEto]) == f"Changed:{PREFIX}.Identity.User!"
    updated = EntityUpdatedEto[UserEto](entity=UserEto(id=1, user_name="john"))
    assert event_name(updated) == f"{PREFIX}.Identity.User.Updated"


def test_a_generic_event_is_one_class_however_often_it_is_parametrized() -> None:
    assert EntityUpdatedEto[UserEto] is EntityUpdatedEto[UserEto]


async def test_subscribing_a_generic_event_twice_uses_one_class_and_one_name() -> None:
    seen: list[tuple[str, str]] = []

    class FirstHandler(DistributedEventHandler[EntityUpdatedEto[UserEto]]):
        async def handle_event(self, event: EntityUpdatedEto[UserEto]) -> None:
            seen.append(("first", event.entity.user_name))

    async def second(event: EntityUpdatedEto[UserEto]) -> None:
        seen.append(("second", event.entity.user_name))

    broker = RecordingBroker()
    async with DistributedEventBus("OrderService", broker=broker) as bus:
        await bus.subscribe(FirstHandler)
        await bus.subscribe(second)
        assert bus.event_names == [f"{PREFIX}.Identity.User.Updated"]
        await bus.publish(EntityUpdatedEto[UserEto](entity=UserEto(id=7, user_name="jane")))
        await wait_until_idle(bus)

    assert sorted(seen) == [("first", "jane"), ("second", "jane")]
    assert [m.name for m in broker.published] == [f"{PREFIX}.Identity.User.Updated"]


def test_an_open_generic_has_no_name_and_the_error_names_the_fix() -> None:
    with pytest.raises(ConfigurationError, match=r"type argument, e\.g\. EntityUpdatedEto\[UserEto\]"):
        event_name(EntityUpdatedEto)


async def test_an_open_generic_cannot_be_subscribed() -> None:
    async def handle(event: EntityUpdatedEto) -> None:  # type: ignore[type-arg]
        raise AssertionError("never called")

    async with DistributedEventBus("OrderService") as bus:
        with pytest.raises(ConfigurationError, match="type argument"):
            await bus.subscribe(handle)


def test_a_generic_event_with_an_explicit_name_fails_at_declaration() -> None:
    # Its parametrizations are named after their argument, so `name=` would be silently ignored.
    with pytest.raises(ConfigurationError, match="name_postfix="):

        class Wrapped(Event, Generic[EtoT], name=f"{PREFIX}.Wrapped"):
            entity: EtoT


def test_a_partly_parametrized_generic_keeps_its_postfix() -> None:
    class AuditedUpdatedEto(EntityUpdatedEto[EtoT], Generic[EtoT], name_postfix=".Audited"):
        by: str

    assert event_name(AuditedUpdatedEto[UserEto]) == f"{PREFIX}.Identity.User.Audited"


def test_a_generic_event_takes_an_event_class_as_its_argument() -> None:
    with pytest.raises(ConfigurationError, match=r"one Event type argument, e\.g\. EntityUpdatedEto\["):
        EntityUpdatedEto[int]  # type: ignore[type-var]


# --- declaration errors ----------------------------------------------------------------------------


def test_a_name_of_256_characters_is_accepted() -> None:
    name = f"{PREFIX}." + "n" * (MAX_NAME_LENGTH - len(PREFIX) - 1)
    assert len(name) == MAX_NAME_LENGTH

    class LongNamed(Event, name=name):
        pass

    assert event_name(LongNamed) == name


def test_a_name_over_256_characters_fails_at_declaration() -> None:
    with pytest.raises(ConfigurationError, match="257 characters; the limit is 256"):

        class TooLong(Event, name="n" * (MAX_NAME_LENGTH + 1)):
            pass


@pytest.mark.parametrize("name", [42, b"Some.Name", ["Some.Name"]], ids=["int", "bytes", "list"])
def test_a_name_that_is_not_a_string_fails_at_declaration(name: object) -> None:
    with pytest.raises(ConfigurationError, match=f"must be a string, not {type(name).__name__}"):

        class NotAString(Event, name=name):
            pass


@pytest.mark.parametrize("name", ["", "   ", " Padded.Name "], ids=["empty", "blank", "padded"])
def test_an_empty_or_padded_name_fails_at_declaration(name: str) -> None:
    with pytest.raises(ConfigurationError, match="non-empty with no surrounding spaces"):

        class Empty(Event, name=name):
            pass


@pytest.mark.parametrize(
    "name", ["Forged\nERROR line", "Red.\x1b[31m", "Spoof\u202eed"], ids=["lf", "esc", "bidi"]
)
def test_a_name_with_control_characters_fails_at_declaration(name: str) -> None:
    # Names are shown in terminals and logs (issue 15): a message named so can then have no handler.
    with pytest.raises(ConfigurationError, match="no control characters or line breaks"):

        class Hostile(Event, name=name):
            pass


def test_two_live_classes_with_one_name_fail_at_declaration() -> None:
    class First(Event, name=f"{PREFIX}.Duplicate"):
        pass

    with pytest.raises(ConfigurationError, match=r"Two event classes are named .*First.*Second.*name="):

        class Second(Event, name=f"{PREFIX}.Duplicate"):
            pass

    assert event_name(First) == f"{PREFIX}.Duplicate"


def test_a_default_name_cannot_be_taken_by_an_explicit_one() -> None:
    with pytest.raises(ConfigurationError, match="Two event classes"):

        class Impostor(Event, name="tests.unit.test_events.UnnamedEto"):
            pass


# --- instances -------------------------------------------------------------------------------------


def test_events_are_frozen() -> None:
    event = ProductPriceChangedEto(product_id=1, old_price=Decimal(10), new_price=Decimal(8))
    with pytest.raises(ValidationError, match="frozen"):
        event.new_price = Decimal(1)  # type: ignore[misc]
    assert event.new_price == Decimal(8)


def test_events_are_validated_when_made() -> None:
    with pytest.raises(ValidationError):
        ProductPriceChangedEto(product_id="not a number", old_price=Decimal(1), new_price=Decimal(1))  # type: ignore[arg-type]


def _publishers_body() -> tuple[bytes, weakref.ref[type[Event]]]:
    """The publisher's process: its own ETO class (more fields), gone once this returns."""

    class OrderPlacedEto(Event, name=f"{PREFIX}.Order.Placed"):
        order_id: int
        customer: str
        total: Decimal
        lines: list[str]

    body = encode_body(OrderPlacedEto(order_id=5, customer="jane", total=Decimal("9.5"), lines=["a", "b"]))
    return body, weakref.ref(OrderPlacedEto)


async def test_a_subscriber_copy_with_fewer_fields_decodes_the_publishers_body() -> None:
    body, publisher_class = _publishers_body()
    gc.collect()
    assert publisher_class() is None, "the publisher's class is still alive; its name would be taken"

    class OrderPlacedEto(Event, name=f"{PREFIX}.Order.Placed"):  # the subscriber's own copy
        order_id: int
        total: Decimal

    handled: list[OrderPlacedEto] = []

    class Record(DistributedEventHandler[OrderPlacedEto]):
        async def handle_event(self, event: OrderPlacedEto) -> None:
            handled.append(event)

    broker = RecordingBroker()
    async with DistributedEventBus("Subscriber", broker=broker) as bus:
        await bus.subscribe(Record)
        await broker.publish([Message(new_message_id(), f"{PREFIX}.Order.Placed", body)])
        await wait_until_idle(bus)
        assert await bus.dead_letters() == []

    assert handled == [OrderPlacedEto(order_id=5, total=Decimal("9.5"))]
    assert not hasattr(handled[0], "customer")


# --- dynamic events --------------------------------------------------------------------------------


def test_a_dynamic_event_is_a_frozen_name_and_dict() -> None:
    event = DynamicEvent("Some.Event", {"a": 1})
    assert (event.name, event.data) == ("Some.Event", {"a": 1})
    assert DynamicEvent("Other.Event").data == {}
    with pytest.raises(AttributeError):
        event.name = "Changed"  # type: ignore[misc]


async def test_publish_by_name_and_subscribe_by_name_without_a_class() -> None:
    received: list[DynamicEvent] = []

    async def on_anything(event: DynamicEvent) -> None:
        received.append(event)

    broker = RecordingBroker()
    async with DistributedEventBus("Audit", broker=broker) as bus:
        await bus.subscribe(on_anything, event=f"{PREFIX}.Dynamic.Happened")
        await bus.publish(f"{PREFIX}.Dynamic.Happened", {"id": 3, "tags": ["x"]})
        await wait_until_idle(bus)

    assert received == [DynamicEvent(f"{PREFIX}.Dynamic.Happened", {"id": 3, "tags": ["x"]})]
    assert broker.published[0].body == b'{"id":3,"tags":["x"]}'


async def test_a_dynamic_publication_reaches_a_typed_handler_and_the_reverse() -> None:
    typed: list[UserEto] = []
    dynamic: list[DynamicEvent] = []

    async def on_typed(event: UserEto) -> None:
        typed.append(event)

    async def on_dynamic(event: DynamicEvent) -> None:
        dynamic.append(event)

    async with DistributedEventBus("Audit") as bus:
        await bus.subscribe(on_typed)
        await bus.subscribe(on_dynamic, event=event_name(UserEto))
        await bus.publish(event_name(UserEto), {"id": 1, "user_name": "from-dict"})
        await bus.publish(UserEto(id=2, user_name="from-class"))
        await wait_until_idle(bus)

    assert sorted(e.user_name for e in typed) == ["from-class", "from-dict"]
    assert sorted(e.data["user_name"] for e in dynamic) == ["from-class", "from-dict"]
    assert {e.name for e in dynamic} == {f"{PREFIX}.Identity.User"}


async def test_a_dynamic_handler_must_say_which_event() -> None:
    async def on_anything(event: DynamicEvent) -> None:
        raise AssertionError("never called")

    async with DistributedEventBus("Audit") as bus:
        with pytest.raises(ConfigurationError, match=r"event='Some\.Event\.Name'"):
            await bus.subscribe(on_anything)


@pytest.mark.parametrize("payload", [{"when": object()}, {"tags": {1, 2}}], ids=["object", "set"])
async def test_a_dynamic_payload_that_is_not_json_is_refused(payload: dict[str, Any]) -> None:
    async with DistributedEventBus("Audit") as bus:
        with pytest.raises(ConfigurationError, match="is not JSON"):
            await bus.publish(f"{PREFIX}.Dynamic.Bad", payload)
