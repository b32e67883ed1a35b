"""Pre-defined entity events (ABP's auto events) for SQLAlchemy 2 models.

```python
entity_events = EntityEvents().select(User).map(User, UserEto)
bus = DistributedEventBus("IdentityService", database=..., entity_events=entity_events)
```

Inserts, updates and deletes of selected models made through the unit of work's session publish
`EntityCreatedEto[UserEto]`, `EntityUpdatedEto[UserEto]` and `EntityDeletedEto[UserEto]`, named
`"{name of UserEto}.Created"` (`.Updated`, `.Deleted`). Changes are gathered at each flush and mapped at
commit, after the database assigned keys, and written to the outbox in the commit's transaction. Per entity
and unit of work one event leaves, with the final state: created then updated is one Created, created then
deleted is none. An entity's events carry the ordering key `"Model:keys"`, so they are handled in order.

Local entity events (ABP's `EntityCreatedEventData<T>` ...) come from the same tracker and carry the entity
itself: `EntityCreated[User]`, `EntityUpdated[User]`, `EntityDeleted[User]`, and `EntityChanged[User]`, the
base of the three, whose handlers take each of them. They are made for every model some local handler takes
(`bus.local.subscribe`), whatever `EntityEvents` selects, and never leave the process (`eventrelay.local`).

Not captured: bulk `update()` / `delete()` statements and raw SQL, which bypass the ORM's unit of work. For
those, load the rows and call `uow.entity_changed(entity, Change.UPDATED)` (or CREATED / DELETED).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Self, TypeVar

from sqlalchemy import event, inspect
from sqlalchemy.orm import Session

from eventrelay.errors import ConfigurationError
from eventrelay.events import Event

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

E = TypeVar("E", bound=Event)
M = TypeVar("M")


class EntityEto(Event, name="Volo.Abp.Domain.Entities.Events.Distributed.EntityEto"):
    """What an entity selected without a mapping publishes: its type name and keys (ABP's `EntityEto`;
    `{"entityType": ..., "keysAsString": ...}` in the "abp" JSON style)."""

    entity_type: str
    keys_as_string: str


# In the "abp" JSON style the version travels inside the entity, as ABP's `IHasEntityVersion` ETOs carry it:
# {"entity": {..., "entityVersion": 3}}; read back from there into `entity_version` (`json_style.py`).
_VERSION_INSIDE_ENTITY = {"entity_version": "entity"}


class EntityCreatedEto(Event, Generic[E], name_postfix=".Created"):
    """An entity was created. `entity_version` is the entity's version after the change, if it has one:
    beside `entity` in the "eventrelay" JSON style, inside it as `entityVersion` in the "abp" style."""

    __abp_inside__: ClassVar[dict[str, str]] = _VERSION_INSIDE_ENTITY

    entity: E
    entity_version: int | None = None


class EntityUpdatedEto(Event, Generic[E], name_postfix=".Updated"):
    """An entity was updated (one event per unit of work, with the final state)."""

    __abp_inside__: ClassVar[dict[str, str]] = _VERSION_INSIDE_ENTITY

    entity: E
    entity_version: int | None = None


class EntityDeletedEto(Event, Generic[E], name_postfix=".Deleted"):
    """An entity was deleted; `entity` is its state before the delete."""

    __abp_inside__: ClassVar[dict[str, str]] = _VERSION_INSIDE_ENTITY

    entity: E
    entity_version: int | None = None


class Change(enum.Enum):
    CREATED = "created"
    UPDATED = "updated"
    DELETED = "deleted"


class EntityChanged(Event, Generic[M], name_postfix=".Changed"):
    """A local entity event: `entity`, an instance of the model `M` (or of a subclass), was created, updated
    or deleted in this unit of work (ABP's `EntityChangedEventData<T>`). A handler of `EntityChanged[User]`
    takes `EntityCreated[User]`, `EntityUpdated[User]` and `EntityDeleted[User]`; `change` says which.

    Only subscribe to these (with `bus.local.subscribe`): they carry the ORM object and are never sent.
    """

    change: ClassVar[Change]
    __entity_changes__: ClassVar[frozenset[Change]] = frozenset(Change)
    __entity_model__: ClassVar[type]

    # The ORM object itself, passed through as it is: pydantic neither validates nor copies it (Any).
    if TYPE_CHECKING:
        entity: M
    else:
        entity: Any

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        metadata = cls.__pydantic_generic_metadata__
        if metadata["parameters"] or metadata["origin"] is None:
            super().__pydantic_init_subclass__(**kwargs)  # an open generic: Event names only its uses
            return
        # EntityUpdated[User]: a name of its own for the handler registry, not Event's (which needs an ETO
        # argument and reserves the name on the wire): these never travel.
        super(Event, cls).__pydantic_init_subclass__(**kwargs)
        (model,) = metadata["args"]
        if not isinstance(model, type):
            raise ConfigurationError(f"{cls.__name__} takes a model class, e.g. EntityUpdated[User]")
        cls.__entity_model__ = model
        postfix = metadata["origin"].__event_declaration__[2]  # type: ignore[attr-defined]
        cls.__event_name__ = f"local:{model.__module__}.{model.__qualname__}{postfix}"


class EntityCreated(EntityChanged[M], Generic[M], name_postfix=".Created"):
    """A local entity event: `entity` was inserted (ABP's `EntityCreatedEventData<T>`)."""

    change = Change.CREATED
    __entity_changes__ = frozenset({Change.CREATED})


class EntityUpdated(EntityChanged[M], Generic[M], name_postfix=".Updated"):
    """A local entity event: `entity` was updated (ABP's `EntityUpdatedEventData<T>`)."""

    change = Change.UPDATED
    __entity_changes__ = frozenset({Change.UPDATED})


class EntityDeleted(EntityChanged[M], Generic[M], name_postfix=".Deleted"):
    """A local entity event: `entity` was deleted; its loaded attributes still read (ABP's
    `EntityDeletedEventData<T>`)."""

    change = Change.DELETED
    __entity_changes__ = frozenset({Change.DELETED})


_LOCAL_EVENTS: dict[Change, Any] = {  # Any: parametrized by the entity's class at run time
    Change.CREATED: EntityCreated,
    Change.UPDATED: EntityUpdated,
    Change.DELETED: EntityDeleted,
}


def local_event(entity: object, change: Change) -> EntityChanged[Any]:
    """The local event of a change of `entity`: `EntityUpdated[type(entity)](entity=entity)`, ..."""
    event: EntityChanged[Any] = _LOCAL_EVENTS[change][type(entity)](entity=entity)
    return event


_WRAPPERS: dict[Change, type[Any]] = {
    Change.CREATED: EntityCreatedEto,
    Change.UPDATED: EntityUpdatedEto,
    Change.DELETED: EntityDeletedEto,
}


@dataclass
class EntityEvents:
    """Which models publish entity events, and how each maps to its ETO (ABP's
    `AbpDistributedEntityEventOptions`). A model is selected if any selector matches and no ignore does.

    `version_attribute` names the integer version of a model (declare it as SQLAlchemy's `version_id_col`
    and it is incremented per update); `tenant_attribute` names its tenant id, which travels in the
    message's tenant header.
    """

    version_attribute: str = "entity_version"
    tenant_attribute: str = "tenant_id"
    _selectors: list[Callable[[type], bool]] = field(default_factory=list)
    _ignored: list[Callable[[type], bool]] = field(default_factory=list)
    _mappings: dict[type, tuple[type[Event], Callable[[Any], Event]]] = field(default_factory=dict)

    def select(self, *models: type) -> Self:
        """Publish events for these model classes (and their subclasses)."""
        self._selectors.append(lambda cls: issubclass(cls, models))
        return self

    def select_module(self, prefix: str) -> Self:
        """Publish events for models defined in this module or package, e.g. `"identity.models"`."""
        self._selectors.append(lambda cls: _in_module(cls, prefix))
        return self

    def select_if(self, predicate: Callable[[type], bool]) -> Self:
        """Publish events for models the predicate accepts."""
        self._selectors.append(predicate)
        return self

    def select_all(self) -> Self:
        """Publish events for every model."""
        self._selectors.append(lambda cls: True)
        return self

    def ignore(self, *models: type) -> Self:
        self._ignored.append(lambda cls: issubclass(cls, models))
        return self

    def ignore_module(self, prefix: str) -> Self:
        self._ignored.append(lambda cls: _in_module(cls, prefix))
        return self

    def ignore_if(self, predicate: Callable[[type], bool]) -> Self:
        self._ignored.append(predicate)
        return self

    def map(self, model: type, eto: type[E], mapper: Callable[[Any], E] | None = None) -> Self:
        """Map `model` to `eto`: with `mapper(entity)`, or else by reading the ETO's fields off the entity."""

        def from_attributes(entity: Any) -> Event:
            return eto.model_validate(entity, from_attributes=True)

        self._mappings[model] = (eto, mapper or from_attributes)
        return self

    def selects(self, model: type) -> bool:
        return any(s(model) for s in self._selectors) and not any(i(model) for i in self._ignored)

    def to_event(self, entity: object, change: Change) -> EntityChange:
        """The event for a change of `entity`, with its tenant id and ordering key."""
        model = type(entity)
        mapping = next((self._mappings[cls] for cls in model.__mro__ if cls in self._mappings), None)
        keys = ",".join(str(k) for k in inspect(entity).identity or ())
        if mapping is None:
            payload: Event = EntityEto(
                entity_type=f"{model.__module__}.{model.__qualname__}", keys_as_string=keys
            )
            eto_type: type[Event] = EntityEto
        else:
            eto_type, mapper = mapping
            payload = mapper(entity)
        version = getattr(entity, self.version_attribute, None)
        tenant = getattr(entity, self.tenant_attribute, None)
        wrapped = _WRAPPERS[change][eto_type](entity=payload, entity_version=version)
        # The key keeps one entity's events in order at the consumer (an update before its delete).
        return EntityChange(wrapped, None if tenant is None else str(tenant), f"{model.__qualname__}:{keys}")


@dataclass(frozen=True)
class EntityChange:
    """An entity event ready to publish."""

    event: Event
    tenant_id: str | None
    key: str


def _in_module(cls: type, prefix: str) -> bool:
    return cls.__module__ == prefix or cls.__module__.startswith(prefix + ".")


# created+updated = created; created+deleted = nothing; updated+deleted = deleted; deleted+created = updated
_COMBINE: dict[tuple[Change, Change], Change | None] = {
    (Change.CREATED, Change.UPDATED): Change.CREATED,
    (Change.CREATED, Change.DELETED): None,
    (Change.UPDATED, Change.UPDATED): Change.UPDATED,
    (Change.UPDATED, Change.DELETED): Change.DELETED,
    (Change.DELETED, Change.CREATED): Change.UPDATED,
}


@dataclass(frozen=True)
class TrackerMark:
    """What an `EntityChangeTracker` had recorded when a savepoint began."""

    changes: dict[int, tuple[object, Change]]
    local: dict[int, tuple[object, Change]]
    deleted: dict[int, EntityChange]


class EntityChangeTracker:
    """Follows one unit of work's session: at each flush, records the changes of the entities whose model
    `config` selects (for distributed events, over the whole unit of work) and of those `local` takes (for
    local events, since the last `local_changes`)."""

    def __init__(
        self,
        config: EntityEvents | None,
        session: AsyncSession,
        local: Callable[[type], bool] | None = None,
    ) -> None:
        self.config = config
        self.session = session
        self._local = local
        self._changes: dict[int, tuple[object, Change]] = {}
        self._local_changes: dict[int, tuple[object, Change]] = {}
        self._deleted_events: dict[int, EntityChange] = {}
        event.listen(session.sync_session, "before_flush", self._before_flush)
        event.listen(session.sync_session, "after_flush", self._after_flush)

    def record(self, entity: object, change: Change) -> None:
        """Note a change of `entity` (what the flush does for ORM changes; call it for bulk statements): for
        the distributed events if this bus publishes any, for the local ones if a local handler takes it."""
        local = self._local is not None and self._local(type(entity))
        self._record(entity, change, distributed=self.config is not None, local=local)

    def _record(self, entity: object, change: Change, *, distributed: bool, local: bool) -> None:
        if local:
            _combine(self._local_changes, entity, change)
        if not distributed or self.config is None:
            return
        key = id(entity)
        combined = _combine(self._changes, entity, change)
        if combined is None:
            self._deleted_events.pop(key, None)
        elif combined is Change.DELETED and key not in self._deleted_events:  # else mapped before the flush
            self._deleted_events[key] = self.config.to_event(entity, Change.DELETED)

    def _before_flush(self, session: Session, _context: object, _instances: object) -> None:
        # Map what this flush deletes while its rows exist: expired attributes can still be loaded.
        if self.config is None:
            return
        for entity in session.deleted:
            if self.config.selects(type(entity)):
                self._deleted_events[id(entity)] = self.config.to_event(entity, Change.DELETED)

    def _after_flush(self, session: Session, _context: object) -> None:
        # The new/dirty/deleted sets still hold the flushed objects here, and new rows have their keys.
        config, local = self.config, self._local
        for entities, change in (
            (session.new, Change.CREATED),
            (session.dirty, Change.UPDATED),
            (session.deleted, Change.DELETED),
        ):
            for entity in entities:
                model = type(entity)
                distributed = config is not None and config.selects(model)
                wanted = local is not None and local(model)
                if not (distributed or wanted):
                    continue
                if change is Change.UPDATED and not session.is_modified(entity, include_collections=False):
                    continue
                self._record(entity, change, distributed=distributed, local=wanted)

    def mark(self) -> TrackerMark:
        """What is recorded now, for `rewind` if the savepoint beginning now rolls back."""
        return TrackerMark(dict(self._changes), dict(self._local_changes), dict(self._deleted_events))

    def rewind(self, mark: TrackerMark) -> None:
        """Forget what was recorded since `mark`: its savepoint rolled back, and with it those changes."""
        self._changes, self._local_changes, self._deleted_events = mark.changes, mark.local, mark.deleted

    async def local_changes(self) -> list[tuple[object, Change]]:
        """Flush what is pending, then return the changes local handlers take made since the last call: one
        per entity, in the order of first change."""
        await self.session.flush()
        changes, self._local_changes = self._local_changes, {}
        return list(changes.values())

    async def collect(self) -> list[EntityChange]:
        """Flush what is pending, then return each changed entity's event, in the order of first change."""
        if self.config is None:
            return []
        config = self.config
        await self.session.flush()
        changes, self._changes = self._changes, {}
        deleted, self._deleted_events = self._deleted_events, {}
        # In the session's greenlet: mapping may load attributes the flush expired (an `onupdate` column).
        return await self.session.run_sync(
            lambda _: [
                deleted[key] if change is Change.DELETED else config.to_event(entity, change)
                for key, (entity, change) in changes.items()
            ]
        )


def _combine(changes: dict[int, tuple[object, Change]], entity: object, change: Change) -> Change | None:
    """Fold `change` into what `changes` holds for `entity`; return the result (None: nothing is left)."""
    key = id(entity)
    previous = changes.get(key)
    combined: Change | None = change if previous is None else _COMBINE.get((previous[1], change), change)
    if combined is None:
        del changes[key]
    else:
        changes[key] = (entity, combined)
    return combined
