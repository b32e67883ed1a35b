"""Test your own handlers without a server: buses on a `RecordingBroker`, `wait_until_idle`, `capture`.

```python
broker = RecordingBroker()
async with DistributedEventBus("OrderService", broker=broker) as orders:
    await orders.subscribe(ApplyDiscount)
    handled = await capture(orders, ProductPriceChangedEto)
    await orders.publish(ProductPriceChangedEto(...))
    await wait_until_idle(orders)
assert broker.events(ProductPriceChangedEto) == handled
```
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import TypeVar

from eventrelay.brokers.memory import MemoryBroker
from eventrelay.bus import DistributedEventBus
from eventrelay.codec import decode
from eventrelay.envelope import Message
from eventrelay.errors import ConfigurationError
from eventrelay.events import Event, event_name
from eventrelay.json_style import JsonStyle

E = TypeVar("E", bound=Event)


class RecordingBroker(MemoryBroker):
    """A `MemoryBroker` that keeps every message published through it, in order."""

    def __init__(self, url: str = "memory://") -> None:
        super().__init__(url)
        self.published: list[Message] = []

    async def publish(self, messages: Sequence[Message]) -> None:
        await super().publish(messages)
        self.published.extend(messages)

    def events(self, event_type: type[E], style: JsonStyle = "eventrelay") -> list[E]:
        """The published events of one class, decoded (in the publishing bus's `json_style`), in publish
        order."""
        name = event_name(event_type)
        return [decode(m, event_type, 2**31, style) for m in self.published if m.name == name]  # type: ignore[misc]


async def capture(bus: DistributedEventBus, event_type: type[E]) -> list[E]:
    """Subscribe a recorder to `event_type` in `bus`; the returned list fills as events are handled."""
    handled: list[E] = []

    async def record(event: Event) -> None:
        handled.append(event)  # type: ignore[arg-type]

    await bus.subscribe(record, event=event_type, name=f"eventrelay.testing.capture:{event_name(event_type)}")
    return handled


async def wait_until_idle(*buses: DistributedEventBus, timeout: float = 5.0) -> None:
    """Wait until every outbox is empty, every broker owes nothing and no handler is running.

    Raises `TimeoutError` naming what is still busy. Delayed events count as busy until they are due.
    """
    deadline = time.monotonic() + timeout
    calm = 0
    while True:
        busy = [reason for bus in buses if (reason := await _busy(bus))]
        calm = 0 if busy else calm + 1
        if calm >= 2:  # idle twice in a row, so a message between two steps is not missed
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"Still busy after {timeout}s: {'; '.join(busy) or 'settling'}")
        await asyncio.sleep(0.005)


async def _busy(bus: DistributedEventBus) -> str | None:
    waiting, _ = await bus.store.outbox_backlog()
    try:
        pending = await bus.broker.pending_count(bus.service)
    except NotImplementedError as exc:
        raise ConfigurationError(f"wait_until_idle needs a broker that counts what it owes: {exc}") from exc
    if waiting or pending or not bus.consumer.idle:
        return (
            f"{bus.service}: {waiting} in outbox, {pending} at the broker, {bus.consumer.in_flight} running"
        )
    return None
