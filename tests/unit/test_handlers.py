"""Handlers as `bus.subscribe` resolves them: classes, unions, functions, an instance per message, factories,
and the errors that say what to do instead."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest

from eventrelay import (
    ConfigurationError,
    Context,
    DistributedEventBus,
    DistributedEventHandler,
    Event,
)
from eventrelay.testing import RecordingBroker, wait_until_idle

PREFIX = "tests.unit.test_handlers"


class PriceChangedEto(Event, name=f"{PREFIX}.PriceChanged"):
    product_id: int
    new_price: int


class UserCreatedEto(Event, name=f"{PREFIX}.UserCreated"):
    user_id: int


class UserDeletedEto(Event, name=f"{PREFIX}.UserDeleted"):
    user_id: int


class ApplyDiscount(DistributedEventHandler[PriceChangedEto]):
    handled: ClassVar[list[tuple[PriceChangedEto, Context]]] = []  # reset by the tests that read it

    async def handle_event(self, event: PriceChangedEto) -> None:
        ApplyDiscount.handled.append((event, self.context))


class SyncUsers(DistributedEventHandler[UserCreatedEto | UserDeletedEto]):
    """One class for several events (the guide: "handle multiple events in the same handler")."""

    handled: ClassVar[list[tuple[str, int, str]]] = []

    async def handle_event(self, event: UserCreatedEto | UserDeletedEto) -> None:
        kind = "created" if isinstance(event, UserCreatedEto) else "deleted"
        SyncUsers.handled.append((kind, event.user_id, self.context.event_name))


class CountInstances(DistributedEventHandler[PriceChangedEto]):
    instances: ClassVar[list[CountInstances]] = []
    calls_per_instance: ClassVar[dict[int, int]] = {}

    async def handle_event(self, event: PriceChangedEto) -> None:
        CountInstances.instances.append(self)  # kept alive, so no two can share an id()
        CountInstances.calls_per_instance[id(self)] = CountInstances.calls_per_instance.get(id(self), 0) + 1


class PriceRepository:
    def __init__(self) -> None:
        self.saved: list[tuple[int, int]] = []


class SavePrice(DistributedEventHandler[PriceChangedEto]):
    def __init__(self, repository: PriceRepository) -> None:
        self.repository = repository

    async def handle_event(self, event: PriceChangedEto) -> None:
        self.repository.saved.append((event.product_id, event.new_price))


def price(product_id: int = 1, new_price: int = 10) -> PriceChangedEto:
    return PriceChangedEto(product_id=product_id, new_price=new_price)


@pytest.fixture
def broker() -> RecordingBroker:
    return RecordingBroker()


# --- what can be subscribed ------------------------------------------------------------------------


async def test_a_handler_class_handles_its_event_and_sees_its_context(broker: RecordingBroker) -> None:
    ApplyDiscount.handled = []
    async with DistributedEventBus("OrderService", broker=broker) as bus:
        subscription = await bus.subscribe(ApplyDiscount)
        message_id = await bus.publish(price(7, 80), correlation_id="corr-1", tenant_id="tenant-1")
        await wait_until_idle(bus)

    [(event, context)] = ApplyDiscount.handled
    assert event == price(7, 80)
    assert subscription.handler_name == "tests.unit.test_handlers.ApplyDiscount"
    assert context.message_id == message_id
    assert context.event_name == f"{PREFIX}.PriceChanged"
    assert context.subscriber == "OrderService"
    assert context.handler == "tests.unit.test_handlers.ApplyDiscount"
    assert context.attempt == 1
    assert (context.correlation_id, context.tenant_id) == ("corr-1", "tenant-1")


async def test_one_class_handles_several_events_through_a_union(broker: RecordingBroker) -> None:
    SyncUsers.handled = []
    async with DistributedEventBus("OrderService", broker=broker) as bus:
        await bus.subscribe(SyncUsers)
        assert bus.event_names == [f"{PREFIX}.UserCreated", f"{PREFIX}.UserDeleted"]
        await bus.publish(UserCreatedEto(user_id=1), key="user-1")
        await bus.publish(UserDeletedEto(user_id=1), key="user-1")
        await wait_until_idle(bus)

    assert SyncUsers.handled == [
        ("created", 1, f"{PREFIX}.UserCreated"),
        ("deleted", 1, f"{PREFIX}.UserDeleted"),
    ]


async def test_a_union_handler_can_be_subscribed_to_one_of_its_events(broker: RecordingBroker) -> None:
    SyncUsers.handled = []
    async with DistributedEventBus("OrderService", broker=broker) as bus:
        await bus.subscribe(SyncUsers, event=UserDeletedEto)
        assert bus.event_names == [f"{PREFIX}.UserDeleted"]
        await bus.publish(UserCreatedEto(user_id=1))
        await bus.publish(UserDeletedEto(user_id=2))
        await wait_until_idle(bus)

    assert SyncUsers.handled == [("deleted", 2, f"{PREFIX}.UserDeleted")]


async def test_a_subclass_of_a_handler_class_inherits_its_event(broker: RecordingBroker) -> None:
    ApplyDiscount.handled = []

    class LoudDiscount(ApplyDiscount):
        pass

    async with DistributedEventBus("OrderService", broker=broker) as bus:
        await bus.subscribe(LoudDiscount)
        assert bus.event_names == [f"{PREFIX}.PriceChanged"]
        await bus.publish(price())
        await wait_until_idle(bus)

    assert [event for event, _ in ApplyDiscount.handled] == [price()]


async def test_plain_async_functions_take_the_event_and_optionally_the_context(
    broker: RecordingBroker,
) -> None:
    events_only: list[PriceChangedEto] = []
    with_context: list[tuple[PriceChangedEto, str, int]] = []

    async def on_price(event: PriceChangedEto) -> None:
        events_only.append(event)

    async def on_price_with_context(event: PriceChangedEto, context: Context) -> None:
        with_context.append((event, context.message_id, context.attempt))

    async with DistributedEventBus("OrderService", broker=broker) as bus:
        await bus.subscribe(on_price)
        await bus.subscribe(on_price_with_context)
        message_id = await bus.publish(price(3))
        await wait_until_idle(bus)

    assert events_only == [price(3)]
    assert with_context == [(price(3), message_id, 1)]


async def test_a_function_may_handle_a_union(broker: RecordingBroker) -> None:
    seen: list[int] = []

    async def on_user(event: UserCreatedEto | UserDeletedEto) -> None:
        seen.append(event.user_id)

    async with DistributedEventBus("OrderService", broker=broker) as bus:
        await bus.subscribe(on_user)
        await bus.publish(UserCreatedEto(user_id=1), key="u")
        await bus.publish(UserDeletedEto(user_id=2), key="u")
        await wait_until_idle(bus)

    assert seen == [1, 2]


async def test_every_message_gets_a_fresh_handler_instance(broker: RecordingBroker) -> None:
    CountInstances.instances = []
    CountInstances.calls_per_instance = {}
    async with DistributedEventBus("OrderService", broker=broker) as bus:
        await bus.subscribe(CountInstances)
        for product_id in range(5):
            await bus.publish(price(product_id))
        await wait_until_idle(bus)

    assert len(CountInstances.instances) == 5
    assert len({id(instance) for instance in CountInstances.instances}) == 5
    assert set(CountInstances.calls_per_instance.values()) == {1}


async def test_a_factory_gives_the_handler_its_dependencies(broker: RecordingBroker) -> None:
    repository = PriceRepository()
    made: list[SavePrice] = []

    def make() -> SavePrice:
        handler = SavePrice(repository)
        made.append(handler)
        return handler

    async with DistributedEventBus("OrderService", broker=broker) as bus:
        await bus.subscribe(SavePrice, factory=make)
        await bus.publish(price(1, 10))
        await bus.publish(price(2, 20))
        await wait_until_idle(bus)

    assert sorted(repository.saved) == [(1, 10), (2, 20)]
    assert len(made) == 2
    assert made[0] is not made[1]


async def test_the_subscription_handle_unsubscribes(broker: RecordingBroker) -> None:
    seen: list[int] = []

    async def on_price(event: PriceChangedEto) -> None:
        seen.append(event.product_id)

    async with DistributedEventBus("OrderService", broker=broker) as bus:
        subscription = await bus.subscribe(on_price)
        await bus.publish(price(1))
        await wait_until_idle(bus)
        await subscription.unsubscribe()
        await subscription.unsubscribe()  # idempotent
        assert bus.event_names == []
        await bus.publish(price(2))
        await wait_until_idle(bus)
        assert await bus.dead_letters() == []

    assert seen == [1]
    assert [m.name for m in broker.published] == [f"{PREFIX}.PriceChanged"] * 2


# --- what cannot be subscribed, and what to do instead ---------------------------------------------


async def test_subscribing_an_instance_says_to_subscribe_the_class_or_a_factory() -> None:
    async with DistributedEventBus("OrderService") as bus:
        with pytest.raises(ConfigurationError, match=r"Subscribe the class SavePrice.*factory=lambda"):
            await bus.subscribe(SavePrice(PriceRepository()))  # type: ignore[arg-type]
        assert bus.event_names == []


async def test_subscribing_a_sync_function_says_to_pass_an_async_function() -> None:
    def on_price(event: PriceChangedEto) -> None:
        raise AssertionError("never called")

    async with DistributedEventBus("OrderService") as bus:
        with pytest.raises(ConfigurationError, match="an async function"):
            await bus.subscribe(on_price)
        assert bus.event_names == []


async def test_subscribing_an_unannotated_function_says_to_annotate_it() -> None:
    async def on_price(event):  # type: ignore[no-untyped-def]
        raise AssertionError("never called")

    async with DistributedEventBus("OrderService") as bus:
        with pytest.raises(ConfigurationError, match=r"Annotate the event parameter .*\(event: MyEto\)"):
            await bus.subscribe(on_price)


async def test_subscribing_a_function_with_too_many_parameters_says_what_it_takes() -> None:
    async def on_price(event: PriceChangedEto, context: Context, extra: int) -> None:
        raise AssertionError("never called")

    async with DistributedEventBus("OrderService") as bus:
        with pytest.raises(ConfigurationError, match=r"must take \(event\) or \(event, context\)"):
            await bus.subscribe(on_price)


async def test_a_function_annotated_with_a_class_it_cannot_see_is_a_configuration_error() -> None:
    class LocalEto(Event, name=f"{PREFIX}.Local"):
        value: int

    # With `from __future__ import annotations` the annotation is the string "LocalEto", which the bus
    # cannot resolve from the module's globals.
    async def on_local(event: LocalEto) -> None:
        raise AssertionError("never called")

    async with DistributedEventBus("OrderService") as bus:
        with pytest.raises(ConfigurationError, match="LocalEto"):
            await bus.subscribe(on_local)


async def test_subscribing_a_class_without_a_type_argument_says_to_name_the_event() -> None:
    class Untyped(DistributedEventHandler):  # type: ignore[type-arg]
        async def handle_event(self, event: Any) -> None:
            raise AssertionError("never called")

    async with DistributedEventBus("OrderService") as bus:
        with pytest.raises(
            ConfigurationError, match=r"must name its event: .*DistributedEventHandler\[MyEto\]"
        ):
            await bus.subscribe(Untyped)


async def test_a_handler_of_something_that_is_not_an_event_is_refused() -> None:
    class Wrong(DistributedEventHandler[int]):  # type: ignore[type-var]
        async def handle_event(self, event: int) -> None:
            raise AssertionError("never called")

    async with DistributedEventBus("OrderService") as bus:
        with pytest.raises(ConfigurationError, match="not an Event class"):
            await bus.subscribe(Wrong)


async def test_a_factory_is_refused_for_a_function() -> None:
    async def on_price(event: PriceChangedEto) -> None:
        raise AssertionError("never called")

    async with DistributedEventBus("OrderService") as bus:
        with pytest.raises(ConfigurationError, match="factory= is for handler classes"):
            await bus.subscribe(on_price, factory=lambda: SavePrice(PriceRepository()))


async def test_the_same_handler_twice_needs_a_name(broker: RecordingBroker) -> None:
    ApplyDiscount.handled = []
    async with DistributedEventBus("OrderService", broker=broker) as bus:
        await bus.subscribe(ApplyDiscount)
        with pytest.raises(ConfigurationError, match="already subscribed in OrderService; pass name="):
            await bus.subscribe(ApplyDiscount)
        second = await bus.subscribe(ApplyDiscount, name="ApplyDiscount.Again")
        assert second.handler_name == "ApplyDiscount.Again"
        await bus.publish(price())
        await wait_until_idle(bus)

    assert sorted(context.handler for _, context in ApplyDiscount.handled) == [
        "ApplyDiscount.Again",
        "tests.unit.test_handlers.ApplyDiscount",
    ]


def test_a_handlers_context_outside_the_bus_raises() -> None:
    handler = SavePrice(PriceRepository())
    with pytest.raises(ConfigurationError, match=r"SavePrice\.context is only set while the bus runs it"):
        _ = handler.context
