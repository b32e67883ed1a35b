"""The consumer keeps consuming whatever a fetch raises, and a retry delay never overflows."""

from __future__ import annotations

from eventrelay import Delivery, DistributedEventBus, Event, RetryPolicy, Settings
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
