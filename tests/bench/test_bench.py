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
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from bench.payload import SIZE, answer, body, event, question, request_body, stamp_of
from bench.plot import bar_chart, nice_top
from bench.run import RoundResult, run_round
from bench.scenarios import BARE_SQLITE, EVENTRELAY, FASTSTREAM, HAND_WRITTEN, RAW, Scenario, all_scenarios
from bench.stats import Spread, percentile

from bench import report, run
from eventrelay.codec import encode_body
from tests.servers import require_server

SVG = "{http://www.w3.org/2000/svg}"
JSON_KEYS = (
    "key",
    "system",
    "broker",
    "events_per_s",
    "p50_ms",
    "p99_ms",
    "rate_per_s",
    "consumer_cpu_us",
    "publisher_cpu_us",
    "rounds",
    "skipped",
)
DECLARED = {(s.key, s.system): s for s in all_scenarios(backlog=100_000)}


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


def test_the_faststream_rpc_sends_the_bytes_eventrelay_sends() -> None:
    assert request_body(7, 123) == encode_body(question(7, 123))
    assert body(7, 123) == encode_body(answer(question(7, 123)))


# eventrelay's rows only: FastStream is the bench extra's (`make bench` installs it), not `make test`'s.
@pytest.mark.parametrize(
    ("broker", "system", "port"), [("rabbitmq", EVENTRELAY, 5672), ("nats", EVENTRELAY, 4222)]
)
def test_a_tiny_request_round_answers_every_request(broker: str, system: str, port: int) -> None:
    require_server(broker, port)
    scenario = DECLARED[f"request.{broker}.concurrent", system]
    result = run_round(replace(scenario, n=2 * scenario.window), kafka=None)
    assert result.ok, result.problem  # each request arrived, and each reply answered its own request
    assert result.throughput > 0
    assert result.p50_ms <= result.p99_ms


def test_request_rows_are_compared_with_faststream_rpc_in_the_same_mode() -> None:
    rows = [
        _declared("request.rabbitmq.sequential", FASTSTREAM, throughput=200, p50=4.0),
        _declared("request.rabbitmq.sequential", throughput=300, p50=3.0),
        _declared("request.rabbitmq.concurrent", FASTSTREAM, throughput=250, p50=100.0),
        _declared("request.nats.concurrent", throughput=1000, p50=30.0),
    ]
    columns = [report.HEADERS.index(h) for h in ("p50 ms", "vs raw", "vs FastStream")]
    assert [[report.cells(r, rows)[c] for c in columns] for r in rows] == [
        ["4.00 (4.00-4.00)", "", ""],
        ["3.00 (3.00-3.00)", "", "1.50x"],
        ["100.00 (100.00-100.00)", "", ""],
        ["30.00 (30.00-30.00)", "", "4.00x"],
    ]
    assert "Request/reply" not in report.throughput_plot(rows)  # round trips are not events/s


def _row(
    key: str, system: str, measure: str, throughput: float = math.nan, p50: float = math.nan
) -> report.Row:
    scenario = Scenario(key, key, measure, system, "rabbitmq", 100)
    nan = Spread.of([])
    return report.Row(scenario, 3, 0, Spread.of([throughput]), Spread.of([p50]), Spread.of([p50 * 4]), nan, 0)


def _declared(
    key: str,
    system: str = EVENTRELAY,
    throughput: float = math.nan,
    p50: float = math.nan,
    rate: float = math.nan,
) -> report.Row:
    """A row of one round of the scenario `all_scenarios` declares under `key` (p99 four times p50)."""
    return report.Row(
        DECLARED[key, system],
        1,
        0,
        Spread.of([throughput]),
        Spread.of([p50]),
        Spread.of([p50 * 4]),
        report.NONE,
        0,
        rate=Spread.of([rate]),
    )


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
    assert found["E3 commit to handler p99 < 25 ms at 200/s"].met is None
    assert found["E2 commit to handler p50 < 5 ms at half the measured throughput"].met is None
    assert report.targets_table(list(found.values())).row_count == len(found)


def test_the_targets_of_issue_16_on_e3_are_figures_and_ratios_to_the_bare_queue() -> None:
    rows = [
        _declared("e3.sqlite.uow1", throughput=1600),
        _declared("e3.sqlite.uow100", throughput=4000),
        _declared("e3.sqlite.bare.uow1", BARE_SQLITE, throughput=5000),
        _declared("e3.sqlite.bare.uow100", BARE_SQLITE, throughput=30000),
    ]
    found = {t.name: (t.measured, t.met) for t in report.targets(rows)}
    assert found["E3 1 event/UoW, default subscribe >= 1,500 events/s"] == ("1,600/s", True)
    assert found["E3 1 event/UoW, default subscribe >= 0.2x bare sqlite3 at 1/txn"] == (
        "0.32x (1,600 vs 5,000/s)",
        True,
    )
    assert found["E3 100 events/UoW, default subscribe >= 5,000 events/s"] == ("4,000/s", False)
    assert found["E3 100 events/UoW, default subscribe >= 0.2x bare sqlite3 at 100/txn"][1] is False  # 0.13x
    assert found["E2 1 event/UoW, default subscribe >= 0.8x hand-written (per fetch) at 1/txn"] == ("", None)
    assert found["E3 commit to handler p99 < 25 ms at 200/s"] == ("", None)


@pytest.mark.parametrize(
    ("prefix", "label", "half_p50"), [("e2.rabbitmq", "E2", 4.5), ("e3.sqlite", "E3", 7.0)]
)
def test_commit_to_handler_is_a_target_at_200_per_s_and_at_half_the_throughput(
    prefix: str, label: str, half_p50: float
) -> None:
    rows = [
        _declared(f"{prefix}.latency200", p50=3.0, rate=200),
        _declared(f"{prefix}.latency-half", p50=half_p50, rate=312.4),
        _declared("e2.rabbitmq.hand.latency-half", HAND_WRITTEN, p50=1.0, rate=600),  # not a target
    ]
    found = {t.name: (t.measured, t.met) for t in report.targets(rows)}
    assert found[f"{label} commit to handler p50 < 5 ms at 200/s"] == ("3.00 ms", True)
    assert found[f"{label} commit to handler p99 < 25 ms at 200/s"] == ("12.00 ms", True)  # p99 is 4x p50
    half = f"{label} commit to handler {{}} at half the measured throughput"
    assert found[half.format("p50 < 5 ms")] == (f"{half_p50:.2f} ms at 312/s", half_p50 < 5)
    assert found[half.format("p99 < 25 ms")] == (f"{4 * half_p50:.2f} ms at 312/s", 4 * half_p50 < 25)
    title = report.cells(rows[1], rows)[0]
    assert title.endswith(" commit to handler at half the 1 event/UoW throughput: 312 (312-312)/s")


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
    assert {
        "e1.rabbitmq.throughput",
        "e2.rabbitmq.uow100",
        "e3.sqlite.latency200",
        "backlog.rabbitmq",
    } <= keys
    assert {f"e1.{b}.throughput" for b in ("nats", "redis", "kafka")} <= keys
    assert {f"request.{b}.{m}" for b in ("rabbitmq", "nats") for m in ("sequential", "concurrent")} <= keys
    assert {s.key for s in scenarios if s.system == FASTSTREAM and s.measure == "requests"} == {
        "request.rabbitmq.sequential",
        "request.rabbitmq.concurrent",
    }
    assert all(s.n % s.per_unit == 0 and s.timeout < 600 for s in scenarios)
    assert {(s.key, s.per_unit) for s in scenarios if s.system == BARE_SQLITE} == {
        ("e3.sqlite.bare.uow1", 1),
        ("e3.sqlite.bare.uow100", 100),
    }


def test_each_durable_system_has_latency_rows_at_200_per_s_and_at_half_its_throughput() -> None:
    scenarios = all_scenarios(backlog=100_000)
    latency = {
        (s.key, s.system): s for s in scenarios if s.measure == "latency" and s.key[:2] in ("e2", "e3")
    }
    at_200 = {key for (key, _), s in latency.items() if s.rate == 200}
    halves = {key: s for (key, _), s in latency.items() if s.half_of}
    for prefix in ("e2.rabbitmq", "e2.rabbitmq.hand", "e3.sqlite", "e2.nats", "e2.redis", "e2.kafka"):
        assert f"{prefix}.latency200" in at_200
        assert f"{prefix}.latency-half" in halves
    # batch=False keeps its row at 200/s only.
    assert {"e2.rabbitmq.latency200.one-by-one", "e3.sqlite.latency200.one-by-one"} <= at_200
    assert not [key for key in halves if "one-by-one" in key]
    assert at_200 | set(halves) == {key for key, _ in latency}  # no durable row at another fixed rate
    order = [(s.key, s.system) for s in scenarios]
    for half in halves.values():
        assert half.rate is None
        assert half.half_of is not None
        measured = DECLARED[half.half_of, half.system]
        assert (measured.measure, measured.per_unit, measured.batch) == ("throughput", 1, True)
        assert order.index((measured.key, half.system)) < order.index((half.key, half.system))


def _fake_round(throughputs: dict[str, list[float]], ran: list[Scenario]) -> Callable[..., RoundResult]:
    """A stand-in for `run_round`: each throughput row's next figure (NaN: a failed round); every other row
    passes, at its rate."""

    def fake(scenario: Scenario, kafka: str | None) -> RoundResult:
        ran.append(scenario)
        if scenario.key in throughputs:
            t = throughputs[scenario.key].pop(0)
            return RoundResult(scenario.key, scenario.system, ok=not math.isnan(t), throughput=t)
        return RoundResult(scenario.key, scenario.system, ok=True, p50_ms=1.0, rate=scenario.rate or math.nan)

    return fake


def test_the_half_rate_row_runs_at_half_its_throughput_in_the_same_round(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    uow1, half = DECLARED["e2.rabbitmq.uow1", EVENTRELAY], DECLARED["e2.rabbitmq.latency-half", EVENTRELAY]
    ran: list[Scenario] = []
    # Round 2's throughput round failed: its half-rate row falls back on the median of the rounds so far.
    monkeypatch.setattr(run, "run_round", _fake_round({uow1.key: [1000.0, math.nan, 600.0]}, ran))
    results = run.run_all([uow1, half], 3, None, lambda *_: None)
    assert [r.rate for r in results if r.key == half.key] == [500.0, 500.0, 300.0]
    assert [s.rate for s in ran if s.key == half.key] == [500.0, 500.0, 300.0]
    [row] = report.summarize([half], results)
    assert (row.rate.median, row.rounds, row.failed, row.skipped) == (500.0, 3, 0, 0)


def test_a_half_rate_row_without_its_throughput_row_is_skipped_with_a_note(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    half = DECLARED["e3.sqlite.latency-half", EVENTRELAY]
    ran: list[Scenario] = []
    monkeypatch.setattr(run, "run_round", _fake_round({}, ran))
    [result] = run.run_all([half], 1, None, lambda *_: None)  # as under `--only =e3.sqlite.latency-half`
    assert ran == []
    assert (result.ok, result.skipped) == (False, True)
    assert "no throughput of e3.sqlite.uow1 (eventrelay)" in result.problem
    rows = report.summarize([half], [result])
    assert (rows[0].rounds, rows[0].failed, rows[0].skipped) == (0, 0, 1)
    assert report.cells(rows[0], rows)[report.HEADERS.index("rounds")] == "0/0, 1 skipped"
    found = {t.name: t.met for t in report.targets(rows)}
    assert found["E3 commit to handler p50 < 5 ms at half the measured throughput"] is None  # not measured
    with pytest.raises(ValueError, match="needs its rate"):
        run_round(half, kafka=None)


def test_a_tiny_embedded_round_delivers_every_event_and_writes_every_row() -> None:
    scenario = Scenario(
        "e3.sqlite.uow1", "smoke", "throughput", EVENTRELAY, "sqlite", 40, durable=True, window=4
    )
    result = run_round(scenario, kafka=None)
    assert result.ok, result.problem  # every event arrived, and the handler's table holds a row for each
    assert result.duplicates == 0
    assert result.throughput > 0
    assert result.consumer_cpu_us > 0
    assert result.publisher_cpu_us > 0


def test_json_has_every_row_with_null_where_a_figure_does_not_apply(tmp_path: Path) -> None:
    rows = [
        replace(
            _row("e1.rabbitmq.throughput", RAW, "throughput", throughput=1000),
            consumer_cpu_us=Spread.of([310.0, 330.0]),
            publisher_cpu_us=Spread.of([420.04]),
        ),
        replace(_row("e1.rabbitmq.latency", EVENTRELAY, "latency", p50=2.5), rate=Spread.of([500.0])),
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
            "rate_per_s": None,
            "consumer_cpu_us": 320.0,
            "publisher_cpu_us": 420.0,
            "rounds": 3,
            "skipped": 0,
        },
        {
            "key": "e1.rabbitmq.latency",
            "system": EVENTRELAY,
            "broker": "rabbitmq",
            "events_per_s": None,
            "p50_ms": 2.5,
            "p99_ms": 10.0,
            "rate_per_s": 500.0,
            "consumer_cpu_us": None,
            "publisher_cpu_us": None,
            "rounds": 3,
            "skipped": 0,
        },
    ]
    cpu_column = report.HEADERS.index("CPU us/ev c/p")
    assert [report.cells(r, rows)[cpu_column] for r in rows] == ["320/420", ""]


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
            assert result.consumer_cpu_us > 0
            assert result.publisher_cpu_us > 0


@pytest.mark.parametrize(
    ("throughputs", "expected"),
    [
        pytest.param(
            [
                ("e3.sqlite.uow100", EVENTRELAY, 3000),
                ("e3.sqlite.uow100.one-by-one", EVENTRELAY, 1500),
                ("e3.sqlite.bare.uow1", BARE_SQLITE, 5000),
                ("e3.sqlite.bare.uow100", BARE_SQLITE, 30000),
            ],
            ["0.10x", "0.05x", "", ""],
            id="e3-bare-queue-at-as-many-events-per-transaction",
        ),
        pytest.param(
            [
                ("e2.rabbitmq.uow100", EVENTRELAY, 2000),
                ("e2.rabbitmq.uow100.one-by-one", EVENTRELAY, 600),
                ("e2.rabbitmq.hand.uow100", HAND_WRITTEN, 2500),
                ("e2.rabbitmq.hand.uow100.per-message", HAND_WRITTEN, 1200),
            ],
            ["0.80x", "0.50x", "", ""],
            id="e2-hand-written-in-the-matching-consumer-mode",
        ),
    ],
)
def test_throughput_rows_are_compared_with_the_same_job_written_by_hand(
    throughputs: list[tuple[str, str, float]], expected: list[str]
) -> None:
    rows = [_declared(key, system, throughput=t) for key, system, t in throughputs]
    by_hand = report.HEADERS.index("vs by hand")
    assert [report.cells(r, rows)[by_hand] for r in rows] == expected


def test_the_targets_of_issue_16_on_e2_compare_with_the_hand_written_per_fetch_consumer() -> None:
    rows = [
        _declared("e2.rabbitmq.uow100", throughput=2000),
        _declared("e2.rabbitmq.hand.uow100", HAND_WRITTEN, throughput=2500),
    ]
    found = {t.name: (t.measured, t.met) for t in report.targets(rows)}
    assert (
        found["E2 100 events/UoW, default subscribe >= 0.8x hand-written (per fetch) at 100/txn"][1] is True
    )
    assert found["E2 1 event/UoW, default subscribe >= 0.8x hand-written (per fetch) at 1/txn"] == ("", None)
    assert found["E2 100 events/UoW >= 0.7x raw aio-pika direct"] == ("", None)


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
