"""What the events carry: the ETO mapped from attributes or by a function, `EntityEto` for entities selected
without a mapping, ABP's wire names, and the keys the database assigned."""

from __future__ import annotations

import json
import uuid

import pytest
from sqlalchemy import inspect

from eventrelay import Event, event_name
from eventrelay.entity_events import (
    EntityCreatedEto,
    EntityDeletedEto,
    EntityEto,
    EntityEvents,
    EntityUpdatedEto,
)
from eventrelay.testing import RecordingBroker
from tests.entity_events.support import (
    AdminUser,
    Book,
    BookEto,
    IdentityBase,
    Tag,
    User,
    UserEto,
    create_models,
    identity,
    names,
    new_user,
    sent,
)


def test_entity_event_names_follow_abps_rule() -> None:
    assert event_name(UserEto) == "Tests.Identity.User"
    assert event_name(EntityCreatedEto[UserEto]) == "Tests.Identity.User.Created"
    assert event_name(EntityUpdatedEto[UserEto]) == "Tests.Identity.User.Updated"
    assert event_name(EntityDeletedEto[UserEto]) == "Tests.Identity.User.Deleted"
    assert (
        event_name(EntityCreatedEto[EntityEto])
        == "Volo.Abp.Domain.Entities.Events.Distributed.EntityEto.Created"
    )


async def test_created_updated_and_deleted_leave_under_abps_names(database_url: str) -> None:
    broker = RecordingBroker()
    events = EntityEvents().select(User).map(User, UserEto)
    async with identity(database_url, broker, events) as bus:
        await create_models(bus, IdentityBase.metadata)
        user = new_user("john")
        async with bus.unit_of_work() as uow:
            uow.session.add(user)
        async with bus.unit_of_work() as uow:
            loaded = await uow.session.get(User, user.id)
            assert loaded is not None
            loaded.email = "john@example.org"
        async with bus.unit_of_work() as uow:
            loaded = await uow.session.get(User, user.id)
            await uow.session.delete(loaded)
        messages = await sent(bus, broker)
    assert names(messages) == [
        "Tests.Identity.User.Created",
        "Tests.Identity.User.Updated",
        "Tests.Identity.User.Deleted",
    ]
    expected = UserEto(id=user.id, user_name="john", name="John", email="john@example.com")
    assert [e.entity for e in broker.events(EntityCreatedEto[UserEto])] == [expected]
    updated = expected.model_copy(update={"email": "john@example.org"})
    assert [e.entity for e in broker.events(EntityUpdatedEto[UserEto])] == [updated]
    assert [e.entity for e in broker.events(EntityDeletedEto[UserEto])] == [updated]  # the state before


async def test_a_mapper_function_builds_the_eto(database_url: str) -> None:
    broker = RecordingBroker()

    def to_eto(book: Book) -> BookEto:
        return BookEto(id=book.id, title=book.title.upper())

    events = EntityEvents().select(Book).map(Book, BookEto, mapper=to_eto)
    async with identity(database_url, broker, events) as bus:
        await create_models(bus, IdentityBase.metadata)
        async with bus.unit_of_work() as uow:
            uow.session.add(Book(title="Dune"))
        messages = await sent(bus, broker)
    assert names(messages) == ["EntityEventTests.Book.Created"]
    (created,) = broker.events(EntityCreatedEto[BookEto])
    assert created.entity.title == "DUNE"
    assert created.entity.id > 0


async def test_a_mapping_of_a_base_class_maps_its_subclasses(database_url: str) -> None:
    broker = RecordingBroker()
    events = EntityEvents().select(User).map(User, UserEto)
    async with identity(database_url, broker, events) as bus:
        await create_models(bus, IdentityBase.metadata)
        admin = new_user("root", admin=True)
        async with bus.unit_of_work() as uow:
            uow.session.add(admin)
        messages = await sent(bus, broker)
    assert names(messages) == ["Tests.Identity.User.Created"]
    assert [e.entity.id for e in broker.events(EntityCreatedEto[UserEto])] == [admin.id]
    assert messages[0].key == f"AdminUser:{admin.id}"


async def test_an_entity_without_a_mapping_publishes_entity_eto_with_its_keys(database_url: str) -> None:
    broker = RecordingBroker()
    events = EntityEvents().select(Tag, Book)  # no mappings
    async with identity(database_url, broker, events) as bus:
        await create_models(bus, IdentityBase.metadata)
        book = Book(title="Dune")
        async with bus.unit_of_work() as uow:
            uow.session.add(Tag(group_id=7, label="new"))
            uow.session.add(book)
        async with bus.unit_of_work() as uow:
            tag = await uow.session.get(Tag, (7, "new"))
            assert tag is not None
            tag.note = "changed"
        messages = await sent(bus, broker)
    prefix = "Volo.Abp.Domain.Entities.Events.Distributed.EntityEto"
    assert names(messages) == [f"{prefix}.Created", f"{prefix}.Created", f"{prefix}.Updated"]
    assert [e.entity for e in broker.events(EntityCreatedEto[EntityEto])] == [
        EntityEto(entity_type="tests.entity_events.support.Tag", keys_as_string="7,new"),
        EntityEto(entity_type="tests.entity_events.support.Book", keys_as_string=str(book.id)),
    ]
    assert [e.entity for e in broker.events(EntityUpdatedEto[EntityEto])] == [
        EntityEto(entity_type="tests.entity_events.support.Tag", keys_as_string="7,new"),
    ]
    # The default ("eventrelay") JSON style: the entity under "entity" as ABP has it, but its fields named as
    # declared in Python. ABP's camelCase body is the "abp" style's (tests/unit/test_json_style.py).
    body = json.loads(messages[0].body)
    assert body["entity"] == {"entity_type": "tests.entity_events.support.Tag", "keys_as_string": "7,new"}


async def test_keys_assigned_by_the_database_are_in_the_created_event(database_url: str) -> None:
    broker = RecordingBroker()
    events = EntityEvents().select(Book).map(Book, BookEto)
    async with identity(database_url, broker, events) as bus:
        await create_models(bus, IdentityBase.metadata)
        flushed, unflushed = Book(title="flushed"), Book(title="never flushed by hand")
        async with bus.unit_of_work() as uow:
            uow.session.add(flushed)
            await uow.session.flush()
            assert inspect(flushed).identity is not None
        async with bus.unit_of_work() as uow:
            uow.session.add(unflushed)  # the first flush is the unit of work's own, at commit
            assert inspect(unflushed).identity is None  # no key yet
        messages = await sent(bus, broker)
    created = broker.events(EntityCreatedEto[BookEto])
    assert [e.entity for e in created] == [
        BookEto(id=flushed.id, title="flushed"),
        BookEto(id=unflushed.id, title="never flushed by hand"),
    ]
    assert isinstance(unflushed.id, int)
    assert flushed.id != unflushed.id
    assert [m.key for m in messages] == [f"Book:{flushed.id}", f"Book:{unflushed.id}"]


class AdminUserEto(Event, name="EntityEventTests.AdminUser"):
    id: uuid.UUID
    user_name: str


@pytest.mark.parametrize("base_first", [True, False], ids=["base-mapped-first", "subclass-mapped-first"])
async def test_the_most_specific_mapping_wins_whatever_the_order(database_url: str, base_first: bool) -> None:
    broker = RecordingBroker()
    events = EntityEvents().select(User)
    if base_first:
        events.map(User, UserEto).map(AdminUser, AdminUserEto)
    else:
        events.map(AdminUser, AdminUserEto).map(User, UserEto)
    async with identity(database_url, broker, events) as bus:
        await create_models(bus, IdentityBase.metadata)
        user, admin = new_user("ann"), new_user("root", admin=True)
        async with bus.unit_of_work() as uow:
            uow.session.add_all([user, admin])
        messages = await sent(bus, broker)
    assert names(messages) == ["Tests.Identity.User.Created", "EntityEventTests.AdminUser.Created"]
    assert [e.entity for e in broker.events(EntityCreatedEto[AdminUserEto])] == [
        AdminUserEto(id=admin.id, user_name="root")
    ]
