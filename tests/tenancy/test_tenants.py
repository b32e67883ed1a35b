"""A database per tenant: each tenant's rows, outbox, inbox, dead letters and sagas stay in its own database,
the tenants without one share the service's, and tenants added while the bus runs get theirs."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import pytest
from pydantic import BaseModel
from sqlalchemy import insert

from eventrelay import (
    ConfigurationError,
    Context,
    DistributedEventBus,
    Event,
    MemoryBroker,
    Reject,
    Saga,
    Settings,
    TenantDatabases,
    current_tenant,
    step,
)
from eventrelay.tenancy import TenantStore
from eventrelay.testing import wait_until_idle
from tests.tenancy.conftest import TENANTS, Databases, count, create_app_tables, effects, orders, rows

QUICK = Settings(relay_poll_interval=0.05, fetch_timeout=0.05)


class Noted(Event, name="Tenancy.Noted"):
    n: int


async def note(event: Noted, context: Context) -> None:
    """Write the effect in the database of the unit of work: the tenant's."""
    if event.n < 0:
        raise Reject(f"negative for {context.tenant_id}")
    assert current_tenant() == context.tenant_id
    values = {"n": event.n, "tenant": context.tenant_id or "", "message_id": context.message_id}
    await context.session.execute(insert(effects).values(**values))


def buses(dbs: Databases, tenants: TenantDatabases) -> tuple[DistributedEventBus, DistributedEventBus]:
    broker = MemoryBroker()
    common = {"broker": broker, "database": dbs.default, "tenants": tenants, "settings": QUICK}
    return DistributedEventBus("Orders", **common), DistributedEventBus("Notes", **common)  # type: ignore[arg-type]


async def place(bus: DistributedEventBus, tenant: str | None, n: int) -> None:
    """An order of `tenant` and its event, in one unit of work."""
    async with bus.tenant(tenant), bus.unit_of_work() as uow:
        await uow.session.execute(insert(orders).values(n=n, tenant=tenant))
        await bus.publish(Noted(n=n))


async def test_each_tenant_s_rows_and_events_stay_in_its_database(databases: Databases) -> None:
    await create_app_tables(*databases.all)
    publisher, subscriber = buses(databases, TenantDatabases(databases.tenants))
    await subscriber.subscribe(note)
    placed = [(None, 0), ("hooli", 1), *((t, 10 + i) for i, t in enumerate(TENANTS)), ("acme", 20)]
    async with publisher, subscriber:
        for tenant, n in placed:
            await place(publisher, tenant, n)
        async with publisher.tenant("globex"):  # outside a unit of work: its own, in globex's database
            await publisher.publish(Noted(n=30))
        await publisher.publish(Noted(n=31), tenant_id="initech")
        await wait_until_idle(publisher, subscriber)
        # Delayed: they wait in the outboxes, where they can be looked at.
        for tenant in (None, *TENANTS):
            async with publisher.tenant(tenant):
                await publisher.publish(Noted(n=99), delay=3600)
        backlogs = await publisher.store.outbox_backlogs()  # type: ignore[attr-defined]
    assert {t: n for t, (n, _) in backlogs.items()} == {None: 1, "acme": 1, "globex": 1, "initech": 1}

    expected: dict[str, set[tuple[int, str]]] = {
        databases.default: {(0, ""), (1, "hooli")},
        databases.tenants["acme"]: {(10, "acme"), (20, "acme")},
        databases.tenants["globex"]: {(11, "globex"), (30, "globex")},
        databases.tenants["initech"]: {(12, "initech"), (31, "initech")},
    }
    for url, wanted in expected.items():
        assert {(n, t) for n, t in await rows(url, "SELECT n, tenant FROM effects")} == wanted
        placed_here = {(n, t or "") for n, t in await rows(url, "SELECT n, tenant FROM orders")}
        assert placed_here == {w for w in wanted if w[0] < 30}
        inbox = await rows(url, "SELECT message_id FROM eventrelay_inbox")
        assert sorted(map(str, inbox)) == sorted(map(str, await rows(url, "SELECT message_id FROM effects")))
        outbox = await rows(url, "SELECT headers FROM eventrelay_outbox")
        assert len(outbox) == 1  # the delayed event of this database's tenant, and no other
        tenant = next(t for n, t in wanted)
        assert (f'"x-tenant-id": "{tenant}"' in str(outbox[0][0])) == (tenant not in ("", "hooli"))


async def test_a_tenant_s_dead_letters_and_their_replay_stay_in_its_database(databases: Databases) -> None:
    await create_app_tables(*databases.all)
    publisher, subscriber = buses(databases, TenantDatabases(databases.tenants))
    await subscriber.subscribe(note)
    async with publisher, subscriber:
        await publisher.publish(Noted(n=-1), tenant_id="globex")
        await wait_until_idle(publisher, subscriber)
        assert await subscriber.dead_letters() == []  # the host's
        async with subscriber.tenant("acme"):
            assert await subscriber.dead_letters() == []
        async with subscriber.tenant("globex"):
            [letter] = await subscriber.dead_letters()
            assert letter.reason == "rejected by handler: negative for globex"
            await subscriber.discard(letter.id)
            assert await subscriber.dead_letters() == []
    assert await count(databases.tenants["globex"], effects) == 0


class Tally(BaseModel):
    total: int = 0


class Totals(Saga[Tally]):
    @step(correlate=lambda e: "all", starts=True)
    async def add(self, event: Noted) -> None:
        if self.is_new:
            self.state = Tally()
        self.state.total += event.n


async def test_a_tenant_s_sagas_live_in_its_database(databases: Databases) -> None:
    publisher, subscriber = buses(databases, TenantDatabases(databases.tenants))
    await subscriber.subscribe(Totals)
    async with publisher, subscriber:
        for tenant, n in [("acme", 1), ("acme", 2), ("globex", 5), (None, 7)]:
            await publisher.publish(Noted(n=n), tenant_id=tenant)
        await wait_until_idle(publisher, subscriber)
        totals = {}
        for tenant in (None, *TENANTS):
            async with subscriber.tenant(tenant):
                record = await subscriber.saga_record(Totals, "all")
                totals[tenant] = None if record is None else record.state["total"]
    assert totals == {None: 7, "acme": 3, "globex": 5, "initech": None}


async def test_a_tenant_added_while_running_gets_its_own_database(databases: Databases) -> None:
    await create_app_tables(*databases.all)
    tenants = TenantDatabases({"acme": databases.tenants["acme"]})
    publisher, subscriber = buses(databases, tenants)
    await subscriber.subscribe(note)
    async with publisher, subscriber:
        await publisher.publish(Noted(n=1), tenant_id="umbrella")  # no database of its own yet: the default
        await wait_until_idle(publisher, subscriber)
        tenants.add("umbrella", databases.spare)  # its tables are made when a bus meets it
        await publisher.publish(Noted(n=2), tenant_id="umbrella")
        await wait_until_idle(publisher, subscriber)
        async with publisher.tenant("umbrella"):
            assert await publisher.dead_letters() == []  # its dead-letter table is there
    assert await rows(databases.default, "SELECT n, tenant FROM effects") == [(1, "umbrella")]
    assert await rows(databases.spare, "SELECT n, tenant FROM effects") == [(2, "umbrella")]


class Listed(TenantDatabases):
    """Tenants read from somewhere else (a tenant table), which another process adds to."""

    def __init__(self, listing: dict[str, str]) -> None:
        super().__init__(refresh=0.3)
        self.listing = listing
        self.asked = 0

    async def databases(self) -> Mapping[str, str]:
        self.asked += 1
        return dict(self.listing)


async def test_tenants_listed_elsewhere_are_looked_up_again_after_refresh(databases: Databases) -> None:
    await create_app_tables(*databases.all)
    tenants = Listed({})
    publisher, subscriber = buses(databases, tenants)
    await subscriber.subscribe(note)
    async with publisher, subscriber:
        for n in (1, 2, 3):
            await publisher.publish(Noted(n=n), tenant_id="umbrella")
        await wait_until_idle(publisher, subscriber)
        tenants.listing["umbrella"] = databases.spare
        await asyncio.sleep(0.4)  # the relays' refresh opens it, and the buses look again
        await publisher.publish(Noted(n=4), tenant_id="umbrella")
        await wait_until_idle(publisher, subscriber)
    assert sorted(await rows(databases.default, "SELECT n FROM effects")) == [(1,), (2,), (3,)]
    assert await rows(databases.spare, "SELECT n FROM effects") == [(4,)]


class Counted(TenantDatabases):
    asked = 0

    async def databases(self) -> Mapping[str, str]:
        self.asked += 1
        return await super().databases()


async def test_a_tenant_without_a_database_is_looked_up_once_per_refresh(databases: Databases) -> None:
    tenants = Counted(refresh=3600)
    bus = DistributedEventBus("Orders", database=databases.default, tenants=tenants)  # not started: no relay
    store = bus.store
    assert isinstance(store, TenantStore)
    for _ in range(3):
        assert await store.open("umbrella") is store.default
    assert tenants.asked == 1
    tenants.add("umbrella", databases.spare)  # seen at once
    assert await store.open("umbrella") is not store.default
    assert tenants.asked == 2
    await store.close()


async def test_one_tenant_s_unit_of_work_takes_no_other_tenant_s_event(databases: Databases) -> None:
    publisher, _ = buses(databases, TenantDatabases(databases.tenants))
    async with publisher:
        with pytest.raises(ConfigurationError, match="publish it in a unit of work of its own"):
            async with publisher.tenant("acme"), publisher.unit_of_work():
                await publisher.publish(Noted(n=1), tenant_id="globex")
        async with publisher.tenant("acme"), publisher.unit_of_work(), publisher.tenant("globex"):
            with pytest.raises(ConfigurationError, match=r"needs its own, bus\.new_unit_of_work"):
                publisher.unit_of_work()
        # Tenants sharing the default database share its units of work.
        async with publisher.unit_of_work():
            await publisher.publish(Noted(n=2), tenant_id="hooli")
        await wait_until_idle(publisher)


def test_a_database_per_tenant_needs_a_default_database() -> None:
    with pytest.raises(ConfigurationError, match="pass database= with tenants="):
        DistributedEventBus("Orders", tenants=TenantDatabases({"acme": "sqlite+aiosqlite:///acme.db"}))
