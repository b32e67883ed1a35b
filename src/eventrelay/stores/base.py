"""The store port: outbox, inbox and dead letters in the service's own database, inside its transactions."""

from __future__ import annotations

import contextlib
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from eventrelay.envelope import Message

if TYPE_CHECKING:
    from sqlalchemy import MetaData
    from sqlalchemy.ext.asyncio import AsyncSession


def utcnow() -> datetime:
    """Now in UTC, naive: every store keeps naive UTC times (MySQL's DATETIME has no zone)."""
    return datetime.now(UTC).replace(tzinfo=None)


TURN = 0.01  # seconds a task may run transactions back to back on a store whose statements never suspend it


class Turns:
    """When SQLite or the memory store, whose statements never suspend the task, should let the event loop's
    other tasks run once: `due()` is true once `TURN` seconds have passed since it last was. Without turns, a
    task that runs transactions back to back and awaits nothing else (a batch import) keeps the loop to
    itself: the relay sent nothing until it ended. A turn before every transaction let the relay in so often
    that it sent batches of one, and E3 with one event per unit of work lost 15% of its throughput."""

    def __init__(self) -> None:
        self._last = 0.0

    def due(self) -> bool:
        now = time.monotonic()
        if now - self._last < TURN:
            return False
        self._last = now
        return True


@dataclass(frozen=True)
class OutboxRecord:
    """A message waiting in the outbox. `seq` orders rows by the time they were written."""

    seq: int
    message: Message
    available_at: datetime
    attempts: int = 0
    last_error: str | None = None


TRUNCATED_FROM = "x-eventrelay-truncated-from"
"""A dead letter's header: the size in bytes of the body of which it keeps only the start (over the limit)."""

DEAD_LETTER_BODY_MAX = 64 * 1024
"""The most a dead letter keeps of a body over `Settings.max_message_bytes`, in bytes (its start)."""


@dataclass(frozen=True)
class DeadLetter:
    """A message a subscriber gave up on, with why. `handler` is None when no handler could take it."""

    id: int
    subscriber: str
    handler: str | None
    message: Message
    attempts: int
    reason: str
    error: str | None
    created_at: datetime

    @property
    def truncated_from(self) -> int | None:
        """The original body's size when the letter keeps only its start; None when it keeps it whole."""
        size = self.message.headers.get(TRUNCATED_FROM)
        return int(size) if isinstance(size, str) and size.isdigit() else None


@dataclass(frozen=True)
class NewDeadLetter:
    """What `Store.add_dead_letter` needs; the store gives it an id and a time."""

    subscriber: str
    handler: str | None
    message: Message
    attempts: int
    reason: str
    error: str | None = None


class Transaction(ABC):
    """One database transaction. The unit of work and the relay write through it."""

    def __init__(self) -> None:
        self._after_commit: list[Callable[[], None]] = []

    @property
    def session(self) -> AsyncSession:
        """The SQLAlchemy session of this transaction."""
        from eventrelay.errors import UnitOfWorkError

        raise UnitOfWorkError(
            "This bus has no database, so its unit of work has no session: "
            "create the bus with database='sqlite+aiosqlite:///service.db' (or PostgreSQL, MariaDB)"
        )

    def after_commit(self, callback: Callable[[], None]) -> None:
        """Run `callback` once the transaction has committed (not after a rollback)."""
        self._after_commit.append(callback)

    @property
    def usable(self) -> bool:
        """False once a failure left only a rollback possible (a failed ORM flush outside a savepoint)."""
        return True

    @contextlib.asynccontextmanager
    async def savepoint(self, key: str | None = None) -> AsyncIterator[None]:
        """A nested transaction: an exception leaving the block undoes only the writes made in it.

        `key` names what runs in the block (a handler): a store may learn from one block what makes the
        next block of that key cheaper.
        """
        mark = len(self._after_commit)
        try:
            async with self._savepoint(key):
                yield
        except BaseException:
            del self._after_commit[mark:]
            raise

    async def commit(self) -> None:
        await self._commit()
        callbacks, self._after_commit = self._after_commit, []
        for callback in callbacks:
            callback()

    async def rollback(self) -> None:
        self._after_commit.clear()
        await self._rollback()

    @abstractmethod
    def _savepoint(self, key: str | None) -> contextlib.AbstractAsyncContextManager[None]: ...

    @abstractmethod
    async def _commit(self) -> None: ...

    @abstractmethod
    async def _rollback(self) -> None: ...


class Store(ABC):
    """Outbox, inbox and dead-letter storage. One subclass per storage technology."""

    async def create_tables(self) -> None:
        """Create the tables if they do not exist; the default has none to create."""

    async def create_tables_of(self, metadata: MetaData) -> None:
        """Create `metadata`'s tables (a saga's) that do not exist yet; only a SQL store can."""
        from eventrelay.errors import UnitOfWorkError

        raise UnitOfWorkError(f"{type(self).__name__} has no database to create tables in: pass database=")

    async def close(self) -> None:
        """Release connections; the default holds none."""

    @abstractmethod
    def begin(self) -> Transaction:
        """Start a transaction."""

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        """`async with store.transaction() as tx:` commits at the end of the block, rolls back on an error."""
        tx = self.begin()
        try:
            yield tx
        except BaseException:
            await tx.rollback()
            raise
        await tx.commit()

    # --- inside a transaction -----------------------------------------------------------------------

    @abstractmethod
    async def add_outbox(self, tx: Transaction, messages: Sequence[Message], available_at: datetime) -> None:
        """Write messages to the outbox, due at `available_at`."""

    @abstractmethod
    async def claim_outbox(
        self, tx: Transaction, limit: int, now: datetime, lease_until: datetime | None = None
    ) -> list[OutboxRecord]:
        """Lock and return up to `limit` due rows in `seq` order, skipping rows another relay holds.

        A relay holds a row while its claiming transaction is open and, when the claim gave `lease_until`,
        after its commit while `now < lease_until` (until the row is released, deleted or deferred): at
        `lease_until` the lease has run out, as a row is due at its `available_at`.
        """

    @abstractmethod
    async def release_outbox(self, tx: Transaction, seqs: Sequence[int], lease_until: datetime) -> None:
        """End the lease of rows claimed with `lease_until` (not a newer lease: another relay's)."""

    @abstractmethod
    async def delete_outbox(self, tx: Transaction, seqs: Sequence[int]) -> None:
        """Delete sent rows."""

    @abstractmethod
    async def defer_outbox(self, tx: Transaction, seq: int, until: datetime, error: str) -> None:
        """Count a failed send of one row and make it due again at `until` (ending its lease)."""

    @abstractmethod
    async def claim_inbox(self, tx: Transaction, subscriber: str, handler: str, message_id: str) -> bool:
        """Record that `handler` of `subscriber` took `message_id`; False if it already had (a duplicate).

        A concurrent claim of the same key waits for the first transaction to end.
        """

    @abstractmethod
    async def unclaim_inbox(self, tx: Transaction, subscriber: str, handler: str, message_id: str) -> None:
        """Undo a claim `tx` made: the message is to be handled again (its handler failed, to retry)."""

    async def claim_inbox_many(
        self, tx: Transaction, subscriber: str, claims: Sequence[tuple[str, str]]
    ) -> list[bool]:
        """`claim_inbox` for each `(handler, message_id)` in order; a key repeated in `claims` is a duplicate.

        The default claims one by one; a store may do it in one statement.
        """
        return [await self.claim_inbox(tx, subscriber, handler, message_id) for handler, message_id in claims]

    @abstractmethod
    async def add_dead_letter(self, tx: Transaction, letter: NewDeadLetter) -> None:
        """Store a dead letter."""

    @abstractmethod
    async def remove_dead_letter(self, tx: Transaction, letter_id: int) -> None:
        """Delete a dead letter."""

    # --- on their own --------------------------------------------------------------------------------

    @abstractmethod
    async def next_outbox_due(self) -> datetime | None:
        """When the earliest outbox row is due, or None if the outbox is empty."""

    @abstractmethod
    async def outbox_backlog(self) -> tuple[int, datetime | None]:
        """How many rows wait in the outbox, and when the oldest was written."""

    @abstractmethod
    async def dead_letters(self, subscriber: str | None = None, limit: int = 100) -> list[DeadLetter]:
        """Dead letters, oldest first, optionally of one subscriber."""

    @abstractmethod
    async def count_dead_letters(self, subscriber: str | None = None, since: datetime | None = None) -> int:
        """How many dead letters (of `subscriber`, stored at or after `since`): counted, none loaded."""

    @abstractmethod
    async def dead_letter(self, letter_id: int) -> DeadLetter | None:
        """One dead letter by id."""

    @abstractmethod
    async def purge_inbox(self, before: datetime) -> int:
        """Delete inbox records received before `before`; return how many went."""

    async def inbox_count(self, subscriber: str, since: datetime | None = None) -> int:
        """Inbox records of `subscriber` (received at or after `since`, when given): what it has handled."""
        raise NotImplementedError(f"{type(self).__name__} cannot count its inbox records")
