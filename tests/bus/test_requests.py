"""Request/reply on the bus (the broker-independent part; tests/brokers run it on every broker): a typed
reply, a failure that comes back as `RemoteError`, timeouts, requests refused inside a unit of work, requests
whose asker gave up, and one reply per request."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
from collections.abc import Sequence

import pytest

from eventrelay import (
    ConfigurationError,
    Context,
    DistributedEventBus,
    DistributedEventHandler,
    Event,
    MemoryBroker,
    RemoteError,
    RequestTimeout,
)
from eventrelay.envelope import DEADLINE, REPLY_TO, Message
from eventrelay.requests import answer
from tests.bus.helpers import make_bus, settings


class GetStock(Event, name="RequestTests.GetStock"):
    product_id: int


class Stock(Event, name="RequestTests.Stock"):
    product_id: int
    count: int


class Placed(Event, name="RequestTests.Placed"):
    product_id: int


class Price(Event, name="RequestTests.Price"):
    amount: str


counted: list[int] = []


async def get_stock(event: GetStock) -> Stock:
    counted.append(event.product_id)
    if event.product_id < 0:
        raise LookupError(f"no product {event.product_id}")
    if event.product_id == 0:
        return "seven"  # type: ignore[return-value]  # not an Event: the asker hears why
    return Stock(product_id=event.product_id, count=event.product_id * 10)


class StockHandler(DistributedEventHandler[GetStock]):
    async def handle_event(self, event: GetStock) -> Stock:
        return Stock(product_id=event.product_id, count=self.context.attempt)


@pytest.fixture(autouse=True)
def _forget() -> None:
    counted.clear()


async def test_a_request_returns_the_typed_reply_of_the_service_that_handles_it(sqlite_url: str) -> None:
    broker = MemoryBroker()
    async with make_bus("Product", broker, sqlite_url) as product, make_bus("Order", broker, None) as order:
        await product.subscribe(get_stock)
        replies = await asyncio.gather(
            *(order.request(GetStock(product_id=n), reply=Stock) for n in range(1, 21))
        )
        assert replies == [Stock(product_id=n, count=n * 10) for n in range(1, 21)]
        await product.unsubscribe(get_stock)
        await product.subscribe(StockHandler)
        assert await order.request(GetStock(product_id=3), reply=Stock, timeout=2) == Stock(
            product_id=3, count=1
        )


async def test_a_failing_handler_answers_remote_error_and_its_request_is_a_dead_letter(
    sqlite_url: str,
) -> None:
    broker = MemoryBroker()
    async with make_bus("Product", broker, sqlite_url) as product, make_bus("Order", broker, None) as order:
        await product.subscribe(get_stock)
        with pytest.raises(RemoteError) as failed:
            await order.request(GetStock(product_id=-4), reply=Stock, timeout=2)
        assert (failed.value.type, failed.value.message, failed.value.service) == (
            "LookupError",
            "no product -4",
            "Product",
        )
        assert failed.value.traceback is None  # another service's code is not shown unless asked
        assert str(failed.value) == "Product failed to answer: LookupError: no product -4"
        assert counted == [-4]  # not retried: the asker waits for this answer
        (letter,) = await product.dead_letters()
        assert letter.reason == "failed to answer a request: LookupError: no product -4"

        with pytest.raises(RemoteError, match="answers with an Event, not str"):
            await order.request(GetStock(product_id=0), reply=Stock, timeout=2)


async def test_reply_tracebacks_sends_the_traceback_for_debugging(sqlite_url: str) -> None:
    broker = MemoryBroker()
    product = make_bus("Product", broker, sqlite_url, reply_tracebacks=True)
    async with product, make_bus("Order", broker, None) as order:
        await product.subscribe(get_stock)
        with pytest.raises(RemoteError) as failed:
            await order.request(GetStock(product_id=-1), reply=Stock, timeout=2)
        assert failed.value.traceback is not None
        assert "LookupError: no product -1" in failed.value.traceback


async def test_a_reply_that_does_not_fit_the_asked_class_is_a_decode_error(sqlite_url: str) -> None:
    broker = MemoryBroker()
    async with make_bus("Product", broker, sqlite_url) as product, make_bus("Order", broker, None) as order:
        await product.subscribe(get_stock)
        with pytest.raises(Exception, match="does not fit Price"):
            await order.request(GetStock(product_id=2), reply=Price, timeout=2)


async def test_no_reply_in_time_raises_request_timeout_naming_the_event() -> None:
    async with make_bus("Order", MemoryBroker(), None) as order:
        started = time.monotonic()
        with pytest.raises(
            RequestTimeout, match=re.escape("No reply to 'RequestTests.GetStock' from Order within 0.3s")
        ) as e:
            await order.request(GetStock(product_id=1), reply=Stock, timeout=0.3)
        assert e.value.event == "RequestTests.GetStock"
        assert time.monotonic() - started < 2


async def test_a_request_inside_a_unit_of_work_or_a_handler_is_refused(sqlite_url: str) -> None:
    broker = MemoryBroker()
    async with make_bus("Order", broker, sqlite_url) as order, make_bus("Product", broker, None) as product:
        await product.subscribe(get_stock)
        async with order.unit_of_work():
            with pytest.raises(ConfigurationError, match=re.escape("bus.request inside a unit of work")):
                await order.request(GetStock(product_id=1), reply=Stock)
        outcome: list[BaseException] = []

        async def on_placed(event: Placed, context: Context) -> None:
            try:
                await order.request(GetStock(product_id=event.product_id), reply=Stock)
            except ConfigurationError as exc:
                outcome.append(exc)

        await order.subscribe(on_placed)
        await order.publish(Placed(product_id=1))
        deadline = time.monotonic() + 5
        while not outcome:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        assert "publish an event and handle the answer as an event" in str(outcome[0])
        # Outside, it works.
        assert await order.request(GetStock(product_id=1), reply=Stock) == Stock(product_id=1, count=10)


async def test_a_request_needs_a_started_bus_and_an_event_class_to_reply_with() -> None:
    order = DistributedEventBus("Order")
    with pytest.raises(ConfigurationError, match=re.escape("Start the bus of Order before bus.request")):
        await order.request(GetStock(product_id=1), reply=Stock)
    async with order:
        with pytest.raises(ConfigurationError, match="reply= is the Event class of the answer"):
            await order.request(GetStock(product_id=1), reply=dict)  # type: ignore[type-var]
        with pytest.raises(ConfigurationError, match="timeout= is more than 0 seconds"):
            await order.request(GetStock(product_id=1), reply=Stock, timeout=0)
        with pytest.raises(
            ConfigurationError, match=re.escape("are set by bus.request and its reply, not headers=")
        ):
            await order.publish(GetStock(product_id=1), headers={REPLY_TO: "somewhere"})


async def test_a_request_its_asker_gave_up_on_is_dropped_unhandled(
    sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    broker = MemoryBroker()
    async with make_bus("Product", broker, sqlite_url) as product:
        await product.subscribe(get_stock)
        body = b'{"product_id": 5}'
        stale = {REPLY_TO: "eventrelay.replies.gone", DEADLINE: f"{time.time() - 1:.3f}"}
        await broker.publish([Message("a" * 32, "RequestTests.GetStock", body, stale)])
        await asyncio.sleep(0.3)
        assert counted == []
        assert await product.dead_letters() == []
        assert "came after its asker gave up; dropped unhandled" in caplog.text
        assert await broker.pending_count("Product") == 0


class Redelivering(MemoryBroker):
    """Hands every request over three times, as a broker does after lost acks; records the replies sent."""

    def __init__(self) -> None:
        super().__init__()
        self.replies: list[Message] = []

    async def publish(self, messages: Sequence[Message]) -> None:
        await super().publish([m for m in messages for _ in range(3 if REPLY_TO in m.headers else 1)])

    async def send_reply(self, address: str, message: Message) -> None:
        self.replies.append(message)
        await super().send_reply(address, message)


async def test_a_redelivered_request_is_handled_and_answered_once(sqlite_url: str) -> None:
    broker = Redelivering()
    async with make_bus("Product", broker, sqlite_url) as product, make_bus("Order", broker, None) as order:
        await product.subscribe(get_stock)
        assert await order.request(GetStock(product_id=6), reply=Stock) == Stock(product_id=6, count=60)
        await asyncio.sleep(0.3)
        assert counted == [6]  # the inbox dropped the copies
        assert len(broker.replies) == 1


def test_an_answer_carries_the_request_id_and_correlation() -> None:
    request = Message("c" * 32, "RequestTests.GetStock", b"{}", {"x-correlation-id": "corr", REPLY_TO: "r"})
    reply = answer(request, Stock(product_id=1, count=2), "eventrelay")
    assert reply.headers == {"x-correlation-id": "corr", "x-eventrelay-in-reply-to": "c" * 32}
    assert reply.body == b'{"product_id":1,"count":2}'
    assert dataclasses.replace(settings(), reply_tracebacks=True).reply_tracebacks
