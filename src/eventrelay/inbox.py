"""The receiving side of a service in its store: inbox claims (what deduplicates), dead letters (written
bounded, logged and counted, listed, discarded) and the purge of old inbox records."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import replace
from datetime import timedelta

from eventrelay.envelope import Message, printable
from eventrelay.errors import ConfigurationError
from eventrelay.metrics import MetricsHooks
from eventrelay.stores.base import (
    DEAD_LETTER_BODY_MAX,
    TRUNCATED_FROM,
    DeadLetter,
    NewDeadLetter,
    Store,
    Transaction,
    utcnow,
)

logger = logging.getLogger(__name__)


class Inbox:
    """One service's inbox records and dead letters in `store`."""

    def __init__(self, store: Store, service: str, metrics: MetricsHooks, max_message_bytes: int) -> None:
        self.store = store
        self.service = service
        self.metrics = metrics
        self.max_message_bytes = max_message_bytes

    # --- claims --------------------------------------------------------------------------------------

    async def claim(self, tx: Transaction, handler: str, message_id: str) -> bool:
        """Record in `tx` that `handler` takes the message; False when it did already (a duplicate)."""
        return await self.store.claim_inbox(tx, self.service, handler, message_id)

    async def claim_many(self, tx: Transaction, claims: Sequence[tuple[str, str]]) -> list[bool]:
        """`claim` for each (handler, message id), in one round trip where the store can."""
        return await self.store.claim_inbox_many(tx, self.service, claims)

    async def unclaim(self, tx: Transaction, handler: str, message_id: str) -> None:
        """Take back a claim made in `tx` (the handler did not run, or will run again)."""
        await self.store.unclaim_inbox(tx, self.service, handler, message_id)

    # --- dead letters --------------------------------------------------------------------------------

    async def dead_letter(
        self, handler: str | None, message: Message, attempts: int, reason: str, error: str | None = None
    ) -> None:
        """Store a dead letter in a transaction of its own; for a handler, also claim the message for it so it
        is not run again (a letter it has already is not written twice)."""
        async with self.store.transaction() as tx:
            if handler is not None and not await self.claim(tx, handler, message.id):
                return
            reason = await self.add_dead_letter(tx, handler, message, attempts, reason, error)
        self.dead_lettered(handler, message, reason)

    async def add_dead_letter(
        self,
        tx: Transaction,
        handler: str | None,
        message: Message,
        attempts: int,
        reason: str,
        error: str | None = None,
    ) -> str:
        """Write a dead letter in `tx`; return its reason as stored (`dead_lettered` once `tx` committed)."""
        kept, reason = self._bounded(message, reason)
        await self.store.add_dead_letter(
            tx, NewDeadLetter(self.service, handler, kept, attempts, reason, error)
        )
        return reason

    def dead_lettered(self, handler: str | None, message: Message, reason: str) -> None:
        """Count and log a dead letter that was written."""
        self.metrics.dead_lettered(handler, message)
        # Each from the message (the reason quotes its fields): escaped, so none can forge a log line.
        where = handler or self.service
        shown = printable(message.id), printable(message.name), printable(reason)
        logger.error("Dead letter: %s (%s) for %s: %s", shown[0], shown[1], where, shown[2])

    def _bounded(self, message: Message, reason: str) -> tuple[Message, str]:
        """What a dead letter keeps of `message`, and its reason: of a body over both the size limit and
        DEAD_LETTER_BODY_MAX, its start and its size (in the TRUNCATED_FROM header) only, so a flood of huge
        messages cannot fill the store. A smaller one stays whole: replayable once the limit is raised."""
        headers = message.headers
        if TRUNCATED_FROM in headers:  # ours to set: one a publisher sent would block its letter's replay
            headers = {k: v for k, v in headers.items() if k != TRUNCATED_FROM}
        if len(message.body) <= max(self.max_message_bytes, DEAD_LETTER_BODY_MAX):
            return (message if headers is message.headers else replace(message, headers=headers)), reason
        headers = {**headers, TRUNCATED_FROM: str(len(message.body))}
        kept = replace(message, body=message.body[:DEAD_LETTER_BODY_MAX], headers=headers)
        return kept, f"{reason}; the dead letter keeps its first {DEAD_LETTER_BODY_MAX} bytes"

    async def letters(self, limit: int = 100) -> list[DeadLetter]:
        """This service's dead letters, oldest first."""
        return await self.store.dead_letters(self.service, limit)

    async def letter(self, letter_id: int) -> DeadLetter:
        """This service's dead letter `letter_id`; `ConfigurationError` when it has none of that id."""
        letter = await self.store.dead_letter(letter_id)
        if letter is None or letter.subscriber != self.service:
            raise ConfigurationError(f"No dead letter {letter_id} in service {self.service!r}")
        return letter

    async def discard(self, letter_id: int) -> None:
        """Delete one of this service's dead letters without handling it."""
        await self.letter(letter_id)
        async with self.store.transaction() as tx:
            await self.remove_letter(tx, letter_id)

    async def remove_letter(self, tx: Transaction, letter_id: int) -> None:
        """Delete a dead letter in `tx` (discarded, or replayed in the handlers' transaction)."""
        await self.store.remove_dead_letter(tx, letter_id)

    # --- cleanup -------------------------------------------------------------------------------------

    async def purge_forever(self, retention: timedelta, interval: timedelta) -> None:
        """Every `interval`, delete inbox records older than `retention` (duplicates come within hours, not
        weeks); until cancelled."""
        while True:
            try:
                removed = await self.store.purge_inbox(utcnow() - retention)
                if removed:
                    logger.info("Removed %d inbox record(s) older than %s", removed, retention)
            except Exception:
                logger.exception("Inbox cleanup failed; it runs again later")
            await asyncio.sleep(interval.total_seconds())
