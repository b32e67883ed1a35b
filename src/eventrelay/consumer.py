"""The consumer: fetches a service's deliveries, runs its handlers, and settles each delivery.

By default the deliveries of one fetch are handled in fetch order in one unit of work, every handler in a
savepoint of its own with its inbox record: a handler that fails rolls back alone and is retried (or
dead-lettered) on its own, and the handlers that succeeded are not run again. Handlers subscribed with
`batch=False` run in a unit of work each, in parallel up to `max_in_flight`. Deliveries with an ordering key
run one after another per key (a key's retries wait in place, so order holds).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import traceback
from collections import deque
from collections.abc import Awaitable, Coroutine, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import replace
from typing import TYPE_CHECKING, Any, TypeVar

from eventrelay.brokers.base import reconnect_pause
from eventrelay.codec import decode
from eventrelay.envelope import Delivery, Message, printable
from eventrelay.errors import BrokerError, BrokerUnavailable, DecodeError, HandlerTimeout
from eventrelay.handlers import Context, HandlerSpec, Reject, Retry, with_body_tenant
from eventrelay.stores.base import DEAD_LETTER_BODY_MAX, TRUNCATED_FROM, NewDeadLetter

if TYPE_CHECKING:
    from eventrelay.bus import DistributedEventBus
    from eventrelay.events import DynamicEvent, Event
    from eventrelay.uow import UnitOfWork

logger = logging.getLogger(__name__)

T = TypeVar("T")

Verdict = tuple[str, str | None]
"""A dead letter's reason and traceback."""

current_context: ContextVar[Context | None] = ContextVar("eventrelay_context", default=None)


class Consumer:
    """Runs the handlers of one bus for the deliveries of its subscription."""

    def __init__(self, bus: DistributedEventBus) -> None:
        self.bus = bus
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
        settings = self.bus.settings
        failures = 0
        while not self._stopping.is_set():
            free = settings.max_in_flight - self.in_flight
            if free <= 0 or self._batches >= settings.max_batches:
                self._slot_free.clear()
                await self._until_stopped(self._slot_free.wait())
                continue
            try:
                started = time.time_ns()
                batch = await self._until_stopped(
                    self.bus.broker.fetch(self.bus.service, free, settings.fetch_timeout)
                )
                self.bus.tracing.received(batch or (), started)
                failures = 0
            except BrokerUnavailable as exc:
                failures += 1
                pause = reconnect_pause(failures)
                logger.warning(
                    "Broker unavailable for %s, fetching again in %.1fs: %s", self.bus.service, pause, exc
                )
                await self._until_stopped(asyncio.sleep(pause))
                continue
            except Exception:  # any other failure must not end consuming for good: log it, back off
                failures += 1
                pause = reconnect_pause(failures)
                logger.exception("Fetching for %s failed, fetching again in %.1fs", self.bus.service, pause)
                await self._until_stopped(asyncio.sleep(pause))
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
            self.bus.service,
            self.bus.settings.shutdown_timeout,
        )
        for task in unfinished:
            task.cancel()
        await asyncio.gather(*unfinished, return_exceptions=True)

    def stop(self) -> None:
        """Stop fetching; deliveries already running finish, those not started go back to the broker."""
        self._stopping.set()

    async def _until_stopped(self, awaitable: Awaitable[T]) -> T | None:
        """Await `awaitable`, or give up (cancelling it) when the consumer stops."""
        task = asyncio.ensure_future(awaitable)
        stop = asyncio.ensure_future(self._stopping.wait())
        done, _ = await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            stop.cancel()
            return task.result()
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            return None
        return task.result()  # it finished before the cancel landed: keep what it fetched

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
        # Entity events are stamped from the handler's context at commit: one message per commit there.
        if self.bus.entity_events is not None:
            return False
        specs = self.bus.handlers_for(delivery.message.name)
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
            left = await self._handle_together(deliveries)
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

    async def _handle_together(self, deliveries: list[Delivery]) -> list[tuple[Delivery, float | None]]:
        """Run the handlers of `deliveries` in fetch order in one unit of work, each in a savepoint of its
        own; commit; ack what is done and send unkeyed failures to be retried.

        Return what is left to handle one by one, in fetch order: `(delivery, None)` for a delivery not
        started here (it cannot be decoded, its handlers changed, the consumer is stopping, or it waits
        behind an earlier one of its key left so),
        `(delivery, delay)` for a keyed delivery whose handler failed and retries in place after `delay`.
        """
        bus = self.bus
        store, service = bus.store, bus.service
        jobs: list[tuple[Delivery, list[tuple[HandlerSpec, Any]] | None]] = []
        for delivery in deliveries:
            message = delivery.message
            specs = [] if delivery.undecodable else bus.handlers_for(message.name)
            try:
                decoded = [(s, self._decode(message, s.events[message.name])) for s in specs]
            except DecodeError:
                decoded = []
            # Undecodable, or its handlers left since the fetch: dead-lettered on the usual path, in order.
            jobs.append((delivery, decoded or None))
        started = time.perf_counter()
        blocked: set[str | None] = set()  # keys whose later deliveries wait for the one-by-one path
        done: list[Delivery] = []
        retries: list[tuple[Delivery, float]] = []
        left: dict[int, float] = {}
        ran: list[tuple[str, Message]] = []
        letters: list[tuple[str, Message, str]] = []
        claims = [(spec.name, d.message.id) for d, handlers in jobs for spec, _ in handlers or ()]
        if claims:
            async with bus.new_unit_of_work() as uow:
                tx = uow.transaction
                claiming = time.time_ns()
                fresh = iter(await store.claim_inbox_many(tx, service, claims))
                claimed_ns = (claiming, time.time_ns())
                for delivery, handlers in jobs:
                    message, attempt = delivery.message, delivery.attempt
                    if handlers is None:
                        blocked.add(message.key)
                        continue
                    claimed = [(spec, event, next(fresh)) for spec, event in handlers]
                    if (
                        (message.key is not None and message.key in blocked)
                        or self._stopping.is_set()  # not started: back to the broker
                        or [spec for spec, _ in handlers] != bus.handlers_for(message.name)  # (un)subscribed
                    ):
                        blocked.add(message.key)
                        for spec, _, new in claimed:
                            if new:
                                await store.unclaim_inbox(tx, service, spec.name, message.id)
                        continue
                    delays: list[float] = []
                    with bus.tracing.process(delivery):
                        for spec, event, new in claimed:
                            try:
                                with self._handling(spec, message, attempt, uow, event) as context:
                                    bus.tracing.inbox_checked(new, *claimed_ns)
                                    if not new:
                                        shown = printable(message.id)
                                        logger.debug("Duplicate %s for %s skipped", shown, spec.name)
                                        continue
                                    async with uow.savepoint(spec.name):
                                        await self._within_time_limit(spec.invoke(event, context))
                                ran.append((spec.name, message))
                                continue
                            except Exception as exc:
                                if not tx.usable:  # only a rollback is left: the batch goes one by one
                                    raise
                                verdict = self._judge(spec, message, attempt, exc)
                            if isinstance(verdict, float):
                                await store.unclaim_inbox(tx, service, spec.name, message.id)
                                delays.append(verdict)
                            else:
                                kept, reason = self._bounded(message, verdict[0])
                                letter = NewDeadLetter(service, spec.name, kept, attempt, reason, verdict[1])
                                await store.add_dead_letter(tx, letter)
                                letters.append((spec.name, message, reason))
                    if not delays:
                        done.append(delivery)
                    elif message.key is None:
                        retries.append((delivery, min(delays)))
                    else:
                        left[id(delivery)] = min(delays)
                        blocked.add(message.key)
        for handler, message in ran:
            bus.metrics.handled(handler, message, started)
        for handler, message, reason in letters:
            self._dead_lettered(handler, message, reason)
        try:
            await bus.broker.ack_many(done)
        except Exception:
            logger.exception("Could not ack %d handled message(s); they come again as duplicates", len(done))
        for delivery, delay in retries:
            await self._hand_back(delivery, delay)
        for _ in done + [d for d, _ in retries]:
            self._finished()
        settled = {id(d) for d in done} | {id(d) for d, _ in retries}
        return [(d, left.get(id(d))) for d in deliveries if id(d) not in settled]

    async def _hand_back(self, delivery: Delivery, delay: float) -> None:
        """Ask the broker to deliver it again after `delay` seconds."""
        try:
            await self.bus.broker.retry(delivery, delay)
        except Exception:
            logger.exception(
                "Could not hand %s back; the broker will deliver it again", printable(delivery.message.id)
            )

    async def _give_back(self, delivery: Delivery, failed_after: float | None = None) -> None:
        """Back to the broker, not handled (shutting down); one whose handler failed counts that attempt."""
        try:
            if failed_after is not None:
                await self.bus.broker.retry(delivery, 0.0)
            else:
                await self.bus.broker.release(delivery)
        except Exception:
            logger.exception(
                "Could not release %s; the broker will deliver it again", printable(delivery.message.id)
            )
        finally:
            self._finished()

    async def _settle_one(self, delivery: Delivery, failed_after: float | None = None) -> None:
        try:
            with self.bus.tracing.process(delivery):
                await self.dispatch(delivery, failed_after)
        except Exception as exc:
            await self._unsettled(delivery, exc)
        finally:
            self._finished()

    async def _unsettled(self, delivery: Delivery, exc: Exception) -> None:
        """Settling raised outside any handler (a bug, the store or the broker failing): retry it like a
        failing handler; after the last attempt make it a dead letter, so it never comes back endlessly."""
        message, policy = delivery.message, self.bus.settings.retry
        try:
            # A broker failing (an ack after the handlers succeeded, say) is no fault of the message.
            if delivery.attempt >= policy.max_attempts and not isinstance(exc, BrokerError):
                reason = f"could not be settled in {delivery.attempt} attempt(s): {type(exc).__name__}: {exc}"
                error = "".join(traceback.format_exception(exc))
                try:
                    await self.dead_letter(None, message, delivery.attempt, reason, error)
                except Exception:  # the store may be down: the message must come again, not be lost
                    logger.exception("Could not dead-letter %s; it will come again", printable(message.id))
                else:
                    await self.bus.broker.ack(delivery)
                    return
            else:
                logger.error(
                    "Could not settle message %s; it will come again", printable(message.id), exc_info=exc
                )
            await self.bus.broker.retry(delivery, policy.delay(delivery.attempt))
        except Exception:
            shown = printable(message.id)
            logger.exception("Could not hand %s back; the broker will deliver it again", shown)

    def _decode(self, message: Message, event_type: type[Event] | None) -> Event | DynamicEvent:
        """The event of `message`, its body read in the bus's JSON style."""
        return decode(message, event_type, self.bus.settings.max_message_bytes, self.bus.json_style)

    def _finished(self) -> None:
        self.in_flight -= 1
        self._slot_free.set()

    async def dispatch(self, delivery: Delivery, failed_after: float | None = None) -> None:
        """Run every handler of the delivery's event, then ack it or ask the broker to retry it.

        `failed_after`: a handler already failed this attempt (in a batch); retry after that many seconds.
        """
        message, broker = delivery.message, self.bus.broker
        if delivery.undecodable is not None:
            await self.dead_letter(None, message, delivery.attempt, f"cannot decode: {delivery.undecodable}")
            await broker.ack(delivery)
            return
        specs = self.bus.handlers_for(message.name)
        if not specs:
            reason = f"no handler for event {message.name!r} in service {self.bus.service!r}"
            if not message.name.isprintable():  # no event can be declared so: a forged log line, say
                reason = f"cannot decode: the event name {message.name!r} has control characters"
            await self.dead_letter(None, message, delivery.attempt, reason)
            await broker.ack(delivery)
            return
        attempt, delay = delivery.attempt, failed_after
        while True:
            if delay is not None:
                if message.key is None or self._stopping.is_set():
                    await broker.retry(delivery, delay)
                    return
                # Ordered: later messages of this key wait behind this one, so its retries wait here.
                if await self._until_stopped(asyncio.sleep(delay, result=True)) is None:
                    await broker.retry(delivery, 0.0)
                    return
                attempt += 1
            # A handler done with the message already (in an earlier attempt) finds its inbox record.
            results = [(spec, await self._run_one(spec, message, attempt)) for spec in specs]
            again = [(spec, d) for spec, d in results if d is not None]
            if not again:
                await broker.ack(delivery)
                return
            delay = min(d for _, d in again)
            specs = [spec for spec, _ in again]

    async def _run_one(self, spec: HandlerSpec, message: Message, attempt: int) -> float | None:
        """Run one handler once; return None when done with the message, or seconds to wait before again."""
        try:
            event = self._decode(message, spec.events[message.name])
        except DecodeError as exc:
            await self.dead_letter(spec.name, message, attempt, f"cannot decode: {exc}")
            return None
        try:
            started = time.perf_counter()
            uow = self.bus.new_unit_of_work()
            # The context stays set through the commit: entity events made there inherit correlation too.
            with self._handling(spec, message, attempt, uow, event) as context:
                async with uow:
                    if not await self.bus.tracing.inbox_check(
                        self.bus.store.claim_inbox(uow.transaction, self.bus.service, spec.name, message.id)
                    ):
                        logger.debug("Duplicate %s for %s skipped", printable(message.id), spec.name)
                        return None
                    await self._within_time_limit(spec.invoke(event, context))
            self.bus.metrics.handled(spec.name, message, started)
            return None
        except Exception as exc:
            verdict = self._judge(spec, message, attempt, exc)
        if isinstance(verdict, float):
            return verdict
        await self.dead_letter(spec.name, message, attempt, *verdict)
        return None

    def _judge(self, spec: HandlerSpec, message: Message, attempt: int, exc: Exception) -> float | Verdict:
        """What a handler's exception means: seconds to wait before trying again, or a dead letter's reason
        and traceback."""
        policy = spec.retry or self.bus.settings.retry
        if isinstance(exc, Reject):
            return f"rejected by handler: {exc.reason}", None
        if attempt < policy.max_attempts:
            if not isinstance(exc, Retry):
                logger.warning(
                    "%s failed on %s (attempt %d): %r", spec.name, printable(message.id), attempt, exc
                )
            self.bus.metrics.retried(spec.name, message)
            return exc.after if isinstance(exc, Retry) else policy.delay(attempt)
        if isinstance(exc, Retry):
            return f"still asking to retry after {attempt} attempts: {exc}", None
        reason = f"failed {attempt} times; last error: {type(exc).__name__}: {exc}"
        return reason, "".join(traceback.format_exception(exc))

    async def dead_letter(
        self, handler: str | None, message: Message, attempts: int, reason: str, error: str | None = None
    ) -> None:
        """Store a dead letter; for a handler, also mark the message done for it so it is not run again."""
        store = self.bus.store
        kept, reason = self._bounded(message, reason)
        async with self.bus.new_unit_of_work() as uow:
            tx = uow.transaction
            if handler is not None and not await store.claim_inbox(tx, self.bus.service, handler, message.id):
                return
            await store.add_dead_letter(
                tx, NewDeadLetter(self.bus.service, handler, kept, attempts, reason, error)
            )
        self._dead_lettered(handler, message, reason)

    def _bounded(self, message: Message, reason: str) -> tuple[Message, str]:
        """What a dead letter keeps of `message`, and its reason: of a body over both the size limit and
        DEAD_LETTER_BODY_MAX, its start and its size (in the TRUNCATED_FROM header) only, so a flood of huge
        messages cannot fill the store. A smaller one stays whole: replayable once the limit is raised."""
        headers = message.headers
        if TRUNCATED_FROM in headers:  # ours to set: one a publisher sent would block its letter's replay
            headers = {k: v for k, v in headers.items() if k != TRUNCATED_FROM}
        if len(message.body) <= max(self.bus.settings.max_message_bytes, DEAD_LETTER_BODY_MAX):
            return (message if headers is message.headers else replace(message, headers=headers)), reason
        headers = {**headers, TRUNCATED_FROM: str(len(message.body))}
        kept = replace(message, body=message.body[:DEAD_LETTER_BODY_MAX], headers=headers)
        return kept, f"{reason}; the dead letter keeps its first {DEAD_LETTER_BODY_MAX} bytes"

    def _dead_lettered(self, handler: str | None, message: Message, reason: str) -> None:
        self.bus.metrics.dead_lettered(handler, message)
        # Each from the message (the reason quotes its fields): escaped, so none can forge a log line.
        where = handler or self.bus.service
        shown = printable(message.id), printable(message.name), printable(reason)
        logger.error("Dead letter: %s (%s) for %s: %s", shown[0], shown[1], where, shown[2])

    async def replay(
        self, specs: Sequence[HandlerSpec], message: Message, letter_id: int, claim: bool
    ) -> None:
        """Run `specs` on a dead letter's message in one unit of work that also deletes the letter.

        A handler's own dead letter already holds its inbox record; for a letter no handler took (`claim`),
        handlers claim the message here and skip it if they handled it since.
        """
        store = self.bus.store
        uow = self.bus.new_unit_of_work()
        replaying = self.bus.tracing.process(Delivery(message), replay=True)
        with replaying, self._handling(specs[0], message, 1, uow, traced=False):
            async with uow:
                tx = uow.transaction
                await store.remove_dead_letter(tx, letter_id)
                for spec in specs:
                    event = self._decode(message, spec.events[message.name])
                    if claim and not await store.claim_inbox(tx, self.bus.service, spec.name, message.id):
                        continue
                    with self._handling(spec, message, 1, uow, event) as context:
                        await spec.invoke(event, context)

    @contextlib.contextmanager
    def _handling(
        self,
        spec: HandlerSpec,
        message: Message,
        attempt: int,
        uow: UnitOfWork,
        event: object = None,
        traced: bool = True,
    ) -> Iterator[Context]:
        """The handler's context, set where `publish` reads it to stamp correlation, causation and tenant."""
        headers = with_body_tenant(message.headers, event)
        context = Context(
            message.id, message.name, self.bus.service, spec.name, attempt, headers, message.key, uow
        )
        token = current_context.set(context)
        try:
            with self.bus.tracing.handle(spec.name, message, attempt) if traced else contextlib.nullcontext():
                yield context
        finally:
            current_context.reset(token)

    async def _within_time_limit(self, handling: Awaitable[None]) -> None:
        limit = self.bus.settings.handler_timeout
        deadline = asyncio.timeout(limit)
        try:
            async with deadline:
                await handling
        except TimeoutError:
            if deadline.expired():  # ours, not a TimeoutError the handler raised itself
                raise HandlerTimeout(f"still running after its time limit of {limit}s; cancelled") from None
            raise
