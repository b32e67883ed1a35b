"""Hunt flaky tests on purpose: run part of the suite several times under load and count each test's failures.

    python -m tests.soak [--runs 5] [--hogs 2] [--workers 2] [PYTEST_ARGS...]   (or: make soak)

Each run is a `pytest -n WORKERS` over the process-level and broker tests (by default `tests/reliability`,
`tests/processes`, `tests/brokers`, `tests/bus` and `tests/sagas`) in an order shuffled with a new seed (this
module is also the pytest plugin that shuffles), beside HOGS processes that keep a core busy each. At
the end it prints every test that failed at least once, with how many runs it failed in and the seeds of
those runs, and exits 1 if there was one. Servers are required, as in CI. A test that fails here once is a
flake with a cause: the run's junit XML (`.soak/run-N.xml`) and output (`.soak/run-N.log`) hold its failure.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import random
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest

DEFAULT_TESTS = ["tests/reliability", "tests/processes", "tests/brokers", "tests/bus", "tests/sagas"]
SHUFFLE_VARIABLE = "EVENTRELAY_TEST_SHUFFLE"  # the seed of the test order


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Shuffle the tests (as a plugin: `-p tests.soak`). Every xdist worker gets the same seed, so the
    same order, as xdist requires."""
    seed = os.environ.get(SHUFFLE_VARIABLE)
    if seed is not None:
        random.Random(int(seed)).shuffle(items)


def _hog() -> None:
    while True:
        pass


@contextlib.contextmanager
def cpu_hogs(count: int) -> Iterator[None]:
    """`count` processes that spin on a core each, for the duration of the block."""
    hogs = [multiprocessing.Process(target=_hog, daemon=True) for _ in range(count)]
    for hog in hogs:
        hog.start()
    try:
        yield
    finally:
        for hog in hogs:
            hog.kill()
            hog.join()


def failures(junit: Path) -> list[str]:
    """The tests (`module.Class::name`) that failed or errored in a junit XML report."""
    if not junit.exists():
        return ["<no report: pytest did not finish>"]
    failed = []
    for case in ElementTree.parse(junit).getroot().iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(f"{case.get('classname')}::{case.get('name')}")
    return failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--hogs", type=int, default=2, help="CPU-bound processes running beside the tests")
    parser.add_argument("--workers", type=int, default=2, help="pytest-xdist workers")
    parser.add_argument("--out", type=Path, default=Path(".soak"))
    options, pytest_args = parser.parse_known_args(argv)
    options.out.mkdir(exist_ok=True)
    env = {**os.environ, "CI": "true", "EVENTRELAY_REQUIRE_SERVERS": "1"}
    counts: Counter[str] = Counter()
    seeds: dict[str, list[int]] = defaultdict(list)
    for run in range(1, options.runs + 1):
        seed = random.randrange(1 << 30)
        junit, log = options.out / f"run-{run}.xml", options.out / f"run-{run}.log"
        junit.unlink(missing_ok=True)
        command = [sys.executable, "-m", "pytest", "-q", "-p", "tests.soak", "-n", str(options.workers)]
        command.append(f"--junitxml={junit}")
        command += pytest_args or DEFAULT_TESTS
        started = time.monotonic()
        with cpu_hogs(options.hogs), log.open("wb") as output:
            code = subprocess.call(
                command, env={**env, SHUFFLE_VARIABLE: str(seed)}, stdout=output, stderr=subprocess.STDOUT
            )
        failed = failures(junit)
        if code != 0 and not failed:  # e.g. the session-end leftover check
            failed = [f"<pytest exited {code} with no failed test: see {log}>"]
        for test in failed:
            counts[test] += 1
            seeds[test].append(seed)
        print(
            f"run {run}/{options.runs} (seed {seed}): {len(failed)} failed, exit {code}, "
            f"{time.monotonic() - started:.0f} s",
            flush=True,
        )
    if not counts:
        print(f"no test failed in {options.runs} runs")
        return 0
    print(f"tests that failed at least once in {options.runs} runs:")
    for test, count in counts.most_common():
        print(f"  {count}x {test} (seeds {', '.join(map(str, seeds[test]))})")
    return 1


if __name__ == "__main__":
    sys.exit(main())
