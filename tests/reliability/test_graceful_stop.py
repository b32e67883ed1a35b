"""Graceful stop under load: SIGTERM to the subscriber while handlers run and to the relay while its outbox is
full. Each exits 0, every handler that had started finishes and commits before the process exits (none is cut
off), and after a restart every event has taken effect exactly once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from tests.reliability.children import Child
from tests.reliability.harness import SIZES, Report, Scenario, subscribe_ahead
from tests.reliability.under_test import BrokerUnderTest

pytestmark = pytest.mark.reliability

IN_FLIGHT = 20
# The handlers of events from a quarter on wait, their effects written, until the test creates the release
# file (scenario_app's RELIABILITY_HOLD_FROM): at the SIGTERM, work is in flight by construction.
HOLD_FROM = SIZES.events // 4
ENV = {"RELIABILITY_LOG_STARTS": "1", "RELIABILITY_HOLD_FROM": str(HOLD_FROM)}
# A held handler must neither time out nor be cancelled by the stop while the test takes its turn.
PATIENT = {"max_in_flight": IN_FLIGHT, "handler_timeout": 120.0, "shutdown_timeout": 120.0}
STOPPING = "stopping: finishing in-flight messages"  # what a service logs once its SIGTERM came in


def started_by(run: Scenario, child: Child) -> set[int]:
    """The numbers of the events whose handler `child` started (scenario_app's started.log)."""
    log = run.folder / "started.log"
    lines = log.read_text().split("\n") if log.exists() else []
    return {int(n) for pid, _, n in (line.partition(" ") for line in lines) if pid == str(child.pid)}


async def test_sigterm_under_load_finishes_in_flight_work_and_loses_nothing(
    scenario: Callable[..., Scenario], broker: BrokerUnderTest, report: Report
) -> None:
    events = SIZES.events
    run = scenario(subscriber_settings=PATIENT, env=ENV)
    await subscribe_ahead(run.broker_url, broker.subscriber)
    assert await run.publisher(events, relay=False).wait(60) == 0  # all in the outbox
    subscriber = run.subscriber()
    relay = run.relay()

    async def holding() -> bool:
        return any(n >= HOLD_FROM for n in started_by(run, subscriber))

    await run.supervise(holding, timeout=60, what="a handler held in flight")
    stopping = time.monotonic()
    stop = asyncio.create_task(run.stop(subscriber, relay))  # SIGTERM to both, then their exit codes

    async def sigterm_taken() -> bool:
        return STOPPING in subscriber.tail() or stop.done()

    await run.supervise(sigterm_taken, timeout=60, what="the subscriber to take the SIGTERM")
    committed = {n for (n,) in await run.rows("SELECT n FROM effects")}
    in_flight = started_by(run, subscriber) - committed
    assert in_flight, "no handler was in flight when the subscriber began to stop"
    (run.folder / "release").touch()  # the held handlers go on, inside the stop
    codes = await stop
    stopped_in, stopped_at = time.monotonic() - stopping, time.time()
    assert codes == [0, 0], run.logs()[-3000:]
    assert "Traceback" not in run.logs()
    interrupted = await run.count()
    # At most IN_FLIGHT handlers were held; had the subscriber fetched on after the SIGTERM, the released ones
    # would have let it take every event.
    assert interrupted.delivered < events, "the subscriber went on fetching after its SIGTERM"
    started = started_by(run, subscriber)
    rows = await run.rows(f"SELECT n FROM effects WHERE handled_at < {stopped_at}")
    assert started <= {n for (n,) in rows}, "a handler that had started was cut off by the stop"

    restarted = time.time()
    run.subscriber("subscriber-again")
    if interrupted.outbox:  # the relay sends what its outbox holds before it exits, within shutdown_timeout
        run.relay("relay-again")
    await run.all_delivered(events)
    assert set(await run.stop()) == {0}
    counts = await run.count()
    assert (counts.sent, counts.delivered, counts.duplicates) == (events, events, 0)
    assert counts.dead_letters == 0
    again = await run.rows(f"SELECT attempt, handled_at - {restarted} FROM effects WHERE attempt > 1")
    later = ", ".join(f"{seconds:.1f}s" for _, seconds in again[:3])
    report.counted(
        "graceful stop (SIGTERM) under load",
        broker.kind,
        counts,
        await run.recovery(restarted),
        f"exit 0 in {stopped_in:.1f}s with {interrupted.delivered}/{events} handled, all "
        f"{len(started)} started handlers finished ({len(in_flight)} held in flight at the SIGTERM); "
        f"{len(again)} handled with attempt > 1 after" + (f" ({later} after the restart)" if again else ""),
    )
