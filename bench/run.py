"""The runner: each round of each scenario in fresh processes and fresh names, figures checked and kept.

python -m bench [--quick | --full] [--rounds N] [--scale F] [--only KEY ...] [--write-docs] [--json FILE]
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import tempfile
import time
import uuid
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from bench import child
from bench.child import Job
from bench.scenarios import BARE_SQLITE, EVENTRELAY, FASTSTREAM, HAND_WRITTEN, Scenario, provisioned, setup
from bench.stats import percentile

_SPAWN = multiprocessing.get_context("spawn")
START_TIMEOUT = 60.0
STOP_TIMEOUT = 60.0


class RoundFailed(Exception):
    """A round that lost events, or whose process failed or ran out of time."""


@dataclass(frozen=True)
class RoundResult:
    """The figures of one round of one scenario (NaN where a figure does not apply)."""

    key: str
    system: str
    ok: bool
    problem: str = ""
    throughput: float = math.nan
    p50_ms: float = math.nan
    p99_ms: float = math.nan
    peak_mib: float = math.nan
    duplicates: int = 0


class Process:
    """One child process and its pipe."""

    def __init__(self, role: str, job: Job) -> None:
        self.role = role
        self.conn, theirs = _SPAWN.Pipe()
        self.process: BaseProcess = _SPAWN.Process(target=child.main, args=(role, job, theirs), daemon=True)
        self.process.start()
        theirs.close()

    def expect(self, word: str, timeout: float) -> Any:
        """The child's next report, which must be `word`; its payload."""
        if not self.conn.poll(timeout):
            raise RoundFailed(f"{self.role}: no {word!r} within {timeout:.0f} s")
        try:
            got, payload = self.conn.recv()
        except EOFError:
            raise RoundFailed(f"{self.role} exited (code {self.process.exitcode}) before {word!r}") from None
        if got == "error":
            raise RoundFailed(f"{self.role} failed:\n{payload}")
        if got != word:
            raise RoundFailed(f"{self.role}: expected {word!r}, got {got!r}")
        return payload

    def say(self, word: str) -> None:
        self.conn.send(word)

    def end(self) -> None:
        """Wait briefly for the process to exit; kill it (by its own id) if it lingers."""
        self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self.conn.close()


def run_round(scenario: Scenario, kafka: str | None) -> RoundResult:
    """One round of `scenario` on fresh names; never raises for a failed round, reports it."""
    suffix = uuid.uuid4().hex[:10]
    with tempfile.TemporaryDirectory(prefix="eventrelay-bench-") as folder:
        plan = setup(scenario, suffix, Path(folder), kafka)
        try:
            return asyncio.run(_provisioned_round(scenario, plan))
        except RoundFailed as exc:
            return RoundResult(scenario.key, scenario.system, ok=False, problem=str(exc))


async def _provisioned_round(scenario: Scenario, plan: Any) -> RoundResult:
    async with provisioned(plan):
        # The processes are driven from a thread: their pipes block, and this loop must stay free to clean up.
        return await asyncio.to_thread(_round, scenario, plan.consumer, plan.publisher)


def _roles(system: str) -> tuple[str, str]:
    prefix = {
        EVENTRELAY: "eventrelay",
        FASTSTREAM: "faststream",
        BARE_SQLITE: "bare_sqlite",
        HAND_WRITTEN: "hand_written",
    }.get(system, "raw")
    return f"{prefix}.consume", f"{prefix}.publish"


def _round(scenario: Scenario, consumer_job: Job, publisher_job: Job) -> RoundResult:
    consume, publish = _roles(scenario.system)
    if scenario.measure == "backlog":
        publish = "eventrelay.fill"
    started: list[Process] = []
    try:
        if scenario.measure == "backlog":  # fill first, then start the consumer on the waiting events
            publisher = Process(publish, publisher_job)
            started.append(publisher)
            publisher.expect("ready", START_TIMEOUT)
            publisher.say("go")
            published = publisher.expect("published", scenario.timeout)
            consumer = Process(consume, consumer_job)
            started.append(consumer)
            consumer.expect("ready", START_TIMEOUT)
        else:
            consumer = Process(consume, consumer_job)
            started.append(consumer)
            consumer.expect("ready", START_TIMEOUT)
            publisher = Process(publish, publisher_job)
            started.append(publisher)
            publisher.expect("ready", START_TIMEOUT)
            publisher.say("go")
            published = publisher.expect("published", scenario.timeout)
        figures = consumer.expect("done", scenario.timeout + 15)
        for process in started:
            process.say("stop")
        for process in started:
            process.expect("stopped", STOP_TIMEOUT)
    finally:
        for process in started:
            process.end()
    return _result(scenario, published, figures)


def _result(scenario: Scenario, published: dict[str, int], figures: dict[str, Any]) -> RoundResult:
    """Check that every event arrived (and every row was written), then compute the round's figures."""
    n = scenario.n
    problems = []
    if figures["distinct"] != n:
        problems.append(f"{n - figures['distinct']} of {n} events never arrived")
    if figures["stray"]:
        problems.append(f"{figures['stray']} events that were not published arrived")
    if figures.get("rows") is not None and figures["rows"] != n:
        problems.append(f"{figures['rows']} rows written for {n} events")
    if problems:
        raise RoundFailed(f"{scenario.key} ({scenario.system}): " + "; ".join(problems))
    start = figures["started_ns"] if scenario.measure == "backlog" else published["start_ns"]
    seconds = (figures["last_ns"] - start) / 1e9
    latencies = figures["latencies_ms"]
    return RoundResult(
        scenario.key,
        scenario.system,
        ok=True,
        throughput=n / seconds if scenario.measure != "latency" else math.nan,
        p50_ms=percentile(latencies, 50) if scenario.measure == "latency" else math.nan,
        p99_ms=percentile(latencies, 99) if scenario.measure == "latency" else math.nan,
        peak_mib=figures["peak_rss_kib"] / 1024 if scenario.measure == "backlog" else math.nan,
        duplicates=figures["duplicates"],
    )


def run_all(scenarios: list[Scenario], rounds: int, kafka: str | None, log: Any) -> list[RoundResult]:
    """Every scenario `rounds` times, interleaved (round 1 of all, then round 2...) so that a noisy minute
    on the machine touches every system alike. The backlog runs once per round too."""
    results: list[RoundResult] = []
    for number in range(1, rounds + 1):
        for scenario in scenarios:
            began = time.monotonic()
            result = run_round(scenario, kafka)
            results.append(result)
            log(number, scenario, result, time.monotonic() - began)
    return results
