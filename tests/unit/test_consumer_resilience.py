"""The consumer keeps consuming whatever a fetch raises; retry delays and reconnect pauses never overflow."""

from __future__ import annotations

from eventrelay import Delivery, DistributedEventBus, Event, RetryPolicy, Settings
from eventrelay.brokers.base import RECONNECT_PAUSE_MAX, reconnect_pause
from eventrelay.testing import RecordingBroker, capture, wait_until_idle


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
