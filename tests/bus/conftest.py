"""Fixtures of the bus tests: a database on every engine, and the no-database (memory store) case."""

from __future__ import annotations

import pytest

MEMORY = pytest.param("memory", id="memory")
SQLITE = pytest.param("sqlite", id="sqlite")
POSTGRESQL = pytest.param("postgresql", id="postgresql", marks=pytest.mark.postgresql)
MARIADB = pytest.param("mariadb", id="mariadb", marks=pytest.mark.mariadb)


def _url(request: pytest.FixtureRequest) -> str | None:
    if request.param == "memory":
        return None
    url = request.getfixturevalue(f"{request.param}_url")
    assert isinstance(url, str)
    return url


@pytest.fixture(params=[MEMORY, SQLITE, POSTGRESQL, MARIADB])
def database(request: pytest.FixtureRequest) -> str | None:
    """None (outbox, inbox and dead letters in memory), then a fresh database on each engine."""
    return _url(request)


@pytest.fixture(params=[MEMORY, POSTGRESQL, MARIADB])
def concurrent_database(request: pytest.FixtureRequest) -> str | None:
    """The stores on which several handlers' transactions are open at once.

    SQLite has one writer: every handler's transaction starts with `BEGIN IMMEDIATE`, so handlers that
    block inside their transaction run one after another there, by design.
    """
    return _url(request)
