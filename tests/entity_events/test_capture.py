"""When entity events are captured and what leaves: only at commit and in its transaction, one event per
entity and unit of work with the final state, versions and tenants, and what bulk statements need."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import delete, event, func, insert, select, update
from sqlalchemy.orm import Session

from eventrelay import Context, DistributedEventBus, DistributedEventHandler, Event, UnitOfWorkError
from eventrelay.entity_events import (
    Change,
    EntityCreatedEto,
    EntityDeletedEto,
    EntityEvents,
    EntityUpdatedEto,
)
from eventrelay.testing import RecordingBroker, wait_until_idle
from tests.bus.helpers import not_started, rolled_back, settings, sql_store
from tests.entity_events.support import (
    Article,
    ArticleEto,
    Book,
    BookEto,
    IdentityBase,
    User,
    UserEto,
    count,
    create_models,
    identity,
    names,
    new_user,
    outbox,
    sent,
)

USERS = EntityEvents().select(User, Book).map(User, UserEto).map(Book, BookEto)


# --- commit and rollback ------------------------------------------------------------------------------


async def test_a_rolled_back_unit_of_work_publishes_nothing(database_url: str) -> None:
    broker = RecordingBroker()
    async with identity(database_url, broker, USERS) as bus:
        await create_models(bus, IdentityBase.metadata)
        async with rolled_back(bus) as uow:
            uow.session.add(new_user("ghost"))
            await uow.session.flush()  # the changes were seen at this flush, and are dropped all the same
        kept = new_user("kept")
        async with bus.unit_of_work() as uow:
            uow.session.add(kept)
        messages = await sent(bus, broker)
        assert await count(bus, User) == 1
    assert [e.entity.user_name for e in broker.events(EntityCreatedEto[UserEto])] == ["kept"]
    assert len(messages) == 1


async def test_the_events_are_in_the_outbox_when_the_commit_is(database_url: str) -> None:
    async with not_started(identity(database_url, RecordingBroker(), USERS)) as bus:  # its relay never runs
        await create_models(bus, IdentityBase.metadata)
        async with rolled_back(bus) as uow:
            uow.session.add(new_user("ghost"))
            await uow.session.flush()
        assert await outbox(bus) == []
        user = new_user("ann")
        async with bus.unit_of_work() as uow:
            uow.session.add(user)
            uow.session.add(Book(title="Dune"))
        assert [name for name, _ in await outbox(bus)] == [
            "Tests.Identity.User.Created",
            "EntityEventTests.Book.Created",
        ]
        assert await count(bus, User) == 1


async def test_the_outbox_rows_are_written_in_the_commits_own_transaction(database_url: str) -> None:
    """The rows are in the transaction when it commits: when the commit fails, they go with the data."""
    async with not_started(identity(database_url, RecordingBroker(), USERS)) as bus:
        await create_models(bus, IdentityBase.metadata)
        table = sql_store(bus).tables.outbox
        seen_at_commit: list[int] = []

        def fail_the_commit(session: Session) -> None:
            seen_at_commit.append(session.execute(select(func.count()).select_from(table)).scalar_one())
            raise RuntimeError("commit refused")

        async def add_a_user() -> None:
            async with bus.unit_of_work() as uow:
                event.listen(uow.session.sync_session, "before_commit", fail_the_commit)
                uow.session.add(new_user("ann"))

        with pytest.raises(RuntimeError, match="commit refused"):
            await add_a_user()
        assert seen_at_commit == [1]  # written in this transaction, before the commit...
        assert await outbox(bus) == []  # ...and gone with it
        assert await count(bus, User) == 0


# --- one event per entity and unit of work -------------------------------------------------------------


async def _saved_user(bus: DistributedEventBus) -> User:
    user = new_user("john")
    async with bus.unit_of_work() as uow:
        uow.session.add(user)
    return user


async def test_two_updates_are_one_updated_event_with_the_final_state(database_url: str) -> None:
    broker = RecordingBroker()
    async with identity(database_url, broker, USERS) as bus:
        await create_models(bus, IdentityBase.metadata)
        user = await _saved_user(bus)
        async with bus.unit_of_work() as uow:
            loaded = await uow.session.get(User, user.id)
            assert loaded is not None
            loaded.name = "First"
            await uow.session.flush()
            loaded.email = "second@example.com"
        messages = await sent(bus, broker)
    assert names(messages) == ["Tests.Identity.User.Created", "Tests.Identity.User.Updated"]
    (updated,) = broker.events(EntityUpdatedEto[UserEto])
    assert (updated.entity.name, updated.entity.email) == ("First", "second@example.com")


async def test_created_then_updated_is_one_created_event_with_the_final_state(database_url: str) -> None:
    broker = RecordingBroker()
    async with identity(database_url, broker, USERS) as bus:
        await create_models(bus, IdentityBase.metadata)
        async with bus.unit_of_work() as uow:
            user = new_user("john")
            uow.session.add(user)
            await uow.session.flush()
            user.name = "Johnny"
            await uow.session.flush()
            user.email = "johnny@example.com"
        messages = await sent(bus, broker)
    assert names(messages) == ["Tests.Identity.User.Created"]
    (created,) = broker.events(EntityCreatedEto[UserEto])
    assert (created.entity.name, created.entity.email) == ("Johnny", "johnny@example.com")


async def test_created_then_deleted_publishes_nothing(database_url: str) -> None:
    broker = RecordingBroker()
    async with identity(database_url, broker, USERS) as bus:
        await create_models(bus, IdentityBase.metadata)
        async with bus.unit_of_work() as uow:
            ghost = new_user("ghost")
            uow.session.add(ghost)
            await uow.session.flush()
            ghost.name = "Changed"
            await uow.session.flush()
            await uow.session.delete(ghost)
            uow.session.add(Book(title="witness"))  # something else in the same unit still leaves
        messages = await sent(bus, broker)
    assert names(messages) == ["EntityEventTests.Book.Created"]


async def test_updated_then_deleted_is_one_deleted_event(database_url: str) -> None:
    broker = RecordingBroker()
    async with identity(database_url, broker, USERS) as bus:
        await create_models(bus, IdentityBase.metadata)
        user = await _saved_user(bus)
        async with bus.unit_of_work() as uow:
            loaded = await uow.session.get(User, user.id)
            assert loaded is not None
            loaded.name = "Last Name Before Delete"
            await uow.session.flush()
            await uow.session.delete(loaded)
        messages = await sent(bus, broker)
    assert names(messages) == ["Tests.Identity.User.Created", "Tests.Identity.User.Deleted"]
    (deleted,) = broker.events(EntityDeletedEto[UserEto])
    assert deleted.entity.id == user.id
    assert deleted.entity.name == "Last Name Before Delete"


async def test_an_update_that_changes_nothing_publishes_nothing(database_url: str) -> None:
    broker = RecordingBroker()
    async with identity(database_url, broker, USERS) as bus:
        await create_models(bus, IdentityBase.metadata)
        user = await _saved_user(bus)
        async with bus.unit_of_work() as uow:
            loaded = await uow.session.get(User, user.id)
            assert loaded is not None
            loaded.name = loaded.name  # the same value: no change
            loaded.email = "other@example.com"
            await uow.session.flush()
            loaded.email = user.email  # changed and changed back: the final state is the stored one
        async with bus.unit_of_work() as uow:
            loaded = await uow.session.get(User, user.id)
            assert loaded is not None
            loaded.name = loaded.name
        messages = await sent(bus, broker)
    # The first unit of work did change the row at its flush (and back at commit), so it publishes;
    # the second changed nothing and publishes nothing.
    assert names(messages) == ["Tests.Identity.User.Created", "Tests.Identity.User.Updated"]
    (updated,) = broker.events(EntityUpdatedEto[UserEto])
    assert updated.entity.email == user.email


async def test_each_entity_gets_its_own_event_in_the_order_of_first_change(database_url: str) -> None:
    broker = RecordingBroker()
    async with identity(database_url, broker, USERS) as bus:
        await create_models(bus, IdentityBase.metadata)
        first, second = await _saved_user(bus), await _saved_user(bus)
        async with bus.unit_of_work() as uow:
            b = await uow.session.get(User, second.id)
            a = await uow.session.get(User, first.id)
            assert a is not None
            assert b is not None
            b.name = "B"
            await uow.session.flush()
            a.name = "A"
            await uow.session.flush()
            b.name = "B2"
        messages = await sent(bus, broker)
    assert [e.entity.name for e in broker.events(EntityUpdatedEto[UserEto])] == ["B2", "A"]
    assert [m.key for m in messages[2:]] == [f"User:{second.id}", f"User:{first.id}"]


# --- bulk statements ---------------------------------------------------------------------------------


async def test_bulk_statements_are_not_captured_and_entity_changed_publishes_for_them(
    database_url: str,
) -> None:
    broker = RecordingBroker()
    async with identity(database_url, broker, USERS) as bus:
        await create_models(bus, IdentityBase.metadata)
        async with bus.unit_of_work() as uow:
            uow.session.add_all([Book(title="one"), Book(title="two")])
        await wait_until_idle(bus)
        broker.published.clear()
        # Documented: bulk statements bypass the ORM's unit of work, so nothing is published for them.
        async with bus.unit_of_work() as uow:
            await uow.session.execute(update(Book).where(Book.title == "one").values(title="uno"))
            await uow.session.execute(delete(Book).where(Book.title == "two"))
        assert await sent(bus, broker) == []
        # The explicit way: load the rows and say what happened to them.
        async with bus.unit_of_work() as uow:
            await uow.session.execute(update(Book).where(Book.title == "uno").values(title="eins"))
            (book,) = (await uow.session.scalars(select(Book).where(Book.title == "eins"))).all()
            uow.entity_changed(book, Change.UPDATED)
        messages = await sent(bus, broker)
    assert names(messages) == ["EntityEventTests.Book.Updated"]
    assert [e.entity for e in broker.events(EntityUpdatedEto[BookEto])] == [BookEto(id=book.id, title="eins")]


async def test_entity_changed_can_say_created_and_deleted(database_url: str) -> None:
    broker = RecordingBroker()
    async with identity(database_url, broker, USERS) as bus:
        await create_models(bus, IdentityBase.metadata)
        async with bus.unit_of_work() as uow:
            uow.session.add(Book(title="one"))
        await wait_until_idle(bus)
        broker.published.clear()
        async with bus.unit_of_work() as uow:
            (book,) = (await uow.session.scalars(select(Book))).all()
            uow.entity_changed(book, Change.DELETED)
            await uow.session.execute(delete(Book))
        async with bus.unit_of_work() as uow:
            await uow.session.execute(insert(Book).values(id=book.id + 10, title="raw"))
            added = await uow.session.get(Book, book.id + 10)
            assert added is not None
            uow.entity_changed(added, Change.CREATED)
        messages = await sent(bus, broker)
    assert names(messages) == ["EntityEventTests.Book.Deleted", "EntityEventTests.Book.Created"]
    assert [e.entity.title for e in broker.events(EntityDeletedEto[BookEto])] == ["one"]
    assert [e.entity.id for e in broker.events(EntityCreatedEto[BookEto])] == [book.id + 10]


@pytest.mark.parametrize("with_database", [False, True], ids=["memory", "sqlite"])
async def test_entity_changed_on_a_bus_without_entity_events_raises(
    with_database: bool, sqlite_url: str
) -> None:
    bus = DistributedEventBus("Plain", database=sqlite_url if with_database else None, settings=settings())
    try:
        async with bus.new_unit_of_work() as uow:
            with pytest.raises(UnitOfWorkError, match="entity_events"):
                uow.entity_changed(Book(title="x"), Change.UPDATED)
    finally:
        await bus.store.close()


# --- versions, tenants, ordering keys ------------------------------------------------------------------


class UserEvents(
    DistributedEventHandler[EntityCreatedEto[UserEto] | EntityUpdatedEto[UserEto] | EntityDeletedEto[UserEto]]
):
    """Records (event name, tenant, ordering key) of each user event it handles."""

    def __init__(self, seen: list[tuple[str, str | None, str | None]]) -> None:
        self.seen = seen

    async def handle_event(
        self, event: EntityCreatedEto[UserEto] | EntityUpdatedEto[UserEto] | EntityDeletedEto[UserEto]
    ) -> None:
        self.seen.append((self.context.event_name, self.context.tenant_id, self.context.key))


async def test_the_events_carry_the_increasing_entity_version(database_url: str) -> None:
    broker = RecordingBroker()
    async with identity(database_url, broker, USERS) as bus:
        await create_models(bus, IdentityBase.metadata)
        user = await _saved_user(bus)
        for n in range(2):
            async with bus.unit_of_work() as uow:
                loaded = await uow.session.get(User, user.id)
                assert loaded is not None
                loaded.name = f"Name {n}"
                await uow.session.flush()
                loaded.email = f"{n}@example.com"  # a second flush in the unit: the version moves again
        async with bus.unit_of_work() as uow:
            loaded = await uow.session.get(User, user.id)
            await uow.session.delete(loaded)
        await sent(bus, broker)
    (created,) = broker.events(EntityCreatedEto[UserEto])
    updates = broker.events(EntityUpdatedEto[UserEto])
    (deleted,) = broker.events(EntityDeletedEto[UserEto])
    assert created.entity_version == 1
    assert [u.entity_version for u in updates] == [3, 5]
    assert deleted.entity_version == 5  # the version of the state it carries


async def test_a_model_without_a_version_publishes_none(database_url: str) -> None:
    broker = RecordingBroker()
    async with identity(database_url, broker, USERS) as bus:
        await create_models(bus, IdentityBase.metadata)
        async with bus.unit_of_work() as uow:
            uow.session.add(Book(title="unversioned"))
        await sent(bus, broker)
    assert [e.entity_version for e in broker.events(EntityCreatedEto[BookEto])] == [None]


async def test_the_tenant_and_the_ordering_key_travel_with_the_events(database_url: str) -> None:
    broker = RecordingBroker()
    seen: list[tuple[str, str | None, str | None]] = []
    orders = DistributedEventBus("OrderService", broker=broker, settings=settings())
    await orders.subscribe(UserEvents, factory=lambda: UserEvents(seen))
    async with identity(database_url, broker, USERS) as bus, orders:
        await create_models(bus, IdentityBase.metadata)
        tenant_user, host_user = new_user("t", tenant_id="tenant-1"), new_user("h")
        async with bus.unit_of_work() as uow:
            uow.session.add_all([tenant_user, host_user])
        async with bus.unit_of_work() as uow:
            loaded = await uow.session.get(User, tenant_user.id)
            assert loaded is not None
            loaded.name = "Changed"
        async with bus.unit_of_work() as uow:
            await uow.session.delete(await uow.session.get(User, tenant_user.id))
        await wait_until_idle(bus, orders)
    messages = broker.published
    tenant_key = f"User:{tenant_user.id}"
    assert [(m.name, m.headers.get("x-tenant-id"), m.key) for m in messages] == [
        ("Tests.Identity.User.Created", "tenant-1", tenant_key),
        ("Tests.Identity.User.Created", None, f"User:{host_user.id}"),
        ("Tests.Identity.User.Updated", "tenant-1", tenant_key),
        ("Tests.Identity.User.Deleted", "tenant-1", tenant_key),
    ]
    assert sorted(seen, key=str) == sorted(
        [(m.name, m.headers.get("x-tenant-id"), m.key) for m in messages], key=str
    )


# --- attributes the database changes -----------------------------------------------------------------

ARTICLES = EntityEvents().select(Article).map(Article, ArticleEto)


async def test_an_attribute_the_update_computed_in_the_database_is_in_the_updated_event(
    database_url: str,
) -> None:
    broker = RecordingBroker()
    async with identity(database_url, broker, ARTICLES) as bus:
        await create_models(bus, IdentityBase.metadata)
        article = Article(title="draft")
        async with bus.unit_of_work() as uow:
            uow.session.add(article)
        async with bus.unit_of_work() as uow:
            loaded = await uow.session.get(Article, article.id)
            assert loaded is not None
            loaded.title = "final"  # the UPDATE sets revision = revision + 1; the ORM expires `revision`
        messages = await sent(bus, broker)
    assert names(messages) == ["EntityEventTests.Article.Created", "EntityEventTests.Article.Updated"]
    assert [e.entity for e in broker.events(EntityUpdatedEto[ArticleEto])] == [
        ArticleEto(id=article.id, title="final", revision=2)
    ]


async def test_a_deleted_entity_with_expired_attributes_is_mapped_before_its_row_is_gone(
    database_url: str,
) -> None:
    broker = RecordingBroker()
    async with identity(database_url, broker, ARTICLES) as bus:
        await create_models(bus, IdentityBase.metadata)
        first, second = Article(title="one"), Article(title="two")
        async with bus.unit_of_work() as uow:
            uow.session.add_all([first, second])
        async with bus.unit_of_work() as uow:
            loaded = await uow.session.get(Article, first.id)
            assert loaded is not None
            loaded.title = "one, revised"
            await uow.session.flush()  # `revision` is expired now
            await uow.session.delete(loaded)
        async with bus.unit_of_work() as uow:
            other = await uow.session.get(Article, second.id)
            assert other is not None
            uow.session.expire(other)
            await uow.session.delete(other)
        await sent(bus, broker)
        assert await count(bus, Article) == 0
    assert [e.entity for e in broker.events(EntityDeletedEto[ArticleEto])] == [
        ArticleEto(id=first.id, title="one, revised", revision=2),
        ArticleEto(id=second.id, title="two", revision=1),
    ]


# --- entity events made by a handler -----------------------------------------------------------------


class RenameUser(Event, name="EntityEventTests.RenameUser"):
    user_id: uuid.UUID
    name: str


async def test_entity_events_made_by_a_handler_carry_its_correlation_and_causation(
    database_url: str,
) -> None:
    broker = RecordingBroker()
    bus = identity(database_url, broker, USERS)

    async def rename(event: RenameUser, context: Context) -> None:
        loaded = await context.session.get(User, event.user_id)
        assert loaded is not None
        loaded.name = event.name

    await bus.subscribe(rename)
    async with bus:
        await create_models(bus, IdentityBase.metadata)
        user = await _saved_user(bus)
        command_id = await bus.publish(RenameUser(user_id=user.id, name="Renamed"), correlation_id="corr-1")
        await wait_until_idle(bus)
        assert await bus.dead_letters() == []
    updated = [m for m in broker.published if m.name == "Tests.Identity.User.Updated"]
    assert [e.entity.name for e in broker.events(EntityUpdatedEto[UserEto])] == ["Renamed"]
    assert [(m.headers.get("x-correlation-id"), m.headers.get("x-causation-id")) for m in updated] == [
        ("corr-1", command_id)
    ]
