"""What happens to one delivery, or to the deliveries of one fetch: decode, claim in the inbox, run the
handlers in a unit of work within their time limit, then ack, ask the broker to retry, or dead-letter.

The consumer (`consumer.py`) decides when and in what order; the dispatcher does the handling.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import traceback
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from eventrelay.brokers.base import Broker
from eventrelay.codec import decode
from eventrelay.config import Settings
from eventrelay.envelope import TENANT_ID, Delivery, Message, printable
from eventrelay.errors import BrokerError, DecodeError, HandlerTimeout
from eventrelay.handlers import (
    Context,
    HandlerSpec,
    Registry,
    Reject,
    Retry,
    current_context,
    with_body_tenant,
)
from eventrelay.inbox import Inbox
from eventrelay.json_style import JsonStyle
from eventrelay.metrics import MetricsHooks
from eventrelay.requests import answer, expired, failure, reply_to
from eventrelay.tracing import Tracing

if TYPE_CHECKING:
    from eventrelay.events import DynamicEvent, Event
    from eventrelay.tenancy import TenantStore
    from eventrelay.uow import UnitOfWork

logger = logging.getLogger(__name__)

T = TypeVar("T")

Verdict = tuple[str, str | None]
"""A dead letter's reason and traceback."""


async def until_stopped(awaitable: Awaitable[T], stopping: asyncio.Event) -> T | None:
    """Await `awaitable`, or give up (cancelling it) once `stopping` is set: then None."""
    task = asyncio.ensure_future(awaitable)
    stop = asyncio.ensure_future(stopping.wait())
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


class Dispatcher:
    """Runs one service's handlers on its deliveries and settles each with the broker."""

    def __init__(
        self,
        service: str,
        broker: Broker,
        handlers: Registry,
        inbox: Inbox,
        new_unit_of_work: Callable[[], UnitOfWork],
        *,
        settings: Settings,
        json_style: JsonStyle,
        tracing: Tracing,
        metrics: MetricsHooks,
        tenants: TenantStore | None = None,
    ) -> None:
        self.service = service
        self.broker = broker
        self.handlers = handlers
        self.inbox = inbox
        self.new_unit_of_work = new_unit_of_work
        self.settings = settings
        self.json_style = json_style
        self.tracing = tracing
        self.metrics = metrics
        self.tenants = tenants

    async def handle_batch(
        self, deliveries: list[Delivery], stopping: asyncio.Event
    ) -> list[tuple[Delivery, float | None]]:
        """`_handle_batch`; with a database per tenant, once for each tenant's deliveries, in its database."""
        if self.tenants is None:
            return await self._handle_batch(deliveries, stopping)
        by_tenant: dict[str | None, list[Delivery]] = {}
        for delivery in deliveries:
            by_tenant.setdefault(self._tenant_of(delivery), []).append(delivery)
        left: dict[int, tuple[Delivery, float | None]] = {}
        for tenant, group in by_tenant.items():
            async with self.tenants.scope(tenant):
                left.update((id(d), (d, delay)) for d, delay in await self._handle_batch(group, stopping))
        return [left[id(d)] for d in deliveries if id(d) in left]

    def _tenant_of(self, delivery: Delivery) -> str | None:
        """The tenant of a delivery: its header's, else (ABP sends it only there) its body's, else None."""
        message = delivery.message
        tenant = message.headers.get(TENANT_ID)
        specs = [] if tenant is not None or delivery.undecodable else self.handlers.handlers_for(message.name)
        if specs:
            with contextlib.suppress(DecodeError):
                event = self._decode(message, specs[0].events[message.name])
                tenant = with_body_tenant(message.headers, event).get(TENANT_ID)
        return tenant

    async def _handle_batch(
        self, deliveries: list[Delivery], stopping: asyncio.Event
    ) -> list[tuple[Delivery, float | None]]:
        """Run the handlers of `deliveries` in fetch order in one unit of work, each in a savepoint of its
        own; commit; ack what is done and send unkeyed failures to be retried.

        Return what is left to handle one by one, in fetch order: `(delivery, None)` for a delivery not
        started here (it cannot be decoded, its handlers changed, the consumer is stopping, or it waits
        behind an earlier one of its key left so),
        `(delivery, delay)` for a keyed delivery whose handler failed and retries in place after `delay`.
        """
        inbox, tracing = self.inbox, self.tracing
        jobs: list[tuple[Delivery, list[tuple[HandlerSpec, Any]] | None]] = []
        done: list[Delivery] = []
        now = time.time()
        for delivery in deliveries:
            message = delivery.message
            if self._given_up(message, now):
                done.append(delivery)
                continue
            specs = [] if delivery.undecodable else self.handlers.handlers_for(message.name)
            try:
                decoded = [(s, self._decode(message, s.events[message.name])) for s in specs]
            except DecodeError:
                decoded = []
            # Undecodable, or its handlers left since the fetch: dead-lettered on the usual path, in order.
            jobs.append((delivery, decoded or None))
        started = time.perf_counter()
        blocked: set[str | None] = set()  # keys whose later deliveries wait for the one-by-one path
        replies: list[tuple[str, Message]] = []  # sent once the unit of work has committed
        retries: list[tuple[Delivery, float]] = []
        left: dict[int, float] = {}
        ran: list[tuple[str, Message]] = []
        letters: list[tuple[str, Message, str]] = []
        claims = [(spec.name, d.message.id) for d, handlers in jobs for spec, _ in handlers or ()]
        if claims:
            async with self.new_unit_of_work() as uow:
                tx = uow.transaction
                claiming = time.time_ns()
                fresh = iter(await inbox.claim_many(tx, claims))
                claimed_ns = (claiming, time.time_ns())
                for delivery, handlers in jobs:
                    message, attempt = delivery.message, delivery.attempt
                    if handlers is None:
                        blocked.add(message.key)
                        continue
                    claimed = [(spec, event, next(fresh)) for spec, event in handlers]
                    if (
                        (message.key is not None and message.key in blocked)
                        or stopping.is_set()  # not started: back to the broker
                        or [spec for spec, _ in handlers] != self.handlers.handlers_for(message.name)
                    ):  # (un)subscribed since the fetch
                        blocked.add(message.key)
                        for spec, _, new in claimed:
                            if new:
                                await inbox.unclaim(tx, spec.name, message.id)
                        continue
                    delays: list[float] = []
                    with tracing.process(delivery):
                        for spec, event, new in claimed:
                            try:
                                with self._handling(spec, message, attempt, uow, event) as context:
                                    tracing.inbox_checked(new, *claimed_ns)
                                    if not new:
                                        shown = printable(message.id)
                                        logger.debug("Duplicate %s for %s skipped", shown, spec.name)
                                        continue
                                    async with uow.savepoint(spec.name):
                                        value = await self._invoke(spec, event, context)
                                        answers = self._answers(message, value)
                                replies += answers  # the savepoint held: its callbacks ran too
                                ran.append((spec.name, message))
                                continue
                            except Exception as exc:
                                if not tx.usable:  # only a rollback is left: the batch goes one by one
                                    raise
                                verdict = self._judge(spec, message, attempt, exc)
                                failures = self._failures(message, exc)
                            if isinstance(verdict, float):
                                await inbox.unclaim(tx, spec.name, message.id)
                                delays.append(verdict)
                            else:
                                reason = await inbox.add_dead_letter(
                                    tx, spec.name, message, attempt, *verdict
                                )
                                letters.append((spec.name, message, reason))
                                replies += failures
                    if not delays:
                        done.append(delivery)
                    elif message.key is None:
                        retries.append((delivery, min(delays)))
                    else:
                        left[id(delivery)] = min(delays)
                        blocked.add(message.key)
        for handler, message in ran:
            self.metrics.handled(handler, message, started)
        for handler, message, reason in letters:
            inbox.dead_lettered(handler, message, reason)
        await self._send_replies(replies)
        try:
            await self.broker.ack_many(done)
        except Exception:
            logger.exception("Could not ack %d handled message(s); they come again as duplicates", len(done))
        for delivery, delay in retries:
            await self.hand_back(delivery, delay)
        settled = {id(d) for d in done} | {id(d) for d, _ in retries}
        return [(d, left.get(id(d))) for d in deliveries if id(d) not in settled]

    async def hand_back(self, delivery: Delivery, delay: float) -> None:
        """Ask the broker to deliver it again after `delay` seconds."""
        try:
            await self.broker.retry(delivery, delay)
        except Exception:
            logger.exception(
                "Could not hand %s back; the broker will deliver it again", printable(delivery.message.id)
            )

    async def unsettled(self, delivery: Delivery, exc: Exception) -> None:
        """Settling raised outside any handler (a bug, the store or the broker failing): retry it like a
        failing handler; after the last attempt make it a dead letter, so it never comes back endlessly."""
        message, policy = delivery.message, self.settings.retry
        try:
            # A broker failing (an ack after the handlers succeeded, say) is no fault of the message.
            if delivery.attempt >= policy.max_attempts and not isinstance(exc, BrokerError):
                reason = f"could not be settled in {delivery.attempt} attempt(s): {type(exc).__name__}: {exc}"
                error = "".join(traceback.format_exception(exc))
                try:
                    await self.inbox.dead_letter(None, message, delivery.attempt, reason, error)
                except Exception:  # the store may be down: the message must come again, not be lost
                    logger.exception("Could not dead-letter %s; it will come again", printable(message.id))
                else:
                    await self.broker.ack(delivery)
                    return
            else:
                logger.error(
                    "Could not settle message %s; it will come again", printable(message.id), exc_info=exc
                )
            await self.broker.retry(delivery, policy.delay(delivery.attempt))
        except Exception:
            shown = printable(message.id)
            logger.exception("Could not hand %s back; the broker will deliver it again", shown)

    def _decode(self, message: Message, event_type: type[Event] | None) -> Event | DynamicEvent:
        """The event of `message`, its body read in the bus's JSON style."""
        return decode(message, event_type, self.settings.max_message_bytes, self.json_style)

    async def dispatch(
        self, delivery: Delivery, stopping: asyncio.Event, failed_after: float | None = None
    ) -> None:
        """Run every handler of the delivery's event, then ack it or ask the broker to retry it.

        `failed_after`: a handler already failed this attempt (in a batch); retry after that many seconds.
        With a database per tenant, it all happens in the database of the delivery's tenant.
        """
        if self.tenants is not None:
            async with self.tenants.scope(self._tenant_of(delivery)):
                await self._dispatch(delivery, stopping, failed_after)
        else:
            await self._dispatch(delivery, stopping, failed_after)

    async def _dispatch(
        self, delivery: Delivery, stopping: asyncio.Event, failed_after: float | None
    ) -> None:
        message, broker = delivery.message, self.broker
        if self._given_up(message, time.time()):
            await broker.ack(delivery)
            return
        if delivery.undecodable is not None:
            reason = f"cannot decode: {delivery.undecodable}"
            await self.inbox.dead_letter(None, message, delivery.attempt, reason)
            await self._send_replies(self._failures(message, DecodeError(reason)))
            await broker.ack(delivery)
            return
        specs = self.handlers.handlers_for(message.name)
        if not specs:
            reason = f"no handler for event {message.name!r} in service {self.service!r}"
            if not message.name.isprintable():  # no event can be declared so: a forged log line, say
                reason = f"cannot decode: the event name {message.name!r} has control characters"
            await self.inbox.dead_letter(None, message, delivery.attempt, reason)
            await self._send_replies(self._failures(message, LookupError(reason)))
            await broker.ack(delivery)
            return
        attempt, delay = delivery.attempt, failed_after
        while True:
            if delay is not None:
                if message.key is None or stopping.is_set():
                    await broker.retry(delivery, delay)
                    return
                # Ordered: later messages of this key wait behind this one, so its retries wait here.
                if await until_stopped(asyncio.sleep(delay, result=True), stopping) is None:
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
            await self.inbox.dead_letter(spec.name, message, attempt, f"cannot decode: {exc}")
            await self._send_replies(self._failures(message, exc))
            return None
        try:
            started = time.perf_counter()
            uow = self.new_unit_of_work()
            # The context stays set through the commit: entity events made there inherit correlation too.
            with self._handling(spec, message, attempt, uow, event) as context:
                async with uow:
                    if not await self.tracing.inbox_check(
                        self.inbox.claim(uow.transaction, spec.name, message.id)
                    ):
                        logger.debug("Duplicate %s for %s skipped", printable(message.id), spec.name)
                        return None
                    value = await self._invoke(spec, event, context)
                    replies = self._answers(message, value)
            self.metrics.handled(spec.name, message, started)
            await self._send_replies(replies)
            return None
        except Exception as exc:
            verdict = self._judge(spec, message, attempt, exc)
            failures = self._failures(message, exc)
        if isinstance(verdict, float):
            return verdict
        await self.inbox.dead_letter(spec.name, message, attempt, *verdict)
        await self._send_replies(failures)
        return None

    def _judge(self, spec: HandlerSpec, message: Message, attempt: int, exc: Exception) -> float | Verdict:
        """What a handler's exception means: seconds to wait before trying again, or a dead letter's reason
        and traceback."""
        policy = spec.retry or self.settings.retry
        if isinstance(exc, Reject):
            return f"rejected by handler: {exc.reason}", None
        if reply_to(message) is not None:  # its asker waits for this answer, not for a retry
            reason = f"failed to answer a request: {type(exc).__name__}: {exc}"
            return reason, "".join(traceback.format_exception(exc))
        if attempt < policy.max_attempts:
            if not isinstance(exc, Retry):
                logger.warning(
                    "%s failed on %s (attempt %d): %r", spec.name, printable(message.id), attempt, exc
                )
            self.metrics.retried(spec.name, message)
            return exc.after if isinstance(exc, Retry) else policy.delay(attempt)
        if isinstance(exc, Retry):
            return f"still asking to retry after {attempt} attempts: {exc}", None
        reason = f"failed {attempt} times; last error: {type(exc).__name__}: {exc}"
        return reason, "".join(traceback.format_exception(exc))

    async def replay(
        self, specs: Sequence[HandlerSpec], message: Message, letter_id: int, claim: bool
    ) -> None:
        """Run `specs` on a dead letter's message in one unit of work that also deletes the letter.

        A handler's own dead letter already holds its inbox record; for a letter no handler took (`claim`),
        handlers claim the message here and skip it if they handled it since.
        """
        uow = self.new_unit_of_work()
        replaying = self.tracing.process(Delivery(message), replay=True)
        with replaying, self._handling(specs[0], message, 1, uow, traced=False):
            async with uow:
                tx = uow.transaction
                await self.inbox.remove_letter(tx, letter_id)
                for spec in specs:
                    event = self._decode(message, spec.events[message.name])
                    if claim and not await self.inbox.claim(tx, spec.name, message.id):
                        continue
                    with self._handling(spec, message, 1, uow, event) as context:
                        await self._invoke(spec, event, context)

    def _given_up(self, message: Message, now: float) -> bool:
        """Whether `message` is a request its asker no longer waits for: then it is dropped (and logged)."""
        if reply_to(message) is None or not expired(message, now):
            return False
        logger.warning(
            "Request %s (%s) came after its asker gave up; dropped unhandled",
            printable(message.id),
            printable(message.name),
        )
        return True

    def _answers(self, message: Message, value: object) -> list[tuple[str, Message]]:
        """The reply a handler's return `value` makes, if `message` is a request and it returned one."""
        address = reply_to(message)
        if address is None or value is None:
            return []
        return [(address, answer(message, value, self.json_style))]

    def _failures(self, message: Message, exc: BaseException) -> list[tuple[str, Message]]:
        """The failure reply `exc` makes, if `message` is a request."""
        address = reply_to(message)
        if address is None:
            return []
        return [(address, failure(message, self.service, exc, self.settings.reply_tracebacks))]

    async def _send_replies(self, replies: list[tuple[str, Message]]) -> None:
        """Send a batch's replies together: one at a time, each waiting for its confirm, they held up the
        consumer for most of a busy answerer's time (issue 19's bench)."""
        if not replies:
            return
        sent = await asyncio.gather(*(self.broker.send_reply(*r) for r in replies), return_exceptions=True)
        for (address, _), outcome in zip(replies, sent, strict=True):
            if isinstance(outcome, Exception):  # the asker times out: a reply is worth no more than that
                logger.warning("Could not send the reply to %s", printable(address), exc_info=outcome)

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
            message.id, message.name, self.service, spec.name, attempt, headers, message.key, uow
        )
        token = current_context.set(context)
        try:
            with self.tracing.handle(spec.name, message, attempt) if traced else contextlib.nullcontext():
                yield context
        finally:
            current_context.reset(token)

    async def _invoke(self, spec: HandlerSpec, event: Event | DynamicEvent, context: Context) -> object:
        """Run the handler within its time limit and return what it returned: every path (batch, one by one,
        replay) comes here."""
        limit = self.settings.handler_timeout
        deadline = asyncio.timeout(limit)
        try:
            async with deadline:
                return await spec.invoke(event, context)
        except TimeoutError:
            if deadline.expired():  # ours, not a TimeoutError the handler raised itself
                raise HandlerTimeout(f"still running after its time limit of {limit}s; cancelled") from None
            raise
