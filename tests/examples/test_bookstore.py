"""The BookStore sample: its story runs end to end in separate processes, and its services keep their
boundaries (a service imports only the other services' contracts)."""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

EXAMPLES = Path(__file__).parent.parent.parent / "examples"
BOOKSTORE = EXAMPLES / "bookstore"
SERVICES = ["identity", "product", "order", "notification", "payment"]
CONTRACTS = {"identity_contracts", "product_contracts", "order_contracts", "payment_contracts"}

STORY = [
    "✓ Services started and healthy",
    "✓ OrderService: orders placed",
    "✓ OrderService applied the discount: alice saves 20.00 (2 x 10.00), bob 10.00",
    "✓ NotificationService got its own copy of the same event",
    "is under the 10% threshold: no discount, but a notice",
    "✓ OrderService shows the new name on alice's orders",
    # The fulfilment saga: A is paid, C is out of stock, B is never paid, times out and is compensated.
    "✓ OrderFulfilment saga: the 3 orders so far got their stock and were paid",
    "✓ Order A placed: alice, 1 x ABP in Action at 24.00 (OrderPlacedEto starts a saga)",
    "✓ Stock reserved: ProductService holds A's copy, 9 -> 8 (StockReservedEto)",
    "✓ Paid: A's 24.00 EUR captured (PaymentRequestedEto v2 names the currency)",
    "✓ Order A completed: status paid, its saga completed",
    "✓ Order C placed: 50 x Mastering Microservices, 7 in stock: rejected",
    "✓ Order B placed: bob, 2 x Mastering Microservices at 30.00",
    "✓ Stock reserved: ProductService holds B's 2 copies, 7 -> 5",
    "✓ No payment: PaymentService holds B's 60.00 unanswered",
    "✓ Timed out after 15 s: B's saga cancelled order B (OrderCancelledEto)",
    "✓ Stock released (compensated): 7 in stock again, B's payment voided",
    "✓ Every service stopped cleanly",
]


def run_demo(data: Path, *options: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "bookstore.demo", "--data", str(data), *options],
        cwd=EXAMPLES,
        # A patient story: the suite may run beside other heavy tests on two cores. Orders are paid in about
        # a second; the payment timeout leaves them more, and is what order B waits for.
        env={
            "PYTHONPATH": str(EXAMPLES),
            "PATH": "/usr/bin:/bin",
            "COLUMNS": "200",
            "BOOKSTORE_PATIENCE": "120",
            "ORDER_PAYMENT_TIMEOUT": "15",
        },
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    logs = "\n".join(p.read_text()[-2000:] for p in data.glob("*.log"))
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\n{logs}"
    for line in STORY:
        assert line in result.stdout, result.stdout
    assert "✗" not in result.stdout
    return result.stdout


@pytest.mark.slow
def test_the_story_on_the_embedded_broker(tmp_path: Path) -> None:
    output = run_demo(tmp_path)
    assert "Alice Johnson: 2 x Mastering Microservices at 30.00, discount 20.00" in output
    assert "Bob Brown: 2 x Mastering Microservices at 30.00, discount 0.00, cancelled" in output
    assert "Mastering Microservices: 30.00, 7 in stock" in output
    assert (tmp_path / "broker.db").exists()  # they talked through the SQLite broker file


@pytest.fixture
async def postgresql_base() -> AsyncIterator[str]:
    """A database name prefix whose per-service databases the demo creates; dropped afterwards."""
    from tests.servers import require_server

    require_server("PostgreSQL", 5432)
    name = f"er_{uuid.uuid4().hex[:10]}"
    yield f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"
    admin = await asyncpg.connect("postgresql://postgres@127.0.0.1:5432/postgres")
    try:
        for service in SERVICES:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}_{service}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.mark.slow
@pytest.mark.postgresql
def test_the_story_on_postgresql(tmp_path: Path, postgresql_base: str, postgresql_url: str) -> None:
    run_demo(tmp_path, "--database", postgresql_base, "--broker", postgresql_url)
    assert not (tmp_path / "broker.db").exists()


SERVICE_NAMES = ["IdentityService", "ProductService", "OrderService", "NotificationService", "PaymentService"]


@pytest.fixture
async def rabbitmq_url() -> AsyncIterator[str]:
    """An exchange of the test's own; the services' queues (named after them, as in ABP) go afterwards."""
    import aio_pika

    from eventrelay.brokers.rabbitmq import RabbitMQBroker
    from tests.servers import require_server

    require_server("RabbitMQ", 5672)
    server = "amqp://guest:guest@127.0.0.1:5672/"
    url = f"{server}?exchange=bookstore-{uuid.uuid4().hex[:10]}&retry_delays=0.1,1"
    layout = RabbitMQBroker(url)  # never started: it only names the queues
    queues = [name for service in SERVICE_NAMES for name in (service, *layout.retry_queues(service))]

    async def delete_all() -> None:
        async with await aio_pika.connect(server) as connection:
            channel = await connection.channel()
            for queue in [*queues, layout.unrouted]:
                await channel.queue_delete(queue)
            for exchange in (layout.exchange, layout.unrouted):
                await channel.exchange_delete(exchange)

    await delete_all()  # queues a crashed earlier run may have left
    yield url
    await delete_all()


@pytest.fixture
async def nats_url() -> AsyncIterator[str]:
    """A stream and subject prefix of the test's own, deleted afterwards."""
    import nats

    from tests.servers import require_server

    require_server("NATS", 4222)
    name = f"bookstore{uuid.uuid4().hex[:10]}"
    yield f"nats://127.0.0.1:4222?stream={name}&prefix={name}"
    client = await nats.connect("nats://127.0.0.1:4222")
    try:
        await client.jetstream().delete_stream(name)
    finally:
        await client.close()


@pytest.fixture
async def redis_url() -> AsyncIterator[str]:
    """A key prefix of the test's own; its keys are deleted afterwards."""
    import redis.asyncio

    from tests.servers import require_server

    require_server("Redis", 6379)
    prefix = f"bookstore-{uuid.uuid4().hex[:10]}:"
    yield f"redis://127.0.0.1:6379/0?prefix={prefix}"
    client = redis.asyncio.Redis.from_url("redis://127.0.0.1:6379/0")
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@pytest.mark.slow
@pytest.mark.rabbitmq
def test_the_story_on_rabbitmq(tmp_path: Path, rabbitmq_url: str) -> None:
    output = run_demo(tmp_path, "--broker", rabbitmq_url)
    assert "guest:guest" not in output  # the banner names the broker without its password
    assert "broker amqp://guest:***@127.0.0.1:5672/" in output


def test_the_demo_banner_hides_passwords_and_tokens() -> None:
    # Imported by name: a static import would make mypy see examples/bookstore under two module names.
    demo = importlib.import_module("bookstore.demo")
    shown = demo.where_they_talk(
        "nats://s3cret-token@127.0.0.1:4222",
        "postgresql+asyncpg://postgres@127.0.0.1/bookstore?password=s3cret",
    )
    assert "s3cret" not in shown
    assert shown == (
        "broker nats://***@127.0.0.1:4222, databases postgresql+asyncpg://postgres@127.0.0.1/bookstore?password=***"
    )


@pytest.mark.slow
@pytest.mark.nats
def test_the_story_on_nats(tmp_path: Path, nats_url: str) -> None:
    run_demo(tmp_path, "--broker", nats_url)


@pytest.mark.slow
@pytest.mark.redis
def test_the_story_on_redis(tmp_path: Path, redis_url: str) -> None:
    run_demo(tmp_path, "--broker", redis_url)


def _imported_modules(path: Path) -> set[str]:
    """The modules a file imports from (`from a.b import c` -> "a.b")."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return found


def _bookstore_imports(path: Path) -> set[str]:
    """The bookstore packages a file imports (`bookstore.order.app` -> "order")."""
    return {n.split(".")[1] for n in _imported_modules(path) if n.startswith("bookstore.")}


@pytest.mark.parametrize("service", SERVICES)
def test_each_service_keeps_the_contracts_committed_in_its_snapshot(service: str, tmp_path: Path) -> None:
    """What a team runs in CI: `eventrelay schema --check` against `contracts.lock.json` (see its README)."""
    target = f"bookstore.{service}.app:service"
    output = in_the_sample(
        tmp_path, "-m", "eventrelay", "schema", target, "--check", "bookstore/contracts.lock.json"
    )
    assert output.startswith("The contracts of ")
    assert "compatible with bookstore/contracts.lock.json" in output


def in_the_sample(data: Path, *args: str) -> str:
    """The output of Python run with `args` in examples/, the sample's data in `data`; it must exit 0."""
    result = subprocess.run(
        [sys.executable, *args],
        cwd=EXAMPLES,
        env={"PYTHONPATH": str(EXAMPLES), "PATH": "/usr/bin:/bin", "BOOKSTORE_DATA": str(data)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    return result.stdout


# PaymentService with its own handler, and an OrderService from before PaymentRequestedEto version 2 on a
# broker connection of its own: it writes the old shape (no currency), no version header, to the broker file.
OLD_PUBLISHER = """
import asyncio
import json
from uuid import UUID

from bookstore.hosting import default_broker
from bookstore.payment.app import Base, Payment, service
from eventrelay import Message
from eventrelay.brokers import broker_from_url
from eventrelay.testing import wait_until_idle

ORDER, BUYER = UUID(int=1), UUID(int=2)


async def main() -> None:
    async with service.engine.begin() as connection:
        await connection.run_sync(Base.metadata.create_all)
    async with service:
        body = json.dumps({"order_id": str(ORDER), "buyer_id": str(BUYER), "amount": "24.00"}).encode()
        async with broker_from_url(default_broker()) as old_order_service:
            await old_order_service.publish([Message("1" * 32, "BookStore.Order.PaymentRequested", body)])
        await wait_until_idle(service.bus, timeout=60)
        async with service.bus.unit_of_work() as uow:
            payment = await uow.session.get(Payment, ORDER)
        letters = await service.bus.dead_letters(limit=10)
    print(json.dumps({
        "payment": payment and [str(payment.amount), payment.currency, payment.status],
        "dead_letters": [letter.reason for letter in letters],
    }))


asyncio.run(main())
"""


def test_payment_service_upcasts_a_version_1_payment_request_from_an_older_order_service(
    tmp_path: Path,
) -> None:
    """PaymentRequestedEto version 2 added `currency`; its upcaster (in order_contracts) says version 1's
    amounts were euros, so a request sent before the upgrade is still paid."""
    outcome = json.loads(in_the_sample(tmp_path, "-c", OLD_PUBLISHER).strip().splitlines()[-1])
    assert outcome == {"payment": ["24.00", "EUR", "captured"], "dead_letters": []}


@pytest.mark.parametrize("service", SERVICES)
def test_a_service_imports_only_other_services_contracts(service: str) -> None:
    files = list((BOOKSTORE / service).rglob("*.py"))
    assert files
    for path in files:
        imported = _bookstore_imports(path) - {service}
        assert imported <= CONTRACTS | {"hosting"}, f"{path.name} imports {sorted(imported - CONTRACTS)}"


def test_contracts_import_nothing_of_the_services() -> None:
    for package in CONTRACTS:
        for path in (BOOKSTORE / package).rglob("*.py"):
            assert _bookstore_imports(path) <= {package}, path


def test_the_sample_imports_eventrelay_from_its_top_level_only() -> None:
    """What a user needs is in `eventrelay` itself: the sample reaches into no module of it."""
    for path in BOOKSTORE.rglob("*.py"):
        deep = {n for n in _imported_modules(path) if n.startswith("eventrelay.")}
        assert deep == set(), f"{path.relative_to(BOOKSTORE)} imports {sorted(deep)}"
