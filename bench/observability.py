"""What tracing and metrics cost: publish and handle N events in memory, with each turned on or off.

    .venv/bin/python bench/observability.py [N]

Every configuration runs in the same process, interleaved, best of five; the baseline is the bus as it
comes (OpenTelemetry's API installed, no SDK configured; metrics off). Prints events per second and the cost
of each configuration relative to the baseline. Figures, not a test.
"""

from __future__ import annotations

import asyncio
import gc
import sys
import time

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from eventrelay import DistributedEventBus, Event, MemoryBroker, Settings
from eventrelay.testing import wait_until_idle


class Ping(Event, name="Bench.Ping"):
    n: int


async def run(n: int, tracing: bool, metrics: bool) -> float:
    handled = 0

    async def on_ping(event: Ping) -> None:
        nonlocal handled
        handled += 1

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(InMemorySpanExporter()))  # as in production
    async with DistributedEventBus("Bench", broker=MemoryBroker(), settings=Settings(metrics=metrics)) as bus:
        if tracing:
            bus.tracing.provider = provider
        await bus.subscribe(on_ping)
        started = time.perf_counter()
        for i in range(n):
            await bus.publish(Ping(n=i))
        await wait_until_idle(bus, timeout=600)
        elapsed = time.perf_counter() - started
    provider.shutdown()
    gc.collect()
    assert handled == n
    return elapsed


async def main(n: int) -> None:
    configurations = {
        "baseline (no SDK, no metrics)": (False, False),
        "metrics": (False, True),
        "tracing (SDK, batched export)": (True, False),
        "tracing and metrics": (True, True),
    }
    best = {name: float("inf") for name in configurations}
    for _ in range(5):
        for name, (tracing, metrics) in configurations.items():
            best[name] = min(best[name], await run(n, tracing, metrics))
    base = best["baseline (no SDK, no metrics)"]
    print(f"{n} events published through the outbox and handled, in memory; best of 5")
    for name, seconds in best.items():
        print(f"  {name:34} {n / seconds:9.0f} events/s  {100 * (seconds / base - 1):+6.1f}%")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000))
