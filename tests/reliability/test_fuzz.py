"""A hypothesis fuzz of the receive path on every broker adapter: random bodies and headers published raw
through the adapter's own `publish`, received and dispatched by a bus. Never a crash, never a silent ack:
each message is either handled or a dead letter, and the broker owes nothing afterwards.

Headers carry what each wire can: any JSON value on the memory, SQL and Redis brokers, AMQP's types on
RabbitMQ (numbers, booleans, None, lists), strings on NATS (its headers are text), with the adapters'
own header names among the keys. Values a publisher cannot send are left out: AMQP tables take no infinite
floats (RabbitMQ closes the connection) and our AMQP client encodes no bytes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import string
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eventrelay import Context, DistributedEventBus, DynamicEvent, Event, RetryPolicy, Settings
from eventrelay.envelope import Message, new_message_id
from tests.reliability.harness import SIZES, Figures, Report, adapter_kind

pytestmark = pytest.mark.reliability

LIMIT = 2048  # max_message_bytes: some bodies are larger
TYPED, DYNAMIC, ORPHAN = "Fuzz.Typed", "Fuzz.Dynamic", "Fuzz.Orphan"  # ORPHAN is bound, with no handler
SETTLE = 20.0  # seconds a message may take to be handled or dead-lettered


class Typed(Event, name=TYPED):
    n: int
    label: str = ""


INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | INT64 | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)
# AMQP floats in a table are 32-bit, and RabbitMQ closes the connection on an infinite one (its parser has no
# infinity).
AMQP_FLOATS = st.floats(width=32, allow_nan=False, allow_infinity=False)
AMQP_VALUES: st.SearchStrategy[Any] = st.one_of(
    st.none(),
    st.booleans(),
    INT64,
    AMQP_FLOATS,
    st.text(max_size=20),
    st.lists(st.text(max_size=8) | INT64, max_size=3),
    st.decimals(places=2, min_value=-(10**6), max_value=10**6),  # AMQP 'D'
    st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(2100, 1, 1)),  # AMQP 'T'
)
KEY_TEXT = st.text(alphabet=string.ascii_letters + string.digits + "-_.", min_size=1, max_size=16)
# Header names the bus and the adapters read themselves, with junk values they must survive.
OWN_HEADERS = ["x-correlation-id", "x-causation-id", "x-tenant-id", "traceparent"]
ADAPTER_HEADERS = {
    "amqp": ["x-eventrelay-attempt", "x-eventrelay-name", "x-eventrelay-key", "x-death"],
    "nats": ["Nats-Msg-Id", "Eventrelay-Key", "Nats-Expected-Stream"],
    "kafka": ["messageId", "eventrelay-name", "eventrelay-key", "eventrelay-attempt", "eventrelay-due"],
}
TEXT_HEADERS = st.text(max_size=40)  # NATS and Kafka headers are text (Kafka's bytes are read as UTF-8)


def _headers(scheme: str) -> st.SearchStrategy[dict[str, Any]]:
    keys = KEY_TEXT | st.sampled_from(OWN_HEADERS + ADAPTER_HEADERS.get(scheme, []))
    values = {"amqp": AMQP_VALUES, "nats": TEXT_HEADERS, "kafka": TEXT_HEADERS}.get(scheme, JSON_VALUES)
    return st.dictionaries(keys, values, max_size=4)


BODIES = st.one_of(
    st.binary(max_size=64),
    JSON_VALUES.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(
        {"n": INT64 | st.text(max_size=5)}, optional={"label": JSON_VALUES, "extra": JSON_VALUES}
    ).map(lambda v: json.dumps(v).encode()),
    st.binary(min_size=LIMIT + 1, max_size=LIMIT + 64),  # over the size limit
)


def _messages(scheme: str) -> st.SearchStrategy[list[tuple[str, bytes, dict[str, Any], str | None]]]:
    names = st.sampled_from([TYPED, DYNAMIC, ORPHAN])
    keys = st.none() | KEY_TEXT
    return st.lists(st.tuples(names, BODIES, _headers(scheme), keys), min_size=1, max_size=4)


class Received:
    """The message ids the fuzzed bus handled, and how many messages and examples went in."""

    def __init__(self) -> None:
        self.handled: list[str] = []
        self.sent = 0
        self.examples = 0


@pytest.fixture
async def fuzzed(
    adapter_url: str, tmp_path: Path, report: Report, names: dict[str, str]
) -> AsyncIterator[tuple[DistributedEventBus, Received]]:
    received = Received()

    async def typed(event: Typed, context: Context) -> None:
        received.handled.append(context.message_id)

    async def dynamic(event: DynamicEvent, context: Context) -> None:
        received.handled.append(context.message_id)

    quick = Settings(
        retry=RetryPolicy(max_attempts=2, initial_delay=0.01, max_delay=0.05),
        max_message_bytes=LIMIT,
        fetch_timeout=0.2,
        shutdown_timeout=10.0,
    )
    database = f"sqlite+aiosqlite:///{tmp_path}/fuzz.db"
    # The broker fixture's subscriber: the fixture deletes its queues (RabbitMQ) after the test.
    bus = DistributedEventBus(names["subscriber"], broker=adapter_url, database=database, settings=quick)
    await bus.subscribe(typed)
    await bus.subscribe(dynamic, event=DYNAMIC)
    async with bus:
        await bus.broker.bind(bus.service, ORPHAN)
        yield bus, received
        dead = len(await bus.dead_letters(limit=100_000))
    report.add(
        Figures(
            "fuzz: random bodies and headers, raw",
            adapter_kind(adapter_url),
            received.sent,
            len(set(received.handled)),
            len(received.handled) - len(set(received.handled)),
            dead,
            None,
            f"{received.examples} hypothesis examples; each message handled or a dead letter",
        )
    )


async def _settled(bus: DistributedEventBus, received: Received, ids: set[str]) -> set[str]:
    """Wait until every id is handled or dead-lettered and the broker owes nothing; the ids that are not."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SETTLE
    while True:
        dead = {letter.message.id for letter in await bus.dead_letters(limit=100_000)}
        open_ = ids - set(received.handled) - dead
        if not open_ and await bus.broker.pending_count(bus.service) == 0 and bus.consumer.idle:
            return set()
        if loop.time() > deadline:
            return open_ or {"(the broker still owes messages)"}
        await asyncio.sleep(0.02)


@settings(
    max_examples=SIZES.fuzz_examples,
    deadline=None,
    database=None,  # no .hypothesis folder in the repository
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
async def test_random_input_is_handled_or_dead_lettered_never_dropped_never_a_crash(
    data: st.DataObject,
    fuzzed: tuple[DistributedEventBus, Received],
    caplog: pytest.LogCaptureFixture,
) -> None:
    bus, received = fuzzed
    scheme = bus.broker_url.partition("://")[0]
    batch = data.draw(_messages(scheme))
    messages = [Message(new_message_id(), name, body, headers, key) for name, body, headers, key in batch]
    received.sent += len(messages)
    received.examples += 1
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="eventrelay"):
        await bus.broker.publish(messages)
        unsettled = await _settled(bus, received, {m.id for m in messages})
    assert not unsettled, f"neither handled nor dead-lettered: {unsettled}"
    assert not bus._tasks[0].done(), "the consumer stopped"
    crashes = [r.getMessage() for r in caplog.records if r.getMessage().startswith(("Could not", "Fetching"))]
    assert not crashes, crashes  # a dispatch that raised: the message would come round again and again
