"""The consumer: fetches a service's deliveries, runs its handlers, and settles each delivery.

By default the deliveries of one fetch are handled in fetch order in one unit of work, every handler in a
savepoint of its own with its inbox record: a handler that fails rolls back alone and is retried (or
dead-lettered) on its own, and the handlers that succeeded are not run again. Handlers subscribed with
`batch=False` run in a unit of work each, in parallel up to `max_in_flight`. Deliveries with an ordering key
run one after another per key (a key's retries wait in place, so order holds).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Coroutine
from typing import Any

from eventrelay.brokers.base import Broker, reconnect_pause
from eventrelay.config import Settings
from eventrelay.dispatch import Dispatcher, until_stopped
from eventrelay.envelope import Delivery, printable
from eventrelay.errors import BrokerUnavailable
from eventrelay.handlers import Registry
from eventrelay.tracing import Tracing

logger = logging.getLogger(__name__)


class Consumer:
    """Runs the handlers of one bus for the deliveries of its subscription."""

    def __init__(
        self,
        service: str,
        broker: Broker,
        handlers: Registry,
        dispatcher: Dispatcher,
        *,
        settings: Settings,
        tracing: Tracing,
        batches: bool = True,
    ) -> None:
        """`batches`: the deliveries of a fetch that only batch handlers take share a unit of work."""
        self.service = service
        self.broker = broker
        self.handlers = handlers
        self.dispatcher = dispatcher
        self.settings = settings
        self.tracing = tracing
        self.batches = batches
        self.in_flight = 0
        self._stopping = asyncio.Event()
        self._slot_free = asyncio.Event()
        # Per ordering key, what waits its turn: a delivery, and the retry delay when its handler failed.
        self._lanes: dict[str, deque[tuple[Delivery, float | None]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._batches = 0  # batches running

    @property
    def idle(self) -> bool:
        """True when no delivery is fetched and unfinished."""
        return self.in_flight == 0

    async def run(self) -> None:
        """Fetch and dispatch until `stop()`; then let in-flight deliveries finish."""
        settings = self.settings
        failures = 0
        while not self._stopping.is_set():
            free = settings.max_in_flight - self.in_flight
            if free <= 0 or self._batches >= settings.max_batches:
                self._slot_free.clear()
                await until_stopped(self._slot_free.wait(), self._stopping)
                continue
            try:
                started = time.time_ns()
                fetching = self.broker.fetch(self.service, free, settings.fetch_timeout)
                batch = await until_stopped(fetching, self._stopping)
                self.tracing.received(batch or (), started)
                failures = 0
            except BrokerUnavailable as exc:
                failures += 1
                pause = reconnect_pause(failures)
                logger.warning(
                    "Broker unavailable for %s, fetching again in %.1fs: %s", self.service, pause, exc
                )
                await until_stopped(asyncio.sleep(pause), self._stopping)
                continue
            except Exception:  # any other failure must not end consuming for good: log it, back off
                failures += 1
                pause = reconnect_pause(failures)
                logger.exception("Fetching for %s failed, fetching again in %.1fs", self.service, pause)
                await until_stopped(asyncio.sleep(pause), self._stopping)
                continue
            self._schedule_all(batch or [])
        try:
            # A batch ending spawns tasks (its keys' lanes give deliveries back): wait for those too.
            deadline = asyncio.get_running_loop().time() + settings.shutdown_timeout
            while self._tasks and (remaining := deadline - asyncio.get_running_loop().time()) > 0:
                await asyncio.wait(set(self._tasks), timeout=remaining)
        finally:
            await self._cancel_unfinished()

    async def _cancel_unfinished(self) -> None:
        """Cancel the handlers still running after the shutdown timeout (or when the consumer itself is
        cancelled), before the bus closes the broker and the store under them: each rolls back, and its
        message, not acknowledged, is delivered again."""
        unfinished = list(self._tasks)
        if not unfinished:
            return
        logger.warning(
            "%d delivery(ies) of %s still running after the shutdown timeout (%ss): cancelled, to come again",
            len(unfinished),
            self.service,
            self.settings.shutdown_timeout,
        )
        for task in unfinished:
            task.cancel()
        await asyncio.gather(*unfinished, return_exceptions=True)

    def stop(self) -> None:
        """Stop fetching; deliveries already running finish, those not started go back to the broker."""
        self._stopping.set()

    def _schedule_all(self, deliveries: list[Delivery]) -> None:
        """Deliveries whose handlers all take batches go to one unit of work; the others one by one."""
        together: list[Delivery] = []
        keys: set[str] = set()
        laned: set[str] = set()  # keys of which a delivery of this fetch went to the lane: the rest follow
        for delivery in deliveries:
            key = delivery.message.key
            if self._batchable(delivery) and (
                key is None or (key in keys and key not in laned) or key not in self._lanes
            ):
                together.append(delivery)
                if key is not None and key not in keys:
                    keys.add(key)
                    self._lanes[key] = deque()  # the key's later deliveries wait behind the batch
            else:
                if key is not None:
                    laned.add(key)
                self._schedule(delivery)
        if together:
            self.in_flight += len(together)
            self._batches += 1
            self._spawn(self._settle_batch(together, keys))

    def _batchable(self, delivery: Delivery) -> bool:
        if not self.batches:
            return False
        specs = self.handlers.handlers_for(delivery.message.name)
        return bool(specs) and all(spec.batch for spec in specs)

    def _schedule(self, delivery: Delivery) -> None:
        self.in_flight += 1
        key = delivery.message.key
        if key is None:
            self._spawn(self._settle_one(delivery))
        elif key in self._lanes:
            self._lanes[key].append((delivery, None))
        else:
            self._lanes[key] = deque([(delivery, None)])
            self._spawn(self._run_lane(key))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_lane(self, key: str) -> None:
        lane = self._lanes[key]
        try:
            while lane:
                if self._stopping.is_set():
                    # Last first: a broker that puts each one back in front then holds them in key order.
                    await self._give_back(*lane.pop())
                else:
                    await self._settle_one(*lane.popleft())
        finally:
            del self._lanes[key]

    async def _settle_batch(self, deliveries: list[Delivery], keys: set[str]) -> None:
        """Handle `deliveries` in one unit of work; what it leaves goes on one by one, in fetch order."""
        left: list[tuple[Delivery, float | None]] = [(d, None) for d in deliveries]
        try:
            left = await self.dispatcher.handle_batch(deliveries, self._stopping)
            for _ in range(len(deliveries) - len(left)):
                self._finished()
        except asyncio.CancelledError:
            # Cancelled (shutdown timeout): its unit of work rolled back and none was acked, so the broker
            # delivers them again; each still counts as finished, and so do those waiting in its keys' lanes.
            for _ in deliveries:
                self._finished()
            for waiting in keys:
                for _ in self._lanes.pop(waiting, ()):
                    self._finished()
            raise
        except Exception:  # the one-by-one path below runs it again and logs it as usual
            logger.debug("A batch of %d failed; handling it one by one", len(deliveries), exc_info=True)
        finally:
            self._batches -= 1
            self._slot_free.set()
        for delivery, failed_after in left:
            key = delivery.message.key
            if key is not None:
                self._lanes[key].append((delivery, failed_after))
            elif self._stopping.is_set():
                await self._give_back(delivery, failed_after)  # not started: back to the broker
            else:
                self._spawn(self._settle_one(delivery, failed_after))
        for key in keys:
            lane = self._lanes[key]
            if lane:  # its own leftovers first (appended in fetch order), then those fetched since
                lane.rotate(sum(1 for d, _ in left if d.message.key == key))
                self._spawn(self._run_lane(key))
            else:
                del self._lanes[key]

    async def _give_back(self, delivery: Delivery, failed_after: float | None = None) -> None:
        """Back to the broker, not handled (shutting down); one whose handler failed counts that attempt."""
        try:
            if failed_after is not None:
                await self.broker.retry(delivery, 0.0)
            else:
                await self.broker.release(delivery)
        except Exception:
            logger.exception(
                "Could not release %s; the broker will deliver it again", printable(delivery.message.id)
            )
        finally:
            self._finished()

    async def _settle_one(self, delivery: Delivery, failed_after: float | None = None) -> None:
        try:
            with self.tracing.process(delivery):
                await self.dispatcher.dispatch(delivery, self._stopping, failed_after)
        except Exception as exc:
            await self.dispatcher.unsettled(delivery, exc)
        finally:
            self._finished()

    def _finished(self) -> None:
        self.in_flight -= 1
        self._slot_free.set()
