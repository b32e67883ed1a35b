"""What every BookStore service shares: where its data lives, and a FastAPI app that runs its Service."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from sqlalchemy import MetaData

from eventrelay.service import Service

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
    """A FastAPI app whose lifespan creates the service's tables and runs its bus (consumer and relay)."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async with service.engine.begin() as conn:
            await conn.run_sync(metadata.create_all)
        async with service:
            yield

    app = FastAPI(title=title, lifespan=lifespan)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"service": service.name, "status": "ok"}

    return app
