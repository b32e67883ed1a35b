"""The guide's story end to end: IdentityService publishes user entity events automatically, and a handler of
`EntityUpdatedEto[UserEto]` in OrderService, a separate service with its own database, receives the update
through a real broker (the SQL broker on PostgreSQL, and RabbitMQ) and writes in its unit of work."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aio_pika
import pytest

from eventrelay import DistributedEventBus, DistributedEventHandler
from eventrelay.brokers.rabbitmq import RabbitMQBroker
from eventrelay.entity_events import EntityEvents, EntityUpdatedEto
from eventrelay.testing import wait_until_idle
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
from tests.servers import require_server

Received = list[tuple[UserEto, str | None, str | None, str]]
USERS = EntityEvents().select(User).map(User, UserEto)
RABBITMQ = "amqp://guest:guest@127.0.0.1:5672/"


class RenameBuyer(DistributedEventHandler[EntityUpdatedEto[UserEto]]):
    """OrderService: keeps its buyer's name current (writing through the handler's unit of work)."""

    def __init__(self, received: Received) -> None:
        self.received = received

    async def handle_event(self, event: EntityUpdatedEto[UserEto]) -> None:
        context = self.context
        self.received.append((event.entity, context.tenant_id, context.key, context.event_name))
        session = context.session
        local = await session.get(Buyer, event.entity.id)
        if local is None:
            local = Buyer(id=event.entity.id)
            session.add(local)
        local.name = event.entity.name
        local.entity_version = event.entity_version


async def _story(identity_service: DistributedEventBus, order_service: DistributedEventBus) -> None:
    received: Received = []
    await order_service.subscribe(RenameBuyer, factory=lambda: RenameBuyer(received))
    async with order_service, identity_service:
        await create_models(identity_service, IdentityBase.metadata)
        await create_models(order_service, OrderBase.metadata)
        user = new_user("john", tenant_id="acme")
        async with identity_service.unit_of_work() as uow:
            uow.session.add(user)
        async with identity_service.unit_of_work() as uow:
            loaded = await uow.session.get(User, user.id)
            assert loaded is not None
            loaded.name = "John Smith"
            await uow.session.flush()
            loaded.email = "john.smith@example.com"
        await wait_until_idle(identity_service, order_service, timeout=10)
        copy = await buyer(order_service, user.id)
        assert await order_service.dead_letters() == []
    assert copy is not None
    assert (copy.name, copy.entity_version) == ("John Smith", 3)  # two flushes, two versions
    assert received == [
        (
            UserEto(id=user.id, user_name="john", name="John Smith", email="john.smith@example.com"),
            "acme",
            f"User:{user.id}",
            "Tests.Identity.User.Updated",
        )
    ]  # only the update: OrderService does not subscribe to Created


@pytest.mark.postgresql
async def test_order_service_receives_the_user_update_through_the_sql_broker(
    postgresql_url: str, tmp_path: Path
) -> None:
    # The broker's database is not a service's: each service has its own SQLite file.
    identity_service = identity(f"sqlite+aiosqlite:///{tmp_path}/identity.db", postgresql_url, USERS)
    order_service = orders(f"sqlite+aiosqlite:///{tmp_path}/orders.db", postgresql_url)
    await _story(identity_service, order_service)


@dataclass(frozen=True)
class RabbitMQSetup:
    """An exchange and service (queue) names of this test's own."""

    url: str
    identity: str
    orders: str


@pytest.fixture
async def rabbitmq() -> AsyncIterator[RabbitMQSetup]:
    require_server("RabbitMQ", 5672)
    suffix = uuid.uuid4().hex[:10]
    setup = RabbitMQSetup(
        f"{RABBITMQ}?exchange=er-entity-{suffix}&retry_delays=0.1,1",
        f"IdentityService-{suffix}",
        f"OrderService-{suffix}",
    )
    yield setup
    layout = RabbitMQBroker(setup.url)  # never started: it only names the queues
    queues = [layout.unrouted]
    for service in (setup.identity, setup.orders):
        queues += [service, *layout.retry_queues(service)]
    async with await aio_pika.connect(RABBITMQ) as connection:
        channel = await connection.channel()
        for queue in queues:
            await channel.queue_delete(queue)
        for exchange in (layout.exchange, layout.unrouted):
            await channel.exchange_delete(exchange)


@pytest.mark.rabbitmq
async def test_order_service_receives_the_user_update_through_rabbitmq(
    rabbitmq: RabbitMQSetup, tmp_path: Path
) -> None:
    identity_service = identity(
        f"sqlite+aiosqlite:///{tmp_path}/identity.db", rabbitmq.url, USERS, service=rabbitmq.identity
    )
    order_service = orders(f"sqlite+aiosqlite:///{tmp_path}/orders.db", rabbitmq.url, service=rabbitmq.orders)
    await _story(identity_service, order_service)
