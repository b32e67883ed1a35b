"""The distributed event bus: publish, subscribe, and the background work (consumer, relay, inbox cleanup)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, Self, TypeVar

from sqlalchemy.ext.asyncio import AsyncEngine

from eventrelay.brokers import Broker, broker_from_url
from eventrelay.config import MEMORY_BROKER, Settings
from eventrelay.consumer import Consumer
from eventrelay.dispatch import Dispatcher
from eventrelay.entity_events import EntityEvents
from eventrelay.envelope import TENANT_ID, Message
from eventrelay.errors import ConfigurationError
from eventrelay.events import Event
from eventrelay.group_commit import GroupCommit
from eventrelay.handlers import DistributedEventHandler, HandlerSpec, Registry, RetryPolicy, resolve_handler
from eventrelay.inbox import Inbox
from eventrelay.json_style import JsonStyle
from eventrelay.local import LocalEventBus
from eventrelay.metrics import Metrics, MetricsHooks, NoMetrics
from eventrelay.outbox import Outbox, Relay
from eventrelay.requests import Requester
from eventrelay.saga import Saga, SagaRecord, create_saga_tables, saga_records, saga_spec
from eventrelay.stores.base import DeadLetter, Store, utcnow
from eventrelay.stores.memory import MemoryStore
from eventrelay.tenancy import TenantDatabases, TenantRelays, TenantStore
from eventrelay.tenant_scope import current_tenant, tenant_scope
from eventrelay.tracing import Tracing
from eventrelay.uow import UnitOfWork, current_unit_of_work, due_time

R = TypeVar("R", bound=Event)
logger = logging.getLogger(__name__)


class Subscription:
    """What `subscribe` returns: `await subscription.unsubscribe()` removes the handler."""

    def __init__(self, bus: DistributedEventBus, spec: HandlerSpec) -> None:
        self.bus = bus
        self.spec = spec

    @property
    def handler_name(self) -> str:
        return self.spec.name

    async def unsubscribe(self) -> None:
        """Remove the handler; unbind names no other handler of this service takes. Idempotent."""
        await self.bus.unsubscribe(self.spec.name)


class DistributedEventBus:
    """One service's connection to the distributed event bus.

    `service` names the subscription (ABP's ClientName): every service gets its own copy of each event it
    subscribes to, and instances of one service share it and compete. `broker` is a `Broker` or a URL, else
    `Settings.broker_url`, else `memory://`. `database` (a URL, an `AsyncEngine` or a `Store`, else
    `Settings.database_url`) holds the outbox, inbox and dead letters next to your tables; without it they
    live in memory and nothing survives the process. `tenants` gives tenants databases of their own (README,
    "A database per tenant").
    """

    def __init__(
        self,
        service: str,
        *,
        broker: Broker | str | None = None,
        database: str | AsyncEngine | Store | None = None,
        settings: Settings | None = None,
        entity_events: EntityEvents | None = None,
        tenants: TenantDatabases | None = None,
    ) -> None:
        if not isinstance(service, str) or not service.strip() or len(service) > 200:
            raise ConfigurationError(
                f"service must be a non-empty name of at most 200 characters: {service!r}"
            )
        self.service = service
        self.settings = settings or Settings()
        if broker is None:
            broker = self.settings.broker_url or MEMORY_BROKER
        if database is None:
            database = self.settings.database_url
        self._owns_broker = isinstance(broker, str)
        self.broker_url = broker if isinstance(broker, str) else f"{type(broker).__name__} instance"
        self.broker = broker_from_url(broker) if isinstance(broker, str) else broker
        abp = self.settings.json_style == "abp" or getattr(self.broker, "profile", None) == "abp"
        self.json_style: JsonStyle = "abp" if abp else "eventrelay"
        """The conventions of this bus's bodies: `Settings.json_style`, or "abp" on a `profile=abp` broker."""
        self._owns_store = not isinstance(database, Store)
        self.store = _store(database)
        self.tenants = tenants
        if tenants is not None:
            if isinstance(self.store, MemoryStore):
                raise ConfigurationError(
                    "A database per tenant needs the service's own database for the tenants without one: "
                    "pass database= with tenants="
                )
            self.store = TenantStore(self.store, tenants, owns_default=self._owns_store)
            self._owns_store = True
        if entity_events is not None and (database is None or isinstance(self.store, MemoryStore)):
            raise ConfigurationError("Entity events come from a database: pass database= with entity_events=")
        self.entity_events = entity_events
        self.tracing = Tracing(service, Tracing.system_of(self.broker))
        metrics_on = self.settings.metrics or self.settings.metrics_port > 0
        self.metrics: MetricsHooks = Metrics(service) if metrics_on else NoMetrics()
        self.relay: Relay | TenantRelays = (
            TenantRelays(self.store, self._relay)
            if isinstance(self.store, TenantStore)
            else self._relay(self.store)
        )
        self.outbox = Outbox(
            self.store,
            self.broker,
            self.relay,
            json_style=self.json_style,
            tracing=self.tracing,
            metrics=self.metrics,
        )
        self.inbox = Inbox(self.store, service, self.metrics, self.settings.max_message_bytes)
        self.handlers = Registry(service)
        self.local = LocalEventBus(
            service, self.unit_of_work, self, database=not isinstance(self.store, MemoryStore)
        )
        """Local events: their handlers run in the publisher's unit of work, before it commits."""
        self.sagas: list[type[Saga[Any]]] = []
        """The saga classes subscribed, in subscription order."""
        self.dispatcher = Dispatcher(
            service,
            self.broker,
            self.handlers,
            self.inbox,
            self.new_unit_of_work,
            settings=self.settings,
            json_style=self.json_style,
            tracing=self.tracing,
            metrics=self.metrics,
            tenants=self.store if isinstance(self.store, TenantStore) else None,
        )
        self.consumer = self._consumer()
        self.requester = Requester(service, self.broker, self.outbox, self.settings.max_message_bytes)
        # Publishes outside a unit of work that arrive while one commits share the next transaction (one
        # such queue per tenant with a database per tenant: a transaction is one database's).
        self._alone: dict[str | None, GroupCommit[tuple[Message, datetime | None]]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.started = False

    def _relay(self, store: Store) -> Relay:
        """The relay of one of the service's databases."""
        return Relay(
            store,
            self.broker,
            batch_size=self.settings.relay_batch_size,
            poll_interval=self.settings.relay_poll_interval,
            lease=self.settings.relay_lease,
            tracing=self.tracing,
            metrics=self.metrics,
        )

    def _consumer(self) -> Consumer:
        """A consumer (one per start: a stopped one stays stopped); a fetch's deliveries share a unit of work
        unless entity events are on (stamped from the handler's context at commit: one message per commit)."""
        return Consumer(
            self.service,
            self.broker,
            self.handlers,
            self.dispatcher,
            settings=self.settings,
            tracing=self.tracing,
            batches=self.entity_events is None,
        )

    # --- lifecycle -----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, create tables (unless turned off), bind subscriptions, start consuming and relaying."""
        if self.started:
            return
        if self._owns_broker:
            await self.broker.start()
        try:
            if self.settings.create_tables:
                await self.create_tables()
            for name in self.handlers.event_names:
                await self.broker.bind(self.service, name)
        except BaseException:  # a half-started bus holds no connection: the caller never calls stop()
            await self._close_owned()
            raise
        self._tasks = [
            asyncio.create_task(self.consumer.run(), name=f"{self.service}-consumer"),
            asyncio.create_task(self.relay.run(), name=f"{self.service}-relay"),
            asyncio.create_task(
                self.inbox.purge_forever(self.settings.inbox_retention, self.settings.inbox_cleanup_interval),
                name=f"{self.service}-inbox-cleanup",
            ),
        ]
        self.started = True
        logger.info("Bus of %s started with %d handler(s)", self.service, len(self.handlers))

    async def stop(self) -> None:
        """Stop fetching, let in-flight handlers finish, send what the outbox holds, then close."""
        if not self.started:
            return
        self.started = False
        self.consumer.stop()
        consumer, relay, cleaner = self._tasks
        await asyncio.wait({consumer}, timeout=self.settings.shutdown_timeout)
        settling = [group.settle() for group in self._alone.values()]  # publishes underway
        await asyncio.wait_for(asyncio.gather(*settling), self.settings.shutdown_timeout)
        # Not cancelled mid-batch (a cancel inside a transaction can leave SQLite's write lock held): the
        # relay finishes its batch, sends what the outbox holds, the handlers' last events too, and returns.
        self.relay.stop()
        await asyncio.wait({relay}, timeout=self.settings.shutdown_timeout)
        for task in (consumer, relay, cleaner):
            task.cancel()
        await asyncio.gather(consumer, relay, cleaner, return_exceptions=True)
        self.consumer = self._consumer()
        await self.requester.close()
        await self._close_owned()
        logger.info("Bus of %s stopped", self.service)

    async def create_tables(self) -> None:
        """Create the tables of the outbox, inbox, dead letters and subscribed sagas that do not exist yet."""
        await self.store.create_tables()
        if self.sagas:
            await create_saga_tables(self.store, self.sagas)

    async def _close_owned(self) -> None:
        """Close the broker and the store the bus made from URLs (those passed in belong to the caller)."""
        if self._owns_broker:
            await self.broker.close()
        if self._owns_store:
            await self.store.close()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    # --- units of work -------------------------------------------------------------------------------

    def unit_of_work(self) -> contextlib.AbstractAsyncContextManager[UnitOfWork]:
        """`async with bus.unit_of_work() as uow:` one transaction (in the database of the tenant in scope,
        with `tenants=`); inside another of this bus, join it."""
        current = current_unit_of_work()
        if current is not None and current.owner is self:
            if self.tenants is not None and current.tenant_id != current_tenant():
                raise ConfigurationError(
                    f"This unit of work is tenant {current.tenant_id!r}'s, in its database: one for tenant "
                    f"{current_tenant()!r} needs its own, bus.new_unit_of_work()"
                )
            return contextlib.nullcontext(current)
        return self.new_unit_of_work()

    def new_unit_of_work(self) -> UnitOfWork:
        """A unit of work of its own, even inside another."""
        return UnitOfWork(self.store, self, self.outbox, self.entity_events, self.local)

    @contextlib.asynccontextmanager
    async def tenant(self, tenant_id: str | None) -> AsyncIterator[None]:
        """`async with bus.tenant("acme"):` acme is the tenant in scope in the block (ABP's
        `CurrentTenant.Change`): events published there carry its id, and with `tenants=` its units of work,
        dead letters and sagas are those of its database (opened now if it has one since). None: the host."""
        if isinstance(self.store, TenantStore):
            async with self.store.scope(tenant_id):
                yield
        else:
            with tenant_scope(tenant_id):
                yield

    # --- publishing ----------------------------------------------------------------------------------

    async def publish(
        self,
        event: Event | str,
        data: Mapping[str, Any] | None = None,
        *,
        use_outbox: bool = True,
        on_unit_of_work_complete: bool = True,
        headers: Mapping[str, str] | None = None,
        key: str | None = None,
        delay: float | timedelta | None = None,
        at: datetime | None = None,
        correlation_id: str | None = None,
        tenant_id: str | None = None,
    ) -> str:
        """Publish an event (or a name and a dict payload); return its message id.

        Inside a unit of work (and `on_unit_of_work_complete`) the event waits for the commit; with
        `use_outbox` it goes through the outbox, in the unit of work's transaction when there is one;
        otherwise it is sent to the broker now. `key` orders events (same key, same order at the consumer);
        `delay` or `at` hold it in the outbox until due.
        """
        message = self.outbox.message(
            event, data, headers=headers, key=key, correlation_id=correlation_id, tenant_id=tenant_id
        )
        due = due_time(delay, at)
        if due is not None and not use_outbox:
            raise ConfigurationError("A delayed event waits in the outbox: drop use_outbox=False")
        uow = current_unit_of_work()
        uow = uow if uow is not None and uow.owner is self else None
        if isinstance(self.store, TenantStore) and use_outbox:
            await self._check_tenant(self.store, message, uow)
        if uow is not None and on_unit_of_work_complete:
            uow.add(message, use_outbox=use_outbox, available_at=due)
        elif use_outbox and uow is not None:
            await self.outbox.write(uow.transaction, [message], due or utcnow())
        elif use_outbox:
            tenant = message.headers.get(TENANT_ID) if self.tenants is not None else None
            alone = self._alone.get(tenant)
            if alone is None:
                alone = self._alone[tenant] = GroupCommit(functools.partial(self._commit_alone, tenant))
            await alone.write((message, due))
        else:
            await self.outbox.send([message])
        return message.id

    async def request(
        self, event: Event, *, reply: type[R], timeout: float = 5.0, key: str | None = None
    ) -> R:
        """Ask: send `event` to the services that handle it, past the outbox, and return the first reply, a
        `reply` (the handler's return value, validated).

        Raises `RequestTimeout` when no reply came within `timeout` seconds, `RemoteError` when the answering
        handler raised (the request is then its dead letter), `ConfigurationError` inside a unit of work of
        this bus (README, "Request/reply", says why).
        """
        if not self.started:
            raise ConfigurationError(
                f"Start the bus of {self.service} before bus.request (async with bus: ...)"
            )
        return await self.requester.ask(event, reply, timeout, key=key, owner=self)

    async def _commit_alone(self, tenant: str | None, pending: list[tuple[Message, datetime | None]]) -> None:
        async with self.tenant(tenant), self.new_unit_of_work() as own:
            for message, available_at in pending:
                own.add(message, use_outbox=True, available_at=available_at)

    @staticmethod
    async def _check_tenant(store: TenantStore, message: Message, uow: UnitOfWork | None) -> None:
        """Refuse an event of one tenant into another tenant's database (the unit of work's)."""
        tenant = message.headers.get(TENANT_ID)
        if uow is None or tenant == uow.tenant_id:
            return
        if await store.open(tenant) is not store.store_of(uow.tenant_id):
            raise ConfigurationError(
                f"An event of tenant {tenant!r} would wait in the outbox of tenant {uow.tenant_id!r}'s "
                f"database: publish it in a unit of work of its own (async with bus.tenant({tenant!r}): ...)"
            )

    # --- subscribing ---------------------------------------------------------------------------------

    async def subscribe(
        self,
        handler: type[DistributedEventHandler[Any]] | type[Saga[Any]] | Callable[..., Any],
        *,
        event: str | type[Event] | None = None,
        factory: Callable[[], DistributedEventHandler[Any] | Saga[Any]] | None = None,
        name: str | None = None,
        retry: RetryPolicy | None = None,
        batch: bool = True,
    ) -> Subscription:
        """Subscribe a handler class (a fresh instance per message, made by `factory` if given) or an async
        function. `event` subscribes to one event by name or class instead of the annotated ones; `name`
        is the handler's stable identity in the inbox and dead letters (default: its qualified name).
        The messages of one fetch share one unit of work, each handler in a savepoint of its own;
        `batch=False` gives it a unit of work per message, run concurrently (README, "Handlers")."""
        if isinstance(handler, type) and issubclass(handler, Saga):
            if event is not None:
                raise ConfigurationError(f"{handler.__name__} is a saga: its steps name their events")
            if isinstance(self.store, MemoryStore):
                raise ConfigurationError(
                    f"The saga {handler.__name__} keeps its state in the service's database: pass database="
                )
            spec = saga_spec(handler, factory=factory, name=name, retry=retry, batch=batch)  # type: ignore[arg-type]
            self.sagas.append(handler)
            if self.started and self.settings.create_tables:
                await create_saga_tables(self.store, [handler])
        else:
            spec = resolve_handler(
                handler,
                event=event,
                factory=factory,  # type: ignore[arg-type]
                name=name,
                retry=retry,
                batch=batch,
            )
        for event_name in self.handlers.add(spec):
            if self.started:
                await self.broker.bind(self.service, event_name)
        return Subscription(self, spec)

    async def unsubscribe(self, handler: str | object) -> None:
        """Remove a handler, given by its name or by what was subscribed. Idempotent."""
        self.sagas = [saga for saga in self.sagas if saga is not handler]
        for name in self.handlers.remove(handler):
            if self.started:
                await self.broker.unbind(self.service, name)

    def handlers_for(self, name: str) -> list[HandlerSpec]:
        """The handlers of this service for an event name, in subscription order."""
        return self.handlers.handlers_for(name)

    @property
    def event_names(self) -> list[str]:
        """The event names this service handles."""
        return self.handlers.event_names

    # --- dead letters --------------------------------------------------------------------------------

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """This service's dead letters, oldest first."""
        return await self.inbox.letters(limit)

    async def dead_letter(self, letter_id: int) -> DeadLetter:
        """This service's dead letter `letter_id`; `ConfigurationError` when it has none of that id."""
        return await self.inbox.letter(letter_id)

    async def replay(self, letter_id: int) -> None:
        """Handle a dead letter again, now, in one unit of work that deletes it if the handler succeeds.

        Raises what the handler raises (the letter stays), or `ConfigurationError` if nothing handles it or
        the letter keeps only the start of its body.
        """
        letter = await self.dead_letter(letter_id)
        if (size := letter.truncated_from) is not None:
            raise ConfigurationError(
                f"Dead letter {letter_id} keeps only the first {len(letter.message.body)} of its {size} "
                "bytes (it was over max_message_bytes), so it cannot be replayed faithfully: discard it "
                f"(`eventrelay dead-letters purge SERVICE {letter_id}`) and have its publisher send it again "
                "within the limit"
            )
        if letter.handler is not None:
            spec = self.handlers.get(letter.handler)
            if spec is None or letter.message.name not in spec.events:
                raise ConfigurationError(f"{letter.handler} no longer handles {letter.message.name!r} here")
            specs = [spec]
        else:
            specs = self.handlers_for(letter.message.name)
            if not specs:
                raise ConfigurationError(f"No handler for {letter.message.name!r} in {self.service!r} yet")
        await self.dispatcher.replay(specs, letter.message, letter.id, claim=letter.handler is None)

    async def saga_records(self, *, limit: int = 100, completed: bool = False) -> list[SagaRecord]:
        """The open sagas of this service (completed ones too, with `completed`), oldest first per saga."""
        return [
            r
            for saga in self.sagas
            for r in await saga_records(self.store, saga, limit=limit, completed=completed)
        ]

    async def saga_record(self, saga: type[Saga[Any]], key: object) -> SagaRecord | None:
        """The saga of `saga`'s class with `key` (open or completed), if there is one."""
        found = await saga_records(self.store, saga, key=str(key))
        return found[0] if found else None

    async def discard(self, letter_id: int) -> None:
        """Delete a dead letter without handling it."""
        await self.inbox.discard(letter_id)


def _store(database: str | AsyncEngine | Store | None) -> Store:
    if database is None:
        return MemoryStore()
    if isinstance(database, Store):
        return database
    from eventrelay.stores.sqlalchemy import SqlStore

    return SqlStore(database)


__all__ = ["DistributedEventBus", "Subscription"]
