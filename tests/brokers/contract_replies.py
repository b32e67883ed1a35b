"""Request/reply on every broker: `ReplyContract`, mixed into each adapter's `BrokerContract` class.

It uses that class's `make_broker` fixture and `cannot` mapping, and one hook of its own,
`reply_channel_exists`, which looks on the server for a reply channel. Every bus has a broker of its own, as
in a process of its own, and a SQLite database of its service's own; service names are unique (uuid).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, ClassVar

import pytest

from eventrelay import Context, DistributedEventBus, Event
from eventrelay.brokers.base import Broker
from eventrelay.envelope import CORRELATION_ID, REPLY_TO, Message, new_message_id
from eventrelay.errors import BrokerUnavailable, PublishFailed, RemoteError, RequestTimeout
from eventrelay.events import event_name as name_of
from tests.brokers.contract import (
    OUTAGES,
    PATIENCE,
    QUIET,
    MakeBroker,
    event_name,
    message,
    nothing_for,
    subscriber_name,
)
from tests.bus.helpers import eventually, settings
from tests.faultproxy import FaultProxy

# What an adapter may be unable to be tested for (a key of the test class's `cannot`).
REPLY_CHANNEL = "looking on the server for a reply channel"

# A request's timeout where a reply should come: generous, so that only a lost reply fails.
ANSWER_WITHIN = 2 * PATIENCE


class StockAsked(Event, name="ReplyContract.Stock Asked ✓"):  # a space and non-ASCII, on every wire
    asker: str
    n: int


ASKED = name_of(StockAsked)


class StockTold(Event, name="ReplyContract.StockTold"):
    asker: str
    n: int
    by: str


def answerer(by: str, handled: list[tuple[str, int]] | None = None) -> Callable[..., Awaitable[StockTold]]:
    """A handler that answers a `StockAsked` with a `StockTold` saying `by` whom (recording the request)."""

    async def tell_stock(event: StockAsked) -> StockTold:
        if handled is not None:
            handled.append((event.asker, event.n))
        return StockTold(asker=event.asker, n=event.n, by=by)

    return tell_stock


class Processes:
    """Starts buses, each on a broker of its own, and stops them (then their brokers) at the end."""

    def __init__(self, make_broker: MakeBroker, folder: Path, stack: contextlib.AsyncExitStack) -> None:
        self.make_broker, self.folder, self.stack = make_broker, folder, stack

    async def bus(
        self, service: str, *handlers: Callable[..., Any], port: int | None = None
    ) -> DistributedEventBus:
        """A started bus of `service` on a broker of its own (through 127.0.0.1:`port`, a fault proxy)."""
        broker = await self.stack.enter_async_context(self.make_broker(port=port))
        database = f"sqlite+aiosqlite:///{self.folder}/{service}.db"  # shared by the service's instances
        bus = DistributedEventBus(service, broker=broker, database=database, settings=settings())
        for handler in handlers:
            await bus.subscribe(handler)
        return await self.stack.enter_async_context(bus)


@contextlib.asynccontextmanager
async def processes(make_broker: MakeBroker, folder: Path) -> AsyncIterator[Processes]:
    async with contextlib.AsyncExitStack() as stack:
        yield Processes(make_broker, folder, stack)


class ReplyContract:
    """Request/reply through the broker (`bus.request`), as users rely on it."""

    cannot: ClassVar[Any] = {}

    async def reply_channel_exists(self, broker: Broker, address: str) -> bool:
        """Whether the reply channel at `address` is on the server, looked up through `broker`."""
        raise NotImplementedError(f"give `reply_channel_exists`, or say in `cannot` why: {REPLY_CHANNEL}")

    async def test_a_reply_keeps_its_id_body_headers_and_key(self, make_broker: MakeBroker) -> None:
        sent = Message(
            new_message_id(),
            "ReplyContract.Any",
            "prix ✓ ".encode() + bytes(range(256)),
            {CORRELATION_ID: new_message_id(), "x-custom": 'quotes " and \\ and spaces ', "x-ü": "Zürich ☃"},
            key="customer-42-Ω",
        )
        async with make_broker() as asking, make_broker() as answering:
            replies = await asking.open_replies(uuid.uuid4().hex)
            try:
                await answering.send_reply(replies.address, sent)  # from another process
                async with asyncio.timeout(PATIENCE):
                    while not (got := await replies.receive(1.0)):
                        pass
            finally:
                await replies.close()

        [reply] = got
        assert (reply.id, reply.body, dict(reply.headers), reply.key) == (
            sent.id,
            sent.body,
            dict(sent.headers),
            sent.key,
        )

    async def test_a_reply_to_an_address_that_names_an_event_is_refused(
        self, make_broker: MakeBroker
    ) -> None:
        name, subscriber = event_name(), subscriber_name()
        async with make_broker() as broker:
            await broker.bind(subscriber, name)

            with pytest.raises(PublishFailed):  # a forged reply-to header
                await broker.send_reply(name, message(name))

            assert await nothing_for(broker, subscriber)

    async def test_a_request_gets_its_typed_reply_from_another_service(
        self, make_broker: MakeBroker, tmp_path: Path
    ) -> None:
        async with processes(make_broker, tmp_path) as run:
            await run.bus(subscriber_name(), answerer("stock"))
            shop = await run.bus(subscriber_name())

            told = await shop.request(StockAsked(asker="shop", n=21), reply=StockTold, timeout=ANSWER_WITHIN)

        assert told == StockTold(asker="shop", n=21, by="stock")

    async def test_answering_instances_compete_and_each_asker_gets_its_own_replies(
        self, make_broker: MakeBroker, tmp_path: Path
    ) -> None:
        handled: dict[str, list[tuple[str, int]]] = {"stock-1": [], "stock-2": []}
        stock, shop = subscriber_name(), subscriber_name()
        async with processes(make_broker, tmp_path) as run:
            for by, requests in handled.items():  # two instances of one answering service
                await run.bus(stock, answerer(by, requests))
            askers = {"shop-1": await run.bus(shop), "shop-2": await run.bus(shop)}  # and of one asking one
            asked: list[tuple[str, int]] = []

            async def ask(who: str, n: int) -> None:
                asked.append((who, n))
                event, key = StockAsked(asker=who, n=n), f"{who}-{n}"
                told = await askers[who].request(event, reply=StockTold, timeout=ANSWER_WITHIN, key=key)
                assert (told.asker, told.n) == (who, n), "a reply to another request"
                assert (who, n) in handled[told.by], "a reply from an instance that did not handle it"

            async with asyncio.timeout(2 * ANSWER_WITHIN), asyncio.TaskGroup() as group:
                for who in askers:
                    for n in range(20):
                        group.create_task(ask(who, n))
            # More, one at a time, until both instances had some: a group may take a moment to share out its
            # partitions (Kafka).
            async with asyncio.timeout(2 * ANSWER_WITHIN):
                while not (handled["stock-1"] and handled["stock-2"]):
                    await ask("shop-1", len(asked))
                    await asyncio.sleep(0.05)

        assert sorted(handled["stock-1"] + handled["stock-2"]) == sorted(asked), "each request answered once"

    async def test_a_failing_handler_answers_remote_error_and_its_request_is_a_dead_letter(
        self, make_broker: MakeBroker, tmp_path: Path
    ) -> None:
        async def count_stock(event: StockAsked) -> StockTold:
            raise LookupError(f"no stock for item {event.n}")

        stock_service = subscriber_name()
        async with processes(make_broker, tmp_path) as run:
            stock = await run.bus(stock_service, count_stock)
            shop = await run.bus(subscriber_name())

            with pytest.raises(RemoteError) as caught:
                await shop.request(StockAsked(asker="shop", n=7), reply=StockTold, timeout=ANSWER_WITHIN)

            async def lettered() -> bool:  # stored while, or just after, the failure was sent
                return bool(await stock.dead_letters())

            await eventually(lettered, PATIENCE)
            letters = await stock.dead_letters()

        assert (caught.value.type, caught.value.message) == ("LookupError", "no stock for item 7")
        assert caught.value.service == stock_service
        [letter] = letters
        assert letter.message.name == ASKED
        assert StockAsked.model_validate_json(letter.message.body) == StockAsked(asker="shop", n=7)
        assert "LookupError: no stock for item 7" in letter.reason

    async def test_a_request_nobody_handles_now_times_out_naming_its_event(
        self, make_broker: MakeBroker, tmp_path: Path
    ) -> None:
        async with processes(make_broker, tmp_path) as run:
            stock = await run.bus(subscriber_name(), answerer("stock"))
            await stock.stop()  # bound, but not running
            shop = await run.bus(subscriber_name())

            with pytest.raises(RequestTimeout) as caught:
                await shop.request(StockAsked(asker="shop", n=1), reply=StockTold, timeout=1.0)

        assert caught.value.event == ASKED
        assert repr(ASKED) in str(caught.value)

    async def test_an_asker_that_lost_its_connection_gets_replies_again(
        self, make_broker: MakeBroker, tmp_path: Path
    ) -> None:
        if OUTAGES in self.cannot:
            pytest.skip(f"no test of {OUTAGES}: {self.cannot[OUTAGES]}")
        server_port: int = getattr(self, "server_port", 0)
        async with FaultProxy(server_port) as proxy, processes(make_broker, tmp_path) as run:
            await run.bus(subscriber_name(), answerer("stock"))
            shop = await run.bus(subscriber_name(), port=proxy.port)
            await shop.request(StockAsked(asker="shop", n=1), reply=StockTold, timeout=ANSWER_WITHIN)

            proxy.reset()  # every connection of the asker's broker, its reply channel's too, gets a TCP RST

            async with asyncio.timeout(2 * ANSWER_WITHIN):
                while True:  # until the broker is back and its reply channel with it
                    try:
                        event = StockAsked(asker="shop", n=2)
                        told = await shop.request(event, reply=StockTold, timeout=QUIET * 4)
                        break
                    except (BrokerUnavailable, RequestTimeout):
                        await asyncio.sleep(0.1)

        assert told == StockTold(asker="shop", n=2, by="stock")

    async def test_the_reply_channel_is_gone_once_the_bus_stops(
        self, make_broker: MakeBroker, tmp_path: Path
    ) -> None:
        if REPLY_CHANNEL in self.cannot:
            pytest.skip(f"no test of {REPLY_CHANNEL}: {self.cannot[REPLY_CHANNEL]}")
        addresses: list[str] = []

        async def tell_stock(event: StockAsked, context: Context) -> StockTold:
            addresses.append(context.headers[REPLY_TO])
            return StockTold(asker=event.asker, n=event.n, by="stock")

        async with processes(make_broker, tmp_path) as run:
            await run.bus(subscriber_name(), tell_stock)
            shop = await run.bus(subscriber_name())
            await shop.request(StockAsked(asker="shop", n=1), reply=StockTold, timeout=ANSWER_WITHIN)
            [address] = addresses
            assert await self.reply_channel_exists(shop.broker, address)

            await shop.stop()  # its broker stays open: it was given one

            assert not await self.reply_channel_exists(shop.broker, address)
