"""Fixtures shared by every test: database URLs for SQLite and for the real PostgreSQL and MariaDB servers.

Each server fixture creates a database of its own with a unique name and drops it afterwards, so tests never
see each other's rows. The shared servers themselves are never stopped or reconfigured.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncmy
import asyncpg
import pytest

from tests.servers import require_server

HOST = "127.0.0.1"
POSTGRESQL_PORT = 5432
MARIADB_PORT = 3306
# Trust authentication: the superuser is "postgres" on Debian, "root" on some other set-ups.
POSTGRESQL_USERS = ("postgres", "root")


def _database_name() -> str:
    return f"er_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path}/service.db"


async def _postgresql_admin() -> tuple[str, asyncpg.Connection]:
    """Connect to the maintenance database as the first superuser that the server lets in."""
    errors: list[str] = []
    for user in POSTGRESQL_USERS:
        try:
            connection = await asyncpg.connect(
                host=HOST, port=POSTGRESQL_PORT, user=user, database="postgres", timeout=5
            )
        except (OSError, asyncpg.PostgresError) as exc:
            errors.append(f"{user}: {exc}")
        else:
            return user, connection
    pytest.fail(f"cannot log in to PostgreSQL on {HOST}:{POSTGRESQL_PORT}: {'; '.join(errors)}")


@pytest.fixture
async def postgresql_url() -> AsyncIterator[str]:
    require_server("PostgreSQL", POSTGRESQL_PORT, HOST)
    name = _database_name()
    user, admin = await _postgresql_admin()
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield f"postgresql+asyncpg://{user}@{HOST}:{POSTGRESQL_PORT}/{name}"
    finally:
        _, admin = await _postgresql_admin()
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


async def _mariadb_execute(statement: str) -> None:
    connection = await asyncmy.connect(
        host=HOST, port=MARIADB_PORT, user="root", password="", autocommit=True
    )
    try:
        async with connection.cursor() as cursor:
            await cursor.execute(statement)
    finally:
        await connection.ensure_closed()


@pytest.fixture
async def mariadb_url() -> AsyncIterator[str]:
    require_server("MariaDB", MARIADB_PORT, HOST)
    name = _database_name()
    await _mariadb_execute(f"CREATE DATABASE `{name}`")
    try:
        yield f"mysql+asyncmy://root@{HOST}:{MARIADB_PORT}/{name}"
    finally:
        await _mariadb_execute(f"DROP DATABASE IF EXISTS `{name}`")


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgresql", id="postgresql", marks=pytest.mark.postgresql),
        pytest.param("mariadb", id="mariadb", marks=pytest.mark.mariadb),
    ]
)
def database_url(request: pytest.FixtureRequest) -> str:
    """The URL of a fresh, empty database on each of the supported engines in turn."""
    url = request.getfixturevalue(f"{request.param}_url")
    assert isinstance(url, str)
    return url
