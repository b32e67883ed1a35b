"""Entity events in the "abp" JSON style through real buses: IdentityService publishes ABP's shape (camelCase,
the version inside the entity), OrderService's `EntitySynchronizer` reads ABP's bodies, version included, and
a `profile=abp` RabbitMQ broker switches a bus to the style."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from eventrelay import DistributedEventBus, Event, Message
from eventrelay.entity_events import EntityEvents, EntityUpdatedEto
from eventrelay.envelope import new_message_id
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

UPDATED = "Tests.Identity.User.Updated"


class UserCopies(EntitySynchronizer[UserEto, Buyer]):
    """OrderService's buyers, kept current from IdentityService's user events."""


def abp_body(user_id: uuid.UUID, name: str, version: int) -> bytes:
    """`EntityUpdatedEto<UserEto>` as an ABP IdentityService writes it (System.Text.Json, camelCase)."""
    return (
        f'{{"entity":{{"id":"{user_id}","tenantId":null,"userName":"{name.lower()}","name":"{name}",'
        f'"surname":"","isActive":true,"email":"{name.lower()}@example.com","emailConfirmed":false,'
        f'"phoneNumber":null,"phoneNumberConfirmed":false,"entityVersion":{version},"extraProperties":{{}}}}}}'
    ).encode()


async def test_identity_service_publishes_abps_shape_and_order_service_keeps_its_copy(tmp_path: Path) -> None:
    broker = RecordingBroker()
    users = EntityEvents().select(User).map(User, UserEto)
    identity_service = identity(f"sqlite+aiosqlite:///{tmp_path}/id.db", broker, users, json_style="abp")
    order_service = orders(f"sqlite+aiosqlite:///{tmp_path}/orders.db", broker, json_style="abp")
    await order_service.subscribe(UserCopies)
    async with identity_service, order_service:
        await create_models(identity_service, IdentityBase.metadata)
        await create_models(order_service, OrderBase.metadata)
        user = new_user("john")
        async with identity_service.unit_of_work() as uow:
            uow.session.add(user)
        async with identity_service.unit_of_work() as uow:
            loaded = await uow.session.get(User, user.id)
            assert loaded is not None
            loaded.name = "Johnny"
        await wait_until_idle(identity_service, order_service)
        copy = await buyer(order_service, user.id)
    assert copy is not None
    assert (copy.user_name, copy.name, copy.entity_version) == ("john", "Johnny", 2)
    created, updated = (json.loads(m.body) for m in broker.published)
    assert created == {
        "entity": {
            "id": str(user.id),
            "userName": "john",
            "name": "John",
            "email": "john@example.com",
            "entityVersion": 1,
        }
    }
    assert updated["entity"]["name"] == "Johnny"
    assert updated["entity"]["entityVersion"] == 2


async def test_the_synchronizer_ignores_an_abp_event_older_than_its_copy(tmp_path: Path) -> None:
    broker = RecordingBroker()
    order_service = orders(f"sqlite+aiosqlite:///{tmp_path}/orders.db", broker, json_style="abp")
    await order_service.subscribe(UserCopies)
    user_id = uuid.uuid4()
    async with order_service:
        await create_models(order_service, OrderBase.metadata)
        for name, version in (("One", 1), ("Three", 3), ("Two", 2)):  # "Two" comes late
            body = abp_body(user_id, name, version)
            await broker.publish([Message(new_message_id(), UPDATED, body, key=f"User:{user_id}")])
            await wait_until_idle(order_service)
        copy = await buyer(order_service, user_id)
        assert await order_service.dead_letters() == []
    assert copy is not None
    assert (copy.name, copy.user_name, copy.entity_version) == ("Three", "three", 3)


class VersionedUserEto(Event, name="AbpStyleTests.Users.User"):
    """A user ETO with ABP's `IHasEntityVersion` as a field of its own."""

    id: uuid.UUID
    name: str
    entity_version: int


class VersionedCopies(EntitySynchronizer[VersionedUserEto, Buyer]):
    """Buyers kept from ETOs that carry their own version."""


async def test_the_synchronizer_takes_the_version_an_eto_carries_itself(tmp_path: Path) -> None:
    broker = RecordingBroker()
    publisher = DistributedEventBus("IdentityService", broker=broker, settings=settings())
    order_service = orders(f"sqlite+aiosqlite:///{tmp_path}/orders.db", broker)
    await order_service.subscribe(VersionedCopies)
    user_id = uuid.uuid4()
    async with publisher, order_service:
        await create_models(order_service, OrderBase.metadata)
        for name, version in (("Three", 3), ("Two", 2)):  # "Two" comes late; no event-level version
            user = VersionedUserEto(id=user_id, name=name, entity_version=version)
            await publisher.publish(EntityUpdatedEto[VersionedUserEto](entity=user), key="User:1")
            await wait_until_idle(publisher, order_service)
        copy = await buyer(order_service, user_id)
    assert copy is not None
    assert (copy.name, copy.entity_version) == ("Three", 3)


class Greeted(Event, name="AbpStyleTests.Greeted"):
    user_id: uuid.UUID
    display_name: str


@pytest.fixture
async def abp_rabbitmq_url() -> AsyncIterator[str]:
    """A `profile=abp` URL on an exchange of the test's own; its queues and exchange go afterwards."""
    import aio_pika

    from eventrelay.brokers.rabbitmq import RabbitMQBroker
    from tests.servers import require_server

    require_server("RabbitMQ", 5672)
    server = "amqp://guest:guest@127.0.0.1:5672/"
    suffix = uuid.uuid4().hex[:10]
    url = f"{server}?exchange=abp-style-{suffix}&profile=abp&retry_delays=0.1"
    layout = RabbitMQBroker(url)  # never started: it only names the queues
    service = f"AbpStyle-{suffix}"
    yield url
    async with await aio_pika.connect(server) as connection:
        channel = await connection.channel()
        for queue in (service, *layout.retry_queues(service)):
            await channel.queue_delete(queue)
        await channel.exchange_delete(layout.exchange)


@pytest.mark.rabbitmq
async def test_a_profile_abp_rabbitmq_bus_writes_and_reads_abps_json(
    abp_rabbitmq_url: str, tmp_path: Path
) -> None:
    received: list[Greeted] = []
    both = asyncio.Event()

    async def record(event: Greeted) -> None:
        received.append(event)
        if len(received) == 2:
            both.set()

    service = f"AbpStyle-{abp_rabbitmq_url.split('abp-style-')[1][:10]}"
    bus = DistributedEventBus(
        service, broker=abp_rabbitmq_url, database=f"sqlite+aiosqlite:///{tmp_path}/s.db", settings=settings()
    )
    assert bus.json_style == "abp"  # from the broker's profile: the settings say nothing
    await bus.subscribe(record)
    user_id = uuid.uuid4()
    async with bus:
        await bus.publish(Greeted(user_id=user_id, display_name="From Python"))
        # As an ABP service publishes it: camelCase, the case of ABP's writer, unknown fields.
        body = f'{{"UserId":"{user_id}","displayName":"Från ABP","extraProperties":{{}}}}'.encode()
        await bus.broker.publish([Message(new_message_id(), "AbpStyleTests.Greeted", body)])
        async with asyncio.timeout(20):
            await both.wait()
        assert await bus.dead_letters() == []
    assert sorted(e.display_name for e in received) == ["From Python", "Från ABP"]
    assert {e.user_id for e in received} == {user_id}
