"""Backlog: many events wait at the broker while the subscriber is away; it comes back, its memory stays
bounded by its in-flight limit (`Settings.max_in_flight`, and RabbitMQ's `prefetch`), and it drains them all.

Memory is the subscriber process's peak resident set (VmHWM in /proc/<pid>/status). The reference is the
same subscriber's peak after handling a warm-up of a few hundred events of the same size: a consumer that
fetched the whole backlog would hold all of it (the bodies alone are `backlog x pad` bytes) and its peak would
grow by at least that much.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from eventrelay.config import Settings
from tests.reliability.harness import SIZES, Figures, Report, Scenario, subscribe_ahead
from tests.reliability.under_test import BrokerUnderTest

pytestmark = pytest.mark.reliability

IN_FLIGHT = 50
WARM_UP = 100


async def test_a_backlog_drains_with_bounded_memory(
    scenario: Callable[..., Scenario], broker: BrokerUnderTest, report: Report
) -> None:
    backlog, pad = SIZES.backlog, SIZES.backlog_pad
    url = broker.url(prefetch=IN_FLIGHT) if broker.kind == "rabbitmq" else broker.url()
    run = scenario(
        broker_url=url,
        subscriber_settings={"max_in_flight": IN_FLIGHT},
        # The default lease: a batch of 500 outlives the scenarios' quick 2 s lease on a loaded machine, and
        # the relay would send it again (a copy the inbox drops, and a slower drain than a user sees).
        publisher_settings={"relay_batch_size": 500, "relay_lease": Settings().relay_lease},
        env={"RELIABILITY_PAD": str(pad), "RELIABILITY_PER_UNIT": "500"},
    )
    await subscribe_ahead(url, broker.subscriber)

    # Warm-up: the subscriber handles a few hundred events; its peak memory is the reference.
    warm = run.subscriber("subscriber-warm-up")
    assert await run.publisher(WARM_UP, name="publisher-warm-up").wait(120) == 0
    await run.all_delivered(WARM_UP)
    reference = warm.peak_rss_kib()
    assert await run.stop(warm) == [0]

    # The backlog: published (and relayed to the broker) while the subscriber is away.
    started = time.monotonic()
    assert await run.publisher(WARM_UP + backlog).wait(max(120.0, backlog / 50)) == 0
    published_in = time.monotonic() - started
    assert (await run.count()).outbox == 0  # all of it at the broker

    back = time.time()
    subscriber = run.subscriber()
    drained_in = await run.all_delivered(WARM_UP + backlog, timeout=max(120.0, backlog / 50))
    peak = subscriber.peak_rss_kib()
    assert await run.stop(subscriber) == [0]

    counts = await run.count()
    assert (counts.sent, counts.delivered) == (WARM_UP + backlog, WARM_UP + backlog), "an event was lost"
    assert counts.duplicates == 0
    assert counts.dead_letters == 0
    growth_kib = peak - reference
    backlog_kib = backlog * pad // 1024
    assert growth_kib < backlog_kib // 2, (
        f"peak memory grew by {growth_kib} KiB over the warm-up's {reference} KiB while draining "
        f"{backlog_kib} KiB of bodies: the consumer is holding the backlog"
    )
    report.add(
        Figures(
            "backlog",
            broker.kind,
            backlog,
            counts.delivered - WARM_UP,
            counts.duplicates,
            counts.dead_letters,
            round(await run.recovery(back), 2),
            f"{backlog} x {pad} B bodies ({backlog_kib // 1024} MiB) waited; peak RSS {peak // 1024} MiB vs "
            f"{reference // 1024} MiB after the warm-up (in flight <= {IN_FLIGHT}); published in "
            f"{published_in:.0f}s, drained in {drained_in:.0f}s ({backlog / drained_in:.0f}/s)",
        )
    )
