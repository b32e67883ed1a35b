"""From rounds to figures: medians with their spread, the issue's targets as measured ratios, a rich table,
and the Markdown and SVG that go into docs/benchmarks.md."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.table import Table

from bench.plot import bar_chart
from bench.run import RoundResult
from bench.scenarios import (
    AT_HALF,
    AT_RATE,
    BARE_SQLITE,
    DURABLE_RATE,
    EVENTRELAY,
    FASTSTREAM,
    HAND_WRITTEN,
    PLOTTED,
    RAW,
    Scenario,
)
from bench.stats import Spread

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
NONE = Spread(math.nan, math.nan, math.nan)


@dataclass(frozen=True)
class Row:
    """One scenario's figures over its rounds."""

    scenario: Scenario
    rounds: int
    failed: int
    throughput: Spread
    p50_ms: Spread
    p99_ms: Spread
    peak_mib: Spread
    duplicates: int
    rate: Spread = NONE
    """Events/s the latency rounds were paced at (a half-rate row's differs from round to round)."""
    consumer_cpu_us: Spread = NONE
    publisher_cpu_us: Spread = NONE
    skipped: int = 0
    """Rounds not run (a half-rate row without a throughput to halve); not in `rounds`."""


@dataclass(frozen=True)
class Target:
    """One target of the issue: what was measured, and whether it is met (None: not measured)."""

    name: str
    measured: str
    met: bool | None


def summarize(scenarios: Sequence[Scenario], results: Sequence[RoundResult]) -> list[Row]:
    """A row per scenario, from its successful rounds (failed rounds are counted, not averaged; skipped ones
    are counted apart)."""
    rows = []
    for scenario in scenarios:
        mine = [r for r in results if r.key == scenario.key and r.system == scenario.system]
        ran = [r for r in mine if not r.skipped]
        good = [r for r in ran if r.ok]
        rows.append(
            Row(
                scenario,
                rounds=len(ran),
                failed=len(ran) - len(good),
                throughput=Spread.of([r.throughput for r in good]),
                p50_ms=Spread.of([r.p50_ms for r in good]),
                p99_ms=Spread.of([r.p99_ms for r in good]),
                peak_mib=Spread.of([r.peak_mib for r in good]),
                duplicates=sum(r.duplicates for r in good),
                rate=Spread.of([r.rate for r in good]),
                consumer_cpu_us=Spread.of([r.consumer_cpu_us for r in good]),
                publisher_cpu_us=Spread.of([r.publisher_cpu_us for r in good]),
                skipped=len(mine) - len(ran),
            )
        )
    return rows


def _find(rows: Sequence[Row], key: str, system: str = EVENTRELAY) -> Row | None:
    return next((r for r in rows if r.scenario.key == key and r.scenario.system == system), None)


def _all_failed(*rows: Row | None) -> bool:
    """Whether one of `rows` ran and every round of it failed: a target on it is not met (a failed round has
    no figures, so it would otherwise read as not measured)."""
    return any(row is not None and row.rounds > 0 and row.failed == row.rounds for row in rows)


def _check(value: float, ok: bool) -> bool | None:
    return None if math.isnan(value) else ok


def targets(rows: Sequence[Row]) -> list[Target]:
    """The targets of issue 16 (and issue 9's E1 latency, which issue 16 does not restate), each as its
    measured figure or ratio; a target whose rows did not run is listed as not measured, one with a row whose
    every round failed as not met."""
    found: list[Target] = []

    def add(name: str, value: float, ok: bool, shown: str, *involved: Row | None) -> None:
        if _all_failed(*involved):
            found.append(Target(name, "every round failed", False))
        else:
            found.append(Target(name, "" if math.isnan(value) else shown, _check(value, ok)))

    def ratio(name: str, row: Row | None, base: Row | None, floor: float) -> None:
        if row is None or base is None:
            add(name, math.nan, False, "", row, base)
            return
        r = row.throughput.ratio(base.throughput)
        figures = f"{row.throughput.median:,.0f} vs {base.throughput.median:,.0f}/s"
        add(name, r, r >= floor, f"{r:.2f}x ({figures})", row, base)

    raw_t, fs_t, er_t = (_find(rows, "e1.rabbitmq.throughput", s) for s in (RAW, FASTSTREAM, EVENTRELAY))
    ratio("E1 throughput >= 0.9x raw aio-pika", er_t, raw_t, 0.9)
    ratio("E1 throughput >= 1.0x FastStream", er_t, fs_t, 1.0)
    raw_l, er_l = _find(rows, "e1.rabbitmq.latency", RAW), _find(rows, "e1.rabbitmq.latency")
    if raw_l and er_l:
        d = er_l.p50_ms.median - raw_l.p50_ms.median
        shown = f"{d:+.2f} ms ({er_l.p50_ms.median:.2f} vs {raw_l.p50_ms.median:.2f})"
        found.append(Target("E1 latency p50 within 1 ms of raw (issue 9)", shown, _check(d, d <= 1.0)))
    else:
        found.append(Target("E1 latency p50 within 1 ms of raw (issue 9)", "", None))
    for per_unit, events_per_s in ((1, 1500), (100, 5000)):
        what = f"{per_unit} event{'s' if per_unit > 1 else ''}/UoW"
        e3 = _find(rows, f"e3.sqlite.uow{per_unit}")
        t = e3.throughput.median if e3 else math.nan
        add(
            f"E3 {what}, default subscribe >= {events_per_s:,} events/s",
            t,
            t >= events_per_s,
            f"{t:,.0f}/s",
            e3,
        )
        bare = _find(rows, f"e3.sqlite.bare.uow{per_unit}", BARE_SQLITE)
        ratio(f"E3 {what}, default subscribe >= 0.2x bare sqlite3 at {per_unit}/txn", e3, bare, 0.2)
    for per_unit in (1, 100):
        what = f"{per_unit} event{'s' if per_unit > 1 else ''}/UoW"
        hand = _find(rows, f"e2.rabbitmq.hand.uow{per_unit}", HAND_WRITTEN)
        name = f"E2 {what}, default subscribe >= 0.8x hand-written (per fetch) at {per_unit}/txn"
        ratio(name, _find(rows, f"e2.rabbitmq.uow{per_unit}"), hand, 0.8)
    ratio("E2 100 events/UoW >= 0.7x raw aio-pika direct", _find(rows, "e2.rabbitmq.uow100"), raw_t, 0.7)
    for prefix, label in (("e2.rabbitmq", "E2"), ("e3.sqlite", "E3")):
        for suffix, at in ((AT_RATE, f"{DURABLE_RATE:,.0f}/s"), (AT_HALF, "half the measured throughput")):
            row = _find(rows, f"{prefix}.{suffix}")
            paced = f" at {row.rate.median:,.0f}/s" if row and row.scenario.half_of else ""
            for q, v, ceiling in (
                ("p50", row.p50_ms.median if row else math.nan, 5.0),
                ("p99", row.p99_ms.median if row else math.nan, 25.0),
            ):
                name = f"{label} commit to handler {q} < {ceiling:.0f} ms at {at}"
                add(name, v, v < ceiling, f"{v:.2f} ms{paced}", row)
    backlog = _find(rows, "backlog.rabbitmq")
    if backlog:
        peak = backlog.peak_mib.high
        drained = backlog.failed == 0 and backlog.rounds > 0
        found.append(
            Target(
                f"Backlog of {backlog.scenario.n:,} drained, consumer peak < 200 MB",
                f"{'drained' if drained else 'NOT drained'}, peak {peak:.0f} MiB",
                _check(peak, drained and peak < 200),
            )
        )
    else:
        found.append(Target("Backlog drained, consumer peak < 200 MB", "", None))
    return found


def _fmt(spread: Spread, digits: int = 0) -> str:
    if math.isnan(spread.median):
        return ""
    return f"{spread.median:,.{digits}f} ({spread.low:,.{digits}f}-{spread.high:,.{digits}f})"


def by_hand(row: Row, rows: Sequence[Row]) -> Row | None:
    """The row of the same job written by hand in the same run, for an eventrelay throughput row at as many
    events per transaction: on E3 the bare sqlite3 row (default subscribe and batch=False alike); on E2 the
    hand-written row, with its per-fetch consumer for the default subscribe and its per-message one for
    batch=False."""
    s = row.scenario
    if s.system != EVENTRELAY or s.measure != "throughput":
        return None
    if s.key.startswith("e3.sqlite."):
        return _find(rows, f"e3.sqlite.bare.uow{s.per_unit}", BARE_SQLITE)
    if s.key.startswith("e2.rabbitmq."):
        mode = "" if s.batch else ".per-message"
        return _find(rows, f"e2.rabbitmq.hand.uow{s.per_unit}{mode}", HAND_WRITTEN)
    return None


def _by_hand_ratio(row: Row, rows: Sequence[Row]) -> str:
    base = by_hand(row, rows)
    r = row.throughput.ratio(base.throughput) if base else math.nan
    return "" if math.isnan(r) else f"{r:.2f}x"


def _ratios(row: Row, rows: Sequence[Row]) -> tuple[str, str]:
    """Throughput against raw aio-pika's and FastStream's E1 throughput in the same run; a request/reply row's
    round trips against FastStream's RPC on RabbitMQ, one at a time or as many in flight."""
    s = row.scenario
    if s.measure == "requests" and s.system == EVENTRELAY:
        base = _find(rows, f"request.rabbitmq.{s.key.rsplit('.', 1)[-1]}", FASTSTREAM)
        r = row.throughput.ratio(base.throughput) if base else math.nan
        return "", "" if math.isnan(r) else f"{r:.2f}x"
    if s.measure != "throughput" or s.system != EVENTRELAY:
        return "", ""
    out = []
    for system in (RAW, FASTSTREAM):
        base = _find(rows, "e1.rabbitmq.throughput", system)
        r = row.throughput.ratio(base.throughput) if base else math.nan
        out.append("" if math.isnan(r) else f"{r:.2f}x")
    return out[0], out[1]


HEADERS = (
    "scenario",
    "broker",
    "system",
    "events",
    "rounds",
    "events/s",
    "p50 ms",
    "p99 ms",
    "peak MiB",
    "CPU us/ev c/p",
    "vs by hand",
    "vs raw",
    "vs FastStream",
)


def cells(row: Row, rows: Sequence[Row]) -> list[str]:
    """The row as table cells: medians with (min-max) over the successful rounds; CPU per event as the
    consumer's and the publisher's medians."""
    s = row.scenario
    rounds = f"{row.rounds - row.failed}/{row.rounds}" + (f", {row.duplicates} dup" if row.duplicates else "")
    if row.skipped:
        rounds += f", {row.skipped} skipped"
    title = f"{s.title}: {_fmt(row.rate)}/s" if s.half_of and not math.isnan(row.rate.median) else s.title
    cpu = row.consumer_cpu_us.median, row.publisher_cpu_us.median
    return [
        title,
        s.broker,
        s.system,
        f"{s.n:,}",
        rounds,
        _fmt(row.throughput),
        _fmt(row.p50_ms, 2),
        _fmt(row.p99_ms, 2),
        _fmt(row.peak_mib),
        "" if math.isnan(cpu[0]) else f"{cpu[0]:,.0f}/{cpu[1]:,.0f}",
        _by_hand_ratio(row, rows),
        *_ratios(row, rows),
    ]


def rich_table(rows: Sequence[Row]) -> Table:
    """The figures for the terminal."""
    table = Table(title="eventrelay benchmark: medians (min-max)")
    for header in HEADERS:
        table.add_column(header, justify="left" if header in ("scenario", "broker", "system") else "right")
    for row in rows:
        table.add_row(*cells(row, rows), style="red" if row.failed else None)
    return table


def targets_table(found: Sequence[Target]) -> Table:
    table = Table(title="Targets of issue 16")
    for header in ("target", "measured", "met"):
        table.add_column(header)
    for t in found:
        table.add_row(t.name, t.measured, _verdict(t.met))
    return table


def _verdict(met: bool | None) -> str:
    return "not measured" if met is None else ("yes" if met else "**no**")


def markdown(rows: Sequence[Row], found: Sequence[Target], context: Sequence[str], plot_name: str) -> str:
    """The figures section of docs/benchmarks.md."""
    lines = [*context, "", "| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(cells(row, rows)) + " |" for row in rows]
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    lines += [f"| {t.name} | {t.measured} | {_verdict(t.met)} |" for t in found]
    lines += ["", f"![Throughput per scenario and system, medians with min-max whiskers]({plot_name})"]
    return "\n".join(lines)


def throughput_plot(rows: Sequence[Row]) -> str:
    """The SVG: throughput per scenario (grouped by title and broker), one bar per system; events/s only, so
    no request/reply round trips."""
    groups: list[str] = []
    values: dict[tuple[str, str], Spread] = {}
    for row in rows:
        if row.scenario.measure in ("latency", "requests") or math.isnan(row.throughput.median):
            continue
        group = f"{row.scenario.title.split(', ')[0]} {row.scenario.broker}"
        if row.scenario.per_unit > 1:
            group += " (100/UoW)"
        if not row.scenario.batch:
            group += " batch=False"
        if group not in groups:
            groups.append(group)
        values[(group, row.scenario.system)] = row.throughput
    return bar_chart("Throughput, events/s (higher is better)", "events/s", groups, list(PLOTTED), values)


def _figure(value: float, digits: int) -> float | None:
    return None if math.isnan(value) else round(value, digits)


def json_rows(rows: Sequence[Row]) -> list[dict[str, Any]]:
    """Every row as plain data for `--json`: medians over the successful rounds, None where a row has no such
    figure (a latency row has no events/s, a throughput row no p50), so a script can check the ratios.
    `rate_per_s` is the pace of a latency row (a half-rate row's median); `consumer_cpu_us` and
    `publisher_cpu_us` are each process's CPU per event in microseconds. `rounds` counts the successful
    rounds, `failed` the others, `skipped` those not run."""
    return [
        {
            "key": row.scenario.key,
            "title": row.scenario.title,
            "system": row.scenario.system,
            "broker": row.scenario.broker,
            "events_per_s": _figure(row.throughput.median, 1),
            "p50_ms": _figure(row.p50_ms.median, 3),
            "p99_ms": _figure(row.p99_ms.median, 3),
            "rate_per_s": _figure(row.rate.median, 1),
            "consumer_cpu_us": _figure(row.consumer_cpu_us.median, 1),
            "publisher_cpu_us": _figure(row.publisher_cpu_us.median, 1),
            "rounds": row.rounds - row.failed,
            "failed": row.failed,
            "skipped": row.skipped,
        }
        for row in rows
    ]


def write_json(path: Path, rows: Sequence[Row]) -> None:
    """`json_rows` into `path`."""
    path.write_text(json.dumps(json_rows(rows), indent=2) + "\n")


def write_docs(path: Path, section: str) -> None:
    """Replace what lies between the markers of `path` with `section` (the markers stay)."""
    text = path.read_text()
    if BEGIN not in text or END not in text:
        raise ValueError(f"{path} lacks the markers {BEGIN} and {END}")
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.DOTALL)
    path.write_text(pattern.sub(lambda _: f"{BEGIN}\n{section}\n{END}", text, count=1))
