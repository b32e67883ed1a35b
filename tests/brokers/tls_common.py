"""What the TLS tests share (`test_tls.py` through our proxy, `test_tls_servers.py` against the servers' own
listeners): the session's certificates, an event, and a bus that publishes and handles it."""

from __future__ import annotations

import uuid

import pytest

from eventrelay import DistributedEventBus, Event, Settings
from eventrelay.testing import wait_until_idle
from tests.brokers.contract import PATIENCE
from tests.certificates import Certificates, make_certificates

FAST = Settings(relay_poll_interval=0.05, fetch_timeout=0.2, shutdown_timeout=5.0)


class PriceChanged(Event, name="TlsTests.PriceChanged"):
    product_id: int


@pytest.fixture(scope="session")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    """A throwaway CA and the certificates it signed (`tests/certificates.py`), for the session."""
    return make_certificates(tmp_path_factory.mktemp("tls"))


def unique() -> str:
    """A name of the test's own (a service, a stream, a key prefix)."""
    return f"er-tls-{uuid.uuid4().hex[:12]}"


async def deliver(broker: str, database: str | None = None, service: str | None = None) -> list[int]:
    """Publish three events through a unit of work and return what a handler of the same bus received."""
    received: list[int] = []

    async def record(event: PriceChanged) -> None:
        received.append(event.product_id)

    bus = DistributedEventBus(service or unique(), broker=broker, database=database, settings=FAST)
    await bus.subscribe(record, event=PriceChanged)
    async with bus:
        async with bus.unit_of_work():
            for product_id in range(3):
                await bus.publish(PriceChanged(product_id=product_id))
        await wait_until_idle(bus, timeout=PATIENCE)
    return sorted(received)
