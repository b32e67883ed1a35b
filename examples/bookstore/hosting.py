"""What every BookStore service shares: where its data lives, and a FastAPI app that runs its Service."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Response
from fastapi.responses import PlainTextResponse
from sqlalchemy import MetaData

from bookstore import traces
from eventrelay import Service, scrape

DATA = Path(os.environ.get("BOOKSTORE_DATA", ".bookstore"))


def sqlite_url(name: str) -> str:
    """The default database of a service: a SQLite file of its own in the data folder."""
    DATA.mkdir(parents=True, exist_ok=True)
    return f"sqlite+aiosqlite:///{DATA / name}.db"


def default_broker() -> str:
    """The embedded default broker: one SQLite file in the data folder, shared by the services."""
    DATA.mkdir(parents=True, exist_ok=True)
    return f"sqlite+aiosqlite:///{DATA / 'broker.db'}"


def create_app(service: Service, metadata: MetaData, title: str) -> FastAPI:
    """A FastAPI app whose lifespan creates the service's tables and runs its bus (consumer and relay).

    With `BOOKSTORE_TRACES=FILE` it traces its requests and its bus to FILE (`bookstore/traces.py`).
    """
    tracing = traces.configure(service.name)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async with service.engine.begin() as conn:
            await conn.run_sync(metadata.create_all)
        async with service:
            yield

    app = FastAPI(title=title, lifespan=lifespan)
    if tracing:
        traces.trace_requests(app)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"service": service.name, "status": "ok"}

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        """The bus's Prometheus metrics, when the service runs with {PREFIX}METRICS=true."""
        if not service.bus.metrics.enabled:
            return PlainTextResponse(f"Metrics are off in {service.name}: set its METRICS=true", 404)
        body, content_type = await scrape(service.bus)
        return Response(body, media_type=content_type)

    return app
