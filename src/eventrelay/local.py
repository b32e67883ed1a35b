"""Local events (ABP's `ILocalEventBus`): in-process events whose handlers run inside the publisher's unit of
work, just before it commits, so that their writes commit with it and a handler that raises rolls it back.

They never leave the process: no outbox, no broker, no inbox. Use them for what one service does in reaction
to its own changes within one transaction; use distributed events for what other services (or this one,
later and on its own) do.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

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
    """

    def __init__(
        self,
        service: str,
        unit_of_work: Callable[[], contextlib.AbstractAsyncContextManager[UnitOfWork]],
        owner: object,
    ) -> None:
        self.service = service
        self._unit_of_work, self._owner = unit_of_work, owner
        self.handlers = Registry(service)

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
        self.handlers.add(spec)
        return spec

    def unsubscribe(self, handler: str | object) -> None:
        """Remove a handler, given by its name or by what was subscribed. Idempotent."""
        self.handlers.remove(handler)

    async def publish(self, event: Event) -> None:
        """Run `event`'s handlers just before the current unit of work of this bus commits; outside one, in a
        unit of work of their own, now. A handler that raises rolls the unit of work back, and `commit` (the
        end of the `async with`) raises what it raised."""
        if not isinstance(event, Event):
            raise ConfigurationError(f"bus.local.publish takes an Event, not {type(event).__name__}")
        uow = current_unit_of_work()
        if uow is not None and uow.owner is self._owner:
            uow.before_commit(functools.partial(self._run, event, uow))
            return
        async with self._unit_of_work() as own:
            own.before_commit(functools.partial(self._run, event, own))

    async def _run(self, event: Event, uow: UnitOfWork) -> None:
        name = event_name(event)
        # The running distributed handler's headers (correlation, tenant), if any: its publishes keep them.
        parent = current_context.get()
        headers = parent.headers if parent is not None else {}
        for spec in self.handlers.handlers_for(name):
            context = Context(new_message_id(), name, self.service, spec.name, 1, headers, None, uow)
            await spec.invoke(event, context)
