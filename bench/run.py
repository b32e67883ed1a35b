"""The runner: each round of each scenario in fresh processes and fresh names, figures checked and kept.

python -m bench [--quick | --full] [--rounds N] [--scale F] [--only KEY ...] [--write-docs] [--json FILE]
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import statistics
import tempfile
import time
import uuid
from dataclasses import dataclass, replace
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
    rate: float = math.nan
    """Events/s the publisher was paced at (latency rows)."""
    consumer_cpu_us: float = math.nan
    """The consumer process's CPU per event, in microseconds (bench/child.py says over what part)."""
    publisher_cpu_us: float = math.nan
    """The publisher process's CPU per event, in microseconds."""
    skipped: bool = False
    """Not run, and not a failure: a half-rate latency row without a throughput to halve (`problem` says
    why)."""


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
    if scenario.measure == "latency" and not scenario.rate:
        raise ValueError(f"{scenario.key}: a latency row needs its rate (see `paced`)")
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


def _roles(scenario: Scenario) -> tuple[str, str]:
    """The consumer's and the publisher's role (the answering and the asking side of request/reply)."""
    prefix = {
        EVENTRELAY: "eventrelay",
        FASTSTREAM: "faststream",
        BARE_SQLITE: "bare_sqlite",
        HAND_WRITTEN: "hand_written",
    }.get(scenario.system, "raw")
    if scenario.measure == "requests":
        return f"{prefix}.answer", f"{prefix}.ask"
    return f"{prefix}.consume", f"{prefix}.publish"


def _round(scenario: Scenario, consumer_job: Job, publisher_job: Job) -> RoundResult:
    """One round's talk with its processes."""
    consume, publish = _roles(scenario)
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
            consumer.say("go")  # its CPU clock starts: the publisher's first event comes after this
            publisher.say("go")
            published = publisher.expect("published", scenario.timeout)
        consumer.expect("arrived", scenario.timeout + 15)
        publisher.say("stop")  # its CPU clock stops: its part is done
        figures = consumer.expect("done", STOP_TIMEOUT)
        consumer.say("stop")
        publisher_cpu_s = publisher.expect("stopped", STOP_TIMEOUT)["cpu_s"]
        consumer.expect("stopped", STOP_TIMEOUT)
    finally:
        for process in started:
            process.end()
    return _result(scenario, published, figures | {"publisher_cpu_s": publisher_cpu_s})


def _result(scenario: Scenario, published: dict[str, Any], figures: dict[str, Any]) -> RoundResult:
    """Check that every event arrived (and every row was written), then compute the round's figures: a
    request/reply row's are the asker's, from its first request to its last reply."""
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
    if scenario.measure == "requests":
        start, end, latencies = published["start_ns"], published["end_ns"], published["latencies_ms"]
    else:
        start = figures["started_ns"] if scenario.measure == "backlog" else published["start_ns"]
        end, latencies = figures["last_ns"], figures["latencies_ms"]
    seconds = (end - start) / 1e9
    timed = scenario.measure in ("latency", "requests")
    return RoundResult(
        scenario.key,
        scenario.system,
        ok=True,
        throughput=n / seconds if scenario.measure != "latency" else math.nan,
        p50_ms=percentile(latencies, 50) if timed else math.nan,
        p99_ms=percentile(latencies, 99) if timed else math.nan,
        peak_mib=figures["peak_rss_kib"] / 1024 if scenario.measure == "backlog" else math.nan,
        duplicates=figures["duplicates"],
        rate=scenario.rate or math.nan,
        consumer_cpu_us=figures["cpu_s"] / n * 1e6,
        publisher_cpu_us=figures["publisher_cpu_s"] / n * 1e6,
    )


def paced(scenario: Scenario, done: list[RoundResult], this_round: list[RoundResult]) -> Scenario | str:
    """`scenario` with its rate: for a half-rate latency row, half the events/s of its throughput row in
    `this_round`, or (if that round failed) the median of its rounds in `done`; a note saying why not when
    there is none (its throughput row was not run, under `--only`, or failed every round so far)."""
    if scenario.half_of is None:
        return scenario

    def measured(results: list[RoundResult]) -> list[float]:
        return [
            r.throughput
            for r in results
            if (r.key, r.system, r.ok) == (scenario.half_of, scenario.system, True)
        ]

    if now := measured(this_round):
        rate = now[-1] / 2
    elif so_far := measured(done):
        rate = statistics.median(so_far) / 2
    else:
        return (
            f"no throughput of {scenario.half_of} ({scenario.system}) in this run to halve:"
            f" run it too (--only ={scenario.half_of})"
        )
    return replace(scenario, rate=rate)


def run_all(scenarios: list[Scenario], rounds: int, kafka: str | None, log: Any) -> list[RoundResult]:
    """Every scenario `rounds` times, interleaved (round 1 of all, then round 2...) so that a noisy minute
    on the machine touches every system alike. The backlog runs once per round too. A half-rate latency row
    runs at half its throughput row's figure of the same round (that row comes before it in the list), or is
    skipped with a note (`paced`)."""
    results: list[RoundResult] = []
    for number in range(1, rounds + 1):
        this_round: list[RoundResult] = []
        for scenario in scenarios:
            began = time.monotonic()
            chosen = paced(scenario, results, this_round)
            if isinstance(chosen, str):
                result = RoundResult(scenario.key, scenario.system, ok=False, problem=chosen, skipped=True)
            else:
                result = run_round(chosen, kafka)
            results.append(result)
            this_round.append(result)
            log(number, scenario, result, time.monotonic() - began)
    return results
