"""Which models publish entity events: selectors by class (and subclasses), module prefix, predicate and all,
and ignore selectors that override them. A model nobody selected publishes nothing."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from sqlalchemy import Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from eventrelay.entity_events import EntityEvents
from eventrelay.testing import RecordingBroker
from tests.bus.helpers import not_started
from tests.entity_events import support
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
    new_user,
    outbox,
)


class Note(IdentityBase):
    """A model defined in this test module, to select by this module's name."""

    __tablename__ = "identity_notes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    text: Mapped[str] = mapped_column(String(100))


EVERY = {"User", "AdminUser", "Book", "Tag", "Note"}


def _table(name: str) -> Callable[[type], bool]:
    return lambda cls: getattr(cls, "__tablename__", None) == name


CONFIGURATIONS: list[tuple[str, Callable[[EntityEvents], EntityEvents], set[str]]] = [
    ("nothing-selected", lambda e: e, set()),
    ("class-and-subclasses", lambda e: e.select(User), {"User", "AdminUser"}),
    ("subclass-only", lambda e: e.select(AdminUser), {"AdminUser"}),
    ("several-classes", lambda e: e.select(Book, Tag), {"Book", "Tag"}),
    ("this-module", lambda e: e.select_module(__name__), {"Note"}),
    ("support-module", lambda e: e.select_module(support.__name__), EVERY - {"Note"}),
    ("package-prefix", lambda e: e.select_module("tests.entity_events"), EVERY),
    ("partial-segment-is-no-prefix", lambda e: e.select_module("tests.entity_ev"), set()),
    ("other-package", lambda e: e.select_module("billing.models"), set()),
    ("predicate", lambda e: e.select_if(_table("identity_books")), {"Book"}),
    ("all", lambda e: e.select_all(), EVERY),
    ("selectors-add-up", lambda e: e.select(Book).select_module(__name__), {"Book", "Note"}),
    ("ignore-class-and-subclasses", lambda e: e.select_all().ignore(User), {"Book", "Tag", "Note"}),
    ("ignore-subclass", lambda e: e.select(User).ignore(AdminUser), {"User"}),
    ("ignore-module", lambda e: e.select_all().ignore_module(support.__name__), {"Note"}),
    ("ignore-predicate", lambda e: e.select_all().ignore_if(_table("identity_tags")), EVERY - {"Tag"}),
    ("ignore-beats-select", lambda e: e.select(Book).ignore_module("tests.entity_events"), set()),
]


@pytest.mark.parametrize(
    ("configure", "expected"),
    [pytest.param(configure, expected, id=name) for name, configure, expected in CONFIGURATIONS],
)
async def test_only_selected_and_not_ignored_models_publish(
    database_url: str, configure: Callable[[EntityEvents], EntityEvents], expected: set[str]
) -> None:
    events = configure(EntityEvents()).map(User, UserEto).map(Book, BookEto)
    async with not_started(identity(database_url, RecordingBroker(), events)) as bus:
        await create_models(bus, IdentityBase.metadata)
        async with bus.unit_of_work() as uow:
            uow.session.add_all(
                [
                    new_user("ann"),
                    new_user("root", admin=True),
                    Book(title="Dune"),
                    Tag(group_id=1, label="x"),
                ]
            )
            uow.session.add(Note(text="hello"))
        rows = await outbox(bus)
    published = {str(key).partition(":")[0] for _, key in rows}
    assert published == expected
    assert len(rows) == len(expected)  # one Created per selected entity, nothing for the others
    assert all(name.endswith(".Created") for name, _ in rows)


def test_selects_answers_for_a_model_class() -> None:
    events = EntityEvents().select_module("tests.entity_events").ignore(Tag)
    assert events.selects(User)
    assert events.selects(AdminUser)
    assert events.selects(Note)
    assert not events.selects(Tag)
    assert not EntityEvents().selects(User)
