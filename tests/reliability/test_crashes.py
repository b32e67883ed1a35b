"""Crashes: SIGKILL at chosen points, repeated; every committed event takes effect exactly once.

Each process kills itself at exact points (see `scenario_app.py`), the harness restarts it, and the run goes
on. After each kill, before the restart, the test checks that the kill landed where it should: the event is
still in the outbox (publisher, relay), its effect is not there (mid-handler) or is there once (before ack).

Two runs per broker, each crashing both sides of the bus at once (which also keeps the suite short):
- a stream: the publisher dies right after a commit, before its relay sent the event, and the subscriber dies
  in the middle of a handler;
- a full outbox: the relay dies mid-batch, after the broker confirmed some of the batch's rows and before it
  deleted them, and the subscriber dies after a handler committed, before the broker's ack.
Each crash point is a row of the report, with the counts of the run it was part of.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.reliability.children import Child
from tests.reliability.harness import SIZES, Report, Scenario, kill_spec, spread, subscribe_ahead
from tests.reliability.under_test import BrokerUnderTest

pytestmark = pytest.mark.reliability

BATCH = 50  # the relay's batch size in scenario_app
TITLES = {
    "commit": "crash: publisher right after commit",
    "handler": "crash: subscriber mid-handler",
    "relay": "crash: relay mid-batch, after confirms",
    "ack": "crash: subscriber after commit, before ack",
}


def _latest(run: Scenario, point: str) -> dict[str, object]:
    return run.kills(point)[-1]


async def _check_kill(run: Scenario, child: Child) -> None:
    """Where the kill that `child` just took landed (before it is restarted)."""
    if child.name == "publisher":  # right after a commit: the event waits in the outbox
        assert _latest(run, "commit")["n"] in await run.outbox_numbers()
    elif child.name == "relay":  # mid-batch: some rows of the batch confirmed, others not; not deleted
        kill = _latest(run, "relay")
        assert 0 < int(str(kill["index"])) < int(str(kill["batch"])) - 1
        assert kill["n"] in await run.outbox_numbers()
    elif "handler" in run.env["RELIABILITY_KILL"]:  # mid-handler: its effect was not committed
        assert await run.effects_of(int(str(_latest(run, "handler")["n"]))) == 0
    else:  # after the handler's commit, before the ack: its effect is there, once
        assert await run.effects_of(int(str(_latest(run, "ack")["n"]))) == 1


async def _finish(
    run: Scenario, broker: BrokerUnderTest, report: Report, points: dict[str, list[int]]
) -> None:
    """Stop the services, assert exactly-once, and record a row per crash point."""
    assert set(await run.stop()) == {0}, run.logs()[-3000:]
    counts = await run.count()
    assert counts.sent == SIZES.events
    assert counts.delivered == SIZES.events, "an event was lost"
    assert counts.duplicates == 0, "an event took effect twice"
    assert counts.dead_letters == 0
    assert counts.outbox == 0
    assert not broker.leaks(run.logs()), "a password reached a log"
    for point, numbers in points.items():
        kills = run.kills(point)
        assert sorted(int(str(kill["n"])) for kill in kills) == numbers, f"not every {point} kill was taken"
        recovery = max([await run.recovery(float(str(kill["time"]))) for kill in kills])
        others = [TITLES[other].partition(": ")[2] for other in points if other != point]
        report.counted(
            TITLES[point],
            broker.kind,
            counts,
            recovery,
            f"{len(kills)} SIGKILLs, at events {', '.join(map(str, numbers))}; same run: "
            + ", ".join(others),
        )


async def test_publisher_killed_after_commit_and_subscriber_killed_mid_handler(
    scenario: Callable[..., Scenario], broker: BrokerUnderTest, report: Report
) -> None:
    points = {
        "commit": spread(SIZES.events, SIZES.kills),
        "handler": spread(SIZES.events, SIZES.kills, offset=SIZES.events // (3 * SIZES.kills)),
    }
    run = scenario(kill=kill_spec(**points))
    await subscribe_ahead(run.broker_url, broker.subscriber)
    run.subscriber()
    run.publisher(SIZES.events)

    async def check(child: Child) -> None:
        await _check_kill(run, child)

    await run.all_delivered(SIZES.events, on_kill=check, kills=sum(map(len, points.values())))
    await _finish(run, broker, report, points)


async def test_relay_killed_mid_batch_and_subscriber_killed_before_the_ack(
    scenario: Callable[..., Scenario], broker: BrokerUnderTest, report: Report
) -> None:
    points = {
        "relay": spread(SIZES.events, SIZES.kills, align=BATCH, offset=BATCH // 2),
        "ack": spread(SIZES.events, SIZES.kills, offset=SIZES.events // (3 * SIZES.kills)),
    }
    run = scenario(kill=kill_spec(**points))
    await subscribe_ahead(run.broker_url, broker.subscriber)
    run.subscriber()
    assert await run.publisher(SIZES.events, relay=False).wait(60) == 0  # all of it in the outbox
    run.relay()

    async def check(child: Child) -> None:
        await _check_kill(run, child)

    await run.all_delivered(SIZES.events, on_kill=check, kills=sum(map(len, points.values())))
    await _finish(run, broker, report, points)
