"""`EntitySynchronizer`: keep a local copy of another service's entity from its entity events (ABP's).

```python
class UserCopies(EntitySynchronizer[UserEto, OrderBuyer]):  # OrderService keeps its buyers current
    pass

await bus.subscribe(UserCopies)   # handles EntityCreatedEto/UpdatedEto/DeletedEto[UserEto]
```

The local model's primary key columns are read from the ETO's fields of the same names; every other ETO field
with a matching attribute is copied (override `apply` to map differently). When the local model has an
`entity_version` column (a plain integer, set by the synchronizer; not SQLAlchemy's `version_id_col`) and the
events carry versions, an event older than the copy is ignored, so out-of-order delivery does no harm. The
version is the event's `entity_version`, or else the ETO's own `entity_version` field (ABP's
`IHasEntityVersion`: `"entityVersion"` inside the entity, as ABP services publish it).
A Deleted event that overtakes the Created of the same entity is not remembered: keep events of one entity in
order (entity events carry the entity as ordering key) rather than relying on that.
"""

from __future__ import annotations

import typing
from typing import Any, ClassVar, Generic, TypeVar

from sqlalchemy import inspect

from eventrelay.entity_events import EntityCreatedEto, EntityDeletedEto, EntityUpdatedEto
from eventrelay.errors import ConfigurationError
from eventrelay.events import Event
from eventrelay.handlers import DistributedEventHandler

E = TypeVar("E", bound=Event)
M = TypeVar("M")


class EntitySynchronizer(DistributedEventHandler[Any], Generic[E, M]):
    """Creates, updates and deletes rows of the local model `M` from the entity events of the ETO `E`."""

    version_attribute: ClassVar[str] = "entity_version"
    ignore_created: ClassVar[bool] = False
    ignore_updated: ClassVar[bool] = False
    ignore_deleted: ClassVar[bool] = False

    @classmethod
    def __handled_events__(cls) -> tuple[type[Event], ...]:
        eto, _ = cls._arguments()
        return (EntityCreatedEto[eto], EntityUpdatedEto[eto], EntityDeletedEto[eto])  # type: ignore[valid-type]

    @classmethod
    def _arguments(cls) -> tuple[type[Event], type[Any]]:
        for klass in cls.__mro__:
            for base in getattr(klass, "__orig_bases__", ()):
                origin = typing.get_origin(base)
                if isinstance(origin, type) and issubclass(origin, EntitySynchronizer):
                    eto, model = typing.get_args(base)
                    if isinstance(eto, type) and isinstance(model, type):
                        return eto, model
        raise ConfigurationError(f"Declare {cls.__name__}(EntitySynchronizer[SomeEto, LocalModel])")

    def key(self, eto: E) -> Any:
        """The local primary key for an ETO: the ETO's fields named like the model's key columns."""
        _, model = self._arguments()
        names = [column.key for column in inspect(model).primary_key]
        values = tuple(getattr(eto, name) for name in names)
        return values[0] if len(values) == 1 else values

    def apply(self, local: M, eto: E) -> None:
        """Copy the ETO onto the local row: every field the model has an attribute for."""
        for name in type(eto).model_fields:
            if hasattr(type(local), name) and name != self.version_attribute:
                setattr(local, name, getattr(eto, name))

    async def handle_event(self, event: Any) -> None:
        _, model = self._arguments()
        session = self.context.session
        eto, version = event.entity, event.entity_version
        if version is None:  # an ETO with a version of its own (ABP's UserEto.EntityVersion)
            version = getattr(eto, "entity_version", None)
        local = await session.get(model, self.key(eto))
        held = getattr(local, self.version_attribute, None) if local is not None else None
        if isinstance(event, EntityDeletedEto):
            fresh = version is None or held is None or held <= version
            if local is not None and fresh and not self.ignore_deleted:
                await session.delete(local)
            return
        if self.ignore_created if isinstance(event, EntityCreatedEto) else self.ignore_updated:
            return
        if local is not None and version is not None and held is not None and held >= version:
            return  # the copy is as new as this event or newer: it came out of order
        if local is None:
            local = model()
            session.add(local)
        self.apply(local, eto)
        for name in (column.key for column in inspect(model).primary_key):
            setattr(local, name, getattr(eto, name))
        if version is not None and hasattr(model, self.version_attribute):
            setattr(local, self.version_attribute, version)
