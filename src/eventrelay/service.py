"""`Service`: the composition root of one microservice (its name, database, broker, handlers, settings).

```python
service = Service(
    "OrderService",
    database="sqlite+aiosqlite:///order.db",
    handlers=[OrderProductPriceChangedHandler],
    publishes=[OrderPlacedEto],
    env_prefix="ORDER_",
)
```

Run it as a process with `eventrelay run orders.app:service`, or inside an asyncio application (a FastAPI
lifespan, say) with `async with service:`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Self

from sqlalchemy.ext.asyncio import AsyncEngine

from eventrelay.brokers.base import Broker
from eventrelay.bus import DistributedEventBus, Subscription
from eventrelay.config import EMBEDDED_BROKER, Settings, redact_url
from eventrelay.entity_events import EntityEvents
from eventrelay.errors import ConfigurationError
from eventrelay.events import Event, event_name
from eventrelay.handlers import DistributedEventHandler, RetryPolicy
from eventrelay.saga import Saga
from eventrelay.tenancy import TenantDatabases

logger = logging.getLogger(__name__)


class Service:
    """One microservice: a bus named after the service, its handlers, and a way to run them.

    `database` and `broker` are URLs, else `Settings.database_url` and `Settings.broker_url`; without a
    database the outbox and inbox live in memory, without a broker it is `EMBEDDED_BROKER`, a SQLite file.
    With `env_prefix="ORDER_"`, `Settings.from_env` reads the environment, which wins over the code: for the
    URLs (`ORDER_DATABASE_URL`, `ORDER_BROKER_URL`) always, for the other fields (`ORDER_MAX_IN_FLIGHT`, ...)
    unless `settings` is given. `tenants` gives tenants databases of their own.
    """

    def __init__(
        self,
        name: str,
        *,
        database: str | None = None,
        broker: str | Broker | None = None,
        handlers: Iterable[type[DistributedEventHandler[Any]] | type[Saga[Any]] | Callable[..., Any]] = (),
        publishes: Sequence[type[Event]] = (),
        entity_events: EntityEvents | None = None,
        tenants: TenantDatabases | None = None,
        settings: Settings | None = None,
        env_prefix: str | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        from_env = Settings.from_env(env_prefix, environ) if env_prefix is not None else Settings()
        if settings is None:
            settings = from_env
        # A deployment's variables win over the code's URLs, which win over those in Settings.
        database = _first(from_env.database_url, database, settings.database_url)
        if not isinstance(broker, Broker):  # an object is the code's own choice: no variable replaces it
            broker = _first(from_env.broker_url, broker, settings.broker_url) or EMBEDDED_BROKER
        self.name = name
        self.database_url = database
        self.publishes = tuple(publishes)
        for event in self.publishes:
            event_name(event)  # a generic without its argument fails here, not at the first publish
        self.bus = DistributedEventBus(
            name,
            broker=broker,
            database=database,
            settings=settings,
            entity_events=entity_events,
            tenants=tenants,
        )
        self._pending: list[Callable[[], Awaitable[Subscription]]] = []
        self._prepared = False
        for handler in handlers:
            self.subscribe(handler)

    def subscribe(
        self,
        handler: type[DistributedEventHandler[Any]] | type[Saga[Any]] | Callable[..., Any],
        *,
        event: str | type[Event] | None = None,
        factory: Callable[[], DistributedEventHandler[Any] | Saga[Any]] | None = None,
        name: str | None = None,
        retry: RetryPolicy | None = None,
        batch: bool = True,
    ) -> None:
        """Add a handler before the service starts (see `DistributedEventBus.subscribe`)."""
        if self._prepared:
            raise ConfigurationError(
                f"{self.name} has started: subscribe at run time with `await service.bus.subscribe(...)`"
            )
        self._pending.append(
            functools.partial(
                self.bus.subscribe,
                handler,
                event=event,
                factory=factory,
                name=name,
                retry=retry,
                batch=batch,
            )
        )

    async def prepare(self) -> None:
        """Subscribe the handlers without starting (what the CLI needs to replay or list). Idempotent."""
        if self._prepared:
            return
        self._prepared = True
        for subscribe in self._pending:
            await subscribe()

    @contextlib.asynccontextmanager
    async def opened(self) -> AsyncIterator[Self]:
        """The service prepared, its tables made (unless `Settings.create_tables` is off), not started:
        what listing, replaying, discarding dead letters need (the CLI, the dashboard); closes the store."""
        await self.prepare()
        try:
            if self.bus.settings.create_tables:
                await self.bus.create_tables()
            yield self
        finally:
            await self.bus.store.close()

    @property
    def engine(self) -> AsyncEngine:
        """The SQLAlchemy engine of the service's database, for its own tables."""
        engine = getattr(self.bus.store, "engine", None)
        if not isinstance(engine, AsyncEngine):
            raise ConfigurationError(f"{self.name} has no database: pass database='sqlite+aiosqlite:///...'")
        return engine

    @property
    def handled_events(self) -> list[str]:
        """Names of the events this service handles (after `prepare`)."""
        return self.bus.event_names

    @property
    def published_events(self) -> list[str]:
        """Names of the events this service declares it publishes."""
        return sorted(event_name(e) for e in self.publishes)

    async def start(self) -> None:
        await self.prepare()
        await self.bus.start()
        logger.info(
            "%s started: database %s, broker %s, handling %s",
            self.name,
            redact_url(self.database_url) if self.database_url else "(memory)",
            redact_url(self.bus.broker_url),
            ", ".join(self.handled_events) or "nothing",
        )

    async def stop(self) -> None:
        await self.bus.stop()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def run(self, on_started: Callable[[], object] | None = None) -> None:
        """Run until SIGINT or SIGTERM; then stop fetching, finish in-flight messages, and return.

        With `Settings.metrics_port`, it serves the bus's metrics at `/metrics` on that port meanwhile.
        `on_started` is called once the service has started (`eventrelay run --json` prints it then).
        """
        loop = asyncio.get_running_loop()
        stopping = asyncio.Event()
        signals = (signal.SIGINT, signal.SIGTERM)
        for sig in signals:
            loop.add_signal_handler(sig, stopping.set)
        try:
            async with self, self._metrics_endpoint():
                if on_started is not None:
                    on_started()
                await stopping.wait()
                logger.info("%s stopping: finishing in-flight messages", self.name)
        finally:
            for sig in signals:
                with contextlib.suppress(Exception):
                    loop.remove_signal_handler(sig)
        logger.info("%s stopped", self.name)

    @contextlib.asynccontextmanager
    async def _metrics_endpoint(self) -> AsyncIterator[None]:
        settings = self.bus.settings
        if not settings.metrics_port:
            yield
            return
        from eventrelay.http import serve_metrics

        server = await serve_metrics(self.bus, settings.metrics_host, settings.metrics_port)
        try:
            yield
        finally:
            server.close()
            await server.wait_closed()


def _first(*urls: str | None) -> str | None:
    """The first URL given, in order of precedence."""
    return next((url for url in urls if url is not None), None)
