"""The plumbing the broker adapters share (`eventrelay.brokers.base`): waking fetchers, renewing leases, and
the check that a delivery came from the broker it is settled on (URL options: test_url_options.py). Nothing
here connects to a server."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import pytest

from eventrelay.brokers.base import Arrivals, LeaseKeeper, delivery_token
from eventrelay.envelope import Delivery, Message
from eventrelay.errors import ConfigurationError


async def test_a_wake_ends_every_wait_under_way_and_not_a_later_one() -> None:
    arrivals = Arrivals()
    waits = [asyncio.create_task(arrivals.wait(5.0)) for _ in range(3)]
    await asyncio.sleep(0)
    arrivals.wake()
    assert await asyncio.gather(*waits) == [True, True, True]
    assert await arrivals.wait(0.01) is False  # that wake is spent


async def test_a_wake_during_a_step_counts_for_a_wait_since_its_mark() -> None:
    arrivals = Arrivals()
    mark = arrivals.mark()
    arrivals.wake()  # as if a message came while the fetcher sent its requests
    assert await arrivals.wait(5.0, since=mark) is True


async def test_the_lease_keeper_renews_what_is_held_every_third_of_the_lease() -> None:
    held: list[int] = []
    renewed: list[list[int]] = []
    twice = asyncio.Event()

    async def renew(items: Sequence[int]) -> None:
        renewed.append(list(items))
        if len(renewed) == 2:
            twice.set()

    keeper = LeaseKeeper("Test", 0.03, lambda: list(held), renew)
    keeper.start()
    keeper.start()  # a second start does not start a second loop
    await asyncio.sleep(0.035)
    assert renewed == []  # nothing held: nothing to renew
    held += [1, 2]
    await asyncio.wait_for(twice.wait(), 5)
    await keeper.stop()
    assert renewed[:2] == [[1, 2], [1, 2]]
    count = len(renewed)
    await asyncio.sleep(0.03)
    assert len(renewed) == count  # stopped


async def test_a_failed_renewal_is_logged_and_tried_again(caplog: pytest.LogCaptureFixture) -> None:
    calls = 0
    again = asyncio.Event()

    async def renew(items: Sequence[str]) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            again.set()
        raise OSError("connection lost")

    keeper = LeaseKeeper("Test", 0.03, lambda: ["a", "b"], renew)
    with caplog.at_level(logging.WARNING, logger="eventrelay.brokers.base"):
        keeper.start()
        await asyncio.wait_for(again.wait(), 5)
        await keeper.stop()
    assert "Could not renew 2 Test lease(s); they may be delivered again" in caplog.messages


def test_a_delivery_from_another_broker_is_refused_with_what_to_do() -> None:
    delivery = Delivery(Message("id", "name", b"{}", {}), 1, token=7)
    assert delivery_token(delivery, int, "SqlBroker") == 7
    with pytest.raises(ConfigurationError, match="did not come from a RedisBroker: settle it on the broker"):
        delivery_token(delivery, str, "RedisBroker")
