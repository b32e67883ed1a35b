"""`make demo`: start the BookStore services as processes, drive the guide's story over HTTP, narrate it.

    python -m bookstore.demo [--broker URL] [--database URL] [--data DIR]

With no options every service keeps a SQLite file and they talk through the embedded SQLite broker: no server.
`--broker amqp://...` (or any eventrelay broker URL) and `--database postgresql+asyncpg://user@host/name` (one
database per service is created beside it: name_identity, name_product, ...) run the same story elsewhere.
Exits 0 when the story came true, 1 naming the step that did not.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from eventrelay import redact_url

console = Console()
# Seconds an eventual effect may take before its step fails (more on a loaded machine: BOOKSTORE_PATIENCE).
PATIENCE = float(os.environ.get("BOOKSTORE_PATIENCE", "30"))
# Seconds an order waits for its payment before its saga cancels it: a few, so that the demo stays quick.
PAYMENT_TIMEOUT = os.environ.get("ORDER_PAYMENT_TIMEOUT", "5")


@dataclass
class Process:
    name: str
    app: str
    env_prefix: str
    port: int = 0
    popen: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


SERVICES = [
    Process("IdentityService", "bookstore.identity.app:app", "IDENTITY_"),
    Process("ProductService", "bookstore.product.app:app", "PRODUCT_"),
    Process("OrderService", "bookstore.order.app:app", "ORDER_"),
    Process("NotificationService", "bookstore.notification.app:app", "NOTIFICATION_"),
    Process("PaymentService", "bookstore.payment.app:app", "PAYMENT_"),
]


class StoryFailed(Exception):
    """A step of the story did not come true."""


def call(method: str, url: str, body: dict[str, Any] | None = None) -> Any:
    """One JSON request; returns the decoded answer, raises StoryFailed with the status on an error."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            payload = response.read()
    except urllib.error.HTTPError as exc:
        raise StoryFailed(f"{method} {url} answered {exc.code}: {exc.read().decode()[:300]}") from exc
    except OSError as exc:
        raise StoryFailed(f"{method} {url} failed: {exc}") from exc
    return json.loads(payload) if payload else None


def eventually(what: str, check: Callable[[], Any]) -> Any:
    """Poll `check` until it returns something truthy (StoryFailed: not yet), or fail after PATIENCE."""
    deadline = time.monotonic() + PATIENCE
    last = "nothing yet"
    with console.status(f"[dim]waiting: {what}"):
        while time.monotonic() < deadline:
            try:
                result = check()
                if result:
                    return result
            except StoryFailed as exc:
                last = str(exc)
            time.sleep(0.1)
    raise StoryFailed(f"{what}: not after {PATIENCE:.0f}s ({last})")


@contextmanager
def step(title: str) -> Iterator[None]:
    try:
        yield
    except StoryFailed as exc:
        console.print(f"[red]✗ {title}[/red]\n  {exc}")
        raise
    console.print(f"[green]✓[/green] {title}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def per_service_database(url: str, service: str) -> str:
    """`.../bookstore` -> `.../bookstore_order`: each service owns its database."""
    base, _, name = url.rpartition("/")
    return f"{base}/{name}_{service.removesuffix('Service').lower()}"


async def create_databases(urls: list[str]) -> None:
    import asyncpg  # only for --database on PostgreSQL

    for url in urls:
        server, _, name = url.replace("postgresql+asyncpg", "postgresql").rpartition("/")
        connection = await asyncpg.connect(f"{server}/postgres")
        try:
            if not await connection.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
                await connection.execute(f'CREATE DATABASE "{name}"')
        finally:
            await connection.close()


def start(
    services: list[Process],
    data: Path,
    broker: str | None,
    database: str | None,
    environ: dict[str, str] | None = None,
) -> None:
    """Start `services` as processes, with `environ` added to this one's environment, and wait until each
    is healthy."""
    examples = str(Path(__file__).resolve().parent.parent)
    for service in services:
        service.port = free_port()
        env = {**os.environ, **(environ or {}), "BOOKSTORE_DATA": str(data), "PYTHONPATH": examples}
        if broker:
            env[f"{service.env_prefix}BROKER_URL"] = broker
        if database:
            env[f"{service.env_prefix}DATABASE_URL"] = per_service_database(database, service.name)
        with open(data / f"{service.name}.log", "ab") as log:
            service.popen = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "uvicorn",
                    service.app,
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(service.port),
                ],
                env=env,
                stdout=log,
                stderr=log,
            )
    for service in services:
        health = f"{service.url}/health"
        eventually(f"{service.name} healthy on port {service.port}", functools.partial(call, "GET", health))


def stop(services: list[Process]) -> bool:
    """SIGTERM every service; True if each finished its in-flight work and exited cleanly."""
    clean = True
    for service in services:
        if service.popen is not None and service.popen.poll() is None:
            service.popen.send_signal(signal.SIGTERM)
    for service in services:
        if service.popen is None:
            continue
        try:
            # uvicorn re-raises SIGTERM once its graceful shutdown is done, so -SIGTERM is a clean exit too.
            clean &= service.popen.wait(timeout=30) in (0, -signal.SIGTERM)
        except subprocess.TimeoutExpired:
            service.popen.kill()
            clean = False
    return clean


def story(identity: str, product: str, order: str, notification: str, payment: str) -> None:
    with step("IdentityService: users alice and bob created (it publishes EntityCreatedEto[UserEto])"):
        alice = call(
            "POST",
            f"{identity}/users",
            {"user_name": "alice", "name": "Alice Smith", "email": "alice@example.com"},
        )
        bob = call(
            "POST", f"{identity}/users", {"user_name": "bob", "name": "Bob Brown", "email": "bob@example.com"}
        )

    with step("ProductService: two books created at 40.00 and 25.00, 10 copies of each in stock"):
        book = call(
            "POST",
            f"{product}/products",
            {"name": "Mastering Microservices", "price": "40.00", "stock": 10},
        )
        guide = call("POST", f"{product}/products", {"name": "ABP in Action", "price": "25.00", "stock": 10})

    def place(buyer: dict[str, Any], item: dict[str, Any], quantity: int) -> dict[str, Any]:
        body = {"buyer_id": buyer["id"], "product_id": item["id"], "quantity": quantity}
        return dict(
            eventually(
                "OrderService to know the buyer and the book", lambda: call("POST", f"{order}/orders", body)
            )
        )

    with step("OrderService: orders placed (buyers and books known from their entity events)"):
        alices = place(alice, book, 2)
        bobs = place(bob, book, 1)
        bobs_guide = place(bob, guide, 1)

    with step("ProductService: Mastering Microservices drops from 40.00 to 30.00 (-25%)"):
        call("PUT", f"{product}/products/{book['id']}/price", {"price": "30.00"})

    def discounted() -> bool:
        orders = {o["id"]: o for o in call("GET", f"{order}/orders")}
        return (
            Decimal(orders[alices["id"]]["discount"]) == Decimal("20.00")
            and Decimal(orders[bobs["id"]]["discount"]) == Decimal("10.00")
            and Decimal(orders[alices["id"]]["unit_price"]) == Decimal("30.00")
        )

    with step("OrderService applied the discount: alice saves 20.00 (2 x 10.00), bob 10.00"):
        eventually("the discount on the open orders", discounted)

    with step("NotificationService got its own copy of the same event"):
        eventually(
            "the price notice",
            lambda: any(
                "Mastering Microservices: the price dropped from 40.00 to 30.00" in n["text"]
                for n in call("GET", f"{notification}/notices")
            ),
        )

    with step("ABP in Action: 25.00 to 24.00 (-4%) is under the 10% threshold: no discount, but a notice"):
        call("PUT", f"{product}/products/{guide['id']}/price", {"price": "24.00"})
        eventually(
            "the second notice",
            lambda: any("ABP in Action" in n["text"] for n in call("GET", f"{notification}/notices")),
        )
        still = call("GET", f"{order}/orders/{bobs_guide['id']}")
        if Decimal(still["discount"]) != 0 or Decimal(still["unit_price"]) != Decimal("25.00"):
            raise StoryFailed(f"bob's order of ABP in Action changed: {still}")

    with step("IdentityService: alice renamed to Alice Johnson (EntityUpdatedEto[UserEto])"):
        call(
            "PUT",
            f"{identity}/users/{alice['id']}",
            {"name": "Alice Johnson", "email": "alice.j@example.com"},
        )

    with step("OrderService shows the new name on alice's orders (OrderUserUpdateHandler)"):
        eventually(
            "the new buyer name on the orders",
            lambda: call("GET", f"{order}/orders/{alices['id']}")["buyer_name"] == "Alice Johnson",
        )

    fulfilment(product, order, payment, place, [alices, bobs, bobs_guide], (alice, bob), (book, guide))


def fulfilment(
    product: str,
    order: str,
    payment: str,
    place: Callable[[dict[str, Any], dict[str, Any], int], dict[str, Any]],
    placed: list[dict[str, Any]],
    buyers: tuple[dict[str, Any], dict[str, Any]],
    books: tuple[dict[str, Any], dict[str, Any]],
) -> None:
    """The fulfilment saga: order A is paid, order C is out of stock, order B is never paid, times out and is
    compensated. Every order placed so far went through the saga too."""
    (alice, bob), (book, guide) = buyers, books

    def stock(item: dict[str, Any]) -> int:
        return int(call("GET", f"{product}/products/{item['id']}/stock")["available"])

    def status(placed_order: dict[str, Any]) -> str:
        return str(call("GET", f"{order}/orders/{placed_order['id']}")["status"])

    def saga(placed_order: dict[str, Any]) -> dict[str, Any]:
        return dict(call("GET", f"{order}/sagas/{placed_order['id']}"))

    def payment_of(placed_order: dict[str, Any]) -> str:
        """The status of the order's payment in PaymentService."""
        return str(call("GET", f"{payment}/payments/{placed_order['id']}")["status"])

    def currency_of(placed_order: dict[str, Any]) -> str:
        return str(call("GET", f"{payment}/payments/{placed_order['id']}")["currency"])

    def ended(placed_order: dict[str, Any], stage: str) -> bool:
        state = saga(placed_order)
        return bool(state["completed"]) and state["state"]["stage"] == stage

    def expect(what: str, actual: object, wanted: object) -> None:
        if actual != wanted:
            raise StoryFailed(f"{what}: {actual!r}, not {wanted!r}")

    with step("OrderFulfilment saga: the 3 orders so far got their stock and were paid"):
        eventually("the three orders paid", lambda: all(status(o) == "paid" for o in placed))
        expect("Mastering Microservices in stock (10 - 2 - 1)", stock(book), 7)
        expect("ABP in Action in stock (10 - 1)", stock(guide), 9)

    with step("Order A placed: alice, 1 x ABP in Action at 24.00 (OrderPlacedEto starts a saga)"):
        order_a = place(alice, guide, 1)
    with step("Stock reserved: ProductService holds A's copy, 9 -> 8 (StockReservedEto)"):
        eventually("A's copy held", lambda: stock(guide) == 8)
    with step("Paid: A's 24.00 EUR captured (PaymentRequestedEto v2 names the currency)"):
        eventually("A's payment captured", lambda: payment_of(order_a) == "captured")
        expect("the currency of A's payment, from PaymentRequestedEto version 2", currency_of(order_a), "EUR")
    with step("Order A completed: status paid, its saga completed"):
        eventually("order A paid", lambda: status(order_a) == "paid" and ended(order_a, "paid"))

    with step("Order C placed: 50 x Mastering Microservices, 7 in stock: rejected"):
        order_c = place(alice, book, 50)
        eventually(
            "order C rejected", lambda: status(order_c) == "rejected" and ended(order_c, "out of stock")
        )
        expect("Mastering Microservices in stock after order C", stock(book), 7)

    with step("PaymentService's card gateway goes silent (simulated): payments will wait"):
        call("PUT", f"{payment}/gateway", {"answering": False})
    with step("Order B placed: bob, 2 x Mastering Microservices at 30.00"):
        order_b = place(bob, book, 2)
    with step("Stock reserved: ProductService holds B's 2 copies, 7 -> 5"):
        eventually("B's copies held", lambda: stock(book) == 5)
    with step("No payment: PaymentService holds B's 60.00 unanswered"):
        eventually(
            "B's payment pending", lambda: payment_of(order_b) == "pending" and status(order_b) == "reserved"
        )
    with step(f"Timed out after {PAYMENT_TIMEOUT} s: B's saga cancelled order B (OrderCancelledEto)"):
        eventually(
            "order B cancelled", lambda: status(order_b) == "cancelled" and ended(order_b, "timed out")
        )
    with step("Stock released (compensated): 7 in stock again, B's payment voided"):
        eventually("B's copies back in stock", lambda: stock(book) == 7)
        eventually("B's payment voided", lambda: payment_of(order_b) == "voided")


def final_table(identity: str, product: str, order: str, notification: str, payment: str) -> None:
    table = Table(title="What each service holds now")
    table.add_column("service")
    table.add_column("data")
    users = call("GET", f"{identity}/users")
    table.add_row(
        "IdentityService", "\n".join(f"{u['user_name']}: {u['name']} <{u['email']}>" for u in users)
    )
    products = call("GET", f"{product}/products")
    stock = {p["id"]: call("GET", f"{product}/products/{p['id']}/stock")["available"] for p in products}
    table.add_row(
        "ProductService", "\n".join(f"{p['name']}: {p['price']}, {stock[p['id']]} in stock" for p in products)
    )
    orders = call("GET", f"{order}/orders")
    table.add_row(
        "OrderService",
        "\n".join(
            f"{o['buyer_name']}: {o['quantity']} x {o['product_name']} at {o['unit_price']}, "
            f"discount {o['discount']}, {o['status']}"
            for o in orders
        ),
    )
    notices = call("GET", f"{notification}/notices")
    table.add_row("NotificationService", "\n".join(n["text"] for n in notices))
    payments = call("GET", f"{payment}/payments")
    table.add_row(
        "PaymentService",
        "\n".join(
            f"order {p['order_id'][:8]}: {p['amount']} {p['currency'] or ''}".rstrip() + f", {p['status']}"
            for p in payments
        ),
    )
    console.print(table)


def where_they_talk(broker: str | None, database: str | None) -> str:
    """The broker and databases, for the banner, passwords and tokens hidden."""
    shown = redact_url(broker) if broker else "embedded SQLite"
    return f"broker {shown}, databases {redact_url(database) if database else 'SQLite files'}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--broker", default=os.environ.get("BROKER") or None, help="an eventrelay broker URL")
    parser.add_argument("--database", default=os.environ.get("DATABASE") or None, help="a PostgreSQL URL")
    parser.add_argument(
        "--data", type=Path, help="where the SQLite files and logs go (default: a new folder)"
    )
    args = parser.parse_args(argv)
    data = args.data or Path(tempfile.mkdtemp(prefix="bookstore-"))
    data.mkdir(parents=True, exist_ok=True)
    where = where_they_talk(args.broker, args.database)
    console.rule("[bold]BookStore: asynchronous communication between microservices")
    console.print(f"Five services, each its own process and database; {where}. Logs in {data}")
    services = [Process(s.name, s.app, s.env_prefix) for s in SERVICES]
    ok = False
    try:
        if args.database:
            asyncio.run(create_databases([per_service_database(args.database, s.name) for s in services]))
        with step("Services started and healthy"):
            start(services, data, args.broker, args.database, {"ORDER_PAYMENT_TIMEOUT": PAYMENT_TIMEOUT})
        urls = [s.url for s in services]
        story(*urls)
        final_table(*urls)
        ok = True
    except StoryFailed:
        console.print(f"[red]The story did not come true. The services' logs are in {data}")
    finally:
        with console.status("[dim]stopping the services (they finish their in-flight messages)"):
            clean = stop(services)
        if clean:
            console.print("[green]✓[/green] Every service stopped cleanly")
        else:
            console.print(f"[red]✗ A service did not stop cleanly; see the logs in {data}")
    return 0 if ok and clean else 1


if __name__ == "__main__":
    sys.exit(main())
