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
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Self

from sqlalchemy.ext.asyncio import AsyncEngine

from eventrelay.brokers.base import Broker
from eventrelay.bus import DistributedEventBus, Subscription
from eventrelay.config import Settings, redact_url
from eventrelay.entity_events import EntityEvents
from eventrelay.errors import ConfigurationError
from eventrelay.events import Event, event_name
from eventrelay.handlers import DistributedEventHandler, RetryPolicy

logger = logging.getLogger(__name__)

DEFAULT_BROKER = "sqlite+aiosqlite:///eventrelay-broker.db"
"""The embedded default: one SQLite file in the working folder, shared by the services started there."""


class Service:
    """One microservice: a bus named after the service, its handlers, and a way to run them.

    `database` and `broker` are URLs. With `env_prefix="ORDER_"`, the environment wins over the code:
    `ORDER_DATABASE_URL`, `ORDER_BROKER_URL` and the `Settings` fields (`ORDER_MAX_IN_FLIGHT`, ...).
    """

    def __init__(
        self,
        name: str,
        *,
        database: str | None = None,
        broker: str | Broker = DEFAULT_BROKER,
        handlers: Iterable[type[DistributedEventHandler[Any]] | Callable[..., Any]] = (),
        publishes: Sequence[type[Event]] = (),
        entity_events: EntityEvents | None = None,
        settings: Settings | None = None,
        env_prefix: str | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        env = os.environ if environ is None else environ
        if env_prefix is not None:
            database = env.get(f"{env_prefix}DATABASE_URL", database)
            broker = env.get(f"{env_prefix}BROKER_URL", broker) if isinstance(broker, str) else broker
            settings = Settings.from_env(env_prefix, env) if settings is None else settings
        self.name = name
        self.database_url = database
        self.publishes = tuple(publishes)
        for event in self.publishes:
            event_name(event)  # a generic without its argument fails here, not at the first publish
        self.bus = DistributedEventBus(
            name, broker=broker, database=database, settings=settings, entity_events=entity_events
        )
        self._pending: list[Callable[[], Awaitable[Subscription]]] = []
        self._prepared = False
        for handler in handlers:
            self.subscribe(handler)

    def subscribe(
        self,
        handler: type[DistributedEventHandler[Any]] | Callable[..., Any],
        *,
        event: str | type[Event] | None = None,
        factory: Callable[[], DistributedEventHandler[Any]] | None = None,
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

    async def run(self) -> None:
        """Run until SIGINT or SIGTERM; then stop fetching, finish in-flight messages, and return.

        With `Settings.metrics_port`, it serves the bus's metrics at `/metrics` on that port meanwhile.
        """
        loop = asyncio.get_running_loop()
        stopping = asyncio.Event()
        signals = (signal.SIGINT, signal.SIGTERM)
        for sig in signals:
            loop.add_signal_handler(sig, stopping.set)
        try:
            async with self, self._metrics_endpoint():
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
