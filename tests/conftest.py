"""Fixtures shared by every test: database URLs for SQLite and for the real PostgreSQL and MariaDB servers.

Each server fixture creates a database of its own with a unique name and drops it afterwards, so tests never
see each other's rows. The shared servers themselves are never stopped or reconfigured. At the end of the
session, what a run left on the servers is listed, and fails the run under CI (tests/leftovers.py).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncmy
import asyncpg
import pytest

from tests import leftovers
from tests.reliability.harness import REPORT, SIZES, Report, report_path
from tests.reliability.report import render
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


# --- the leftover check (tests/leftovers.py): what the servers hold at the start, compared at the end -------

BEFORE = pytest.StashKey[leftovers.Snapshot]()
FOUND = pytest.StashKey[leftovers.Leftovers]()


@pytest.hookimpl(tryfirst=True)  # before xdist's controller starts its workers
def pytest_sessionstart(session: pytest.Session) -> None:
    if not hasattr(session.config, "workerinput"):  # the controller, or the only process
        session.config.stash[BEFORE] = leftovers.take()


def _check_leftovers(session: pytest.Session) -> None:
    """List what the run left on the servers; under CI, fail the run if it left anything."""
    before = session.config.stash.get(BEFORE, None)
    if before is None:
        return
    ci = leftovers.under_ci()
    linger = leftovers.LINGER if ci and session.exitstatus != pytest.ExitCode.INTERRUPTED else 0.0
    found = leftovers.check(before, linger=linger)
    session.config.stash[FOUND] = found
    if found and ci and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# --- the reliability suite's figures (here, not in tests/reliability/, so that pytest-xdist's controller,
# which collects nothing, has these hooks too) --------------------------------------------------------------


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Write the reliability figures (an xdist worker hands its rows to the controller instead), and check
    for leftovers on the servers."""
    _check_leftovers(session)
    report = session.config.stash.get(REPORT, None)
    if report is None or not report.rows:
        return
    worker_output = getattr(session.config, "workeroutput", None)
    if worker_output is not None:
        worker_output["reliability_rows"] = report.rows_json()
    else:
        report_path().write_text(json.dumps(report.as_dict(), indent=1) + "\n")


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    """(xdist controller) Take the rows of a worker that finished."""
    rows = getattr(node, "workeroutput", {}).get("reliability_rows")
    if rows:
        node.config.stash.setdefault(REPORT, Report()).add_json(rows)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    found = config.stash.get(FOUND, None)
    if found:
        ci = leftovers.under_ci()
        terminalreporter.section("leftovers on the servers", red=ci, yellow=not ci)
        terminalreporter.write_line(
            "New since the session started: a test must delete what it made on the servers (DESIGN.md, "
            "Tests and tools). "
            + ("This fails the run (CI=true)." if ci else "Under CI=true this fails the run.")
        )
        for line in found.lines():
            terminalreporter.write_line(line)
    report = config.stash.get(REPORT, None)
    if report is None or not report.rows or hasattr(config, "workeroutput"):
        return
    terminalreporter.section("reliability figures")
    terminalreporter.write_line(f"sizes: {SIZES} (written to {report_path()})")
    for line in render(report.as_dict()).splitlines():
        terminalreporter.write_line(line)
