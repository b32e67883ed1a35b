"""A database per tenant (ABP's "database per tenant"): a tenant's rows, outbox, inbox, dead letters and sagas
live in its own database; tenants without one share the service's database.

`TenantDatabases` says which tenant has which database. `TenantStore` is the bus's store then: a transaction
goes to the database of the tenant in scope (`async with bus.tenant(id):`, or the tenant of the message a
handler runs for), and listings and cleanups span every database. `TenantRelays` runs one relay per database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING
from weakref import WeakKeyDictionary

from eventrelay.envelope import Message
from eventrelay.stores.base import DeadLetter, NewDeadLetter, OutboxRecord, Store, Transaction
from eventrelay.tenant_scope import current_tenant, tenant_scope

if TYPE_CHECKING:
    from sqlalchemy import MetaData
    from sqlalchemy.ext.asyncio import AsyncEngine

    from eventrelay.outbox import Relay

logger = logging.getLogger(__name__)


class TenantDatabases:
    """Which tenants have a database of their own: tenant id -> database URL. The others share the service's.

    A bus asks `databases()` at start, every `refresh` seconds, and when a tenant it does not know shows up
    (at most once per `refresh` seconds for each). Override `databases` to read your tenant table; `add` a
    tenant to this object and every bus using it opens its database when it next meets the tenant.
    """

    def __init__(self, databases: Mapping[str, str] | None = None, *, refresh: float = 30.0) -> None:
        self._databases = dict(databases or {})
        self.refresh = refresh
        self.generation = 0
        """Counts `add` calls: a tenant found without a database is looked up again after one."""

    async def databases(self) -> Mapping[str, str]:
        """Every tenant with a database of its own, and its URL."""
        return dict(self._databases)

    def add(self, tenant_id: str, url: str) -> None:
        """Give `tenant_id` a database of its own (created tables included, if the bus creates tables)."""
        self._databases[tenant_id] = url
        self.generation += 1


class TenantStore(Store):
    """The store of a bus with a database per tenant: the default store plus one per tenant database.

    A transaction goes to the store of the tenant in scope when it begins, and the calls that take it go to
    that store too; outbox backlogs and inbox purges span all stores, dead-letter listings read the scope's.
    The tables made with `create_tables`/`create_tables_of` are made again in each database opened later.
    """

    def __init__(self, default: Store, databases: TenantDatabases, *, owns_default: bool) -> None:
        self.default = default
        self.databases = databases
        self._owns_default = owns_default
        self._by_tenant: dict[str, Store] = {}
        self._by_url: dict[str, Store] = {}
        self._missing: dict[str, tuple[float, int]] = {}  # tenant -> (when found without one, generation)
        self._owners: WeakKeyDictionary[Transaction, Store] = WeakKeyDictionary()
        self._tables: list[MetaData | None] = []  # None: the store's own tables
        self._lock = asyncio.Lock()
        self.opened: list[Callable[[Store], None]] = []
        """Called with each database's store as it is opened (the relays start theirs)."""

    @property
    def engine(self) -> AsyncEngine:
        """The default database's engine."""
        engine: AsyncEngine = self.default.engine  # type: ignore[attr-defined]
        return engine

    def stores(self) -> list[Store]:
        """The default store, then each tenant database's, each once."""
        return [self.default, *{id(s): s for s in self._by_tenant.values() if s is not self.default}.values()]

    def tenants(self) -> dict[str, Store]:
        """The tenants with a database of their own opened so far, and their stores."""
        return dict(self._by_tenant)

    def store_of(self, tenant_id: str | None) -> Store:
        """The store of `tenant_id` as opened so far: its own, or the default."""
        return self.default if tenant_id is None else self._by_tenant.get(tenant_id, self.default)

    async def open(self, tenant_id: str | None) -> Store:
        """The store of `tenant_id`; its database is opened now if `TenantDatabases` names it since."""
        if tenant_id is None or (store := self._by_tenant.get(tenant_id)) is not None:
            return self.store_of(tenant_id)
        missing = self._missing.get(tenant_id)
        if missing is not None:
            since, generation = missing
            fresh = time.monotonic() - since < self.databases.refresh
            if fresh and generation == self.databases.generation:
                return self.default
        await self.refresh()
        store = self._by_tenant.get(tenant_id)
        if store is None:
            self._missing[tenant_id] = (time.monotonic(), self.databases.generation)
            return self.default
        return store

    async def refresh(self) -> None:
        """Open the databases of the tenants `TenantDatabases` names that are not open yet."""
        async with self._lock:
            generation = self.databases.generation
            for tenant, url in (await self.databases.databases()).items():
                if tenant in self._by_tenant:
                    continue  # a tenant keeps the database it was opened with, until the bus stops
                store = self._by_url.get(url)
                if store is None:
                    store = await self._open(url)
                    self._by_url[url] = store
                    for listener in self.opened:
                        listener(store)
                self._by_tenant[tenant] = store
                self._missing.pop(tenant, None)
                logger.info("Tenant %s has its own database", tenant)
            if generation != self.databases.generation:  # added meanwhile: seen at the next look
                self._missing.clear()

    async def _open(self, url: str) -> Store:
        from eventrelay.stores.sqlalchemy import SqlStore

        tables = getattr(self.default, "tables", None)
        prefix = tables.outbox.name.removesuffix("outbox") if tables is not None else "eventrelay_"
        store = SqlStore(url, prefix=prefix)
        try:
            for metadata in self._tables:
                await (store.create_tables() if metadata is None else store.create_tables_of(metadata))
        except BaseException:
            await store.close()
            raise
        return store

    @contextlib.asynccontextmanager
    async def scope(self, tenant_id: str | None) -> AsyncIterator[Store]:
        """`tenant_id` in scope within the block, its database opened; yields its store."""
        store = await self.open(tenant_id)
        with tenant_scope(tenant_id):
            yield store

    def _owner(self, tx: Transaction) -> Store:
        return self._owners[tx]

    # --- the Store port ------------------------------------------------------------------------------

    def begin(self) -> Transaction:
        store = self.store_of(current_tenant())
        tx = store.begin()
        self._owners[tx] = store
        return tx

    async def create_tables(self) -> None:
        await self._create(None)

    async def create_tables_of(self, metadata: MetaData) -> None:
        await self._create(metadata)

    async def _create(self, metadata: MetaData | None) -> None:
        await self.refresh()
        if metadata not in self._tables:
            self._tables.append(metadata)
        for store in self.stores():
            await (store.create_tables() if metadata is None else store.create_tables_of(metadata))

    async def close(self) -> None:
        stores = [s for s in self.stores() if s is not self.default or self._owns_default]
        self._by_tenant.clear()
        self._by_url.clear()
        for store in stores:
            await store.close()

    async def add_outbox(self, tx: Transaction, messages: Sequence[Message], available_at: datetime) -> None:
        await self._owner(tx).add_outbox(tx, messages, available_at)

    async def claim_outbox(
        self, tx: Transaction, limit: int, now: datetime, lease_until: datetime | None = None
    ) -> list[OutboxRecord]:
        return await self._owner(tx).claim_outbox(tx, limit, now, lease_until)

    async def release_outbox(self, tx: Transaction, seqs: Sequence[int], lease_until: datetime) -> None:
        await self._owner(tx).release_outbox(tx, seqs, lease_until)

    async def delete_outbox(self, tx: Transaction, seqs: Sequence[int]) -> None:
        await self._owner(tx).delete_outbox(tx, seqs)

    async def defer_outbox(self, tx: Transaction, seq: int, until: datetime, error: str) -> None:
        await self._owner(tx).defer_outbox(tx, seq, until, error)

    async def claim_inbox(self, tx: Transaction, subscriber: str, handler: str, message_id: str) -> bool:
        return await self._owner(tx).claim_inbox(tx, subscriber, handler, message_id)

    async def unclaim_inbox(self, tx: Transaction, subscriber: str, handler: str, message_id: str) -> None:
        await self._owner(tx).unclaim_inbox(tx, subscriber, handler, message_id)

    async def claim_inbox_many(
        self, tx: Transaction, subscriber: str, claims: Sequence[tuple[str, str]]
    ) -> list[bool]:
        return await self._owner(tx).claim_inbox_many(tx, subscriber, claims)

    async def add_dead_letter(self, tx: Transaction, letter: NewDeadLetter) -> None:
        await self._owner(tx).add_dead_letter(tx, letter)

    async def remove_dead_letter(self, tx: Transaction, letter_id: int) -> None:
        await self._owner(tx).remove_dead_letter(tx, letter_id)

    async def next_outbox_due(self) -> datetime | None:
        due = [d for s in self.stores() if (d := await s.next_outbox_due()) is not None]
        return min(due, default=None)

    async def outbox_backlog(self) -> tuple[int, datetime | None]:
        """Rows waiting in every database's outbox, and when the oldest of them was written."""
        backlogs = [await s.outbox_backlog() for s in self.stores()]
        oldest = [o for _, o in backlogs if o is not None]
        return sum(count for count, _ in backlogs), min(oldest, default=None)

    async def outbox_backlogs(self) -> dict[str | None, tuple[int, datetime | None]]:
        """Each database's outbox backlog, by tenant (None: the default database, shared by the others);
        tenants sharing one database show the same backlog."""
        backlogs: dict[str | None, tuple[int, datetime | None]] = {None: await self.default.outbox_backlog()}
        for tenant, store in sorted(self._by_tenant.items()):
            backlogs[tenant] = await store.outbox_backlog()
        return backlogs

    async def dead_letters(self, subscriber: str | None = None, limit: int = 100) -> list[DeadLetter]:
        return await self.store_of(current_tenant()).dead_letters(subscriber, limit)

    async def count_dead_letters(self, subscriber: str | None = None, since: datetime | None = None) -> int:
        return await self.store_of(current_tenant()).count_dead_letters(subscriber, since)

    async def dead_letter(self, letter_id: int) -> DeadLetter | None:
        return await self.store_of(current_tenant()).dead_letter(letter_id)

    async def purge_inbox(self, before: datetime) -> int:
        return sum([await s.purge_inbox(before) for s in self.stores()])

    async def inbox_count(self, subscriber: str, since: datetime | None = None) -> int:
        return await self.store_of(current_tenant()).inbox_count(subscriber, since)


class TenantRelays:
    """One relay per database of a `TenantStore`, each started as its database is opened; the tenants are
    looked up again every `TenantDatabases.refresh` seconds. Used where the bus uses a `Relay`."""

    def __init__(self, store: TenantStore, relay: Callable[[Store], Relay]) -> None:
        self.store = store
        self._relay = relay
        self._relays: dict[Store, Relay] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        store.opened.append(self._start)

    @property
    def sent(self) -> int:
        """Rows sent and deleted, by every relay."""
        return sum(r.sent for r in self._relays.values())

    def relay_of(self, store: Store) -> Relay:
        """The relay of one of the databases (made now if it has none yet)."""
        relay = self._relays.get(store)
        if relay is None:
            relay = self._relays[store] = self._relay(store)
        return relay

    def wake(self) -> None:
        """Ask the relay of the tenant in scope to look at its outbox now (after a commit there)."""
        self.relay_of(self.store.store_of(current_tenant())).wake()

    def stop(self) -> None:
        """Let every relay send what its outbox holds and return (`Relay.stop`)."""
        self._stopping.set()
        for relay in self._relays.values():
            relay.stop()

    def _start(self, store: Store) -> None:
        if self._tasks:  # running: the new database's relay starts now
            self._tasks.append(asyncio.create_task(self.relay_of(store).run(), name="eventrelay-relay"))

    async def run(self) -> None:
        """Relay every database until cancelled, or until `stop()` and every outbox is drained."""
        self._stopping.clear()
        with contextlib.suppress(Exception):  # a database down now is looked up again at the next refresh
            await self.store.refresh()
        self._tasks = [
            asyncio.create_task(self.relay_of(s).run(), name="eventrelay-relay") for s in self.store.stores()
        ]
        try:
            while not self._stopping.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), self.store.databases.refresh)
                if not self._stopping.is_set():
                    try:
                        await self.store.refresh()
                    except Exception:
                        logger.exception("Could not look up the tenants' databases; tried again later")
            await asyncio.gather(*self._tasks)
        finally:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self._tasks = []
            self._relays.clear()  # their stores close with the bus: a restart opens new ones
