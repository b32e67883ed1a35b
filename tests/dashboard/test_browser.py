"""The operations guide in a real browser: the BookStore's OrderService runs a broken deployment, a price drop
becomes a dead letter, and an operator finds it in the dashboard, reads its trace and replays it.

Headless Chromium is Debian's `chromium` package, driven by Playwright with that executable (Playwright never
downloads a browser). Without them the test skips, or fails under CI, where `.ci/run` installs chromium.
Screenshots go to the test's folder; with EVENTRELAY_SCREENSHOTS=docs/images they also refresh the guide's.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from tests.servers import servers_required

CHROMIUM = "/usr/bin/chromium"
EXAMPLES = Path(__file__).parent.parent.parent / "examples"
TOKEN = "operations-guide-token"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytestmark = [pytest.mark.browser, pytest.mark.slow]
# The sample's demo driver, imported by name: mypy checks the sample on its own (`mypy -p bookstore`).
demo: Any = importlib.import_module("bookstore.demo")


def require_browser() -> None:
    missing = [] if os.path.exists(CHROMIUM) else [f"Debian's chromium ({CHROMIUM})"]
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("playwright (pip)")
    if missing:
        message = f"the browser test needs {' and '.join(missing)}; .ci/run installs them"
        if servers_required():
            pytest.fail(message)
        pytest.skip(message)


def wait_until(what: str, check: Any, timeout: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.1)
    raise AssertionError(f"{what}: not after {timeout:.0f}s")


def dead_letters(data: Path) -> list[tuple[int, str, str]]:
    with sqlite3.connect(data / "order.db") as db:
        try:
            return list(db.execute("SELECT id, name, reason FROM eventrelay_dead_letters ORDER BY id"))
        except sqlite3.OperationalError:  # the tables are not there yet
            return []


@pytest.fixture
def broken_bookstore(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """Identity, Product and a broken OrderService as processes; an order whose discount failed."""
    monkeypatch.setenv("BOOKSTORE_TRACES", str(tmp_path / "traces.jsonl"))
    monkeypatch.setenv("ORDER_BROKEN_PRICING", "1")
    monkeypatch.setenv("ORDER_RETRY_MAX_ATTEMPTS", "2")
    monkeypatch.setenv("ORDER_RETRY_INITIAL_DELAY", "0.05")
    monkeypatch.setattr(demo, "PATIENCE", 120.0)
    services = [demo.Process(s.name, s.app, s.env_prefix) for s in demo.SERVICES[:3]]
    try:
        demo.start(services, tmp_path, None, None)
        identity, product, order = (s.url for s in services)
        alice = demo.call(
            "POST", f"{identity}/users", {"user_name": "alice", "name": "Alice", "email": "a@example.com"}
        )
        book = demo.call(
            "POST", f"{product}/products", {"name": "Mastering Microservices", "price": "40.00", "stock": 10}
        )
        body = {"buyer_id": alice["id"], "product_id": book["id"], "quantity": 2}
        placed = demo.eventually("the order", lambda: demo.call("POST", f"{order}/orders", body))
        demo.call("PUT", f"{product}/products/{book['id']}/price", {"price": "30.00"})
        wait_until("the failed discount as a dead letter", lambda: dead_letters(tmp_path))
        yield {"order_url": f"{order}/orders/{placed['id']}", "data": tmp_path}
    finally:
        demo.stop(services)


@pytest.fixture
def dashboard_url(broken_bookstore: dict[str, Any]) -> Iterator[str]:
    """`eventrelay dashboard` of the sample's services, with the fix deployed (no ORDER_BROKEN_PRICING)."""
    data: Path = broken_bookstore["data"]
    port = demo.free_port()
    env = {k: v for k, v in os.environ.items() if k != "ORDER_BROKEN_PRICING"}
    env |= {
        "BOOKSTORE_DATA": str(data),
        "PYTHONPATH": str(EXAMPLES),
        "OTEL_SERVICE_NAME": "eventrelay-dashboard",
    }
    targets = [f"bookstore.{s}.app:service" for s in ("product", "order", "identity")]
    with open(data / "dashboard.log", "ab") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "eventrelay",
                "dashboard",
                *targets,
                "--port",
                str(port),
                "--token",
                TOKEN,
            ],
            cwd=EXAMPLES,
            env=env,
            stdout=log,
            stderr=log,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until("the dashboard", lambda: _answers(f"{url}/style.css") or process.poll() is not None, 60)
        assert process.poll() is None, (data / "dashboard.log").read_text()
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, (data / "dashboard.log").read_text()


def _answers(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except OSError:
        return False


def test_an_operator_finds_the_failed_discount_reads_its_trace_and_replays_it(
    broken_bookstore: dict[str, Any], dashboard_url: str, tmp_path: Path
) -> None:
    require_browser()
    from playwright.sync_api import expect, sync_playwright

    shots = tmp_path / "screenshots"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),  # a fresh user-data-dir
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 760},
        )
        try:
            page = browser.new_page()
            page.goto(dashboard_url)
            expect(page).to_have_url(f"{dashboard_url}/login")
            page.get_by_label("Token").fill(TOKEN)
            page.get_by_role("button", name="Log in").click()
            expect(page.get_by_role("link", name="OrderService")).to_be_visible()
            page.screenshot(path=shots / "dashboard-overview.png")

            page.get_by_role("link", name="OrderService").click()
            expect(page.get_by_role("heading", name="OrderService")).to_be_visible()
            page.screenshot(path=shots / "dashboard-service.png")

            page.get_by_role("link", name="1", exact=True).click()  # the dead letter's id
            expect(page.get_by_text("pricing rules unavailable").first).to_be_visible()
            expect(page.get_by_text('"new_price": "30.00"')).to_be_visible()
            trace_id = page.locator("code").first.inner_text()
            page.screenshot(path=shots / "dashboard-letter.png", full_page=True)

            page.get_by_role("button", name="Replay", exact=True).click()
            expect(
                page.get_by_role("heading", name="Replay 1 dead letter(s) of OrderService?")
            ).to_be_visible()
            page.screenshot(path=shots / "dashboard-confirm.png")
            page.get_by_role("button", name="Yes, replay 1").click()
            expect(page.get_by_role("heading", name="1 of 1 dead letter(s) replayed")).to_be_visible()
            page.screenshot(path=shots / "dashboard-replayed.png")
        finally:
            browser.close()

    order = demo.call("GET", broken_bookstore["order_url"])
    assert Decimal(order["discount"]) == Decimal("20.00")  # the replay applied it
    assert Decimal(order["unit_price"]) == Decimal("30.00")
    assert dead_letters(broken_bookstore["data"]) == []

    spans = [json.loads(line) for line in (tmp_path / "traces.jsonl").read_text().splitlines()]
    in_trace = [s for s in spans if s["context"]["trace_id"] == f"0x{trace_id}"]
    names = {(s["resource"]["attributes"]["service.name"], s["name"]) for s in in_trace}
    assert ("ProductService", "PUT /products/{product_id}/price") in names
    assert ("ProductService", "create BookStore.Product.PriceChanged") in names
    process = [s for s in in_trace if s["name"] == "process BookStore.Product.PriceChanged"]
    # The broken deployment's first attempt ran in its fetch's batch; keyed by product, its second waited in
    # place (a process span of its own); then the replay.
    assert [s["attributes"].get("eventrelay.replay", False) for s in process] == [False, False, True]
    handler = "handle bookstore.order.app.OrderProductPriceChangedHandler"
    handles = [s for s in in_trace if s["name"] == handler]
    assert [s["status"]["status_code"] for s in handles] == ["ERROR", "ERROR", "UNSET"]
    assert [s["attributes"]["messaging.consumer.group.name"] for s in handles] == ["OrderService"] * 3
    processes = [s["resource"]["attributes"]["service.name"] for s in handles]
    assert processes == ["OrderService", "OrderService", "eventrelay-dashboard"]  # where each ran

    target = os.environ.get("EVENTRELAY_SCREENSHOTS")
    if target:
        for shot in shots.iterdir():
            shutil.copy(shot, Path(target) / shot.name)
