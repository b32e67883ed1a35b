"""Faults the reliability suite found in the library, each pinned by a small test of its own (two more are in
`tests/unit/test_consumer_resilience.py`: the consumer stopped for good when a fetch raised anything but
`BrokerUnavailable`, and a retry delay for an absurd attempt count overflowed):

- the SQL broker called a connection dropped mid-statement a refusal (`PublishFailed`), not an outage, so the
  relay sent the batch row by row and deferred rows with a growing delay;
- a foreign AMQP message with header values JSON lacks (decimals, timestamps) could not be stored as a dead
  letter, and came round again and again (found by the fuzz).
"""

from __future__ import annotations

import asyncio
import json
import struct
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import cast

import pytest

from eventrelay import Context, DistributedEventBus, Event
from eventrelay.brokers.rabbitmq import RabbitMQBroker
from eventrelay.brokers.sql import SqlBroker
from eventrelay.envelope import Message, new_message_id
from eventrelay.errors import BrokerUnavailable
from eventrelay.testing import wait_until_idle
from tests.brokers.raw_amqp import publish_raw, short_string
from tests.conftest import POSTGRESQL_PORT
from tests.faultproxy import FaultProxy
from tests.reliability.under_test import BrokerUnderTest

pytestmark = pytest.mark.reliability


class Pinged(Event, name="Regressions.Pinged"):
    n: int


class HoldingProxy(FaultProxy):
    """Our fault proxy, telling when a stall holds bytes that a client sent towards the server."""

    def __init__(self, target_port: int) -> None:
        super().__init__(target_port)
        self.holding = asyncio.Event()
        self._stalled = False

    def stall(self) -> None:
        self._stalled = True
        super().stall()

    def resume(self) -> None:
        self._stalled = False
        super().resume()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if writer.get_extra_info("peername")[:2] == self.target:  # the client-to-server direction
            reader = cast(asyncio.StreamReader, _Noticing(reader, self))
        await super()._pump(reader, writer)


class _Noticing:
    """A reader that sets its proxy's `holding` when it reads bytes during a stall (the stall holds them)."""

    def __init__(self, reader: asyncio.StreamReader, proxy: HoldingProxy) -> None:
        self.reader, self.proxy = reader, proxy

    async def read(self, n: int) -> bytes:
        data = await self.reader.read(n)
        if data and self.proxy._stalled:
            self.proxy.holding.set()
        return data


@pytest.mark.postgresql
@pytest.mark.parametrize("operation", ["publish", "fetch"])
async def test_a_sql_broker_connection_dropped_mid_statement_is_an_outage(
    operation: str, postgresql_url: str
) -> None:
    async with HoldingProxy(POSTGRESQL_PORT) as proxy:
        url = postgresql_url.replace(f":{POSTGRESQL_PORT}/", f":{proxy.port}/")
        async with SqlBroker(url) as broker:
            await broker.bind("Regressions", "Regressions.Pinged")
            # A first publish leaves a connection in the pool, which the next call uses.
            await broker.publish([Message(new_message_id(), "Regressions.Pinged", b"{}")])
            proxy.stall()
            running: asyncio.Future[object] = asyncio.ensure_future(
                broker.publish([Message(new_message_id(), "Regressions.Pinged", b"{}")])
                if operation == "publish"
                else broker.fetch("Regressions", 10, 5.0)
            )
            async with asyncio.timeout(10):  # the statement is on its way: the stall holds it
                await proxy.holding.wait()
            proxy.reset()
            proxy.resume()
            with pytest.raises(BrokerUnavailable):
                await running


@pytest.mark.rabbitmq
async def test_a_foreign_amqp_message_with_headers_that_are_not_strings_is_handled_with_them_as_text(
    rabbitmq_broker: BrokerUnderTest, tmp_path: Path
) -> None:
    """ABP's `headersArguments` and other AMQP publishers send decimals, timestamps, ints and tables: once
    dead letters, since issue 17 they arrive as text."""
    seen: list[Context] = []

    async def record(event: Pinged, context: Context) -> None:
        seen.append(context)

    database = f"sqlite+aiosqlite:///{tmp_path}/foreign.db"
    bus = DistributedEventBus(rabbitmq_broker.subscriber, broker=rabbitmq_broker.url(), database=database)
    await bus.subscribe(record)
    headers: dict[str, object] = {
        "x-price": Decimal("9.99"),
        "x-sent-at": datetime(2024, 5, 1, 12, 0),
        "x-retries": 7,
        "x-route": {"zone": "eu", "hops": [1, True]},
        "x-eventrelay-attempt": 10**15,  # an absurd attempt count, as a foreign publisher may send
    }
    async with bus:
        sent = Message(new_message_id(), "Regressions.Pinged", b'{"n": 1}', headers)  # type: ignore[arg-type]
        await bus.broker.publish([sent])
        await wait_until_idle(bus, timeout=20)
        letters = await bus.dead_letters()
    assert not letters, letters[0].reason
    [context] = seen
    assert context.message_id == sent.id
    assert {name: context.headers[name] for name in ("x-price", "x-sent-at", "x-retries")} == {
        "x-price": "9.99",
        "x-sent-at": "2024-05-01T12:00:00+00:00",  # an AMQP timestamp is UTC
        "x-retries": "7",
    }
    assert json.loads(context.headers["x-route"]) == {"zone": "eu", "hops": [1, True]}


@pytest.mark.rabbitmq
async def test_a_foreign_amqp_header_that_cannot_be_text_makes_a_dead_letter_that_says_which(
    rabbitmq_broker: BrokerUnderTest, tmp_path: Path
) -> None:
    async def record(event: Pinged, context: Context) -> None:
        raise AssertionError("a header that cannot be carried: it must not be handled")

    database = f"sqlite+aiosqlite:///{tmp_path}/foreign.db"
    bus = DistributedEventBus(rabbitmq_broker.subscriber, broker=rabbitmq_broker.url(), database=database)
    await bus.subscribe(record)
    raw = b"\xff\xfe"  # a long string that is not UTF-8: pamqp hands it over as bytes
    entries = b"\x05x-rawS" + struct.pack(">I", len(raw)) + raw
    entries += b"\x06x-fineS" + struct.pack(">I", 3) + b"yes"
    properties = {"headers": struct.pack(">I", len(entries)) + entries, "message_id": short_string(b"m-raw")}
    async with bus:
        assert isinstance(bus.broker, RabbitMQBroker)
        await publish_raw(5672, bus.broker.exchange, "Regressions.Pinged", properties, b'{"n": 1}')
        await wait_until_idle(bus, timeout=20)
        letters = await bus.dead_letters()
    [letter] = letters
    assert letter.message.id == "m-raw"
    assert "header values that cannot be carried as text: 'x-raw'" in letter.reason
    assert letter.message.headers["x-fine"] == "yes"
