"""Failures: retries with backoff, dead letters with reasons, poison messages, replay and discard.

Every promise that touches the store runs without a database (the in-memory store) and on each real one.
Several tests also run with an ordering key, because keyed messages retry in place while the others go back
to the broker.
"""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import timedelta

import pytest

from eventrelay import (
    ConfigurationError,
    Context,
    DeadLetter,
    Delivery,
    DistributedEventBus,
    DistributedEventHandler,
    DynamicEvent,
    Event,
    Message,
    Reject,
    Retry,
    RetryPolicy,
    Settings,
    event_name,
)
from eventrelay.envelope import CORRELATION_ID, new_message_id
from eventrelay.testing import RecordingBroker, wait_until_idle

PREFIX = "tests.unit.test_failures"
SERVICE = "OrderService"
MAX_ATTEMPTS = 3
FAST = Settings(retry=RetryPolicy(initial_delay=0.01, max_delay=0.05, max_attempts=MAX_ATTEMPTS))
IDLE_TIMEOUT = 15.0  # a bound, not a measurement: a healthy run is idle long before


class OrderPlacedEto(Event, name=f"{PREFIX}.OrderPlaced"):
    order_id: int
    poison: bool = False


class StockReservedEto(Event, name=f"{PREFIX}.StockReserved"):
    order_id: int


class SpyBroker(RecordingBroker):
    """A memory broker that also remembers the delay of every retry the bus asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.retry_delays: list[float] = []

    async def retry(self, delivery: Delivery, delay: float) -> None:
        self.retry_delays.append(delay)
        await super().retry(delivery, delay)


@pytest.fixture(
    params=[
        pytest.param("memory", id="no-database"),
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgresql", id="postgresql", marks=pytest.mark.postgresql),
        pytest.param("mariadb", id="mariadb", marks=pytest.mark.mariadb),
    ]
)
def database(request: pytest.FixtureRequest) -> str | None:
    """No database (the in-memory store), then a fresh database on each supported engine."""
    if request.param == "memory":
        return None
    url = request.getfixturevalue(f"{request.param}_url")
    assert isinstance(url, str)
    return url


@pytest.fixture(params=[True, False], ids=["batched", "one-by-one"])
def batch(request: pytest.FixtureRequest) -> bool:
    """Each promise holds both for the default subscription and for `batch=False`."""
    return bool(request.param)


@pytest.fixture
def broker() -> SpyBroker:
    return SpyBroker()


def make_bus(broker: SpyBroker, database: str | None, settings: Settings = FAST) -> DistributedEventBus:
    return DistributedEventBus(SERVICE, broker=broker, database=database, settings=settings)


async def idle(bus: DistributedEventBus) -> None:
    await wait_until_idle(bus, timeout=IDLE_TIMEOUT)


def published(broker: RecordingBroker, message_id: str) -> Message:
    [message] = [m for m in broker.published if m.id == message_id]
    return message


keyed = pytest.mark.parametrize("key", [None, "order-key"], ids=["unkeyed", "keyed"])


# --- retries -------------------------------------------------------------------------------------------


@keyed
async def test_a_handler_that_fails_twice_then_succeeds_is_handled(
    broker: SpyBroker, database: str | None, key: str | None, batch: bool
) -> None:
    attempts: list[int] = []
    handled: list[int] = []

    async def flaky(event: OrderPlacedEto, context: Context) -> None:
        attempts.append(context.attempt)
        if context.attempt < 3:
            raise ConnectionError("database hiccup")
        handled.append(event.order_id)

    async with make_bus(broker, database) as bus:
        await bus.subscribe(flaky, batch=batch)
        await bus.publish(OrderPlacedEto(order_id=1), key=key)
        await idle(bus)
        assert await bus.dead_letters() == []

    assert attempts == [1, 2, 3]
    assert handled == [1]
    if key is None:  # unkeyed retries go back to the broker, with the policy's backoff
        assert len(broker.retry_delays) == 2
        assert all(0 <= delay <= 0.05 for delay in broker.retry_delays)


@keyed
async def test_a_poison_message_is_dead_lettered_while_the_messages_behind_it_are_handled(
    broker: SpyBroker, database: str | None, key: str | None, batch: bool
) -> None:
    handled: list[int] = []
    poison_attempts: list[int] = []

    async def handle_order(event: OrderPlacedEto, context: Context) -> None:
        if event.poison:
            poison_attempts.append(context.attempt)
            raise ValueError(f"order {event.order_id} cannot be priced")
        handled.append(event.order_id)

    async with make_bus(broker, database) as bus:
        await bus.subscribe(handle_order, batch=batch)
        for order_id in range(1, 4):
            await bus.publish(OrderPlacedEto(order_id=order_id), key=key)
        poison_id = await bus.publish(
            OrderPlacedEto(order_id=99, poison=True), key=key, headers={"x-source": "checkout"}
        )
        for order_id in range(4, 8):
            await bus.publish(OrderPlacedEto(order_id=order_id), key=key)
        await idle(bus)
        letters = await bus.dead_letters()

    assert (sorted(handled) if key is None else handled) == [1, 2, 3, 4, 5, 6, 7]
    assert poison_attempts == [1, 2, 3]
    [letter] = letters
    original = published(broker, poison_id)
    assert letter.subscriber == SERVICE
    assert letter.handler is not None
    assert letter.handler.endswith("handle_order")
    assert letter.attempts == MAX_ATTEMPTS
    assert "ValueError" in letter.reason
    assert "order 99 cannot be priced" in letter.reason
    assert letter.error is not None
    assert "Traceback (most recent call last)" in letter.error
    assert "in handle_order" in letter.error
    assert "ValueError: order 99 cannot be priced" in letter.error
    assert letter.message.id == poison_id
    assert letter.message.name == f"{PREFIX}.OrderPlaced"
    assert letter.message.body == original.body
    assert dict(letter.message.headers) == dict(original.headers)
    assert letter.message.headers["x-source"] == "checkout"
    assert letter.message.headers[CORRELATION_ID] == poison_id
    assert letter.message.key == key


async def test_a_handlers_own_policy_overrides_the_services(
    broker: SpyBroker, database: str | None, batch: bool
) -> None:
    calls: dict[str, int] = {"strict": 0, "default": 0}

    async def strict(event: OrderPlacedEto) -> None:
        calls["strict"] += 1
        raise RuntimeError("strict fails")

    async def default(event: OrderPlacedEto) -> None:
        calls["default"] += 1
        raise RuntimeError("default fails")

    async with make_bus(broker, database) as bus:
        await bus.subscribe(strict, name="Strict", retry=RetryPolicy(max_attempts=1), batch=batch)
        await bus.subscribe(default, name="Default", batch=batch)
        await bus.publish(OrderPlacedEto(order_id=1))
        await idle(bus)
        letters = {letter.handler: letter for letter in await bus.dead_letters()}

    assert calls == {"strict": 1, "default": MAX_ATTEMPTS}
    assert set(letters) == {"Strict", "Default"}
    assert letters["Strict"].attempts == 1
    assert "failed 1 times; last error: RuntimeError: strict fails" in letters["Strict"].reason
    assert letters["Default"].attempts == MAX_ATTEMPTS


@keyed
async def test_retry_after_tries_again_until_the_last_attempt_then_dead_letters(
    broker: SpyBroker, database: str | None, key: str | None, batch: bool
) -> None:
    attempts: list[int] = []

    async def not_yet(event: OrderPlacedEto, context: Context) -> None:
        attempts.append(context.attempt)
        raise Retry(after=timedelta(milliseconds=20), reason="stock service busy")

    async with make_bus(broker, database) as bus:
        await bus.subscribe(not_yet, batch=batch)
        message_id = await bus.publish(OrderPlacedEto(order_id=1), key=key)
        await idle(bus)
        [letter] = await bus.dead_letters()

    assert attempts == [1, 2, 3]
    assert letter.attempts == MAX_ATTEMPTS
    assert letter.message.id == message_id
    assert "still asking to retry after 3 attempts" in letter.reason
    assert "stock service busy" in letter.reason
    if key is None:  # the handler's delay, not the policy's backoff
        assert broker.retry_delays == [0.02, 0.02]


async def test_retry_then_success_is_handled_once(
    broker: SpyBroker, database: str | None, batch: bool
) -> None:
    attempts: list[int] = []
    handled: list[int] = []

    async def later(event: OrderPlacedEto, context: Context) -> None:
        attempts.append(context.attempt)
        if context.attempt == 1:
            raise Retry(after=0.01)
        handled.append(event.order_id)

    async with make_bus(broker, database) as bus:
        await bus.subscribe(later, batch=batch)
        await bus.publish(OrderPlacedEto(order_id=4))
        await idle(bus)
        assert await bus.dead_letters() == []

    assert attempts == [1, 2]
    assert handled == [4]
    assert broker.retry_delays == [0.01]


@keyed
async def test_a_handler_that_hangs_past_its_time_limit_is_cancelled_then_dead_lettered(
    broker: SpyBroker, database: str | None, key: str | None, batch: bool
) -> None:
    started: list[int] = []
    handled: list[int] = []

    async def stuck(event: OrderPlacedEto, context: Context) -> None:
        if event.poison:
            started.append(context.attempt)
            await asyncio.Event().wait()  # never set: hangs until the time limit cancels it
        handled.append(event.order_id)

    settings = dataclasses.replace(FAST, handler_timeout=0.2)
    async with make_bus(broker, database, settings) as bus:
        await bus.subscribe(stuck, batch=batch)
        await bus.publish(OrderPlacedEto(order_id=1, poison=True), key=key)
        await bus.publish(OrderPlacedEto(order_id=2), key=key)
        await idle(bus)
        [letter] = await bus.dead_letters()

    assert started == list(range(1, MAX_ATTEMPTS + 1))  # each attempt was cancelled and tried again
    assert handled == [2]
    assert "HandlerTimeout" in letter.reason
    assert "time limit of 0.2s" in letter.reason


@keyed
async def test_reject_dead_letters_at_once_with_its_reason(
    broker: SpyBroker, database: str | None, key: str | None, batch: bool
) -> None:
    calls: list[int] = []
    handled: list[int] = []

    class CheckStock(DistributedEventHandler[OrderPlacedEto]):
        async def handle_event(self, event: OrderPlacedEto) -> None:
            calls.append(self.context.attempt)
            if event.poison:
                raise Reject("product 42 no longer exists")
            handled.append(event.order_id)

    async with make_bus(broker, database) as bus:
        await bus.subscribe(CheckStock, batch=batch)
        await bus.publish(OrderPlacedEto(order_id=1, poison=True), key=key)
        await bus.publish(OrderPlacedEto(order_id=2), key=key)
        await idle(bus)
        [letter] = await bus.dead_letters()

    assert calls == [1, 1]
    assert handled == [2]
    assert broker.retry_delays == []
    assert letter.attempts == 1
    assert "product 42 no longer exists" in letter.reason
    assert letter.reason.startswith("rejected by handler")
    assert letter.handler is not None
    assert letter.handler.endswith("CheckStock")


# --- messages that cannot be handled -------------------------------------------------------------------

PADDING = "x" * 200


@pytest.mark.parametrize(
    ("body", "headers", "words"),
    [
        pytest.param(b"\xff\xfe\x00 not json", {}, ["cannot decode", "Invalid JSON"], id="undecodable"),
        pytest.param(b"{not json", {}, ["cannot decode", "Invalid JSON"], id="broken-json"),
        pytest.param(
            b'{"order_id": "forty-two"}',
            {},
            ["cannot decode", "does not fit OrderPlacedEto", "order_id", "valid integer"],
            id="invalid",
        ),
        pytest.param(b"{}", {}, ["does not fit OrderPlacedEto", "order_id", "Field required"], id="missing"),
        pytest.param(
            b'{"order_id": 1, "padding": "' + PADDING.encode() + b'"}',
            {},
            ["cannot decode", "over the limit of 128"],
            id="oversize",
        ),
        pytest.param(
            b'{"order_id": 1}',
            {"x-count": 5, "x-ok": "yes"},
            ["cannot decode", "headers must be strings", "x-count"],
            id="non-string-header",
        ),
    ],
)
async def test_a_message_that_cannot_become_the_event_is_dead_lettered_with_a_reason(
    broker: SpyBroker,
    database: str | None,
    body: bytes,
    headers: dict[str, object],
    words: list[str],
    batch: bool,
) -> None:
    handled: list[int] = []

    async def handle_order(event: OrderPlacedEto) -> None:
        handled.append(event.order_id)

    settings = Settings(retry=FAST.retry, max_message_bytes=128)
    bad = Message(new_message_id(), f"{PREFIX}.OrderPlaced", body, headers)  # type: ignore[arg-type]
    async with make_bus(broker, database, settings) as bus:
        await bus.subscribe(handle_order, batch=batch)
        await bus.publish(OrderPlacedEto(order_id=10))
        await idle(bus)
        await broker.publish([bad])
        await bus.publish(OrderPlacedEto(order_id=11))
        await idle(bus)
        [letter] = await bus.dead_letters()

    assert sorted(handled) == [10, 11]
    assert broker.retry_delays == []
    assert letter.message.id == bad.id
    assert letter.message.body == body
    assert letter.handler is not None
    assert letter.handler.endswith("handle_order")
    assert letter.attempts == 1
    for word in words:
        assert word in letter.reason


async def test_a_dynamic_handler_dead_letters_a_body_that_is_not_an_object(
    broker: SpyBroker, database: str | None, batch: bool
) -> None:
    received: list[DynamicEvent] = []

    async def audit(event: DynamicEvent) -> None:
        received.append(event)

    name = f"{PREFIX}.Audited"
    async with make_bus(broker, database) as bus:
        await bus.subscribe(audit, event=name, batch=batch)
        await broker.publish([Message(new_message_id(), name, b"[1, 2, 3]")])
        await bus.publish(name, {"ok": True})
        await idle(bus)
        [letter] = await bus.dead_letters()

    assert received == [DynamicEvent(name, {"ok": True})]
    assert "not a JSON object" in letter.reason


async def test_an_event_no_handler_takes_is_dead_lettered(
    broker: SpyBroker, database: str | None, batch: bool
) -> None:
    handled: list[int] = []

    async def handle_order(event: OrderPlacedEto) -> None:
        handled.append(event.order_id)

    async with make_bus(broker, database) as bus:
        await bus.subscribe(handle_order, batch=batch)
        await broker.bind(SERVICE, f"{PREFIX}.Nobody.Handles")  # e.g. a binding left by an older version
        stray = Message(new_message_id(), f"{PREFIX}.Nobody.Handles", b'{"a": 1}', {"x-why": "test"})
        await broker.publish([stray])
        await bus.publish(OrderPlacedEto(order_id=1))
        await idle(bus)
        [letter] = await bus.dead_letters()

    assert handled == [1]
    assert letter.handler is None
    assert "no handler" in letter.reason
    assert f"{PREFIX}.Nobody.Handles" in letter.reason
    assert letter.message == stray


async def test_messages_queued_when_their_handler_is_unsubscribed_are_dead_lettered(
    broker: SpyBroker, database: str | None, batch: bool
) -> None:
    started = asyncio.Event()
    release = asyncio.Event()
    handled: list[int] = []

    async def slow(event: OrderPlacedEto) -> None:
        started.set()
        await release.wait()
        handled.append(event.order_id)

    settings = Settings(retry=FAST.retry, max_in_flight=1)
    async with make_bus(broker, database, settings) as bus:
        subscription = await bus.subscribe(slow, batch=batch)
        # Straight to the broker, so all three are queued before the first is handled.
        ids = [await bus.publish(OrderPlacedEto(order_id=n), use_outbox=False) for n in (1, 2, 3)]
        await asyncio.wait_for(started.wait(), IDLE_TIMEOUT)
        assert await broker.pending_count(SERVICE) == 3  # one leased, two queued behind it
        await subscription.unsubscribe()
        release.set()
        await idle(bus)
        letters = await bus.dead_letters()

    assert len(handled) == 1
    assert len(letters) == 2
    assert all(letter.handler is None and "no handler" in letter.reason for letter in letters)
    assert {letter.message.id for letter in letters} | {ids[handled[0] - 1]} == set(ids)


@keyed
async def test_when_one_of_several_handlers_fails_the_others_run_once(
    broker: SpyBroker, database: str | None, key: str | None, batch: bool
) -> None:
    calls: dict[str, int] = {"reserve": 0, "notify": 0, "invoice": 0}

    async def reserve(event: OrderPlacedEto) -> None:
        calls["reserve"] += 1

    async def invoice(event: OrderPlacedEto) -> None:
        calls["invoice"] += 1
        raise RuntimeError("invoice service down")

    async def notify(event: OrderPlacedEto) -> None:
        calls["notify"] += 1

    async with make_bus(broker, database) as bus:
        await bus.subscribe(reserve, name="Reserve", batch=batch)
        await bus.subscribe(invoice, name="Invoice", batch=batch)
        await bus.subscribe(notify, name="Notify", batch=batch)
        await bus.publish(OrderPlacedEto(order_id=1), key=key)
        await idle(bus)
        letters = await bus.dead_letters()

    assert calls == {"reserve": 1, "notify": 1, "invoice": MAX_ATTEMPTS}
    assert [(letter.handler, letter.attempts) for letter in letters] == [("Invoice", MAX_ATTEMPTS)]


# --- replay and discard --------------------------------------------------------------------------------


class Invoicing:
    """A handler whose dependency is down until `fixed` is set."""

    def __init__(self) -> None:
        self.fixed = False
        self.handled: list[tuple[int, int]] = []  # (order id, attempt)

    async def __call__(self, event: OrderPlacedEto, context: Context) -> None:
        if not self.fixed:
            raise RuntimeError("invoice service down")
        self.handled.append((event.order_id, context.attempt))


async def dead_letter_one(bus: DistributedEventBus, invoicing: Invoicing, order_id: int = 1) -> DeadLetter:
    async def invoice(event: OrderPlacedEto, context: Context) -> None:
        await invoicing(event, context)

    await bus.subscribe(invoice, name="Invoice")
    await bus.publish(OrderPlacedEto(order_id=order_id))
    await idle(bus)
    [letter] = await bus.dead_letters()
    assert letter.handler == "Invoice"
    return letter


async def test_replay_after_the_fix_handles_the_message_once_and_removes_the_letter(
    broker: SpyBroker, database: str | None
) -> None:
    invoicing = Invoicing()
    async with make_bus(broker, database) as bus:
        letter = await dead_letter_one(bus, invoicing)
        invoicing.fixed = True
        await bus.replay(letter.id)
        assert await bus.dead_letters() == []
        await idle(bus)  # nothing else comes: the broker settled the message long ago

    assert invoicing.handled == [(1, 1)]


async def test_replaying_a_letter_twice_finds_it_gone(broker: SpyBroker, database: str | None) -> None:
    invoicing = Invoicing()
    async with make_bus(broker, database) as bus:
        letter = await dead_letter_one(bus, invoicing)
        invoicing.fixed = True
        await bus.replay(letter.id)
        with pytest.raises(ConfigurationError, match=f"No dead letter {letter.id} "):
            await bus.replay(letter.id)

    assert invoicing.handled == [(1, 1)]


async def test_a_replay_whose_handler_still_fails_raises_and_keeps_the_letter(
    broker: SpyBroker, database: str | None
) -> None:
    invoicing = Invoicing()
    async with make_bus(broker, database) as bus:
        letter = await dead_letter_one(bus, invoicing)
        with pytest.raises(RuntimeError, match="invoice service down"):
            await bus.replay(letter.id)
        assert await bus.dead_letters() == [letter]
        invoicing.fixed = True  # and once fixed, the same letter replays
        await bus.replay(letter.id)
        assert await bus.dead_letters() == []

    assert invoicing.handled == [(1, 1)]


async def test_a_letter_no_handler_took_replays_once_a_handler_is_subscribed(
    broker: SpyBroker, database: str | None, batch: bool
) -> None:
    handled: list[int] = []

    async def reserve(event: StockReservedEto) -> None:
        handled.append(event.order_id)

    name = event_name(StockReservedEto)
    async with make_bus(broker, database) as bus:
        await broker.bind(SERVICE, name)
        await broker.publish([Message(new_message_id(), name, b'{"order_id": 8}')])
        await idle(bus)
        [letter] = await bus.dead_letters()
        assert letter.handler is None
        with pytest.raises(ConfigurationError, match="No handler for"):
            await bus.replay(letter.id)
        assert await bus.dead_letters() == [letter]

        await bus.subscribe(reserve, batch=batch)
        await bus.replay(letter.id)
        assert await bus.dead_letters() == []
        with pytest.raises(ConfigurationError, match="No dead letter"):
            await bus.replay(letter.id)

    assert handled == [8]


async def test_discard_deletes_a_letter_without_handling_it(broker: SpyBroker, database: str | None) -> None:
    invoicing = Invoicing()
    async with make_bus(broker, database) as bus:
        first = await dead_letter_one(bus, invoicing, order_id=1)
        await bus.publish(OrderPlacedEto(order_id=2))
        await idle(bus)
        letters = await bus.dead_letters()
        assert [letter.id for letter in letters] == [first.id, letters[1].id]
        await bus.discard(first.id)
        assert [letter.message for letter in await bus.dead_letters()] == [letters[1].message]
        invoicing.fixed = True
        with pytest.raises(ConfigurationError, match="No dead letter"):
            await bus.replay(first.id)

    assert invoicing.handled == []


async def test_dead_letters_survive_in_the_database(
    broker: SpyBroker, database_url: str, batch: bool
) -> None:
    invoicing = Invoicing()
    async with make_bus(broker, database_url) as bus:
        letter = await dead_letter_one(bus, invoicing)

    async with make_bus(SpyBroker(), database_url) as again:
        assert await again.dead_letters() == [letter]
        async with DistributedEventBus("OtherService", broker=SpyBroker(), database=database_url) as other:
            assert await other.dead_letters() == []
        invoicing.fixed = True

        async def invoice(event: OrderPlacedEto, context: Context) -> None:
            await invoicing(event, context)

        await again.subscribe(invoice, name="Invoice", batch=batch)
        await again.replay(letter.id)
        assert await again.dead_letters() == []

    assert invoicing.handled == [(1, 1)]
