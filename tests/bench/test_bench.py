"""The benchmark harness (bench/): its statistics, report and plot, and one tiny round end to end.

No figure is asserted here: a benchmark is never a timed test. The smoke round checks what the harness
checks, that every event arrived and every row was written.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path

from bench.payload import SIZE, body, event, stamp_of
from bench.plot import bar_chart, nice_top
from bench.run import run_round
from bench.scenarios import BARE_SQLITE, EVENTRELAY, FASTSTREAM, HAND_WRITTEN, RAW, Scenario, all_scenarios
from bench.stats import Spread, percentile

from bench import report
from eventrelay.codec import encode_body

SVG = "{http://www.w3.org/2000/svg}"
JSON_KEYS = ("key", "system", "broker", "events_per_s", "p50_ms", "p99_ms", "rounds")


def test_percentile_is_the_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile([3.0], 99) == 3.0
    assert math.isnan(percentile([], 50))


def test_spread_is_the_median_with_the_lowest_and_highest_round() -> None:
    assert Spread.of([3.0, 1.0, 2.0, math.nan]) == Spread(2.0, 1.0, 3.0)
    assert Spread(300.0, 0, 0).ratio(Spread(200.0, 0, 0)) == 1.5
    assert math.isnan(Spread.of([]).median)


def test_the_baselines_send_the_bytes_eventrelay_sends() -> None:
    assert body(7, 123) == encode_body(event(7, 123))
    assert abs(len(body(7, 123)) - SIZE) <= 16
    assert stamp_of(body(7, 123)) == (7, 123)


def _row(
    key: str, system: str, measure: str, throughput: float = math.nan, p50: float = math.nan
) -> report.Row:
    scenario = Scenario(key, key, measure, system, "rabbitmq", 100)
    nan = Spread.of([])
    return report.Row(scenario, 3, 0, Spread.of([throughput]), Spread.of([p50]), Spread.of([p50 * 4]), nan, 0)


def test_targets_are_ratios_to_the_baselines_of_the_same_run() -> None:
    rows = [
        _row("e1.rabbitmq.throughput", RAW, "throughput", throughput=1000),
        _row("e1.rabbitmq.throughput", FASTSTREAM, "throughput", throughput=800),
        _row("e1.rabbitmq.throughput", EVENTRELAY, "throughput", throughput=1100),
        _row("e1.rabbitmq.latency", RAW, "latency", p50=1.0),
        _row("e1.rabbitmq.latency", EVENTRELAY, "latency", p50=2.5),
    ]
    found = {t.name: t for t in report.targets(rows)}
    assert found["E1 throughput >= 0.9x raw aio-pika"].measured == "1.10x (1,100 vs 1,000/s)"
    assert found["E1 throughput >= 0.9x raw aio-pika"].met is True
    assert found["E1 throughput >= 1.0x FastStream"].met is True  # 1.375x
    assert found["E1 latency p50 within 1 ms of raw (issue 9)"].met is False  # +1.5 ms
    assert report.cells(rows[2], rows)[-2:] == ["1.10x", "1.38x"]
    # Every other target is listed, as not measured: its rows did not run.
    assert found["E3 1 event/UoW, default subscribe >= 1,500 events/s"].met is None
    assert found["E3 commit to handler p99 < 25 ms"].met is None
    assert report.targets_table(list(found.values())).row_count == len(found)


def test_the_targets_of_issue_16_on_e3_are_figures_and_ratios_to_the_bare_queue() -> None:
    def row(
        key: str, system: str, measure: str, throughput: float = math.nan, p50: float = math.nan
    ) -> report.Row:
        scenario = Scenario(
            key, key, measure, system, "sqlite", 100, rate=1000.0 if measure == "latency" else None
        )
        nan = Spread.of([])
        return report.Row(
            scenario, 1, 0, Spread.of([throughput]), Spread.of([p50]), Spread.of([p50 * 4]), nan, 0
        )

    rows = [
        row("e3.sqlite.uow1", EVENTRELAY, "throughput", throughput=1600),
        row("e3.sqlite.uow100", EVENTRELAY, "throughput", throughput=4000),
        row("e3.sqlite.bare.uow1", BARE_SQLITE, "throughput", throughput=5000),
        row("e3.sqlite.bare.uow100", BARE_SQLITE, "throughput", throughput=30000),
        row("e3.sqlite.latency", EVENTRELAY, "latency", p50=4.0),
    ]
    found = {t.name: (t.measured, t.met) for t in report.targets(rows)}
    assert found["E3 1 event/UoW, default subscribe >= 1,500 events/s"] == ("1,600/s", True)
    assert found["E3 1 event/UoW, default subscribe >= 0.2x bare sqlite3 at 1/txn"] == (
        "0.32x (1,600 vs 5,000/s)",
        True,
    )
    assert found["E3 100 events/UoW, default subscribe >= 5,000 events/s"] == ("4,000/s", False)
    assert found["E3 100 events/UoW, default subscribe >= 0.2x bare sqlite3 at 100/txn"][1] is False  # 0.13x
    assert found["E3 commit to handler p50 < 5 ms at 1,000/s"] == ("4.00 ms", True)
    assert found["E3 commit to handler p99 < 25 ms at 1,000/s"] == ("16.00 ms", True)
    assert found["E2 1 event/UoW, default subscribe >= 0.8x hand-written (per fetch) at 1/txn"] == ("", None)


def test_the_plot_is_an_svg_with_a_bar_per_figure() -> None:
    values = {("E1", RAW): Spread(900, 800, 1000), ("E1", EVENTRELAY): Spread(1200, 1100, 1300)}
    svg = ET.fromstring(bar_chart("t", "events/s", ["E1", "E2"], [RAW, EVENTRELAY], values))
    bars = [r for r in svg.iter(f"{SVG}rect") if r.find(f"{SVG}title") is not None]
    assert [b.findtext(f"{SVG}title") for b in bars] == [
        "raw aio-pika: 900 events/s",
        "eventrelay: 1,200 events/s",
    ]
    assert nice_top(1300) == 2000
    assert nice_top(0.3) == 0.5


def test_the_figures_replace_what_lies_between_the_markers(tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    doc.write_text(f"intro\n{report.BEGIN}\nold figures\n{report.END}\nnote\n")
    report.write_docs(doc, "new figures")
    assert doc.read_text() == f"intro\n{report.BEGIN}\nnew figures\n{report.END}\nnote\n"


def test_default_scenarios_are_bounded_and_cover_the_issue() -> None:
    scenarios = all_scenarios(backlog=100_000)
    keys = {s.key for s in scenarios}
    assert {"e1.rabbitmq.throughput", "e2.rabbitmq.uow100", "e3.sqlite.latency", "backlog.rabbitmq"} <= keys
    assert {f"e1.{b}.throughput" for b in ("nats", "redis", "kafka")} <= keys
    assert all(s.n % s.per_unit == 0 and s.timeout < 600 for s in scenarios)


def test_a_tiny_embedded_round_delivers_every_event_and_writes_every_row() -> None:
    scenario = Scenario(
        "e3.sqlite.uow1", "smoke", "throughput", EVENTRELAY, "sqlite", 40, durable=True, window=4
    )
    result = run_round(scenario, kafka=None)
    assert result.ok, result.problem  # every event arrived, and the handler's table holds a row for each
    assert result.duplicates == 0
    assert result.throughput > 0


def test_json_has_every_row_with_null_where_a_figure_does_not_apply(tmp_path: Path) -> None:
    rows = [
        _row("e1.rabbitmq.throughput", RAW, "throughput", throughput=1000),
        _row("e1.rabbitmq.latency", EVENTRELAY, "latency", p50=2.5),
    ]
    path = tmp_path / "bench.json"
    report.write_json(path, rows)
    found = json.loads(path.read_text())
    assert [{k: r[k] for k in JSON_KEYS} for r in found] == [
        {
            "key": "e1.rabbitmq.throughput",
            "system": RAW,
            "broker": "rabbitmq",
            "events_per_s": 1000.0,
            "p50_ms": None,
            "p99_ms": None,
            "rounds": 3,
        },
        {
            "key": "e1.rabbitmq.latency",
            "system": EVENTRELAY,
            "broker": "rabbitmq",
            "events_per_s": None,
            "p50_ms": 2.5,
            "p99_ms": 10.0,
            "rounds": 3,
        },
    ]


def test_the_written_by_hand_baselines_import_neither_eventrelay_nor_sqlalchemy() -> None:
    check = (
        "import sys, bench.bare_sqlite, bench.hand_written; "
        "assert not {'eventrelay', 'sqlalchemy'} & set(sys.modules), sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", check], check=True, cwd=Path(__file__).parents[2])


def test_a_tiny_bare_sqlite3_round_delivers_every_event_and_writes_every_row() -> None:
    for scenario in all_scenarios(backlog=100_000):
        if scenario.system == BARE_SQLITE:
            result = run_round(replace(scenario, n=4 * scenario.per_unit * scenario.window), kafka=None)
            assert result.ok, result.problem
            assert result.duplicates == 0


def test_e3_rows_are_compared_with_the_bare_queue_at_as_many_events_per_transaction() -> None:
    scenarios = {(s.key, s.system): s for s in all_scenarios(backlog=100_000)}
    bare = [s for s in scenarios.values() if s.system == BARE_SQLITE]
    assert {(s.key, s.per_unit) for s in bare} == {("e3.sqlite.bare.uow1", 1), ("e3.sqlite.bare.uow100", 100)}

    def row(key: str, system: str, throughput: float) -> report.Row:
        nan = Spread.of([])
        return report.Row(scenarios[key, system], 1, 0, Spread.of([throughput]), nan, nan, nan, 0)

    rows = [
        row("e3.sqlite.uow100", EVENTRELAY, 3000),
        row("e3.sqlite.uow100.one-by-one", EVENTRELAY, 1500),
        row("e3.sqlite.bare.uow1", BARE_SQLITE, 5000),
        row("e3.sqlite.bare.uow100", BARE_SQLITE, 30000),
    ]
    by_hand = report.HEADERS.index("vs by hand")
    assert [report.cells(r, rows)[by_hand] for r in rows] == ["0.10x", "0.05x", "", ""]


def test_e2_rows_are_compared_with_the_hand_written_outbox_in_the_matching_consumer_mode() -> None:
    scenarios = {(s.key, s.system): s for s in all_scenarios(backlog=100_000)}

    def row(key: str, system: str, throughput: float) -> report.Row:
        nan = Spread.of([])
        return report.Row(scenarios[key, system], 1, 0, Spread.of([throughput]), nan, nan, nan, 0)

    rows = [
        row("e2.rabbitmq.uow100", EVENTRELAY, 2000),
        row("e2.rabbitmq.uow100.one-by-one", EVENTRELAY, 600),
        row("e2.rabbitmq.hand.uow100", HAND_WRITTEN, 2500),
        row("e2.rabbitmq.hand.uow100.per-message", HAND_WRITTEN, 1200),
    ]
    by_hand = report.HEADERS.index("vs by hand")
    assert [report.cells(r, rows)[by_hand] for r in rows] == ["0.80x", "0.50x", "", ""]
    found = {t.name: t for t in report.targets(rows)}
    assert (
        found["E2 100 events/UoW, default subscribe >= 0.8x hand-written (per fetch) at 100/txn"].met is True
    )
    assert found["E2 1 event/UoW, default subscribe >= 0.8x hand-written (per fetch) at 1/txn"].met is None


def test_a_target_whose_row_failed_every_round_is_not_met() -> None:
    scenario = next(s for s in all_scenarios(backlog=100_000) if s.key == "e3.sqlite.uow1")
    nan = Spread.of([])
    failed = report.Row(scenario, 2, 2, nan, nan, nan, nan, 0)
    found = {t.name: t for t in report.targets([failed])}
    target = found["E3 1 event/UoW, default subscribe >= 1,500 events/s"]
    assert (target.measured, target.met) == ("every round failed", False)
    assert (
        found["E3 1 event/UoW, default subscribe >= 0.2x bare sqlite3 at 1/txn"].met is False
    )  # even without a bare row
