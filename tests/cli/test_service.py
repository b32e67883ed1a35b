"""`Settings.from_env`, `Service` (environment, lifecycle, inside an asyncio app) and `eventrelay run` as a
real process that stops gracefully on SIGTERM or SIGINT."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest

from eventrelay import (
    ConfigurationError,
    Context,
    DistributedEventHandler,
    Event,
    MemoryBroker,
    RetryPolicy,
    Settings,
)
from eventrelay.brokers.sql import SqlBroker
from eventrelay.config import EMBEDDED_BROKER
from eventrelay.service import Service
from eventrelay.testing import wait_until_idle

# --- Settings.from_env -------------------------------------------------------------------------------


def test_from_env_without_variables_gives_the_defaults() -> None:
    assert Settings.from_env("ORDER_", {}) == Settings()
    assert Settings.from_env(environ={"ORDER_MAX_IN_FLIGHT": "5"}) == Settings()  # another prefix


def test_from_env_parses_every_kind_of_field() -> None:
    environ = {
        "ORDER_MAX_IN_FLIGHT": "50",
        "ORDER_MAX_MESSAGE_BYTES": "2048",
        "ORDER_FETCH_TIMEOUT": "0.25",
        "ORDER_RELAY_BATCH_SIZE": "10",
        "ORDER_RELAY_POLL_INTERVAL": "2",
        "ORDER_INBOX_RETENTION": "3600",
        "ORDER_INBOX_CLEANUP_INTERVAL": "90.5",
        "ORDER_CREATE_TABLES": "false",
        "ORDER_SHUTDOWN_TIMEOUT": "5",
        "OTHER_MAX_IN_FLIGHT": "7",
    }

    settings = Settings.from_env("ORDER_", environ)

    assert settings == Settings(
        max_in_flight=50,
        max_message_bytes=2048,
        fetch_timeout=0.25,
        relay_batch_size=10,
        relay_poll_interval=2.0,
        inbox_retention=timedelta(hours=1),
        inbox_cleanup_interval=timedelta(seconds=90.5),
        create_tables=False,
        shutdown_timeout=5.0,
    )
    assert isinstance(settings.max_in_flight, int)
    assert isinstance(settings.relay_poll_interval, float)


def test_from_env_sets_the_retry_policy() -> None:
    settings = Settings.from_env(
        "ORDER_",
        {"ORDER_RETRY_MAX_ATTEMPTS": "3", "ORDER_RETRY_INITIAL_DELAY": "0.5", "ORDER_RETRY_MAX_DELAY": "10"},
    )

    assert settings.retry == RetryPolicy(max_attempts=3, initial_delay=0.5, max_delay=10.0)


def test_from_env_keeps_the_retry_fields_not_given() -> None:
    settings = Settings.from_env("ORDER_", {"ORDER_RETRY_MAX_DELAY": "2.5"})

    assert settings.retry == dataclasses.replace(RetryPolicy(), max_delay=2.5)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("true", True), ("TRUE", True), ("1", True), ("false", False), ("False", False), ("0", False)],
)
def test_from_env_booleans(raw: str, expected: bool) -> None:
    assert Settings.from_env("ORDER_", {"ORDER_CREATE_TABLES": raw}).create_tables is expected


@pytest.mark.parametrize(
    ("variable", "raw"),
    [
        ("ORDER_MAX_IN_FLIGHT", "many"),
        ("ORDER_MAX_IN_FLIGHT", "1.5"),
        ("ORDER_FETCH_TIMEOUT", "soon"),
        ("ORDER_INBOX_RETENTION", "7d"),
        ("ORDER_CREATE_TABLES", "yes"),
        ("ORDER_CREATE_TABLES", ""),
        ("ORDER_RETRY_MAX_ATTEMPTS", "2.5"),
        ("ORDER_RETRY_INITIAL_DELAY", "fast"),
        ("ORDER_RETRY_MAX_DELAY", "1m"),
    ],
)
def test_from_env_rejects_a_bad_value_naming_the_variable(variable: str, raw: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        Settings.from_env("ORDER_", {variable: raw})

    assert variable in str(caught.value)
    assert repr(raw) in str(caught.value)


@pytest.mark.parametrize(
    ("variable", "raw", "field"),
    [
        ("ORDER_MAX_IN_FLIGHT", "0", "max_in_flight"),
        ("ORDER_RELAY_BATCH_SIZE", "-1", "relay_batch_size"),
        ("ORDER_FETCH_TIMEOUT", "0", "fetch_timeout"),
        ("ORDER_SHUTDOWN_TIMEOUT", "-2.5", "shutdown_timeout"),
        ("ORDER_INBOX_RETENTION", "-5", "inbox_retention"),
        ("ORDER_INBOX_CLEANUP_INTERVAL", "0", "inbox_cleanup_interval"),
        ("ORDER_RETRY_MAX_ATTEMPTS", "0", "max_attempts"),
        ("ORDER_RETRY_INITIAL_DELAY", "-1", "delays"),
    ],
)
def test_from_env_rejects_a_value_out_of_range(variable: str, raw: str, field: str) -> None:
    with pytest.raises(ConfigurationError, match=field):
        Settings.from_env("ORDER_", {variable: raw})


def test_from_env_reads_the_urls() -> None:
    settings = Settings.from_env(
        "ORDER_", {"ORDER_BROKER_URL": "amqp://broker/", "ORDER_DATABASE_URL": "sqlite+aiosqlite:///o.db"}
    )

    assert settings == Settings(broker_url="amqp://broker/", database_url="sqlite+aiosqlite:///o.db")
    assert (Settings().broker_url, Settings().database_url) == (None, None)  # the builder's defaults


def test_from_env_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORDERTEST_MAX_IN_FLIGHT", "9")

    assert Settings.from_env("ORDERTEST_").max_in_flight == 9
    assert Settings.from_env("ORDERTEST_", {}).max_in_flight == 100  # an explicit environ wins


# --- Service: settings from the environment ----------------------------------------------------------


def test_service_takes_its_urls_and_settings_from_the_given_environ(tmp_path: Path, sqlite_url: str) -> None:
    environ = {
        "ORDER_DATABASE_URL": sqlite_url,
        "ORDER_BROKER_URL": "memory://",
        "ORDER_MAX_IN_FLIGHT": "7",
        "ORDER_RETRY_MAX_ATTEMPTS": "2",
    }

    service = Service(
        "Orders",
        database=f"sqlite+aiosqlite:///{tmp_path}/from-code.db",
        broker=f"sqlite+aiosqlite:///{tmp_path}/broker-from-code.db",
        env_prefix="ORDER_",
        environ=environ,
    )

    assert service.database_url == sqlite_url
    assert service.bus.broker_url == "memory://"
    assert isinstance(service.bus.broker, MemoryBroker)
    assert service.bus.settings.max_in_flight == 7
    assert service.bus.settings.retry.max_attempts == 2


def test_service_keeps_the_code_values_without_variables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    database = f"sqlite+aiosqlite:///{tmp_path}/from-code.db"
    broker = f"sqlite+aiosqlite:///{tmp_path}/broker.db"
    monkeypatch.setenv(
        "ORDER_DATABASE_URL", "sqlite+aiosqlite:///from-os-environ.db"
    )  # not the environ given

    service = Service("Orders", database=database, broker=broker, env_prefix="ORDER_", environ={})

    assert service.database_url == database
    assert service.bus.broker_url == broker
    assert isinstance(service.bus.broker, SqlBroker)
    assert service.bus.settings == Settings()


def test_service_takes_its_urls_from_its_settings(tmp_path: Path) -> None:
    database = f"sqlite+aiosqlite:///{tmp_path}/from-settings.db"

    service = Service("Orders", settings=Settings(broker_url="memory://", database_url=database))

    assert service.database_url == database
    assert service.bus.broker_url == "memory://"


def test_service_urls_the_environment_then_the_arguments_then_the_settings(tmp_path: Path) -> None:
    settings = Settings(broker_url="memory://", database_url=f"sqlite+aiosqlite:///{tmp_path}/settings.db")
    from_code = f"sqlite+aiosqlite:///{tmp_path}/code.db"
    from_env = f"sqlite+aiosqlite:///{tmp_path}/env.db"

    by_code = Service("Orders", database=from_code, broker=from_code, settings=settings)
    by_env = Service(
        "Orders",
        database=from_code,
        settings=settings,
        env_prefix="ORDER_",
        environ={"ORDER_DATABASE_URL": from_env, "ORDER_BROKER_URL": from_env},
    )

    assert (by_code.database_url, by_code.bus.broker_url) == (from_code, from_code)
    assert (by_env.database_url, by_env.bus.broker_url) == (from_env, from_env)
    assert by_env.bus.settings is settings  # explicit settings win for every other field


def test_service_without_a_broker_uses_the_embedded_one() -> None:
    service = Service("Orders")

    assert service.bus.broker_url == EMBEDDED_BROKER == "sqlite+aiosqlite:///eventrelay-broker.db"
    assert isinstance(service.bus.broker, SqlBroker)
    assert service.database_url is None


def test_service_reads_no_environment_without_a_prefix() -> None:
    service = Service(
        "Orders", broker="memory://", environ={"DATABASE_URL": "sqlite+aiosqlite://", "MAX_IN_FLIGHT": "3"}
    )

    assert service.database_url is None
    assert service.bus.settings == Settings()


def test_explicit_settings_win_over_the_environment() -> None:
    settings = Settings(max_in_flight=3)

    service = Service(
        "Orders",
        broker="memory://",
        settings=settings,
        env_prefix="ORDER_",
        environ={"ORDER_MAX_IN_FLIGHT": "9"},
    )

    assert service.bus.settings is settings


def test_service_with_a_bad_variable_fails_at_construction() -> None:
    with pytest.raises(ConfigurationError, match="ORDER_FETCH_TIMEOUT"):
        Service("Orders", broker="memory://", env_prefix="ORDER_", environ={"ORDER_FETCH_TIMEOUT": "x"})


def test_service_with_an_unknown_broker_scheme_from_the_environment() -> None:
    with pytest.raises(ConfigurationError, match="No broker for URL scheme 'pulsar'"):
        Service("Orders", env_prefix="ORDER_", environ={"ORDER_BROKER_URL": "pulsar://127.0.0.1"})


# --- Service: lifecycle inside an asyncio application ------------------------------------------------


class PriceChanged(Event, name="Tests.Cli.Service.PriceChanged"):
    product: str
    price: int


class OrderPlaced(Event, name="Tests.Cli.Service.OrderPlaced"):
    order: str


DISCOUNTS: list[tuple[str, int]] = []
SEEN_BY: list[str] = []


class ApplyDiscount(DistributedEventHandler[PriceChanged]):
    async def handle_event(self, event: PriceChanged) -> None:
        DISCOUNTS.append((event.product, event.price))
        SEEN_BY.append(self.context.subscriber)


async def note_order(event: OrderPlaced, context: Context) -> None:
    SEEN_BY.append(f"{context.subscriber}:{event.order}")


@pytest.fixture(autouse=True)
def _forget_effects() -> None:
    DISCOUNTS.clear()
    SEEN_BY.clear()


QUICK = Settings(relay_poll_interval=0.05, fetch_timeout=0.05)


async def test_service_runs_inside_an_asyncio_application(sqlite_url: str, tmp_path: Path) -> None:
    """Two services on one shared broker, started with `async with` as a FastAPI lifespan would."""
    broker = MemoryBroker()
    await broker.start()
    products = Service(
        "Products",
        database=f"sqlite+aiosqlite:///{tmp_path}/products.db",
        broker=broker,
        publishes=[PriceChanged],
        settings=QUICK,
    )
    orders = Service("Orders", database=sqlite_url, broker=broker, handlers=[ApplyDiscount], settings=QUICK)
    orders.subscribe(note_order)
    try:
        async with orders, products:
            assert (orders.bus.started, products.bus.started) == (True, True)
            assert orders.handled_events == [
                "Tests.Cli.Service.OrderPlaced",
                "Tests.Cli.Service.PriceChanged",
            ]
            assert products.published_events == ["Tests.Cli.Service.PriceChanged"]

            async with products.bus.unit_of_work():
                await products.bus.publish(PriceChanged(product="book", price=9))
            await products.bus.publish(OrderPlaced(order="o-1"))
            await wait_until_idle(products.bus, orders.bus, timeout=30)

            assert DISCOUNTS == [("book", 9)]
            assert sorted(SEEN_BY) == ["Orders", "Orders:o-1"]
        assert (orders.bus.started, products.bus.started) == (False, False)  # stopped on leaving
    finally:
        await broker.close()


async def test_subscribe_after_start_is_a_configuration_error(sqlite_url: str) -> None:
    service = Service("Orders", database=sqlite_url, broker="memory://", settings=QUICK)
    service.subscribe(ApplyDiscount)  # before start: fine

    async with service:
        with pytest.raises(ConfigurationError, match=r"Orders has started: subscribe at run time"):
            service.subscribe(note_order)
        # The way that does work at run time:
        subscription = await service.bus.subscribe(note_order)
        await service.bus.publish(OrderPlaced(order="o-9"))
        await wait_until_idle(service.bus, timeout=30)
        await subscription.unsubscribe()

    assert SEEN_BY == ["Orders:o-9"]
    with pytest.raises(ConfigurationError):  # prepared once is prepared for good
        service.subscribe(note_order)


async def test_subscribe_after_prepare_is_a_configuration_error() -> None:
    service = Service("Orders", broker="memory://")
    await service.prepare()
    await service.prepare()  # idempotent

    with pytest.raises(ConfigurationError, match="has started"):
        service.subscribe(ApplyDiscount)


async def test_a_handler_subscribed_twice_is_refused_when_prepared() -> None:
    service = Service("Orders", broker="memory://", handlers=[ApplyDiscount])
    service.subscribe(ApplyDiscount)

    with pytest.raises(ConfigurationError, match="already subscribed"):
        await service.prepare()


# --- `eventrelay run` as a real process --------------------------------------------------------------

RUN_APP = """
import asyncio
import logging

from eventrelay import Event, Service, Settings

log = logging.getLogger("runapp")


class Ping(Event, name="RunApp.Ping"):
    n: int


async def pong(event: Ping) -> None:
    log.info("pong %d", event.n)


service = Service(
    "{name}",
    database="sqlite+aiosqlite:///runner.db",
    broker="memory://",
    handlers=[pong],
    settings=Settings(fetch_timeout=0.2, relay_poll_interval=0.2),
)
"""


def _wait_for_text(path: Path, text: str, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in path.read_text():
            return
        if process.poll() is not None:
            raise AssertionError(f"exited with {process.returncode} before {text!r}:\n{path.read_text()}")
        time.sleep(0.05)
    raise AssertionError(f"no {text!r} after {timeout}s:\n{path.read_text()}")


def _run_and_stop(tmp_path: Path, sig: signal.Signals, *options: str) -> tuple[str, int, str, str]:
    """`eventrelay run runapp:service OPTIONS` as a process, sent `sig` once it has started (as its log says,
    or with `--json` its output): the service's name, the exit code, the output and the log."""
    name = f"Runner{uuid.uuid4().hex[:8]}"
    (tmp_path / "runapp.py").write_text(textwrap.dedent(RUN_APP).replace("{name}", name))
    out, log = tmp_path / "run.out", tmp_path / "run.log"
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    with out.open("wb") as stdout, log.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "eventrelay", "run", "runapp:service", *options],
            cwd=tmp_path,
            env=env,
            stdout=stdout,
            stderr=stderr,
        )
    try:
        if "--json" in options:
            _wait_for_text(out, '"started": true', process, timeout=60)
        else:
            _wait_for_text(log, f"{name} started: database", process, timeout=60)
        process.send_signal(sig)
        returncode = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
    return name, returncode, out.read_text(), log.read_text()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_run_stops_gracefully_on_a_signal_and_exits_0(tmp_path: Path, sig: signal.Signals) -> None:
    name, returncode, _, output = _run_and_stop(tmp_path, sig)

    assert returncode == 0, output
    assert "Traceback" not in output
    lines = output.splitlines()
    started = next(i for i, line in enumerate(lines) if f"{name} started: database" in line)
    stopping = next(i for i, line in enumerate(lines) if f"{name} stopping: finishing in-flight" in line)
    stopped = next(i for i, line in enumerate(lines) if line.endswith(f"eventrelay.service: {name} stopped"))
    assert started < stopping < stopped
    assert "INFO" in lines[started]
    assert "handling RunApp.Ping" in lines[started]
    assert "broker memory://" in lines[started]


def test_run_json_prints_a_line_when_started_and_one_when_stopped(tmp_path: Path) -> None:
    name, returncode, output, log = _run_and_stop(tmp_path, signal.SIGTERM, "--json")

    assert returncode == 0, log
    started, stopped = (json.loads(line) for line in output.splitlines())
    assert started == {
        "service": name,
        "started": True,
        "broker": "memory://",
        "database": "sqlite+aiosqlite:///runner.db",
        "handles": ["RunApp.Ping"],
    }
    assert stopped == {"service": name, "stopped": True}
