"""The consumer keeps consuming whatever a fetch raises; whatever settling a message raises ends, after its
attempts, as a dead letter; retry delays and reconnect pauses never overflow."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from eventrelay import Delivery, DistributedEventBus, DynamicEvent, Event, RetryPolicy, Settings
from eventrelay.brokers.base import RECONNECT_PAUSE_MAX, reconnect_pause
from eventrelay.codec import decode
from eventrelay.envelope import Message, new_message_id
from eventrelay.errors import DecodeError
from eventrelay.testing import RecordingBroker, capture, wait_until_idle
from tests.bus.helpers import eventually


class Pinged(Event, name="ConsumerResilience.Pinged"):
    n: int


class FlakyFetchBroker(RecordingBroker):
    """A broker whose first fetch fails with an error that is not BrokerUnavailable."""

    def __init__(self) -> None:
        super().__init__()
        self.failed = False

    async def fetch(self, subscriber: str, max_count: int, timeout: float) -> list[Delivery]:
        if not self.failed:
            self.failed = True
            raise RuntimeError("an adapter bug, or a connection error it did not translate")
        return await super().fetch(subscriber, max_count, timeout)


async def test_a_fetch_that_raises_anything_does_not_stop_the_consumer() -> None:
    broker = FlakyFetchBroker()
    async with DistributedEventBus("Pings", broker=broker, settings=Settings(fetch_timeout=0.05)) as bus:
        handled = await capture(bus, Pinged)
        await bus.publish(Pinged(n=1), use_outbox=False)
        await wait_until_idle(bus, timeout=10)
    assert broker.failed
    assert [e.n for e in handled] == [1]


@pytest.fixture
def default_recursion_limit() -> Iterator[None]:
    """Python's default limit: another test in the same process (hypothesis) may have left it raised, and
    with it json.loads decodes what it would otherwise refuse."""
    before = sys.getrecursionlimit()
    sys.setrecursionlimit(1_000)
    try:
        yield
    finally:
        sys.setrecursionlimit(before)


@pytest.mark.usefixtures("default_recursion_limit")
@pytest.mark.parametrize("depth", [10_000, 100_000])
def test_json_nested_too_deeply_is_a_decode_error_not_a_recursion_error(depth: int) -> None:
    body = ("[" * depth + "]" * depth).encode()
    message = Message(new_message_id(), "Deep", b'{"n": ' + body + b"}")
    with pytest.raises(DecodeError, match="nested too deeply"):
        decode(message, None, 10 * len(message.body))
    with pytest.raises(DecodeError, match="does not fit Pinged"):
        decode(message, Pinged, 10 * len(message.body))


async def test_an_error_outside_the_handlers_ends_as_a_dead_letter_after_the_attempts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    delivered: list[int] = []

    def broken(message: Message, event_type: Any, max_bytes: int, style: str = "eventrelay") -> Any:
        delivered.append(1)
        raise RuntimeError("a bug in decoding or in the consumer's bookkeeping")

    async def handler(event: DynamicEvent, context: Any) -> None:
        raise AssertionError("never handled")

    settings = Settings(retry=RetryPolicy(max_attempts=2, initial_delay=0.01, jitter=0.0), fetch_timeout=0.05)
    monkeypatch.setattr("eventrelay.dispatch.decode", broken)
    async with DistributedEventBus("Bookkeeping", broker="memory://", settings=settings) as bus:
        await bus.subscribe(handler, event="Bookkeeping.Any")
        await bus.broker.publish([Message(new_message_id(), "Bookkeeping.Any", b"{}")])

        async def dead_lettered() -> bool:
            return bool(await bus.dead_letters())

        await eventually(dead_lettered, timeout=10)
        tries = len(delivered)
        await asyncio.sleep(0.3)  # time to come again, were it redelivered
        letters = await bus.dead_letters()
    assert len(delivered) == tries  # never again after its dead letter
    [letter] = letters
    assert letter.handler is None
    assert letter.attempts == 2
    assert letter.reason == (
        "could not be settled in 2 attempt(s): RuntimeError: a bug in decoding or in the consumer's "
        "bookkeeping"
    )
    assert "Traceback" in (letter.error or "")


def test_a_retry_delay_for_an_absurd_attempt_count_is_the_longest() -> None:
    policy = RetryPolicy(initial_delay=1.0, max_delay=60.0, multiplier=2.0, jitter=0.0)
    assert policy.delay(10**15) == 60.0
    assert policy.delay(3) == 4.0


def test_the_pause_before_trying_a_broker_again_doubles_up_to_a_few_seconds_and_never_overflows() -> None:
    pauses = [reconnect_pause(failures) for failures in range(1, 12)]
    assert pauses[:3] == [0.2, 0.4, 0.8]
    assert pauses == sorted(pauses)
    assert max(pauses) == RECONNECT_PAUSE_MAX <= 5.0  # a broker back is tried again within seconds
    assert reconnect_pause(10**6) == RECONNECT_PAUSE_MAX  # days of outage: no OverflowError
