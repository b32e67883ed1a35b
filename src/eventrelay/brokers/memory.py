"""`memory://`: an in-process broker with the semantics of a real one, for tests and single processes.

Fan-out per subscriber, competing fetchers, leases, delayed retries. Share one instance between the buses
that should talk. A message whose name no subscriber has bound goes nowhere, as on RabbitMQ with no binding.
Nothing survives the process. It takes no URL options.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict, deque
from collections.abc import Sequence

from eventrelay.brokers.base import Arrivals, Broker
from eventrelay.brokers.options import UrlOptions, url_query
from eventrelay.envelope import Delivery, Message
from eventrelay.errors import BrokerUnavailable


class MemoryBroker(Broker):
    """An in-process broker with the semantics of a real one (see the module docstring)."""

    def __init__(self, url: str = "memory://") -> None:
        UrlOptions("Memory", url, url_query(url)).finish()
        self._bindings: defaultdict[str, set[str]] = defaultdict(set)
        self._queues: defaultdict[str, deque[Delivery]] = defaultdict(deque)
        self._leased: defaultdict[str, set[Delivery]] = defaultdict(set)
        self._delayed: defaultdict[str, set[asyncio.TimerHandle]] = defaultdict(set)
        self._owner: dict[Delivery, str] = {}
        self._arrivals = Arrivals()
        self._closed = False

    async def start(self) -> None:
        self._closed = False

    async def close(self) -> None:
        self._closed = True
        for handles in self._delayed.values():
            for handle in handles:
                handle.cancel()
        self._arrivals.wake()

    async def publish(self, messages: Sequence[Message]) -> None:
        self._check_open()
        for message in messages:
            for subscriber in self._bindings.get(message.name, ()):
                self._queues[subscriber].append(Delivery(message, 1))
        self._arrivals.wake()

    async def bind(self, subscriber: str, name: str) -> None:
        self._bindings[name].add(subscriber)
        self._queues.setdefault(subscriber, deque())  # the subscription exists from its first binding on

    async def unbind(self, subscriber: str, name: str) -> None:
        self._bindings[name].discard(subscriber)

    async def fetch(self, subscriber: str, max_count: int, timeout: float) -> list[Delivery]:
        self._check_open()
        queue = self._queues[subscriber]
        deadline = asyncio.get_running_loop().time() + timeout
        while not queue:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0 or self._closed:
                return []
            await self._arrivals.wait(remaining)
        batch = [queue.popleft() for _ in range(min(max_count, len(queue)))]
        for delivery in batch:
            self._leased[subscriber].add(delivery)
            self._owner[delivery] = subscriber
        return batch

    async def ack(self, delivery: Delivery) -> None:
        self._unlease(delivery)

    async def retry(self, delivery: Delivery, delay: float) -> None:
        subscriber = self._unlease(delivery)
        again = Delivery(delivery.message, delivery.attempt + 1)
        handle: asyncio.TimerHandle

        def due() -> None:
            self._delayed[subscriber].discard(handle)
            self._queues[subscriber].append(again)
            self._arrivals.wake()

        handle = asyncio.get_running_loop().call_later(max(0.0, delay), due)
        self._delayed[subscriber].add(handle)

    async def release(self, delivery: Delivery) -> None:
        subscriber = self._unlease(delivery)
        self._queues[subscriber].appendleft(delivery)
        self._arrivals.wake()

    async def pending_count(self, subscriber: str) -> int:
        return len(self._queues[subscriber]) + len(self._leased[subscriber]) + len(self._delayed[subscriber])

    def _unlease(self, delivery: Delivery) -> str:
        subscriber = self._owner.pop(delivery)
        self._leased[subscriber].discard(delivery)
        return subscriber

    def _check_open(self) -> None:
        if self._closed:
            raise BrokerUnavailable("the memory broker is closed")
