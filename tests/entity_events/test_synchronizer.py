"""`EntitySynchronizer`: OrderService keeps a local copy of IdentityService's users from their entity events,
ignores events older than its copy, honours its ignore flags and `apply` override, and refuses to be
subscribed without its type arguments."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any, TypeVar

import pytest

from eventrelay import ConfigurationError, DistributedEventBus, Event
from eventrelay.entity_events import (
    EntityCreatedEto,
    EntityDeletedEto,
    EntityEvents,
    EntityUpdatedEto,
)
from eventrelay.synchronizer import EntitySynchronizer
from eventrelay.testing import RecordingBroker, wait_until_idle
from tests.bus.helpers import settings
from tests.entity_events.support import (
    Buyer,
    IdentityBase,
    OrderBase,
    User,
    UserEto,
    buyer,
    create_models,
    identity,
    new_user,
    orders,
)

E = TypeVar("E", bound=Event)
M = TypeVar("M")


class UserCopies(EntitySynchronizer[UserEto, Buyer]):
    """OrderService's buyers, kept current from IdentityService's user events."""


class CopiesWithoutCreated(EntitySynchronizer[UserEto, Buyer]):
    ignore_created = True


class CopiesWithoutUpdated(EntitySynchronizer[UserEto, Buyer]):
    ignore_updated = True


class CopiesWithoutDeleted(EntitySynchronizer[UserEto, Buyer]):
    ignore_deleted = True


class CopiesWithANote(EntitySynchronizer[UserEto, Buyer]):
    def apply(self, local: Buyer, eto: UserEto) -> None:
        super().apply(local, eto)
        local.note = f"{eto.name} <{eto.email}>"


def eto(user_id: uuid.UUID, name: str) -> UserEto:
    return UserEto(id=user_id, user_name=name.lower(), name=name, email=f"{name.lower()}@example.com")


async def test_a_local_copy_follows_create_update_and_delete(database_url: str, tmp_path: Path) -> None:
    broker = RecordingBroker()
    users = EntityEvents().select(User).map(User, UserEto)
    order_service = orders(f"sqlite+aiosqlite:///{tmp_path}/orders.db", broker)
    await order_service.subscribe(UserCopies)
    async with identity(database_url, broker, users) as identity_service, order_service:
        await create_models(identity_service, IdentityBase.metadata)
        await create_models(order_service, OrderBase.metadata)
        user = new_user("john")
        async with identity_service.unit_of_work() as uow:
            uow.session.add(user)
        await wait_until_idle(identity_service, order_service)
        copy = await buyer(order_service, user.id)
        assert copy is not None
        assert (copy.user_name, copy.name, copy.email, copy.entity_version) == (
            "john",
            "John",
            "john@example.com",
            1,
        )

        async with identity_service.unit_of_work() as uow:
            loaded = await uow.session.get(User, user.id)
            assert loaded is not None
            loaded.name = "Johnny"
        await wait_until_idle(identity_service, order_service)
        copy = await buyer(order_service, user.id)
        assert copy is not None
        assert (copy.name, copy.entity_version) == ("Johnny", 2)

        async with identity_service.unit_of_work() as uow:
            await uow.session.delete(await uow.session.get(User, user.id))
        await wait_until_idle(identity_service, order_service)
        assert await buyer(order_service, user.id) is None
        assert await order_service.dead_letters() == []


async def _publish(bus: DistributedEventBus, *events: Event) -> None:
    key = "User:out-of-order"  # one entity's events in one lane, so they are handled in publish order
    for event in events:
        await bus.publish(event, key=key)


async def test_an_update_older_than_the_copy_is_ignored(database_url: str) -> None:
    broker = RecordingBroker()
    publisher = DistributedEventBus("IdentityService", broker=broker, settings=settings())
    order_service = orders(database_url, broker)
    await order_service.subscribe(UserCopies)
    user_id = uuid.uuid4()
    async with publisher, order_service:
        await create_models(order_service, OrderBase.metadata)
        await _publish(
            publisher,
            EntityCreatedEto[UserEto](entity=eto(user_id, "One"), entity_version=1),
            EntityUpdatedEto[UserEto](entity=eto(user_id, "Three"), entity_version=3),
            EntityUpdatedEto[UserEto](entity=eto(user_id, "Two"), entity_version=2),  # late
            EntityUpdatedEto[UserEto](entity=eto(user_id, "Again"), entity_version=3),  # not newer
        )
        await wait_until_idle(publisher, order_service)
        copy = await buyer(order_service, user_id)
        assert copy is not None
        assert (copy.name, copy.entity_version) == ("Three", 3)

        await _publish(publisher, EntityDeletedEto[UserEto](entity=eto(user_id, "Two"), entity_version=2))
        await wait_until_idle(publisher, order_service)
        assert await buyer(order_service, user_id) is not None  # a delete of an older state: ignored

        await _publish(publisher, EntityDeletedEto[UserEto](entity=eto(user_id, "Three"), entity_version=3))
        await wait_until_idle(publisher, order_service)
        assert await buyer(order_service, user_id) is None


async def test_an_update_that_overtakes_the_create_wins(database_url: str) -> None:
    broker = RecordingBroker()
    publisher = DistributedEventBus("IdentityService", broker=broker, settings=settings())
    order_service = orders(database_url, broker)
    await order_service.subscribe(UserCopies)
    user_id = uuid.uuid4()
    async with publisher, order_service:
        await create_models(order_service, OrderBase.metadata)
        await _publish(
            publisher,
            EntityUpdatedEto[UserEto](entity=eto(user_id, "Three"), entity_version=3),
            EntityCreatedEto[UserEto](entity=eto(user_id, "One"), entity_version=1),
        )
        await wait_until_idle(publisher, order_service)
        copy = await buyer(order_service, user_id)
        assert copy is not None
        assert (copy.name, copy.email, copy.entity_version) == ("Three", "three@example.com", 3)


async def test_events_without_versions_are_applied_in_arrival_order(database_url: str) -> None:
    broker = RecordingBroker()
    publisher = DistributedEventBus("IdentityService", broker=broker, settings=settings())
    order_service = orders(database_url, broker)
    await order_service.subscribe(UserCopies)
    user_id = uuid.uuid4()
    async with publisher, order_service:
        await create_models(order_service, OrderBase.metadata)
        await _publish(
            publisher,
            EntityCreatedEto[UserEto](entity=eto(user_id, "One")),
            EntityUpdatedEto[UserEto](entity=eto(user_id, "Two")),
        )
        await wait_until_idle(publisher, order_service)
        copy = await buyer(order_service, user_id)
        assert copy is not None
        assert (copy.name, copy.entity_version) == ("Two", None)
        await _publish(publisher, EntityDeletedEto[UserEto](entity=eto(user_id, "Two")))
        await wait_until_idle(publisher, order_service)
        assert await buyer(order_service, user_id) is None


@pytest.mark.parametrize(
    ("synchronizer", "after_created", "after_updated", "after_deleted"),
    [
        pytest.param(CopiesWithoutCreated, None, "Two", None, id="ignore_created"),
        pytest.param(CopiesWithoutUpdated, "One", "One", None, id="ignore_updated"),
        pytest.param(CopiesWithoutDeleted, "One", "Two", "Two", id="ignore_deleted"),
    ],
)
async def test_the_ignore_flags_skip_their_event(
    database_url: str,
    synchronizer: type[EntitySynchronizer[UserEto, Buyer]],
    after_created: str | None,
    after_updated: str | None,
    after_deleted: str | None,
) -> None:
    broker = RecordingBroker()
    publisher = DistributedEventBus("IdentityService", broker=broker, settings=settings())
    order_service = orders(database_url, broker)
    await order_service.subscribe(synchronizer)
    user_id = uuid.uuid4()

    async def name_after(event: Event) -> str | None:
        await _publish(publisher, event)
        await wait_until_idle(publisher, order_service)
        copy = await buyer(order_service, user_id)
        return None if copy is None else copy.name

    async with publisher, order_service:
        await create_models(order_service, OrderBase.metadata)
        assert await name_after(EntityCreatedEto[UserEto](entity=eto(user_id, "One"), entity_version=1)) == (
            after_created
        )
        assert await name_after(EntityUpdatedEto[UserEto](entity=eto(user_id, "Two"), entity_version=2)) == (
            after_updated
        )
        assert await name_after(EntityDeletedEto[UserEto](entity=eto(user_id, "Two"), entity_version=2)) == (
            after_deleted
        )


async def test_apply_can_be_overridden(database_url: str) -> None:
    broker = RecordingBroker()
    publisher = DistributedEventBus("IdentityService", broker=broker, settings=settings())
    order_service = orders(database_url, broker)
    await order_service.subscribe(CopiesWithANote)
    user_id = uuid.uuid4()
    async with publisher, order_service:
        await create_models(order_service, OrderBase.metadata)
        await _publish(
            publisher,
            EntityCreatedEto[UserEto](entity=eto(user_id, "Ann"), entity_version=1),
            EntityUpdatedEto[UserEto](entity=eto(user_id, "Anne"), entity_version=2),
        )
        await wait_until_idle(publisher, order_service)
        copy = await buyer(order_service, user_id)
        assert copy is not None
        assert (copy.name, copy.note, copy.entity_version) == ("Anne", "Anne <anne@example.com>", 2)


class Unparametrized(EntitySynchronizer):  # type: ignore[type-arg]
    pass


class StillOpen(EntitySynchronizer[E, M]):
    pass


@pytest.mark.parametrize("synchronizer", [Unparametrized, StillOpen], ids=["no-arguments", "type-variables"])
async def test_a_synchronizer_without_its_type_arguments_cannot_be_subscribed(synchronizer: Any) -> None:
    bus = DistributedEventBus("OrderService", settings=settings())
    with pytest.raises(ConfigurationError, match=r"EntitySynchronizer\[SomeEto, LocalModel\]"):
        await bus.subscribe(synchronizer)
    assert bus.event_names == []


async def test_a_synchronizer_handles_the_three_entity_events_of_its_eto() -> None:
    bus = DistributedEventBus("OrderService", settings=settings())
    await bus.subscribe(UserCopies)
    assert bus.event_names == [
        "Tests.Identity.User.Created",
        "Tests.Identity.User.Deleted",
        "Tests.Identity.User.Updated",
    ]
