"""What every benchmark process shares: the job it is given, the talk with the runner, pacing, counting.

The runner spawns each publisher and consumer as an OS process running :func:`main`, and talks to it over a
pipe. A child says `("ready", info)` when set up; both then wait for `"go"` (the consumer's comes just before
the publisher's; a backlog's consumer, started on events already waiting, gets none); the publisher publishes
and says `("published", figures)`; the consumer says `("arrived", None)` when every event arrived or its time
ran out, then `("done", figures)` after its checks. Both then wait for `"stop"` (the publisher's comes as soon
as the consumer said "arrived"), shut down and say `("stopped", figures)`. A failure is
`("error", traceback)`.

Each child clocks its own process's CPU (`time.process_time`: every thread of the process, so SQLite's worker
threads too) over its part of the round: the consumer from "go" (a backlog's consumer from its start, as its
events/s do) until every event arrived; the publisher from "go" until its "stop", so the relay's work for the
last events is in, plus a pipe's round trip of idling. The consumer reports its CPU seconds in "done", the
publisher in "stopped".

The request/reply rows play the same talk with an answering service as the consumer (it counts each request
that arrives) and an asker as the publisher: each of its units is one `request` awaited to its reply, timed
by the asker alone (`RoundTrips`), whose round trips go with its "published" figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import time
import traceback
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

TABLE = "bench_price_changes"
"""The consumer's handler table: one row per event, written in the handler's transaction (every system that
has a database; the rows check counts them)."""
CREATE_TABLE = f"CREATE TABLE {TABLE} (seq INTEGER PRIMARY KEY, product_id TEXT, new_price NUMERIC)"
REQUEST_TIMEOUT = 30.0
"""Seconds an asker waits for one reply: a request without one fails the round."""
WARM_UP = -1
"""The `seq` of the request an asker sends before it says "ready" (its reply channel and connection warm):
answered, but not counted."""

ROLES = {
    "raw.publish": "bench.baselines:raw_publish",
    "raw.consume": "bench.baselines:raw_consume",
    "faststream.publish": "bench.baselines:faststream_publish",
    "faststream.consume": "bench.baselines:faststream_consume",
    "eventrelay.publish": "bench.eventrelay_roles:publish",
    "eventrelay.consume": "bench.eventrelay_roles:consume",
    "eventrelay.fill": "bench.eventrelay_roles:fill",
    "bare_sqlite.publish": "bench.bare_sqlite:publish",
    "bare_sqlite.consume": "bench.bare_sqlite:consume",
    "hand_written.publish": "bench.hand_written:publish",
    "hand_written.consume": "bench.hand_written:consume",
    "eventrelay.ask": "bench.eventrelay_roles:ask",
    "eventrelay.answer": "bench.eventrelay_roles:answer_requests",
    "faststream.ask": "bench.baselines:faststream_ask",
    "faststream.answer": "bench.baselines:faststream_answer",
}
"""Role name -> `module:function`, imported in the child only, so a baseline never imports eventrelay's
brokers and the other way round."""


@dataclass(frozen=True)
class Job:
    """What one process of one round does. Plain data: it crosses the process boundary by pickle."""

    n: int
    """Events in the round."""
    url: str
    """The broker URL (an AMQP URL for the baselines)."""
    destination: str
    """The baselines' queue, or eventrelay's consuming service (its subscription)."""
    publisher: str = "Bench.Product"
    """eventrelay's publishing service."""
    database: str | None = None
    """The consumer's database: inbox, and the table its handler writes to. None: E1, no database."""
    publisher_database: str | None = None
    """The publisher's database: with it events go through units of work and the outbox; without, direct."""
    per_unit: int = 1
    """Events per unit of work (durable) ; 1 otherwise."""
    window: int = 500
    """Units of work, or publishes awaiting their confirm, in flight at once."""
    rate: float | None = None
    """Events per second when paced (latency runs); None publishes as fast as the window allows."""
    timeout: float = 120.0
    """How long a consumer waits for every event."""
    batch: bool = True
    """The consumer's `subscribe(..., batch=...)`: True, the default, one unit of work per fetch; False, one
    per message (the hand-written baseline: its per-fetch or per-message consumer)."""
    latencies: bool = True
    """Whether the consumer keeps every event's latency (off for the backlog)."""
    go: bool = True
    """Whether the consumer waits for the runner's "go" and starts its CPU clock there (off for the backlog:
    its events wait before it starts, so its clock runs from its start)."""


def main(role: str, job: Job, conn: Connection) -> None:
    """Entry point of a spawned process: run `role` on `job`, reporting over `conn`."""
    module, _, name = ROLES[role].partition(":")
    run: Callable[[Job, Connection], Coroutine[Any, Any, None]] = getattr(
        importlib.import_module(module), name
    )
    try:
        asyncio.run(run(job, conn))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        raise SystemExit(1) from None


async def receive(conn: Connection) -> Any:
    """The runner's next word, without blocking the event loop."""
    return await asyncio.to_thread(conn.recv)


async def until(conn: Connection, word: str) -> None:
    """Wait for the runner to say `word`."""
    got = await receive(conn)
    if got != word:
        raise RuntimeError(f"expected {word!r} from the runner, got {got!r}")


async def drive(job: Job, send: Callable[[int], Awaitable[None]]) -> tuple[int, int]:
    """Call `send(unit)` for each unit of work, at most `job.window` at once and paced to `job.rate` if set.

    Returns the wall-clock nanoseconds of the start and of the last unit's completion.
    """
    units = job.n // job.per_unit
    slots = asyncio.Semaphore(job.window)
    failures: list[BaseException] = []
    tasks: set[asyncio.Task[None]] = set()

    async def one(unit: int) -> None:
        try:
            await send(unit)
        except Exception as exc:  # kept and raised below: a publish that failed fails the round
            failures.append(exc)
        finally:
            slots.release()

    start_ns, start = time.time_ns(), time.perf_counter()
    per_unit_interval = job.per_unit / job.rate if job.rate else 0.0
    for unit in range(units):
        if per_unit_interval:
            pause = start + unit * per_unit_interval - time.perf_counter()
            if pause > 0:
                await asyncio.sleep(pause)
        await slots.acquire()
        if failures:
            break
        task = asyncio.create_task(one(unit))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(set(tasks))
    if failures:
        raise failures[0]
    return start_ns, time.time_ns()


def peak_rss_kib() -> int:
    """This process's peak resident memory (VmHWM), in KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


class Tally:
    """A consumer's count: which events arrived, how late, and when the last one did."""

    def __init__(self, job: Job) -> None:
        self.n = job.n
        self.keep_latencies = job.latencies
        self.seen = bytearray(job.n)
        self.distinct = 0
        self.duplicates = 0
        self.stray = 0
        self.latencies_ms: list[float] = []
        self.started_ns = time.time_ns()
        self.last_ns = 0
        self.complete = asyncio.Event()
        self.cpu_started = time.process_time()
        self.cpu_done: float | None = None

    def go(self) -> None:
        """Start the CPU clock now: the publisher is about to start."""
        self.cpu_started = time.process_time()

    def record(self, seq: int, sent_ns: int) -> None:
        """One delivery of event `seq`, stamped `sent_ns` by its publisher."""
        now = time.time_ns()
        if not 0 <= seq < self.n:
            self.stray += 1
            return
        if self.seen[seq]:
            self.duplicates += 1
            return
        self.seen[seq] = 1
        self.distinct += 1
        self.last_ns = now
        if self.keep_latencies:
            self.latencies_ms.append((now - sent_ns) / 1e6)
        if self.distinct == self.n:
            self.cpu_done = time.process_time()
            self.complete.set()

    async def wait(self, timeout: float) -> None:
        """Until every event arrived, or `timeout` seconds passed (the runner sees the shortfall)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.complete.wait(), timeout)

    def figures(self, **extra: Any) -> dict[str, Any]:
        """What the consumer reports to the runner."""
        return {
            "distinct": self.distinct,
            "duplicates": self.duplicates,
            "stray": self.stray,
            "started_ns": self.started_ns,
            "last_ns": self.last_ns,
            "latencies_ms": self.latencies_ms,
            "peak_rss_kib": peak_rss_kib(),
            "cpu_s": (time.process_time() if self.cpu_done is None else self.cpu_done) - self.cpu_started,
            **extra,
        }


class RoundTrips:
    """An asker's count: how long each request took to its reply, and that each reply answers its request."""

    def __init__(self) -> None:
        self.latencies_ms: list[float] = []

    async def time(self, seq: int, asking: Awaitable[int]) -> None:
        """Await `asking`, the request for `seq` that returns the `seq` its reply carries."""
        started = time.perf_counter()
        answered = await asking
        self.latencies_ms.append((time.perf_counter() - started) * 1e3)
        if answered != seq:
            raise RuntimeError(f"the reply to request {seq} answered request {answered}")

    def figures(self) -> dict[str, Any]:
        return {"latencies_ms": self.latencies_ms}


async def serve_publisher(
    job: Job,
    conn: Connection,
    send: Callable[[int], Awaitable[None]],
    close: Callable[[], Awaitable[None]],
    figures: Callable[[], dict[str, Any]] | None = None,
) -> None:
    """A publisher's part of the talk: ready, publish on "go", report (with what `figures` adds), close on
    "stop" and report its CPU."""
    conn.send(("ready", None))
    await until(conn, "go")
    cpu_started = time.process_time()
    start_ns, end_ns = await drive(job, send)
    conn.send(("published", {"start_ns": start_ns, "end_ns": end_ns, **(figures() if figures else {})}))
    await until(conn, "stop")
    cpu_s = time.process_time() - cpu_started
    await close()
    conn.send(("stopped", {"cpu_s": cpu_s}))


async def serve_consumer(
    job: Job,
    conn: Connection,
    tally: Tally,
    close: Callable[[], Awaitable[None]],
    check: Callable[[], Awaitable[dict[str, Any]]] | None = None,
) -> None:
    """A consumer's part of the talk, once it consumes: ready, "go" (unless `job.go` is off), wait for every
    event (bounded), say so, report with what `check` adds, close on "stop"."""
    conn.send(("ready", None))
    if job.go:
        await until(conn, "go")
        tally.go()
    await tally.wait(job.timeout)
    conn.send(("arrived", None))
    conn.send(("done", tally.figures(**(await check() if check else {}))))
    await until(conn, "stop")
    await close()
    conn.send(("stopped", None))
