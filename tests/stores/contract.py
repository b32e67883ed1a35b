"""The store contract: what every `Store` promises, specified once and inherited by one class per adapter.

A subclass provides the `store` fixture (a started store with its tables created, closed afterwards) and says
how its outbox claims behave while another relay holds rows (`concurrent_claims`):

- ``"skip_locked"``: the second relay gets the rows nobody holds, at once (PostgreSQL, MariaDB);
- ``"serialised"``: the second relay waits until the first transaction ends (SQLite's write lock, memory).

Either way two relays never hold one row at once, and that is what every adapter is tested for.
Every wait is bounded, so a hang fails the test instead of blocking the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import datetime, timedelta
from types import TracebackType
from typing import ClassVar, Generic, Literal, TypeVar

import pytest
from sqlalchemy import event

from eventrelay.envelope import CAUSATION_ID, CORRELATION_ID, TENANT_ID, TRACEPARENT, Message, new_message_id
from eventrelay.stores.base import DeadLetter, NewDeadLetter, OutboxRecord, Store, Transaction, utcnow
from eventrelay.stores.memory import MemoryStore
from eventrelay.stores.sqlalchemy import SqlStore

T = TypeVar("T")
S = TypeVar("S", bound=Store)

# The upper bound of any wait that should end: generous, only there so that a hang fails.
PATIENCE = 15.0


@contextlib.asynccontextmanager
async def started(store: S) -> AsyncIterator[S]:
    """`store` with its tables created, closed at the end: what a subclass's `store` fixture yields."""
    try:
        await store.create_tables()
        yield store
    finally:
        await store.close()


@contextlib.asynccontextmanager
async def transaction(store: Store, *, commit: bool = True) -> AsyncIterator[Transaction]:
    """A transaction committed (or rolled back, with `commit=False`) at the end; rolled back on an error."""
    tx = store.begin()
    try:
        yield tx
    except BaseException:
        await tx.rollback()
        raise
    if commit:
        await tx.commit()
    else:
        await tx.rollback()


class Held(Generic[T]):
    """Another relay or consumer: `work` runs in a transaction of its own task, which then stays open until
    the test calls `end` (or leaves the `async with`, which rolls it back)."""

    def __init__(self, store: Store, work: Callable[[Transaction], Awaitable[T]]) -> None:
        self.store = store
        self.work = work
        self.tx = store.begin()
        loop = asyncio.get_running_loop()
        self.result: asyncio.Future[T] = loop.create_future()
        self._commit: asyncio.Future[bool] = loop.create_future()
        self._task: asyncio.Task[None] | None = None
        self._statement: str | None = None  # SQLite: the statement `work` is executing, if any

    async def __aenter__(self) -> Held[T]:
        if _sqlite(self.store):
            self._watch_statements(True)
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            await self._end_task(exc)
        finally:
            if _sqlite(self.store):
                self._watch_statements(False)

    async def _end_task(self, exc: BaseException | None) -> None:
        assert self._task is not None
        if not self._commit.done():
            self._commit.set_result(False)
        done, _ = await asyncio.wait({self._task}, timeout=PATIENCE)
        if not done:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.result.done() and not self.result.cancelled():
            self.result.exception()  # retrieved, so that asyncio does not log it a second time
        if exc is None:
            assert done, "the held transaction did not end"
            self._task.result()

    async def _run(self) -> None:
        ended = False
        try:
            try:
                value = await self.work(self.tx)
            except asyncio.CancelledError:
                self.result.cancel()
                raise
            except BaseException as exc:
                self.result.set_exception(exc)
                raise
            self.result.set_result(value)
            if await self._commit:
                await self.tx.commit()
                ended = True
        finally:
            if not ended:
                await self.tx.rollback()

    async def value(self) -> T:
        """What `work` returned, waiting for it (boundedly)."""
        async with asyncio.timeout(PATIENCE):
            return await asyncio.shield(self.result)

    async def blocked(self) -> bool:
        """Whether `work` is blocked by another transaction: True as soon as the store shows it waiting for a
        lock, False once it has finished. No time window decides, so a slow machine only makes it slower."""
        try:
            async with asyncio.timeout(PATIENCE):
                while not self.result.done():
                    if await self._waits_for_a_lock():
                        return True
                    await asyncio.sleep(0.01)
        except TimeoutError:
            raise AssertionError(f"neither finished nor waiting for a lock after {PATIENCE}s") from None
        return False

    async def _waits_for_a_lock(self) -> bool:
        """Whether `work` waits for a lock, as the store itself shows it. On a server, each test has a
        database of its own and the holding transaction is idle: a lock wait in that database is `work`'s."""
        store, task = self.store, self._task
        assert task is not None
        if isinstance(store, MemoryStore):  # suspended in asyncio's Lock.acquire or Event.wait
            innermost: object = task.get_coro()
            while hasattr(awaited := getattr(innermost, "cr_await", None), "cr_code"):
                innermost = awaited
            return getattr(innermost, "cr_code", None) in (
                asyncio.Lock.acquire.__code__,
                asyncio.Event.wait.__code__,
            )
        assert isinstance(store, SqlStore), f"no way to see a lock wait in {type(store).__name__}"
        if _sqlite(store):
            # BEGIN IMMEDIATE takes the write lock, which the other transaction holds (it wrote or claimed):
            # once that statement is under way, `work` cannot go on until the other transaction ends.
            return self._statement is not None and self._statement.startswith("BEGIN IMMEDIATE")
        async with store.engine.connect() as conn:  # a transaction of its own: a fresh view of the server
            if store.engine.dialect.name == "postgresql":
                query = (
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
                return bool((await conn.exec_driver_sql(query)).scalar_one())
            # MariaDB: information_schema.INNODB_TRX is a cache, not refreshed while it is read more often
            # than every 0.1 s, so it can show a lock wait late; InnoDB's status report is made on demand.
            status = str((await conn.exec_driver_sql("SHOW ENGINE INNODB STATUS")).mappings().one()["Status"])
        waiting = [
            block.partition("FOR THIS LOCK TO BE GRANTED:")[2]
            for block in status.split("---TRANSACTION ")
            if "LOCK WAIT" in block
        ]
        return any(f"of table `{store.engine.url.database}`." in lock for lock in waiting)

    def _watch_statements(self, on: bool) -> None:
        """Follow the statements `work` executes on SQLite, which shows no lock waits of its own."""
        assert isinstance(self.store, SqlStore)
        engine = self.store.engine.sync_engine
        change = event.listen if on else event.remove
        change(engine, "before_cursor_execute", self._before)
        change(engine, "after_cursor_execute", self._after)
        change(engine, "handle_error", self._failed)

    def _before(self, conn: object, cursor: object, statement: str, *args: object) -> None:
        if asyncio.current_task() is self._task:
            self._statement = statement

    def _after(self, *args: object) -> None:
        if asyncio.current_task() is self._task:
            self._statement = None

    def _failed(self, context: object) -> None:
        if asyncio.current_task() is self._task:
            self._statement = None

    async def end(self, *, commit: bool) -> None:
        """Commit or roll back the transaction and wait until it has ended."""
        assert self._task is not None
        self._commit.set_result(commit)
        async with asyncio.timeout(PATIENCE):
            await asyncio.shield(self._task)


def _sqlite(store: Store) -> bool:
    return isinstance(store, SqlStore) and store.engine.dialect.name == "sqlite"


def message(name: str = "orders.order_placed", body: bytes = b'{"order_id": 1}', **headers: str) -> Message:
    return Message(new_message_id(), name, body, headers)


class StoreContract:
    """Behaviour every store adapter inherits. Subclasses provide `store` and `concurrent_claims`."""

    concurrent_claims: ClassVar[Literal["skip_locked", "serialised"]]

    @pytest.fixture
    def store(self) -> Store:
        raise NotImplementedError("a store contract subclass provides the `store` fixture")

    # --- helpers ------------------------------------------------------------------------------------

    @staticmethod
    async def write(store: Store, messages: Sequence[Message], available_at: datetime | None = None) -> None:
        async with transaction(store) as tx:
            await store.add_outbox(tx, messages, utcnow() if available_at is None else available_at)

    @staticmethod
    async def peek(store: Store, now: datetime | None = None, limit: int = 1000) -> list[OutboxRecord]:
        """Claim due rows and let them go again (roll back)."""
        async with transaction(store, commit=False) as tx:
            return await store.claim_outbox(tx, limit, utcnow() if now is None else now)

    @staticmethod
    def relay(store: Store, limit: int = 1000) -> Held[list[OutboxRecord]]:
        async def work(tx: Transaction) -> list[OutboxRecord]:
            return await store.claim_outbox(tx, limit, utcnow())

        return Held(store, work)

    @staticmethod
    def inbox_claim(store: Store, subscriber: str, handler: str, message_id: str) -> Held[bool]:
        async def work(tx: Transaction) -> bool:
            return await store.claim_inbox(tx, subscriber, handler, message_id)

        return Held(store, work)

    @staticmethod
    async def claim_inbox(store: Store, subscriber: str, handler: str, message_id: str) -> bool:
        async with transaction(store) as tx:
            return await store.claim_inbox(tx, subscriber, handler, message_id)

    @staticmethod
    async def add_dead_letter(store: Store, letter: NewDeadLetter) -> DeadLetter:
        """Add a dead letter and return it as stored (the newest one of its subscriber)."""
        async with transaction(store) as tx:
            await store.add_dead_letter(tx, letter)
        letters = await store.dead_letters(letter.subscriber, limit=10_000)
        assert letters, "the dead letter was not stored"
        assert letters[-1].message.id == letter.message.id
        return letters[-1]

    # --- outbox: transactions -----------------------------------------------------------------------

    async def test_committed_rows_are_claimed_in_write_order(self, store: Store) -> None:
        now = utcnow()
        first = [message(body=f'{{"n": {n}}}'.encode()) for n in range(50)]
        second = [message("orders.order_shipped")]
        await self.write(store, first, now)
        await self.write(store, second, now)

        records = await self.peek(store, now)

        assert [r.message for r in records] == first + second
        seqs = [r.seq for r in records]
        assert seqs == sorted(seqs)
        assert len(set(seqs)) == len(seqs)
        assert all(r.available_at == now and r.attempts == 0 and r.last_error is None for r in records)

    async def test_uncommitted_rows_are_invisible_until_commit(self, store: Store) -> None:
        messages = [message(), message()]

        async def add(tx: Transaction) -> None:
            await store.add_outbox(tx, messages, utcnow())

        async with Held(store, add) as writer:
            await writer.value()
            assert await store.outbox_backlog() == (0, None)
            assert await store.next_outbox_due() is None
            async with self.relay(store) as relay:
                # A relay sees nothing now; on SQLite it waits for the writer's lock instead.
                if not await relay.blocked():
                    assert await relay.value() == []
                await writer.end(commit=True)
                seen = await relay.value()
                assert [r.message for r in seen] in ([], messages)

        assert [r.message for r in await self.peek(store)] == messages

    async def test_rolled_back_rows_never_existed(self, store: Store) -> None:
        async with transaction(store, commit=False) as tx:
            await store.add_outbox(tx, [message(), message()], utcnow())

        assert await self.peek(store) == []
        assert await store.outbox_backlog() == (0, None)
        assert await store.next_outbox_due() is None

    async def test_an_error_in_the_transaction_discards_its_rows(self, store: Store) -> None:
        kept = message()
        await self.write(store, [kept])

        async def publish_then_fail() -> None:
            async with transaction(store) as tx:
                await store.add_outbox(tx, [message()], utcnow())
                raise RuntimeError("business rule failed")

        with pytest.raises(RuntimeError, match="business rule failed"):
            await publish_then_fail()

        assert [r.message for r in await self.peek(store)] == [kept]

    # --- outbox: claim, delete, defer ---------------------------------------------------------------

    async def test_claim_returns_at_most_limit_rows_first_written_first(self, store: Store) -> None:
        messages = [message() for _ in range(5)]
        await self.write(store, messages)

        async with transaction(store, commit=False) as tx:
            records = await store.claim_outbox(tx, 2, utcnow())

        assert [r.message for r in records] == messages[:2]

    async def test_claim_leaves_rows_that_are_not_due_yet(self, store: Store) -> None:
        now = utcnow()
        later, due = message(), message()
        await self.write(store, [later], now + timedelta(hours=1))
        await self.write(store, [due], now)

        assert [r.message for r in await self.peek(store, now)] == [due]
        assert [r.message for r in await self.peek(store, now + timedelta(minutes=59))] == [due]
        # Due at its time exactly, and then in write order.
        assert [r.message for r in await self.peek(store, now + timedelta(hours=1))] == [later, due]

    async def test_deleted_rows_are_gone(self, store: Store) -> None:
        messages = [message() for _ in range(4)]
        await self.write(store, messages)

        async with transaction(store) as tx:
            records = await store.claim_outbox(tx, 2, utcnow())
            await store.delete_outbox(tx, [r.seq for r in records])

        assert [r.message for r in await self.peek(store)] == messages[2:]
        assert (await store.outbox_backlog())[0] == 2

    async def test_a_delete_rolled_back_keeps_the_rows(self, store: Store) -> None:
        messages = [message() for _ in range(3)]
        await self.write(store, messages)

        async with transaction(store, commit=False) as tx:
            records = await store.claim_outbox(tx, 10, utcnow())
            await store.delete_outbox(tx, [r.seq for r in records])

        assert [r.message for r in await self.peek(store)] == messages

    async def test_deferred_row_waits_and_the_rows_behind_it_go_first(self, store: Store) -> None:
        now = utcnow()
        messages = [message() for _ in range(3)]
        await self.write(store, messages, now)
        until = now + timedelta(minutes=1)

        async with transaction(store) as tx:
            [first] = await store.claim_outbox(tx, 1, now)
            await store.defer_outbox(tx, first.seq, until, "broker refused: too large")

        assert [r.message for r in await self.peek(store, now + timedelta(seconds=59))] == messages[1:]
        again = await self.peek(store, until)
        assert [r.message for r in again] == messages
        deferred = again[0]
        assert deferred.seq == first.seq
        assert deferred.attempts == 1
        assert deferred.last_error == "broker refused: too large"
        assert deferred.available_at == until
        assert await store.next_outbox_due() == now

        async with transaction(store) as tx:
            await store.defer_outbox(tx, first.seq, until + timedelta(minutes=1), "refused again: ünïcode ☃")
        async with transaction(store, commit=False) as tx:
            await store.defer_outbox(tx, first.seq, until, "rolled back")

        [deferred] = [r for r in await self.peek(store, until + timedelta(minutes=1)) if r.seq == first.seq]
        assert deferred.attempts == 2
        assert deferred.last_error == "refused again: ünïcode ☃"
        assert deferred.available_at == until + timedelta(minutes=1)

    async def test_messages_round_trip_exactly(self, store: Store) -> None:
        messages = [
            Message(new_message_id(), "orders.order_placed", b'{"order_id": 1}'),
            Message(new_message_id(), "orders.empty", b""),
            Message(
                new_message_id(),
                "commandes.créée.注文",
                "prix réduit ✓ 🎉 ".encode() + bytes(range(256)) + b"\x00\xff\x00",
                {
                    CORRELATION_ID: new_message_id(),
                    CAUSATION_ID: new_message_id(),
                    TENANT_ID: "Zürich ☃",
                    TRACEPARENT: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                    "x-quote": 'she said "hi" \\ \n\t',
                },
                key="client-Ünïcode-🔑",
            ),
            Message(
                new_message_id(),
                "blobs.uploaded",
                random.Random(7).randbytes(200 * 1024),
                {"content-type": "application/octet-stream"},
                key="k",
            ),
        ]
        await self.write(store, messages)

        records = await self.peek(store)

        assert [r.message for r in records] == messages
        for record, sent in zip(records, messages, strict=True):
            assert type(record.message.body) is bytes
            assert dict(record.message.headers) == dict(sent.headers)
            assert record.message.key == sent.key

    # --- outbox: several relays ---------------------------------------------------------------------

    async def test_two_relays_never_hold_the_same_row(self, store: Store) -> None:
        messages = [message() for _ in range(4)]
        await self.write(store, messages)

        async with self.relay(store, limit=2) as first:
            held = await first.value()
            assert [r.message for r in held] == messages[:2]
            async with self.relay(store) as second:
                if self.concurrent_claims == "skip_locked":
                    assert [r.message for r in await second.value()] == messages[2:]
                else:
                    assert await second.blocked(), "a second relay claimed while the first held rows"
                await store.delete_outbox(first.tx, [r.seq for r in held])
                await first.end(commit=True)
                assert [r.message for r in await second.value()] == messages[2:]

    async def test_a_relay_holding_every_row_leaves_none_to_another(self, store: Store) -> None:
        messages = [message() for _ in range(3)]
        await self.write(store, messages)

        async with self.relay(store) as first:
            assert [r.message for r in await first.value()] == messages
            async with self.relay(store) as second:
                if self.concurrent_claims == "skip_locked":
                    assert await second.value() == []
                else:
                    assert await second.blocked(), "a second relay claimed while the first held rows"
                await store.delete_outbox(first.tx, [r.seq for r in await first.value()])
                await first.end(commit=True)
                assert await second.value() == []

    async def test_rows_of_a_rolled_back_claim_can_be_claimed_again(self, store: Store) -> None:
        messages = [message() for _ in range(3)]
        await self.write(store, messages)

        async with self.relay(store) as first:
            assert [r.message for r in await first.value()] == messages
            async with self.relay(store) as second:
                if self.concurrent_claims == "skip_locked":
                    assert await second.value() == []  # claimed while the first relay held them
                    await first.end(commit=False)
                else:
                    assert await second.blocked(), "a second relay claimed while the first held rows"
                    await first.end(commit=False)
                    again = await second.value()
                    assert [r.message for r in again] == messages
                    assert all(r.attempts == 0 for r in again)

        assert [r.message for r in await self.peek(store)] == messages

    async def test_new_writes_go_on_while_a_relay_holds_rows(self, store: Store) -> None:
        held = [message() for _ in range(2)]
        await self.write(store, held)
        new = message()

        async def add(tx: Transaction) -> None:
            await store.add_outbox(tx, [new], utcnow())

        async with self.relay(store) as relay:
            assert [r.message for r in await relay.value()] == held
            async with Held(store, add) as writer:
                if self.concurrent_claims == "skip_locked":
                    # A business transaction publishing an event is not held up while the relay sends.
                    assert not await writer.blocked(), "a relay's claim blocked a write to the outbox"
                    await writer.end(commit=True)
                    await relay.end(commit=True)
                else:
                    await relay.end(commit=True)
                    await writer.value()
                    await writer.end(commit=True)

        assert [r.message for r in await self.peek(store)] == [*held, new]

    # --- outbox: leases -----------------------------------------------------------------------------

    async def test_a_leased_row_is_skipped_until_its_lease_runs_out(self, store: Store) -> None:
        now = utcnow()
        messages = [message() for _ in range(3)]
        await self.write(store, messages, now)
        until = now + timedelta(seconds=30)

        async with transaction(store) as tx:  # a relay that claims two rows, then dies
            leased = await store.claim_outbox(tx, 2, now, until)

        assert [r.message for r in leased] == messages[:2]
        assert [r.message for r in await self.peek(store, now)] == messages[2:]
        assert [r.message for r in await self.peek(store, until - timedelta(microseconds=1))] == messages[2:]
        assert [r.message for r in await self.peek(store, until)] == messages
        assert (await store.outbox_backlog())[0] == 3

    async def test_a_released_lease_frees_the_rows_but_not_a_newer_lease(self, store: Store) -> None:
        now = utcnow()
        messages = [message() for _ in range(2)]
        await self.write(store, messages, now)
        first, second = now + timedelta(seconds=1), now + timedelta(seconds=31)
        async with transaction(store) as tx:
            await store.claim_outbox(tx, 1, now, first)
        async with transaction(store) as tx:  # the first lease ran out: another relay took the row
            [taken] = await store.claim_outbox(tx, 1, first, second)
            assert taken.message == messages[0]

        async with transaction(store) as tx:
            await store.release_outbox(tx, [taken.seq], first)  # the late first relay lets go: no effect
        assert [r.message for r in await self.peek(store, first)] == messages[1:]
        async with transaction(store) as tx:
            await store.release_outbox(tx, [taken.seq], second)
        assert [r.message for r in await self.peek(store, first)] == messages

    async def test_a_lease_rolled_back_never_held_the_rows(self, store: Store) -> None:
        now = utcnow()
        messages = [message() for _ in range(2)]
        await self.write(store, messages, now)

        async with transaction(store, commit=False) as tx:
            await store.claim_outbox(tx, 10, now, now + timedelta(seconds=30))

        assert [r.message for r in await self.peek(store, now)] == messages

    async def test_a_deferred_row_loses_its_lease(self, store: Store) -> None:
        now = utcnow()
        await self.write(store, [message()], now)
        async with transaction(store) as tx:
            [row] = await store.claim_outbox(tx, 1, now, now + timedelta(hours=1))
        async with transaction(store) as tx:
            await store.defer_outbox(tx, row.seq, now + timedelta(seconds=1), "refused")

        [again] = await self.peek(store, now + timedelta(seconds=1))
        assert (again.seq, again.attempts) == (row.seq, 1)

    # --- outbox: reads on their own -----------------------------------------------------------------

    async def test_backlog_counts_rows_and_gives_when_the_oldest_was_written(self, store: Store) -> None:
        assert await store.outbox_backlog() == (0, None)

        before = utcnow()
        await self.write(store, [message(), message()], before + timedelta(hours=1))
        after = utcnow()
        await self.write(store, [message()], before - timedelta(hours=1))

        count, oldest = await store.outbox_backlog()
        assert count == 3
        assert oldest is not None
        assert before <= oldest <= after  # when written, not when due

        async with transaction(store) as tx:
            records = await store.claim_outbox(tx, 10, before + timedelta(hours=2))
            await store.delete_outbox(tx, [r.seq for r in records])
        assert await store.outbox_backlog() == (0, None)

    async def test_next_due_is_the_earliest_available_at(self, store: Store) -> None:
        now = utcnow()
        assert await store.next_outbox_due() is None

        await self.write(store, [message()], now + timedelta(minutes=10))
        assert await store.next_outbox_due() == now + timedelta(minutes=10)
        await self.write(store, [message()], now + timedelta(minutes=5))
        assert await store.next_outbox_due() == now + timedelta(minutes=5)
        await self.write(store, [message()], now - timedelta(minutes=1))
        assert await store.next_outbox_due() == now - timedelta(minutes=1)

        async with transaction(store) as tx:
            records = await store.claim_outbox(tx, 10, now + timedelta(hours=1))
            await store.delete_outbox(tx, [r.seq for r in records])
        assert await store.next_outbox_due() is None

    # --- inbox --------------------------------------------------------------------------------------

    async def test_inbox_claim_is_true_once_then_a_duplicate(self, store: Store) -> None:
        message_id = new_message_id()

        assert await self.claim_inbox(store, "order-service", "ApplyDiscount", message_id) is True
        assert await self.claim_inbox(store, "order-service", "ApplyDiscount", message_id) is False
        assert await self.claim_inbox(store, "order-service", "ApplyDiscount", message_id) is False

    async def test_a_second_inbox_claim_in_the_same_transaction_is_a_duplicate(self, store: Store) -> None:
        message_id = new_message_id()
        tx = store.begin()
        try:
            async with asyncio.timeout(10):  # a store that waits for itself would hang here
                assert await store.claim_inbox(tx, "order-service", "ApplyDiscount", message_id) is True
                assert await store.claim_inbox(tx, "order-service", "ApplyDiscount", message_id) is False
            await tx.commit()
        except BaseException:
            await tx.rollback()
            raise
        assert await self.claim_inbox(store, "order-service", "ApplyDiscount", message_id) is False

    async def test_inbox_keys_of_other_handlers_subscribers_and_messages_are_independent(
        self, store: Store
    ) -> None:
        message_id = new_message_id()
        assert await self.claim_inbox(store, "order-service", "ApplyDiscount", message_id) is True

        assert await self.claim_inbox(store, "order-service", "NotifyCustomer", message_id) is True
        assert await self.claim_inbox(store, "audit-service", "ApplyDiscount", message_id) is True
        assert await self.claim_inbox(store, "order-service", "ApplyDiscount", new_message_id()) is True
        assert await self.claim_inbox(store, "order-service", "NotifyCustomer", message_id) is False
        assert await self.claim_inbox(store, "audit-service", "ApplyDiscount", message_id) is False

    async def test_claim_inbox_many_is_claim_inbox_for_each_key_in_order(self, store: Store) -> None:
        old, new, again = new_message_id(), new_message_id(), new_message_id()
        assert await self.claim_inbox(store, "order-service", "ApplyDiscount", old) is True
        claims = [
            ("ApplyDiscount", new),
            ("ApplyDiscount", old),  # claimed before
            ("NotifyCustomer", new),
            ("ApplyDiscount", new),  # repeated in this call
            ("ApplyDiscount", again),
        ]

        async with transaction(store) as tx:
            assert await store.claim_inbox_many(tx, "order-service", claims) == [
                True,
                False,
                True,
                False,
                True,
            ]
            assert await store.claim_inbox_many(tx, "order-service", []) == []
        async with transaction(store, commit=False) as tx:
            assert await store.claim_inbox_many(tx, "order-service", claims[:3]) == [False, False, False]
            assert await store.claim_inbox_many(tx, "audit-service", claims[:2]) == [True, True]

        assert await self.claim_inbox(store, "audit-service", "ApplyDiscount", new) is True  # rolled back
        assert await self.claim_inbox(store, "order-service", "ApplyDiscount", again) is False

    async def test_a_rolled_back_inbox_claim_frees_the_key(self, store: Store) -> None:
        message_id = new_message_id()
        async with transaction(store, commit=False) as tx:
            assert await store.claim_inbox(tx, "order-service", "ApplyDiscount", message_id) is True

        assert await self.claim_inbox(store, "order-service", "ApplyDiscount", message_id) is True
        assert await self.claim_inbox(store, "order-service", "ApplyDiscount", message_id) is False

    @pytest.mark.parametrize("first_commits", [True, False], ids=["commit", "rollback"])
    async def test_a_concurrent_inbox_claim_waits_for_the_first_transaction(
        self, store: Store, first_commits: bool
    ) -> None:
        key = ("order-service", "ApplyDiscount", new_message_id())

        async with self.inbox_claim(store, *key) as first:
            assert await first.value() is True
            async with self.inbox_claim(store, *key) as second:
                assert await second.blocked(), "a second claim did not wait for the first transaction"
                await first.end(commit=first_commits)
                # A duplicate if the first committed; the second's to take if it rolled back.
                assert await second.value() is (not first_commits)
                await second.end(commit=True)

        assert await self.claim_inbox(store, *key) is False

    async def test_purge_removes_only_older_inbox_records(self, store: Store) -> None:
        old = [new_message_id() for _ in range(3)]
        new = [new_message_id() for _ in range(2)]
        for message_id in old:
            assert await self.claim_inbox(store, "order-service", "ApplyDiscount", message_id)
        await _tick()
        cut = utcnow()
        await _tick()
        for message_id in new:
            assert await self.claim_inbox(store, "order-service", "ApplyDiscount", message_id)

        assert await store.purge_inbox(cut) == 3
        assert await store.purge_inbox(cut) == 0

        for message_id in old:  # forgotten: would be taken again
            assert await self.claim_inbox(store, "order-service", "ApplyDiscount", message_id) is True
        for message_id in new:  # still remembered
            assert await self.claim_inbox(store, "order-service", "ApplyDiscount", message_id) is False

    async def test_inbox_count_counts_a_subscribers_records_since_a_time(self, store: Store) -> None:
        for message_id in (new_message_id(), new_message_id()):
            assert await self.claim_inbox(store, "order-service", "ApplyDiscount", message_id)
        await _tick()
        cut = utcnow()
        await _tick()
        assert await self.claim_inbox(store, "order-service", "NotifyBuyer", new_message_id())
        assert await self.claim_inbox(store, "other-service", "ApplyDiscount", new_message_id())

        assert await store.inbox_count("order-service") == 3
        assert await store.inbox_count("order-service", since=cut) == 1
        assert await store.inbox_count("nobody") == 0

    # --- dead letters -------------------------------------------------------------------------------

    async def test_dead_letter_is_stored_with_everything(self, store: Store) -> None:
        sent = Message(
            new_message_id(),
            "products.product_price_changed",
            b"\x00\xff not json \xc3\x28" + random.Random(3).randbytes(200 * 1024),
            {CORRELATION_ID: new_message_id(), TENANT_ID: "Genève ☃"},
            key="product-Ω",
        )
        before = utcnow()
        letter = await self.add_dead_letter(
            store,
            NewDeadLetter(
                "order-service",
                "ApplyDiscount",
                sent,
                5,
                "failed 5 times; last error: ValueError: prix négatif",
                "Traceback (most recent call last):\n  ...\nValueError: prix négatif ✗",
            ),
        )
        after = utcnow()

        assert letter.subscriber == "order-service"
        assert letter.handler == "ApplyDiscount"
        assert letter.message == sent
        assert letter.attempts == 5
        assert letter.reason == "failed 5 times; last error: ValueError: prix négatif"
        assert letter.error == "Traceback (most recent call last):\n  ...\nValueError: prix négatif ✗"
        assert before <= letter.created_at <= after
        assert await store.dead_letter(letter.id) == letter

        undecodable = await self.add_dead_letter(
            store, NewDeadLetter("order-service", None, message(body=b"{"), 1, "cannot decode")
        )
        assert undecodable.handler is None
        assert undecodable.error is None
        assert undecodable.id != letter.id

    async def test_a_rolled_back_dead_letter_is_not_stored(self, store: Store) -> None:
        async with transaction(store, commit=False) as tx:
            await store.add_dead_letter(
                tx, NewDeadLetter("order-service", "ApplyDiscount", message(), 1, "x")
            )

        assert await store.dead_letters() == []
        assert await store.dead_letters("order-service") == []

    async def test_dead_letters_are_listed_by_subscriber_oldest_first(self, store: Store) -> None:
        names = ["order-service", "audit-service", "order-service", "order-service", "audit-service"]
        added = []
        for n, subscriber in enumerate(names):
            letter = NewDeadLetter(subscriber, "Handler", message(body=str(n).encode()), 1, f"reason {n}")
            added.append(await self.add_dead_letter(store, letter))
        orders = [d for d in added if d.subscriber == "order-service"]
        audits = [d for d in added if d.subscriber == "audit-service"]

        assert await store.dead_letters("order-service") == orders
        assert await store.dead_letters("order-service", limit=2) == orders[:2]
        assert await store.dead_letters("audit-service") == audits
        assert await store.dead_letters("billing-service") == []
        assert await store.dead_letters() == added
        assert await store.dead_letters(limit=3) == added[:3]
        assert [d.id for d in added] == sorted(d.id for d in added)

    async def test_dead_letters_are_counted_by_subscriber_and_since_a_time(self, store: Store) -> None:
        for subscriber in ("order-service", "order-service", "audit-service"):
            await self.add_dead_letter(store, NewDeadLetter(subscriber, "H", message(), 1, "early"))
        await _tick()
        cut = utcnow()
        await _tick()
        await self.add_dead_letter(store, NewDeadLetter("order-service", "H", message(), 1, "late"))

        assert await store.count_dead_letters() == 4
        assert await store.count_dead_letters("order-service") == 3
        assert await store.count_dead_letters("order-service", since=cut) == 1
        assert await store.count_dead_letters(since=cut) == 1
        assert await store.count_dead_letters("audit-service", since=cut) == 0
        assert await store.count_dead_letters("billing-service") == 0

    async def test_unknown_dead_letter_is_none(self, store: Store) -> None:
        assert await store.dead_letter(424242) is None

    async def test_removed_dead_letter_is_gone_and_a_rolled_back_removal_keeps_it(self, store: Store) -> None:
        keep = await self.add_dead_letter(store, NewDeadLetter("order-service", "H", message(), 1, "keep"))
        drop = await self.add_dead_letter(store, NewDeadLetter("order-service", "H", message(), 1, "drop"))

        async with transaction(store, commit=False) as tx:
            await store.remove_dead_letter(tx, keep.id)
        async with transaction(store) as tx:
            await store.remove_dead_letter(tx, drop.id)

        assert await store.dead_letter(drop.id) is None
        assert await store.dead_letter(keep.id) == keep
        assert await store.dead_letters("order-service") == [keep]

    async def test_dead_letter_ids_are_never_reused(self, store: Store) -> None:
        first = await self.add_dead_letter(store, NewDeadLetter("order-service", "H", message(), 1, "one"))
        async with transaction(store) as tx:
            await store.remove_dead_letter(tx, first.id)

        second = await self.add_dead_letter(store, NewDeadLetter("order-service", "H", message(), 1, "two"))

        assert second.id > first.id
        assert await store.dead_letter(first.id) is None

    # --- tables -------------------------------------------------------------------------------------

    async def test_create_tables_twice_is_fine_and_keeps_the_rows(self, store: Store) -> None:
        kept = message()
        await self.write(store, [kept])

        await store.create_tables()
        await store.create_tables()

        assert [r.message for r in await self.peek(store)] == [kept]
        assert await self.claim_inbox(store, "order-service", "ApplyDiscount", kept.id) is True


async def _tick() -> None:
    """Wait until `utcnow()` has moved on, so that times before and after this call differ."""
    start = utcnow()
    async with asyncio.timeout(PATIENCE):
        while utcnow() <= start:  # noqa: ASYNC110 - waiting for the clock, which sets no event
            await asyncio.sleep(0.001)
