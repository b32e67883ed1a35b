"""Graceful stop under load: SIGTERM to the subscriber while handlers run and to the relay while its outbox is
full. Each exits 0, every handler that had started finishes and commits before the process exits (none is cut
off), and after a restart every event has taken effect exactly once.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from tests.reliability.harness import SIZES, BrokerUnderTest, Report, Scenario, subscribe_ahead

pytestmark = pytest.mark.reliability

PAUSE = 0.01  # seconds each handler takes (in its unit of work), so that work is in flight at the SIGTERM
IN_FLIGHT = 20
ENV = {"RELIABILITY_HANDLER_PAUSE": str(PAUSE), "RELIABILITY_LOG_STARTS": "1"}


async def test_sigterm_under_load_finishes_in_flight_work_and_loses_nothing(
    scenario: Callable[..., Scenario], broker: BrokerUnderTest, report: Report
) -> None:
    events = SIZES.events
    run = scenario(subscriber_settings={"max_in_flight": IN_FLIGHT}, env=ENV)
    await subscribe_ahead(run.broker_url, broker.subscriber)
    assert await run.publisher(events, relay=False).wait(60) == 0  # all in the outbox
    subscriber = run.subscriber()
    relay = run.relay()

    async def loaded() -> bool:
        return (await run.count()).delivered >= events // 4

    await run.supervise(loaded, timeout=60, what="a quarter of the events handled")
    stopping = time.monotonic()
    codes = await run.stop(subscriber, relay)
    stopped_in, stopped_at = time.monotonic() - stopping, time.time()
    assert codes == [0, 0], run.logs()[-3000:]
    assert "Traceback" not in run.logs()
    interrupted = await run.count()
    assert interrupted.delivered < events, "the SIGTERM came too late to find work in flight"
    lines = (run.folder / "started.log").read_text().split("\n")
    started = {int(n) for pid, _, n in (line.partition(" ") for line in lines) if pid == str(subscriber.pid)}
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
        f"{len(started)} started handlers finished; {len(again)} handled with attempt > 1 after"
        + (f" ({later} after the restart)" if again else ""),
    )
