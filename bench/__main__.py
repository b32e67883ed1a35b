"""`python -m bench`: run the scenarios, print the figures, and (with --write-docs) put them in
docs/benchmarks.md and docs/benchmarks.svg; with --json FILE, every row as JSON too. Exits 1 if any round lost
an event or failed."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

from rich.console import Console

from bench import report, servers
from bench.run import RoundResult, run_all
from bench.scenarios import Scenario, all_scenarios

DOCS = Path(__file__).resolve().parent.parent / "docs"
BACKLOG_DEFAULT, BACKLOG_FULL, BACKLOG_QUICK = 100_000, 1_000_000, 20_000


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a tenth of the events, 1 round (about 2 minutes)")
    size.add_argument("--full", action="store_true", help="the backlog at 1,000,000 events as in issue 9")
    parser.add_argument("--rounds", type=int, help="rounds per scenario (default 3; 1 with --quick)")
    parser.add_argument(
        "--scale",
        type=float,
        default=float(os.environ.get("BENCH_SCALE", "1")),
        help="multiply every scenario's events (env BENCH_SCALE; default 1)",
    )
    parser.add_argument("--backlog", type=int, help="events in the backlog scenario")
    parser.add_argument(
        "--only", nargs="*", default=[], help="run scenarios whose key contains any of these (=KEY: that key)"
    )
    parser.add_argument("--write-docs", action="store_true", help="write docs/benchmarks.md and .svg")
    parser.add_argument(
        "--json", type=Path, metavar="FILE", help="write every row (medians, null where none) to FILE as JSON"
    )
    return parser.parse_args(argv)


def choose(args: argparse.Namespace) -> tuple[list[Scenario], int]:
    """The scenarios at their sizes for these options, and the rounds."""
    backlog = args.backlog or (
        BACKLOG_QUICK if args.quick else BACKLOG_FULL if args.full else BACKLOG_DEFAULT
    )
    scale = args.scale * (0.1 if args.quick else 1.0)
    rounds = args.rounds or (1 if args.quick else 3)
    chosen = [
        s if s.measure == "backlog" else s.scaled(scale)
        for s in all_scenarios(backlog)
        if not args.only or any(s.key == part[1:] if part[:1] == "=" else part in s.key for part in args.only)
    ]
    return chosen, rounds


def machine() -> list[str]:
    """What ran the figures: CPU, cores, memory, Python and the libraries compared."""
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    memory = next(
        line.split()[1]
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal")
    )
    found = asyncio.run(servers.versions())
    libs = ", ".join(
        f"{name} {version(name)}"
        for name in ("aio-pika", "faststream", "nats-py", "redis", "confluent-kafka", "SQLAlchemy", "asyncpg")
    )
    return [
        f"- CPU: {model}, {os.cpu_count()} cores; memory {int(memory) // 1024:,} MiB; {platform.platform()}",
        f"- Python {platform.python_version()}; {libs}",
        "- Servers (127.0.0.1): " + ", ".join(f"{k} {v.strip('<>')}" for k, v in found.items()),
        f"- eventrelay at commit {_git('rev-parse', '--short', 'HEAD')}"
        + (" with uncommitted changes" if _git("status", "--porcelain", "src") else ""),
    ]


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True, check=False).stdout.strip()


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


@contextlib.contextmanager
def kafka_if_needed(scenarios: list[Scenario]) -> Iterator[str | None]:
    """Tansu for the run, if a Kafka scenario is chosen."""
    if not any(s.broker == "kafka" for s in scenarios):
        yield None
        return
    with (
        tempfile.TemporaryDirectory(prefix="eventrelay-bench-tansu-") as folder,
        servers.tansu(Path(folder)) as address,
    ):
        yield address


def main(argv: list[str]) -> int:
    args = parse(argv)
    scenarios, rounds = choose(args)
    console = Console(width=None if sys.stdout.isatty() else 200)
    command = "python -m bench " + shlex.join(argv)
    load_before, began = _uptime(), time.monotonic()
    console.print(f"{len(scenarios)} scenarios x {rounds} rounds; load: {load_before}")

    def log(number: int, scenario: Scenario, result: RoundResult, seconds: float) -> None:
        parts = [f"{result.throughput:,.0f}/s"] if result.throughput == result.throughput else []
        if result.rate == result.rate:
            parts.append(f"at {result.rate:,.0f}/s")
        if result.p50_ms == result.p50_ms:
            parts.append(f"p50 {result.p50_ms:.2f} ms p99 {result.p99_ms:.2f} ms")
        figure = " ".join(parts) + f", CPU us/ev {result.consumer_cpu_us:,.0f}/{result.publisher_cpu_us:,.0f}"
        if result.ok:
            status = figure
        elif result.skipped:
            status = f"[yellow]skipped[/yellow] {result.problem}"
        else:
            status = f"[red]FAILED[/red] {result.problem}"
        console.print(f"round {number} {scenario.key:32} {scenario.system:13} {seconds:5.1f} s  {status}")

    with kafka_if_needed(scenarios) as kafka:
        results = run_all(scenarios, rounds, kafka, log)
    rows = report.summarize(scenarios, results)
    found = report.targets(rows)
    console.print(report.rich_table(rows))
    console.print(report.targets_table(found))
    failed = [r for r in results if not r.ok and not r.skipped]
    elapsed = time.monotonic() - began
    if args.write_docs:
        context = [
            f"Run of {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC by `{command}`"
            f" (`make bench`), {rounds} round(s) per scenario, {elapsed / 60:.1f} minutes:",
            "",
            *machine(),
            f"- Load before: `{load_before}`",
            f"- Load after: `{_uptime()}`",
            "",
            "Medians over the rounds, with (min-max). Latency rows are paced at the stated rate; a row at"
            " half the throughput follows its title with the rates it ran at. CPU us/ev c/p: the consumer's"
            " and the publisher's process CPU per event, in microseconds (medians). Ratios compare each"
            " eventrelay throughput with the same job written by hand (E3: bare sqlite3 at as many events"
            " per transaction) and with E1 raw aio-pika and FastStream. Request/reply rows: round trips/s"
            " in the events/s column, the round trip's p50 and p99, CPU of the answering and the asking"
            " process per round trip, and the ratio to FastStream's RPC on RabbitMQ in the same mode.",
        ]
        (DOCS / "benchmarks.svg").write_text(report.throughput_plot(rows))
        report.write_docs(DOCS / "benchmarks.md", report.markdown(rows, found, context, "benchmarks.svg"))
        console.print("Wrote docs/benchmarks.md and docs/benchmarks.svg")
    if args.json is not None:
        report.write_json(args.json, rows)
        console.print(f"Wrote {args.json}")
    for result in results:
        if not result.ok:
            word = "[yellow]skipped[/yellow]" if result.skipped else "[red]FAILED[/red]"
            console.print(f"{word} {result.key} ({result.system}): {result.problem}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
