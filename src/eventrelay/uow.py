"""The unit of work: one database transaction; the events published in it leave only if it commits."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Protocol

from eventrelay.entity_events import Change, EntityChangeTracker, EntityEvents
from eventrelay.envelope import Message
from eventrelay.errors import ConfigurationError, UnitOfWorkError
from eventrelay.events import Event
from eventrelay.stores.base import Store, Transaction, utcnow
from eventrelay.tenant_scope import current_tenant

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

LOCAL_ROUNDS = 10
"""Rounds of local entity events a commit runs (each for the changes the previous one's handlers made)."""

_current: ContextVar[UnitOfWork | None] = ContextVar("eventrelay_unit_of_work", default=None)


def current_unit_of_work() -> UnitOfWork | None:
    """The unit of work active in this task, if any."""
    return _current.get()


class Outgoing(Protocol):
    """Where a unit of work sends its events (`eventrelay.outbox.Outbox`)."""

    def message(
        self,
        event: Event,
        *,
        headers: Mapping[str, str] | None = None,
        key: str | None = None,
        tenant_id: str | None = None,
    ) -> Message:
        """The stamped message of `event`."""

    async def write(self, tx: Transaction, messages: Sequence[Message], due: datetime) -> None:
        """Write `messages` to the outbox in `tx`."""

    async def send(self, messages: Sequence[Message]) -> None:
        """Send `messages` to the broker now."""


class LocalEntityHandlers(Protocol):
    """Who takes local entity events (`eventrelay.local.LocalEventBus`)."""

    @property
    def watches_entities(self) -> bool:
        """Whether any handler takes local entity events."""

    def takes(self, model: type) -> bool:
        """Whether a handler takes local entity events of `model`."""

    async def publish_entity_changes(self, changes: Iterable[tuple[object, Change]], uow: UnitOfWork) -> None:
        """Run the handlers of these changes' local entity events in `uow`."""


@dataclass(frozen=True)
class _Pending:
    message: Message
    use_outbox: bool
    available_at: datetime | None  # None: due once committed


class UnitOfWork:
    """One transaction over the service's database, used as `async with bus.unit_of_work() as uow:`.

    Your own tables share it through `uow.session`. Events published while it is active are buffered and,
    at commit, written to the outbox in the same transaction; a rollback (an exception leaving the block)
    discards them. Events published with `use_outbox=False` are sent right after the commit.
    """

    def __init__(
        self,
        store: Store,
        owner: object,
        outgoing: Outgoing,
        entity_events: EntityEvents | None = None,
        local: LocalEntityHandlers | None = None,
    ) -> None:
        self.tenant_id = current_tenant()
        """The tenant in scope when it began: with a database per tenant, its database's."""
        self.transaction: Transaction = store.begin()
        self.owner = owner
        self._outgoing = outgoing
        self._pending: list[_Pending] = []
        self._before_commit: list[Callable[[], Awaitable[None]]] = []
        self._token: object = None
        # The session is watched only when someone listens: distributed entity events, or a local handler.
        self._local = local if local is not None and local.watches_entities else None
        self._tracker = (
            None
            if entity_events is None and self._local is None
            else EntityChangeTracker(
                entity_events, self.session, None if self._local is None else self._local.takes
            )
        )

    @property
    def session(self) -> AsyncSession:
        """The SQLAlchemy session (raises `UnitOfWorkError` when the bus has no database)."""
        return self.transaction.session

    def add(self, message: Message, *, use_outbox: bool, available_at: datetime | None = None) -> None:
        """Buffer a message until commit; `available_at` None: due at once."""
        self._pending.append(_Pending(message, use_outbox, available_at))

    def publish(
        self,
        event: Event,
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
        available_at: datetime | None = None,
    ) -> Message:
        """Publish `event` through the outbox once this unit of work commits (due at `available_at`, else at
        once); return its message."""
        message = self._outgoing.message(event, headers=headers, key=key)
        self.add(message, use_outbox=True, available_at=available_at)
        return message

    def before_commit(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Run `callback` at commit, before the buffered events are written (it may add more)."""
        self._before_commit.append(callback)

    def entity_changed(self, entity: object, change: Change) -> None:
        """Publish an entity event for a change the ORM did not see (a bulk `update()`, raw SQL)."""
        if self._tracker is None:
            raise UnitOfWorkError(
                "This bus publishes no entity events: pass entity_events=EntityEvents()... or subscribe a "
                "local handler of EntityChanged[Model] (bus.local.subscribe) before the unit of work begins"
            )
        self._tracker.record(entity, change)

    def after_commit(self, callback: Callable[[], None]) -> None:
        """Run `callback` once this unit of work has committed."""
        self.transaction.after_commit(callback)

    @contextlib.asynccontextmanager
    async def savepoint(self, key: str | None = None) -> AsyncIterator[None]:
        """A SAVEPOINT: an exception leaving the block undoes only what was written and published in it.
        `key` names what runs in it (`Transaction.savepoint`).

        `before_commit` callbacks registered in the block run at its end, inside it, so that their failure
        too undoes only the block.
        """
        pending, before = len(self._pending), len(self._before_commit)
        tracker, mark = self._tracker, None
        try:
            async with self.transaction.savepoint(key):
                # After the savepoint flushed what came before it: changes recorded from here are the block's.
                mark = None if tracker is None else tracker.mark()
                yield
                # What the block left for the commit is its own too: a failure there rolls back only it. A
                # callback may leave more (a local event's handler publishing another): they run here too.
                while len(self._before_commit) > before:
                    callbacks = self._before_commit[before:]
                    del self._before_commit[before:]
                    for callback in callbacks:
                        await callback()
        except BaseException:
            del self._pending[pending:], self._before_commit[before:]
            if tracker is not None and mark is not None:
                tracker.rewind(mark)  # else a rolled-back row would still publish its entity events
            raise

    async def commit(self) -> None:
        """Write buffered events (and the entity events of the changes made in it) to the outbox, commit, then
        send the events that skip the outbox.

        Before that run the `before_commit` callbacks (local events), then the local entity events."""
        try:
            for callback in self._before_commit:  # a callback may add more: the loop takes them too
                await callback()
            if self._local is not None and self._tracker is not None:
                await self._local_entity_events(self._local, self._tracker)
            if self._tracker is not None:
                for change in await self._tracker.collect():
                    message = self._outgoing.message(change.event, key=change.key, tenant_id=change.tenant_id)
                    self.add(message, use_outbox=True)
        except BaseException:
            await self.rollback()
            raise
        # One write per due time: those due at once share the commit's (one statement for them all).
        now, by_due, direct = utcnow(), dict[datetime, list[Message]](), []
        for pending in self._pending:
            if pending.use_outbox:
                by_due.setdefault(pending.available_at or now, []).append(pending.message)
            else:
                direct.append(pending.message)
        self._pending.clear()
        try:
            for due, messages in by_due.items():
                await self._outgoing.write(self.transaction, messages, due)
        except BaseException:
            await self.transaction.rollback()
            raise
        await self.transaction.commit()
        if direct:
            await self._outgoing.send(direct)

    async def _local_entity_events(self, local: LocalEntityHandlers, tracker: EntityChangeTracker) -> None:
        """Run the local entity events of the changes made so far, then those of the changes their handlers
        (and the local events these publish) made, in rounds until one leaves nothing new: `LOCAL_ROUNDS` at
        most."""
        done = len(self._before_commit)
        for round_ in range(LOCAL_ROUNDS + 1):
            changes = await tracker.local_changes()
            if not changes:
                return
            if round_ == LOCAL_ROUNDS:
                models = ", ".join(sorted({type(entity).__qualname__ for entity, _ in changes}))
                raise UnitOfWorkError(
                    f"Local entity event handlers still changed {models} after {LOCAL_ROUNDS} rounds: a "
                    "handler loop? Let a handler write only what differs, so that a round ends it"
                )
            await local.publish_entity_changes(changes, self)
            while done < len(self._before_commit):  # local events the handlers published
                await self._before_commit[done]()
                done += 1

    async def rollback(self) -> None:
        """Discard buffered events and roll the transaction back."""
        self._pending.clear()
        await self.transaction.rollback()

    async def __aenter__(self) -> UnitOfWork:
        self._token = _current.set(self)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if exc is None:
                await self.commit()
            else:
                await self.rollback()
        finally:
            _current.reset(self._token)  # type: ignore[arg-type]


def due_time(delay: float | timedelta | None, at: datetime | None) -> datetime | None:
    """When an event given `delay=` or `at=` is due (naive UTC, as stored); None: at once."""
    if delay is not None and at is not None:
        raise ConfigurationError("Give delay= or at=, not both")
    if delay is not None:
        seconds = delay.total_seconds() if isinstance(delay, timedelta) else float(delay)
        return utcnow() + timedelta(seconds=max(0.0, seconds))
    if at is not None:
        if at.tzinfo is None:
            raise ConfigurationError("at= needs a timezone-aware datetime, e.g. datetime.now(UTC) + ...")
        return at.astimezone(UTC).replace(tzinfo=None)
    return None
