"""The way out of a service: `Outbox` makes messages from events and writes them to the outbox table in the
caller's transaction (or sends them past it); `Relay` sends the outbox's rows to the broker in order and in
batches, deleting each once it was accepted."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, Protocol

from eventrelay.brokers.base import Broker, reconnect_pause
from eventrelay.codec import check_headers, encode_body
from eventrelay.envelope import (
    CAUSATION_ID,
    COMMITTED_AT,
    CORRELATION_ID,
    REQUEST_HEADERS,
    RESERVED_HEADERS,
    TENANT_ID,
    VERSION,
    Message,
    new_message_id,
    printable,
)
from eventrelay.errors import BrokerUnavailable, ConfigurationError, PublishFailed, StoreError
from eventrelay.events import DynamicEvent, Event, event_name, validate_event_name
from eventrelay.handlers import current_context
from eventrelay.json_style import JsonStyle
from eventrelay.metrics import MetricsHooks, NoMetrics, committed_stamp
from eventrelay.stores.base import OutboxRecord, Store, Transaction, utcnow
from eventrelay.tenant_scope import current_tenant
from eventrelay.tracing import Tracing

logger = logging.getLogger(__name__)

MAX_DEFERRAL = 300.0  # seconds: the longest a row the broker refused waits before it is sent again


class Relay:
    """Moves the outbox to the broker. Wakes at once on `wake()` (after a local commit); polls as a fallback.

    A batch is claimed with a lease in one short transaction and published outside any transaction; its rows
    are deleted in the transaction that claims the next batch (or in one of their own when no rows wait): no
    lock is held while the broker confirms, so a hung broker does not hold up the service's units of work
    (on SQLite the lock is the whole database's). A claim skips leased
    rows and a publish is given up when its lease runs out, so two relays never send a row at the same time.
    A relay that dies leaves its rows to be sent again once their lease ran out (the inbox drops the
    duplicates). A row the broker refuses is deferred with backoff, and the rows behind it go on.
    """

    def __init__(
        self,
        store: Store,
        broker: Broker,
        *,
        batch_size: int = 100,
        poll_interval: float = 1.0,
        lease: float = 10.0,
        tracing: Tracing | None = None,
        metrics: MetricsHooks | None = None,
    ) -> None:
        self.store = store
        self.broker = broker
        self.tracing = tracing or Tracing("relay", Tracing.system_of(broker))
        self.metrics = metrics or NoMetrics()
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.lease = lease
        self._wakeup = asyncio.Event()
        self._stopping = False
        self.sent = 0  # rows sent and deleted
        # The outcome of the last batch, settled in the next transaction: the seqs sent, the rows refused.
        self._done: tuple[list[int], list[tuple[OutboxRecord, str]]] = ([], [])

    def wake(self) -> None:
        """Ask the relay to look at the outbox now."""
        self._wakeup.set()

    def stop(self) -> None:
        """Let `run()` finish the batch it is sending, send what the outbox holds, and return."""
        self._stopping = True
        self._wakeup.set()

    async def run(self) -> None:
        """Relay until cancelled, or until `stop()` and the outbox is drained."""
        self._stopping = False
        failures = 0
        while True:
            self._wakeup.clear()
            try:
                while (claimed := await self.run_once()) == self.batch_size:
                    pass
                if not self._wakeup.is_set():  # no commit came meanwhile: settle now, not with the next
                    async with self.store.transaction() as tx:
                        await self._settle(tx)
                failures = 0
            except Exception as exc:
                failures += 1
                pause = reconnect_pause(failures)
                if isinstance(exc, BrokerUnavailable | StoreError):  # said what failed: no traceback
                    logger.warning("Relay pauses %.1fs: %s", pause, exc)
                else:
                    logger.exception("Relay failed, it tries again in %.1fs", pause)
                if self._stopping:
                    logger.warning("Relay stopped with rows in the outbox: they are sent at the next start")
                    return
                await asyncio.sleep(pause)
                continue
            if self._stopping:
                if not claimed:  # drained, the rows committed since the stop included
                    return
                continue
            if not self._wakeup.is_set():  # else a commit came while sending: look again at once
                await self._sleep()

    async def run_once(self) -> int:
        """Settle the last batch and claim the next in one transaction, then send it; return how many rows
        were claimed."""
        deadline = asyncio.get_running_loop().time() + self.lease
        now = utcnow()
        lease_until = now + timedelta(seconds=self.lease)
        async with self.store.transaction() as tx:
            await self._settle(tx)
            rows = await self.store.claim_outbox(tx, self.batch_size, now, lease_until)
        if not rows:
            return 0
        try:
            async with asyncio.timeout_at(deadline):
                self._done = await self._send(rows)
        except BaseException as exc:
            with contextlib.suppress(Exception):  # else they wait until the lease runs out
                async with self.store.transaction() as tx:
                    await self.store.release_outbox(tx, [row.seq for row in rows], lease_until)
            if isinstance(exc, TimeoutError):
                raise BrokerUnavailable(f"The broker did not confirm within the {self.lease}s lease") from exc
            raise
        return len(rows)

    async def _settle(self, tx: Transaction) -> None:
        """Delete the rows the last batch sent and defer those the broker refused; forgotten once `tx`
        commits (a rollback leaves them for the next transaction)."""
        sent, refused = self._done
        await self.store.delete_outbox(tx, sent)
        for row, error in refused:
            delay = min(MAX_DEFERRAL, 2.0 ** min(row.attempts + 1, 16))
            await self.store.defer_outbox(tx, row.seq, utcnow() + timedelta(seconds=delay), error)
        if sent or refused:
            tx.after_commit(lambda: self._forget(sent))

    def _forget(self, sent: list[int]) -> None:
        if self._done[0] is sent:
            self._done = ([], [])
            self.sent += len(sent)

    async def _send(self, rows: list[OutboxRecord]) -> tuple[list[int], list[tuple[OutboxRecord, str]]]:
        """Publish `rows`; return the seqs sent and the rows the broker refused, with why."""
        try:
            await self._publish([row.message for row in rows])
            return [row.seq for row in rows], []
        except PublishFailed as exc:
            if exc.refused is None:
                logger.warning("Broker refused a batch of %d, sending one by one: %s", len(rows), exc)
                return await self._send_one_by_one(rows)
            refused = {position: (rows[position], why) for position, why in exc.refused.items()}
        for row, why in refused.values():
            self._refused(row, why)
        accepted = [row for position, row in enumerate(rows) if position not in refused]
        self.metrics.relayed([row.message for row in accepted])
        return [row.seq for row in accepted], list(refused.values())

    async def _send_one_by_one(
        self, rows: list[OutboxRecord]
    ) -> tuple[list[int], list[tuple[OutboxRecord, str]]]:
        """Find the rows the broker refuses (it did not say which); the others go on."""
        sent, refused = [], []
        for row in rows:
            try:
                await self._publish([row.message])
                sent.append(row.seq)
            except PublishFailed as exc:
                self._refused(row, str(exc))
                refused.append((row, str(exc)))
        return sent, refused

    @staticmethod
    def _refused(row: OutboxRecord, why: str) -> None:
        message = row.message
        logger.error(
            "Broker refused outbox message %s (%s): %s",
            printable(message.id),
            printable(message.name),
            printable(why),
        )

    async def _publish(self, messages: Sequence[Message]) -> None:
        with self.tracing.send(messages):
            await self.broker.publish(messages)
        self.metrics.relayed(messages)

    async def _sleep(self) -> None:
        timeout = self.poll_interval
        due = await self.store.next_outbox_due()
        if due is not None:
            # Not below 50 ms: due rows that another relay holds must not make this one spin.
            timeout = min(timeout, max(0.05, (due - utcnow()).total_seconds()))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wakeup.wait(), timeout)


class Wakes(Protocol):
    """What an outbox wakes after a commit: a `Relay`, or the relays of a database per tenant."""

    def wake(self) -> None: ...


class Outbox:
    """Makes a service's messages and sends them on their way: into the outbox table, in the caller's
    transaction (the relay is woken once it commits), or straight to the broker."""

    def __init__(
        self,
        store: Store,
        broker: Broker,
        relay: Wakes,
        *,
        json_style: JsonStyle,
        tracing: Tracing,
        metrics: MetricsHooks,
    ) -> None:
        self.store = store
        self.broker = broker
        self.relay = relay
        self.json_style = json_style
        self.tracing = tracing
        self.metrics = metrics

    def message(
        self,
        event: Event | str,
        data: Mapping[str, Any] | None = None,
        *,
        headers: Mapping[str, str] | None = None,
        key: str | None = None,
        correlation_id: str | None = None,
        tenant_id: str | None = None,
    ) -> Message:
        """The message of an event (or of a name and a dict payload), stamped with correlation, causation
        and tenant from the handler running in this task, if any (the tenant in scope, `bus.tenant`, before
        the handler's); `ConfigurationError` for bad arguments."""
        if isinstance(event, Event):
            if data is not None:
                raise ConfigurationError("Pass data only with an event name: publish('Name', {...})")
            name, body = event_name(event), encode_body(event, self.json_style)
            version = event.__event_version__
        elif isinstance(event, str):
            name = validate_event_name(event)
            body = encode_body(DynamicEvent(name, dict(data or {})))
            version = 1
        else:
            raise ConfigurationError(f"publish takes an Event or an event name, not {type(event).__name__}")
        if key is not None and (not isinstance(key, str) or len(key) > 256):
            raise ConfigurationError(f"key must be a string of at most 256 characters: {key!r}")
        all_headers = check_headers(headers) if headers else {}
        if all_headers:
            if reserved := RESERVED_HEADERS & all_headers.keys():
                raise ConfigurationError(
                    f"Set {sorted(reserved)} with correlation_id= / tenant_id=, not headers="
                )
            if taken := REQUEST_HEADERS & all_headers.keys():
                raise ConfigurationError(
                    f"{sorted(taken)} are set by bus.request and its reply, not headers="
                )
            if VERSION in all_headers:
                raise ConfigurationError(f"{VERSION} is set from the event class's version=, not headers=")
        if version > 1:  # version 1 goes without, as before versions (and as ABP sends)
            all_headers[VERSION] = str(version)
        message_id = new_message_id()
        parent = current_context.get()
        correlation = correlation_id or (parent.correlation_id if parent else None) or message_id
        all_headers[CORRELATION_ID] = correlation
        if parent is not None:
            all_headers[CAUSATION_ID] = parent.message_id
        tenant = tenant_id or current_tenant() or (parent.tenant_id if parent else None)
        if tenant is not None:
            all_headers[TENANT_ID] = tenant
        return self.tracing.created(Message(message_id, name, body, all_headers, key))

    async def write(self, tx: Transaction, messages: Sequence[Message], due: datetime) -> None:
        """Write `messages` to the outbox in `tx`, due at `due`; the relay looks once `tx` commits."""
        stamp = committed_stamp()
        messages = [dataclasses.replace(m, headers={**m.headers, COMMITTED_AT: stamp}) for m in messages]
        with self.tracing.outbox_write(messages):
            await self.store.add_outbox(tx, messages, due)
        self.metrics.published(messages)
        tx.after_commit(self.relay.wake)

    async def send(self, messages: Sequence[Message]) -> None:
        """Send `messages` to the broker now, past the outbox."""
        with self.tracing.send(messages):
            await self.broker.publish(messages)
        self.metrics.published(messages)
