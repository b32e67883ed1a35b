"""Versions in the contract commands: `eventrelay events` and `schema` show an event's version and the older
versions its upcasters read; the snapshot records them, and `schema --check` tells a version raised with an
upcaster chain from the old one (what then breaks only older messages is safe) from one raised without.

Upcasters are registered by event name for the life of the process, so each test names its event anew.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from eventrelay.cli import main
from tests.cli.test_schema_check import app, schema

FIELDS = """
    order_id: int
    note: str = ""
"""


@pytest.fixture
def name() -> str:
    return f"Versions.OrderPlaced{uuid.uuid4().hex[:8]}"


def shop(name: str, version: int = 1, fields: str = FIELDS, upcasters: str = "") -> str:
    """The shop's module: one event at `version` with `fields`, and these upcasters."""
    return (
        "from typing import Any\n\nfrom eventrelay import upcaster\n\n\n"
        f'class OrderPlaced(Event, name="{name}", version={version}):\n{fields}\n\n'
        f"{upcasters}\n"
        'service = Service("Shop", broker="memory://", publishes=[OrderPlaced])\n'
    )


def upcaster_from(version: int, returns: str = "body") -> str:
    return (
        f"@upcaster(OrderPlaced, from_version={version})\n"
        f"def from_{version}(body: dict[str, Any]) -> dict[str, Any]:\n    return {returns}\n\n\n"
    )


def check(folder: Path, old: str, new: str, *options: str) -> Result:
    """Snapshot the `old` module, then check the `new` one against it."""
    written = schema(app(folder, old), "--write", "contracts.lock.json")
    assert written.exit_code == 0, written.output
    return schema(app(folder, new), "--check", "contracts.lock.json", *options)


def test_a_required_field_added_with_the_version_raised_and_an_upcaster_passes(
    app_folder: Path, name: str
) -> None:
    new = shop(name, 2, FIELDS + "    total: int\n", upcaster_from(1, '{**body, "total": 0}'))

    result = check(app_folder, shop(name), new)

    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        "The contracts of Shop are compatible with contracts.lock.json; safe changes:",
        f"  - {name}: version 1 -> 2, with upcasters from version 1",
        f"  - {name} total: a required field added without a default: messages without it fail, but the "
        "upcasters from version 1 bring older messages up",
        "Record them with --write contracts.lock.json",
    ]


def test_a_required_field_added_at_the_same_version_says_to_raise_it_with_an_upcaster(
    app_folder: Path, name: str
) -> None:
    result = check(app_folder, shop(name), shop(name, 1, FIELDS + "    total: int\n"))

    assert result.exit_code == 1
    assert result.output.splitlines()[1] == (
        f"  - {name} total: a required field added without a default: messages without it fail "
        "(to keep older messages, raise its version above 1 with an upcaster from 1)"
    )


def test_a_version_raised_without_an_upcaster_from_the_old_one_breaks_old_messages(
    app_folder: Path, name: str
) -> None:
    result = check(app_folder, shop(name), shop(name, 3, upcasters=upcaster_from(2)), "--json")

    assert result.exit_code == 1
    assert json.loads(result.output)["breaking"] == [
        {
            "event": name,
            "path": "",
            "reason": "version 1 -> 3 with no upcaster from version 1: messages of version 1 still queued or "
            "dead-lettered fail; register @upcaster(OrderPlaced, from_version=1)",
        }
    ]


def test_a_chain_of_upcasters_from_the_recorded_version_passes(app_folder: Path, name: str) -> None:
    old = shop(name, 2, upcasters=upcaster_from(1))

    result = check(app_folder, old, shop(name, 3, upcasters=upcaster_from(1) + upcaster_from(2)))

    assert result.exit_code == 0, result.output
    assert f"  - {name}: version 2 -> 3, with upcasters from version 2" in result.output.splitlines()


def test_a_rename_with_an_upcaster_still_breaks_consumers_on_the_old_copy(
    app_folder: Path, name: str
) -> None:
    renamed = FIELDS.replace("order_id", "order_number")
    upcast = upcaster_from(1, '{"order_number": body["order_id"], "note": body.get("note", "")}')

    result = check(app_folder, shop(name), shop(name, 2, renamed, upcast))

    assert result.exit_code == 1
    assert result.output.splitlines() == [
        "1 breaking change(s) in the contracts of Shop against contracts.lock.json:",
        f"  - {name} order_id: a required field removed: consumers on the old copy reject the messages",
        "Safe changes:",
        f"  - {name}: version 1 -> 2, with upcasters from version 1",
        f"  - {name} order_number: a required field added without a default: messages without it fail, "
        "but the upcasters from version 1 bring older messages up",
    ]


def test_a_rename_in_two_steps_passes_keeping_the_old_field_optional(app_folder: Path, name: str) -> None:
    both = FIELDS.replace("order_id: int", "order_id: int = 0\n    order_number: int")
    upcast = upcaster_from(1, '{**body, "order_number": body["order_id"]}')

    first = check(app_folder, shop(name), shop(name, 2, both, upcast))
    assert first.exit_code == 0, first.output
    assert f"  - {name} order_id: made optional (it has a default)" in first.output.splitlines()

    assert (
        schema(app(app_folder, shop(name, 2, both, upcast)), "--write", "contracts.lock.json").exit_code == 0
    )
    dropped = app(app_folder, shop(name, 2, FIELDS.replace("order_id", "order_number"), upcast))
    second = schema(dropped, "--check", "contracts.lock.json")
    assert second.exit_code == 0, second.output
    assert f"  - {name} order_id: an optional field removed (consumers use its default)" in second.output


def test_a_version_lowered_is_breaking(app_folder: Path, name: str) -> None:
    result = check(app_folder, shop(name, 2, upcasters=upcaster_from(1)), shop(name))

    assert result.exit_code == 1
    assert f"  - {name}: its version went down from 2 to 1: raise it above 2 instead" in result.output


def test_the_snapshot_and_schema_record_a_version_over_1_and_its_upcasters(
    app_folder: Path, name: str
) -> None:
    target = app(app_folder, shop(name, 2, upcasters=upcaster_from(1)))

    written = schema(target, "--write", "contracts.lock.json")
    printed = json.loads(schema(target).output)

    assert (
        written.output
        == f"Wrote the contracts of Shop (1 event(s), {name} at version 2) to contracts.lock.json\n"
    )
    recorded = json.loads((app_folder / "contracts.lock.json").read_text())["services"]["Shop"][name]
    assert recorded == printed[name]
    assert (recorded["x-eventrelay-version"], recorded["x-eventrelay-upcasts-from"]) == (2, [1])
    plain = json.loads(schema(app(app_folder, shop(name))).output)[name]
    assert not {"x-eventrelay-version", "x-eventrelay-upcasts-from"} & set(plain)  # version 1 says nothing


def test_events_shows_each_version_and_the_versions_upcast_from(app_folder: Path, name: str) -> None:
    target = app(app_folder, shop(name, 3, upcasters=upcaster_from(1) + upcaster_from(2)))
    runner = CliRunner()

    table = runner.invoke(main, ["events", target], env={"COLUMNS": "200"})
    data = json.loads(runner.invoke(main, ["events", target, "--json"]).output)

    assert table.exit_code == 0, table.output
    row = next(line for line in table.output.splitlines() if name in line)
    assert "3 (upcasts 1, 2)" in row
    assert "publishes" in row
    assert (data["versions"], data["upcasts_from"]) == ({name: 3}, {name: [1, 2]})
