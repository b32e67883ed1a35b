"""Metrics: counters, histograms and gauges after real traffic between two services (a SQLite file as the
broker), each bus with a registry of its own; `/metrics` served by the library and by `eventrelay run`."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from datetime import timedelta
from pathlib import Path

import pytest

from eventrelay import DistributedEventBus, Event, Reject, RetryPolicy, Settings
from eventrelay.envelope import COMMITTED_AT
from eventrelay.errors import ConfigurationError
from eventrelay.http import serve_metrics
from eventrelay.metrics import Metrics, committed_at, scrape
from eventrelay.stores.base import utcnow
from eventrelay.testing import RecordingBroker, wait_until_idle
from tests.bus.helpers import eventually, settings
from tests.server_process import free_port

METRICS = settings(metrics=True, retry=RetryPolicy(max_attempts=3, initial_delay=0.01, max_delay=0.01))
NAME = "MetricsTests.StockChanged"


class StockChanged(Event, name=NAME):
    n: int


def value(bus: DistributedEventBus, name: str, **labels: str) -> float | None:
    assert isinstance(bus.metrics, Metrics)
    return bus.metrics.registry.get_sample_value(name, {"service": bus.service, **labels})


async def http_get(port: int, path: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def test_counters_histograms_and_gauges_after_real_traffic(tmp_path: Path) -> None:
    broker = f"sqlite+aiosqlite:///{tmp_path}/broker.db"
    products = DistributedEventBus(
        "ProductService", broker=broker, database=f"sqlite+aiosqlite:///{tmp_path}/p.db", settings=METRICS
    )
    orders = DistributedEventBus(
        "OrderService", broker=broker, database=f"sqlite+aiosqlite:///{tmp_path}/o.db", settings=METRICS
    )
    failed_once: set[int] = set()

    async def reserve(event: StockChanged) -> None:
        if event.n == 0:
            raise Reject("no such product")
        if event.n == 1 and event.n not in failed_once:
            failed_once.add(event.n)
            raise ConnectionError("warehouse down")

    await orders.subscribe(reserve, name="reserve")
    async with products, orders:
        for n in range(3):
            await products.publish(StockChanged(n=n))
        await eventually(
            lambda: value(orders, "eventrelay_handled_total", event=NAME, handler="reserve") == 2, 30
        )
        await wait_until_idle(products, orders, timeout=30)
        body, content_type = await scrape(orders)
        await scrape(products)

    handler = {"event": NAME, "handler": "reserve"}
    assert value(products, "eventrelay_published_total", event=NAME) == 3
    assert value(products, "eventrelay_relayed_total", event=NAME) == 3
    assert value(orders, "eventrelay_handled_total", **handler) == 2
    assert value(orders, "eventrelay_retried_total", **handler) == 1
    assert value(orders, "eventrelay_dead_lettered_total", **handler) == 1
    assert value(orders, "eventrelay_handler_duration_seconds_count", **handler) == 2
    assert value(orders, "eventrelay_commit_to_handle_seconds_count", **handler) == 2
    assert value(products, "eventrelay_outbox_backlog") == 0
    assert value(products, "eventrelay_outbox_oldest_age_seconds") == 0
    assert value(orders, "eventrelay_consumer_lag") == 0
    assert value(orders, "eventrelay_published_total", event=NAME) is None  # registries are per bus
    assert content_type.startswith("text/plain")
    labels = b'event="MetricsTests.StockChanged",handler="reserve",service="OrderService"'
    assert b"eventrelay_handled_total{" + labels + b"} 2.0" in body


async def test_the_outbox_gauges_show_what_waits() -> None:
    async with DistributedEventBus("Stalled", broker=RecordingBroker(), settings=METRICS) as bus:
        before = utcnow()
        await bus.publish(StockChanged(n=1), delay=3600)  # waits in the outbox for an hour
        written = utcnow()
        aged = written + timedelta(seconds=0.05)
        await eventually(lambda: utcnow() >= aged)  # the row is at least 50 ms old from here on
        scraped = utcnow()
        await scrape(bus)
        after = utcnow()
        assert value(bus, "eventrelay_outbox_backlog") == 1
        # Its age counts from when it was written (not from when it is due, an hour ahead), in seconds.
        age = value(bus, "eventrelay_outbox_oldest_age_seconds")
        assert age is not None
        assert (scraped - written).total_seconds() <= age <= (after - before).total_seconds()
        assert value(bus, "eventrelay_consumer_lag") == 0


async def test_the_commit_time_rides_in_a_header_written_with_the_outbox_row() -> None:
    broker = RecordingBroker()
    before = utcnow()
    async with DistributedEventBus("Stamps", broker=broker, settings=settings()) as bus:
        async with bus.unit_of_work():
            await bus.publish(StockChanged(n=1))
        await bus.publish(StockChanged(n=2), use_outbox=False)  # no outbox row, no stamp
        await wait_until_idle(bus)
    stamped, direct = sorted(broker.published, key=lambda m: COMMITTED_AT in m.headers, reverse=True)
    when = committed_at(stamped)
    assert when is not None
    assert before <= when <= utcnow()
    assert stamped.headers[COMMITTED_AT].endswith("Z")
    assert COMMITTED_AT not in direct.headers


async def test_metrics_are_off_by_default_and_scrape_says_how_to_turn_them_on() -> None:
    bus = DistributedEventBus("Plain", broker=RecordingBroker())
    assert not bus.metrics.enabled
    with pytest.raises(ConfigurationError, match=r"Settings\(metrics=True\)"):
        await scrape(bus)


async def test_the_library_serves_metrics_over_http() -> None:
    async with DistributedEventBus("Served", broker=RecordingBroker(), settings=METRICS) as bus:
        await bus.publish(StockChanged(n=1))
        await wait_until_idle(bus)
        server = await serve_metrics(bus, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            status, body = await http_get(port, "/metrics")
            assert status == 200
            assert (
                b'eventrelay_published_total{event="MetricsTests.StockChanged",service="Served"} 1.0' in body
            )
            assert (await http_get(port, "/elsewhere"))[0] == 404
        finally:
            server.close()
            await server.wait_closed()


def test_settings_turn_metrics_on_from_the_environment() -> None:
    env = {"ORDER_METRICS_PORT": "9464", "ORDER_METRICS_HOST": "0.0.0.0", "ORDER_METRICS": "true"}
    assert Settings.from_env("ORDER_", env) == Settings(
        metrics=True, metrics_port=9464, metrics_host="0.0.0.0"
    )
    with pytest.raises(ConfigurationError, match="metrics_port"):
        Settings(metrics_port=70000)


async def test_eventrelay_run_serves_metrics_at_the_metrics_port(tmp_path: Path) -> None:
    (tmp_path / "metered.py").write_text(
        textwrap.dedent(
            f"""
            from eventrelay.service import Service

            service = Service("Metered", database="sqlite+aiosqlite:///{tmp_path}/m.db",
                              broker="sqlite+aiosqlite:///{tmp_path}/b.db", env_prefix="METERED_")
            """
        )
    )
    port = free_port()
    env = {**os.environ, "METERED_METRICS_PORT": str(port), "PYTHONPATH": str(tmp_path)}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "eventrelay",
        "run",
        "metered:service",
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:

        async def answers() -> bool:
            try:
                status, body = await http_get(port, "/metrics")
            except OSError:
                return False
            return status == 200 and b'eventrelay_outbox_backlog{service="Metered"} 0.0' in body

        await eventually(answers, timeout=60)
    finally:
        process.send_signal(signal.SIGTERM)
        _, errors = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, errors.decode()
