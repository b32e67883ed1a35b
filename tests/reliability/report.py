"""Render the reliability suite's figures (the JSON file it writes) as the table of `docs/reliability.md`.

    python -m tests.reliability.report                      # print the table of the last run
    python -m tests.reliability.report --write docs/reliability.md   # and put it in the document
                                                     # (the CI-size or the full-size table, as the run was)
    python -m tests.reliability.report a.json b.json   # one table of several runs (parts of the suite)
    python -m tests.reliability.report f.json --write docs/reliability.md --section full-crashes
                                                     # a part re-run, into a section of its own

The suite prints the same table (the same function renders both) at the end of its run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

MARKERS = "<!-- figures:{run}:begin -->", "<!-- figures:{run}:end -->"  # run: "ci", "full" or a section
BROKERS = ("memory", "sqlite", "postgresql", "rabbitmq", "redis", "nats", "kafka")  # the table's order
COLUMNS = ("scenario", "broker", "sent", "delivered", "duplicates", "dead letters", "recovery (s)", "notes")


def _cell(row: dict[str, Any], column: str) -> str:
    if column == "dead letters":
        return str(row["dead_letters"])
    if column == "recovery (s)":
        return "-" if row["recovery_s"] is None else f"{row['recovery_s']:.2f}"
    return str(row[column])


def render(data: dict[str, Any]) -> str:
    """The figures as a Markdown table, preceded by the sizes they were measured at."""
    sizes = ", ".join(f"{name}={value}" for name, value in data["sizes"].items())
    lines = [
        f"Run: {'full sizes (make reliability)' if data['full'] else 'CI sizes (make test)'}; {sizes}",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join(" --- " for _ in COLUMNS) + "|",
    ]
    # Sorted: tests run in any order (pytest-xdist workers), the table reads the same.
    order = {broker: index for index, broker in enumerate(BROKERS)}
    for row in sorted(data["rows"], key=lambda row: (row["scenario"], order.get(row["broker"], len(order)))):
        lines.append("| " + " | ".join(_cell(row, column) for column in COLUMNS) + " |")
    return "\n".join(lines)


def merge(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One run's figures out of several runs of parts of the suite, all at the same sizes."""
    first = runs[0]
    if any(run["full"] != first["full"] or run["sizes"] != first["sizes"] for run in runs):
        raise SystemExit("These runs were measured at different sizes: render them one by one")
    return {**first, "rows": [row for run in runs for row in run["rows"]]}


def write(document: Path, table: str, run: str) -> None:
    """Replace what stands between the figure markers of `run` ("ci" or "full") in `document` with `table`."""
    begin, end = (marker.format(run=run) for marker in MARKERS)
    text = document.read_text()
    head, found_begin, rest = text.partition(begin)
    _, found_end, tail = rest.partition(end)
    if not found_begin or not found_end:
        raise SystemExit(f"{document} has no {begin} ... {end} section")
    document.write_text(f"{head}{begin}\n{table}\n{end}{tail}")


def main(argv: list[str] | None = None) -> None:
    from tests.reliability.harness import report_path

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("figures", nargs="*", type=Path, help="JSON files of runs (default: the last run)")
    parser.add_argument("--write", type=Path, metavar="DOCUMENT", help="put the table into DOCUMENT")
    parser.add_argument("--section", help="the markers to write between (default: ci or full, as run)")
    args = parser.parse_args(argv)
    files: list[Path] = args.figures or [report_path()]
    if missing := [str(path) for path in files if not path.exists()]:
        sys.exit(f"No figures at {', '.join(missing)}: run the suite first (make reliability)")
    data = merge([json.loads(path.read_text()) for path in files])
    table = render(data)
    print(table)
    if args.write:
        write(args.write, table, args.section or ("full" if data["full"] else "ci"))
        print(f"\nwritten to {args.write}")


if __name__ == "__main__":
    main()
