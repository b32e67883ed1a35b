"""Local events (ABP's `ILocalEventBus`): in-process events whose handlers run inside the publisher's unit of
work, just before it commits, so that their writes commit with it and a handler that raises rolls it back.

They never leave the process: no outbox, no broker, no inbox. Use them for what one service does in reaction
to its own changes within one transaction; use distributed events for what other services (or this one,
later and on its own) do.

Local entity events (`EntityUpdated[User]`, ... from `eventrelay.entity_events`) are published by the unit of
work itself at commit, for the models some local handler takes; see `UnitOfWork.commit`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable
from typing import Any

from eventrelay.entity_events import Change, EntityChanged, local_event
from eventrelay.envelope import new_message_id
from eventrelay.errors import ConfigurationError
from eventrelay.events import Event, event_name
from eventrelay.handlers import (
    Context,
    DistributedEventHandler,
    HandlerSpec,
    Registry,
    current_context,
    resolve_handler,
)
from eventrelay.uow import UnitOfWork, current_unit_of_work


class LocalEventBus:
    """A service's local events: `bus.local.subscribe(Handler)`, then `await bus.local.publish(event)`.

    Handlers are the same classes (`DistributedEventHandler[E]`) and async functions as distributed ones,
    several per event, run in subscription order. Their `context.unit_of_work` is the publisher's.

    A handler of a local entity event (`async def f(event: EntityUpdated[User])`) makes the units of work of
    this bus begun from then on watch their session for changes of `User` (and its subclasses).
    """

    def __init__(
        self,
        service: str,
        unit_of_work: Callable[[], contextlib.AbstractAsyncContextManager[UnitOfWork]],
        owner: object,
        *,
        database: bool = True,
    ) -> None:
        self.service = service
        self._unit_of_work, self._owner = unit_of_work, owner
        self._database = database
        self.handlers = Registry(service)
        # The entity event handlers with the classes they take, in subscription order; which models they take.
        self._entity_handlers: list[tuple[HandlerSpec, tuple[type[EntityChanged[Any]], ...]]] = []
        self._takes: dict[type, bool] = {}

    def subscribe(
        self,
        handler: type[DistributedEventHandler[Any]] | Callable[..., Any],
        *,
        event: type[Event] | None = None,
        factory: Callable[[], DistributedEventHandler[Any]] | None = None,
        name: str | None = None,
    ) -> HandlerSpec:
        """Subscribe a handler class (a fresh instance per event) or an async function to local events."""
        spec = resolve_handler(handler, event=event, factory=factory, name=name)
        entity_events = tuple(
            t for t in spec.events.values() if t is not None and issubclass(t, EntityChanged)
        )
        if entity_events and not self._database:
            raise ConfigurationError(
                f"{spec.name} takes local entity events, which come from a database: create the bus with "
                "database='sqlite+aiosqlite:///service.db' (or PostgreSQL, MariaDB)"
            )
        self.handlers.add(spec)
        if entity_events:
            self._entity_handlers.append((spec, entity_events))
            self._takes.clear()
        return spec

    def unsubscribe(self, handler: str | object) -> None:
        """Remove a handler, given by its name or by what was subscribed. Idempotent."""
        self.handlers.remove(handler)
        self._entity_handlers = [e for e in self._entity_handlers if self.handlers.get(e[0].name) is e[0]]
        self._takes.clear()

    @property
    def watches_entities(self) -> bool:
        """Whether a local entity event handler is subscribed (units of work then watch their session)."""
        return bool(self._entity_handlers)

    def takes(self, model: type) -> bool:
        """Whether a local handler takes entity events of `model` (asked per flushed entity: cached)."""
        known = self._takes.get(model)
        if known is None:
            known = self._takes[model] = any(
                issubclass(model, t.__entity_model__) for _, types in self._entity_handlers for t in types
            )
        return known

    async def publish(self, event: Event) -> None:
        """Run `event`'s handlers just before the current unit of work of this bus commits; outside one, in a
        unit of work of their own, now. A handler that raises rolls the unit of work back, and `commit` (the
        end of the `async with`) raises what it raised."""
        if not isinstance(event, Event):
            raise ConfigurationError(f"bus.local.publish takes an Event, not {type(event).__name__}")
        if isinstance(event, EntityChanged):
            raise ConfigurationError(
                "Local entity events come from the unit of work's changes: for one the ORM did not see, call "
                "uow.entity_changed(entity, Change.UPDATED) (or CREATED, DELETED)"
            )
        uow = current_unit_of_work()
        if uow is not None and uow.owner is self._owner:
            uow.before_commit(functools.partial(self._run, event, uow))
            return
        async with self._unit_of_work() as own:
            own.before_commit(functools.partial(self._run, event, own))

    async def publish_entity_changes(self, changes: Iterable[tuple[object, Change]], uow: UnitOfWork) -> None:
        """Run the handlers of each change's local entity event (`EntityUpdated[Model]`, ...), in `uow`: those
        of its kind and of `EntityChanged`, for the entity's model or a base of it, in subscription order."""
        for entity, change in changes:
            model = type(entity)
            specs = [
                spec
                for spec, types in self._entity_handlers
                if any(
                    change in t.__entity_changes__ and issubclass(model, t.__entity_model__) for t in types
                )
            ]
            await self._run(local_event(entity, change), uow, specs)

    async def _run(self, event: Event, uow: UnitOfWork, specs: list[HandlerSpec] | None = None) -> None:
        name = event_name(event)
        # The running distributed handler's headers (correlation, tenant), if any: its publishes keep them.
        parent = current_context.get()
        headers = parent.headers if parent is not None else {}
        for spec in self.handlers.handlers_for(name) if specs is None else specs:
            context = Context(new_message_id(), name, self.service, spec.name, 1, headers, None, uow)
            await spec.invoke(event, context)
