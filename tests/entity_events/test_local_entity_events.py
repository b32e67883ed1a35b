"""Local entity events (ABP's `EntityCreatedEventData<T>`, ...): `EntityCreated[User]`, `EntityUpdated[User]`,
`EntityDeleted[User]` and `EntityChanged[User]` carry the entity itself to `bus.local` handlers, which run at
the commit inside the unit of work: their writes commit with it, their changes make events of their own, and
one that raises rolls everything back. Nothing watches the session while no such handler is subscribed."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from eventrelay import (
    Change,
    ConfigurationError,
    Context,
    DistributedEventBus,
    DistributedEventHandler,
    EntityChanged,
    EntityCreated,
    EntityCreatedEto,
    EntityDeleted,
    EntityEvents,
    EntityUpdated,
    MemoryBroker,
    UnitOfWorkError,
)
from eventrelay.testing import RecordingBroker, wait_until_idle
from tests.bus.helpers import OrderPlaced, make_bus, not_started
from tests.entity_events.support import (
    Book,
    BookEto,
    IdentityBase,
    User,
    UserEto,
    count,
    create_models,
    identity,
    new_user,
    outbox,
    sent,
)

USERS = EntityEvents().select(User, Book).map(User, UserEto).map(Book, BookEto)

seen: list[tuple[str, str, Any]] = []  # (handler, change, entity)


async def on_created(event: EntityCreated[User], context: Context) -> None:
    seen.append(("created", event.change.value, event.entity))


async def on_updated(event: EntityUpdated[User]) -> None:
    seen.append(("updated", event.change.value, event.entity))


async def on_deleted(event: EntityDeleted[User]) -> None:
    seen.append(("deleted", event.change.value, event.entity))


class AuditUsers(DistributedEventHandler[EntityChanged[User]]):
    async def handle_event(self, event: EntityChanged[User]) -> None:
        seen.append(("changed", event.change.value, event.entity))


async def book_for_new_user(event: EntityCreated[User], context: Context) -> None:
    context.session.add(Book(title=f"Welcome, {event.entity.user_name}"))


async def on_book(event: EntityCreated[Book]) -> None:
    seen.append(("book", event.change.value, event.entity.title))


@pytest.fixture(autouse=True)
def _forget() -> None:
    seen.clear()


def _listeners(session: Session) -> int:
    return len(session.dispatch.before_flush) + len(session.dispatch.after_flush)


async def _lifecycle(bus: DistributedEventBus) -> User:
    """Create, update and delete a user, a unit of work each; return it."""
    user = new_user("ann")
    async with bus.unit_of_work() as uow:
        uow.session.add(user)
    async with bus.unit_of_work() as uow:
        loaded = await uow.session.get(User, user.id)
        assert loaded is not None
        loaded.name = "Ann B."
    async with bus.unit_of_work() as uow:
        await uow.session.delete(await uow.session.get(User, user.id))
    return user


async def test_created_updated_and_deleted_reach_their_handlers_with_the_entity(database_url: str) -> None:
    broker = RecordingBroker()
    async with identity(database_url, broker, None) as bus:  # no distributed entity events at all
        await create_models(bus, IdentityBase.metadata)
        for handler in (on_created, on_updated, on_deleted):
            bus.local.subscribe(handler)
        user = new_user("ann")
        async with bus.unit_of_work() as uow:
            uow.session.add(user)
            await uow.session.flush()
            assert seen == []  # not at a flush: at the commit
        assert seen == [("created", "created", user)]  # the entity itself, not a copy
        await _lifecycle(bus)
        assert [(h, c, e.name) for h, c, e in seen[1:]] == [
            ("created", "created", "Ann"),
            ("updated", "updated", "Ann B."),
            ("deleted", "deleted", "Ann B."),  # a deleted entity's loaded attributes still read
        ]
    assert broker.published == []  # local: nothing reaches the broker


async def test_an_entity_changed_handler_takes_all_three_for_the_model_and_its_subclasses(
    database_url: str,
) -> None:
    async with identity(database_url, RecordingBroker(), None) as bus:
        await create_models(bus, IdentityBase.metadata)
        bus.local.subscribe(AuditUsers)
        await _lifecycle(bus)
        async with bus.unit_of_work() as uow:
            uow.session.add(new_user("root", admin=True))
            uow.session.add(Book(title="Dune"))  # no local handler takes books
        assert [(c, type(e).__name__, e.user_name) for _, c, e in seen] == [
            ("created", "User", "ann"),
            ("updated", "User", "ann"),
            ("deleted", "User", "ann"),
            ("created", "AdminUser", "root"),
        ]


async def test_a_handlers_writes_commit_with_the_unit_of_work_and_make_their_own_events(
    database_url: str,
) -> None:
    async with not_started(identity(database_url, RecordingBroker(), USERS)) as bus:
        await create_models(bus, IdentityBase.metadata)
        bus.local.subscribe(book_for_new_user)
        bus.local.subscribe(on_book)
        async with bus.unit_of_work() as uow:
            uow.session.add(new_user("ann"))
        assert await count(bus, Book) == 1
        assert seen == [("book", "created", "Welcome, ann")]  # the handler's change, in the next round
        assert [name for name, _ in await outbox(bus)] == [  # and its distributed event
            "Tests.Identity.User.Created",
            "EntityEventTests.Book.Created",
        ]


async def test_a_handler_changing_the_entity_again_is_one_distributed_event_with_the_final_state(
    database_url: str,
) -> None:
    broker = RecordingBroker()

    async def check_name(event: EntityCreated[User]) -> None:
        event.entity.name = event.entity.name.upper()

    async with identity(database_url, broker, USERS) as bus:
        await create_models(bus, IdentityBase.metadata)
        bus.local.subscribe(check_name)
        bus.local.subscribe(on_updated)
        async with bus.unit_of_work() as uow:
            uow.session.add(new_user("ann"))
        assert [(h, e.name) for h, _, e in seen] == [
            ("updated", "ANN")
        ]  # its change: a local event of its own
        async with bus.unit_of_work() as uow:
            assert (await uow.session.scalars(select(User.name))).all() == ["ANN"]
        await sent(bus, broker)
    assert [e.entity.name for e in broker.events(EntityCreatedEto[UserEto])] == ["ANN"]
    assert len(broker.published) == 1  # Created with the final state, no Updated beside it


async def test_a_handler_that_raises_rolls_back_the_change_and_the_distributed_events(
    database_url: str,
) -> None:
    async def refuse(event: EntityCreated[User]) -> None:
        if event.entity.user_name == "mallory":
            raise ValueError("no mallory here")

    async with not_started(identity(database_url, RecordingBroker(), USERS)) as bus:
        await create_models(bus, IdentityBase.metadata)
        bus.local.subscribe(book_for_new_user)  # runs, and writes, before the one that raises
        bus.local.subscribe(refuse)

        async def add(name: str) -> None:
            async with bus.unit_of_work() as uow:
                uow.session.add(new_user(name))
                await bus.publish(OrderPlaced(order_id=1))

        with pytest.raises(ValueError, match="no mallory here"):
            await add("mallory")
        assert await count(bus, User) == 0
        assert await count(bus, Book) == 0  # the other handler's write went too
        assert await outbox(bus) == []  # and every distributed event of the unit of work
        await add("ann")
        assert (await count(bus, User), await count(bus, Book), len(await outbox(bus))) == (1, 1, 3)


async def test_a_handler_loop_stops_after_ten_rounds_naming_the_models(database_url: str) -> None:
    rounds: list[int] = []

    async def touch_again(event: EntityUpdated[User]) -> None:
        rounds.append(1)
        event.entity.name += "!"

    async with not_started(identity(database_url, RecordingBroker(), USERS)) as bus:
        await create_models(bus, IdentityBase.metadata)
        user = new_user("ann")
        async with bus.unit_of_work() as uow:
            uow.session.add(user)
        bus.local.subscribe(touch_again)

        async def rename() -> None:
            async with bus.unit_of_work() as uow:
                loaded = await uow.session.get(User, user.id)
                assert loaded is not None
                loaded.name = "Loop"

        with pytest.raises(UnitOfWorkError, match=r"still changed User after 10 rounds: a handler loop"):
            await rename()
        assert len(rounds) == 10
        async with bus.unit_of_work() as uow:
            assert (await uow.session.scalars(select(User.name))).all() == ["Ann"]
        assert [name for name, _ in await outbox(bus)] == ["Tests.Identity.User.Created"]


async def test_manual_changes_feed_the_local_events_too(database_url: str) -> None:
    async with identity(database_url, RecordingBroker(), None) as bus:
        await create_models(bus, IdentityBase.metadata)
        user = new_user("ann")
        async with bus.unit_of_work() as uow:
            uow.session.add(user)
        bus.local.subscribe(on_updated)
        async with bus.unit_of_work() as uow:
            await uow.session.execute(update(User).where(User.id == user.id).values(name="Bulk"))
            loaded = await uow.session.get(User, user.id, populate_existing=True)
            assert loaded is not None
            uow.entity_changed(loaded, Change.UPDATED)  # the ORM did not see the bulk statement
        assert [(h, e.name) for h, _, e in seen] == [("updated", "Bulk")]


async def test_nothing_watches_the_session_until_a_local_entity_handler_is_subscribed(
    database_url: str,
) -> None:
    async with not_started(identity(database_url, RecordingBroker(), None)) as bus:

        async def order_placed(event: OrderPlaced) -> None:
            pass

        bus.local.subscribe(order_placed)  # a local handler, of no entity event
        async with bus.unit_of_work() as uow:
            assert _listeners(uow.session.sync_session) == 0
            with pytest.raises(UnitOfWorkError, match="or subscribe a local handler of EntityChanged"):
                uow.entity_changed(new_user(), Change.UPDATED)
        bus.local.subscribe(AuditUsers)
        async with bus.unit_of_work() as uow:
            assert _listeners(uow.session.sync_session) == 2
        bus.local.unsubscribe(AuditUsers)
        async with bus.unit_of_work() as uow:
            assert _listeners(uow.session.sync_session) == 0


async def test_local_entity_events_need_a_database_and_come_only_from_the_unit_of_work() -> None:
    async with make_bus("Identity", MemoryBroker(), None) as bus:
        with pytest.raises(ConfigurationError, match="come from a database: create the bus with database="):
            bus.local.subscribe(AuditUsers)
        with pytest.raises(ConfigurationError, match=r"call uow.entity_changed\(entity, Change.UPDATED\)"):
            await bus.local.publish(EntityUpdated[User](entity=new_user()))


async def test_changes_in_a_savepoint_that_rolls_back_make_no_events(database_url: str) -> None:
    async with not_started(identity(database_url, RecordingBroker(), USERS)) as bus:
        await create_models(bus, IdentityBase.metadata)
        bus.local.subscribe(on_created)
        kept = new_user("kept")
        async with bus.unit_of_work() as uow:
            uow.session.add(kept)
            with contextlib.suppress(RuntimeError):
                async with uow.savepoint():
                    uow.session.add(new_user("ghost"))
                    await uow.session.flush()  # seen by the tracker, then undone with the savepoint
                    raise RuntimeError
        assert await count(bus, User) == 1
        assert [(h, e.user_name) for h, _, e in seen] == [("created", "kept")]
        assert await outbox(bus) == [("Tests.Identity.User.Created", f"User:{kept.id}")]


async def test_a_batched_handler_that_fails_leaves_no_local_entity_event(database_url: str) -> None:
    broker = MemoryBroker()

    async def register(event: OrderPlaced, context: Context) -> None:
        context.session.add(new_user(f"buyer{event.order_id}"))
        await context.session.flush()
        if event.order_id == 2:
            raise ValueError("order 2 fails")

    async with identity(database_url, broker, None) as bus:
        await create_models(bus, IdentityBase.metadata)
        bus.local.subscribe(on_created)
        await bus.subscribe(register, retry=None)
        for order_id in (1, 2, 3):
            await bus.publish(OrderPlaced(order_id=order_id))
        await wait_until_idle(bus, timeout=30)
        assert sorted(e.user_name for _, _, e in seen) == ["buyer1", "buyer3"]
        assert await count(bus, User) == 2
        assert len(await bus.dead_letters()) == 1


async def test_changes_made_by_local_events_the_handlers_publish_make_events_too(database_url: str) -> None:
    async with identity(database_url, RecordingBroker(), None) as bus:

        async def welcome(event: EntityCreated[User]) -> None:
            await bus.local.publish(OrderPlaced(order_id=1, note=event.entity.user_name))

        async def add_book(event: OrderPlaced, context: Context) -> None:
            context.session.add(Book(title=f"Order of {event.note}"))

        await create_models(bus, IdentityBase.metadata)
        for handler in (welcome, add_book, on_book):
            bus.local.subscribe(handler)
        async with bus.unit_of_work() as uow:
            uow.session.add(new_user("ann"))
        assert seen == [("book", "created", "Order of ann")]
        assert await count(bus, Book) == 1
