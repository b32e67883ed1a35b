"""`eventrelay schema --write FILE` snapshots a service's ETO schemas; `--check FILE` fails on a change that
breaks a consumer, naming the event, the field and why, and passes (listing them) on safe ones.

Each test writes the service twice, as two versions of a small app module (`contracts_shop.py`): the first
is snapshotted, the second checked against it.
"""

from __future__ import annotations

import importlib
import json
import shutil
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from pydantic import BaseModel

from eventrelay.cli import main
from eventrelay.contracts import compare

HEADER = '''
"""A shop's contracts, one version of them."""

from __future__ import annotations

from datetime import date
from typing import Literal

from pydantic import BaseModel

from eventrelay import Event, Service


class Category(BaseModel):
    name: str
    parent: Category | None = None


class Tag(BaseModel):
    label: str = ""


'''

ADDRESS = """
class Address(BaseModel):
    street: str
    city: str = ""
"""

ORDER = """
class OrderPlaced(Event, name="Contracts.OrderPlaced"):
    order_id: int
    address: Address
    status: Literal["new", "paid"]
    lines: list[int] = []
    prices: dict[str, int] = {}
    category: Category | None = None
    note: str = ""
"""

SERVICE = """
service = Service("Shop", broker="memory://", publishes=[OrderPlaced])
"""

BASE = ADDRESS + ORDER + SERVICE
MODULE = "contracts_shop"


def app(folder: Path, source: str) -> str:
    """The shop's module with these classes, its earlier version forgotten; its MODULE:SERVICE.

    One module name for every version: an event's wire name belongs to one `module.Class`.
    """
    sys.modules.pop(MODULE, None)
    shutil.rmtree(folder / "__pycache__", ignore_errors=True)
    (folder / f"{MODULE}.py").write_text(HEADER + textwrap.dedent(source))
    importlib.invalidate_caches()
    return f"{MODULE}:service"


def schema(*args: str) -> Result:
    return CliRunner().invoke(main, ["schema", *args])


def snapshot_then_check(folder: Path, new: str, *options: str) -> Result:
    """Write the snapshot of the base version, then check the `new` version against it."""
    written = schema(app(folder, BASE), "--write", "contracts.lock.json")
    assert written.exit_code == 0, written.output
    return schema(app(folder, new), "--check", "contracts.lock.json", *options)


BREAKING = [
    pytest.param(
        BASE.replace("    order_id: int\n", ""),
        "Contracts.OrderPlaced order_id: a required field removed",
        id="required-field-removed",
    ),
    pytest.param(
        BASE.replace("order_id: int", "order_id: str"),
        "Contracts.OrderPlaced order_id: its type changed from integer to string",
        id="retyped",
    ),
    pytest.param(
        BASE.replace("order_id: int", "order_id: date"),
        "Contracts.OrderPlaced order_id: its type changed from integer to string (date)",
        id="retyped-with-format",
    ),
    pytest.param(
        BASE.replace('note: str = ""', "note: str | None = None"),
        "Contracts.OrderPlaced note: its type changed from string to null | string",
        id="made-nullable",
    ),
    pytest.param(
        BASE.replace("lines: list[int]", "lines: list[str]"),
        "Contracts.OrderPlaced lines[]: its type changed from integer to string",
        id="array-items-retyped",
    ),
    pytest.param(
        BASE.replace("dict[str, int]", "dict[str, str]"),
        "Contracts.OrderPlaced prices{}: its type changed from integer to string",
        id="map-values-retyped",
    ),
    pytest.param(
        BASE.replace("    order_id: int\n", "    order_id: int\n    total: int\n"),
        "Contracts.OrderPlaced total: a required field added without a default",
        id="required-field-added",
    ),
    pytest.param(
        BASE.replace('note: str = ""', "note: str"),
        "Contracts.OrderPlaced note: made required",
        id="made-required",
    ),
    pytest.param(
        BASE.replace('Literal["new", "paid"]', 'Literal["new"]'),
        'Contracts.OrderPlaced status: values removed: "paid"',
        id="enum-narrowed",
    ),
    pytest.param(
        BASE.replace('Literal["new", "paid"]', 'Literal["new", "paid", "shipped"]'),
        'Contracts.OrderPlaced status: values added: "shipped"',
        id="enum-widened",
    ),
    pytest.param(
        BASE.replace("street: str", "street: int"),
        "Contracts.OrderPlaced address.street: its type changed from string to integer",
        id="nested-field-retyped",
    ),
    pytest.param(
        BASE.replace("    street: str\n", ""),
        "Contracts.OrderPlaced address.street: a required field removed",
        id="nested-required-field-removed",
    ),
    pytest.param(
        BASE.replace("category: Category | None = None", "category: Tag | None = None"),
        "Contracts.OrderPlaced category.name: a required field removed",
        id="nested-model-swapped",
    ),
    pytest.param(
        BASE.replace('name="Contracts.OrderPlaced"', 'name="Contracts.OrderWasPlaced"'),
        "Contracts.OrderPlaced: the event is gone",
        id="event-renamed",
    ),
]


@pytest.mark.parametrize(("new", "reported"), BREAKING)
def test_a_breaking_change_fails_the_check_naming_the_event_the_field_and_why(
    app_folder: Path, new: str, reported: str
) -> None:
    result = snapshot_then_check(app_folder, new)

    assert result.exit_code == 1, result.output
    lines = result.output.splitlines()
    assert lines[0] == "1 breaking change(s) in the contracts of Shop against contracts.lock.json:"
    assert lines[1].startswith(f"  - {reported}")


SAFE = [
    pytest.param(
        BASE.replace('note: str = ""', 'note: str = ""\n    coupon: str = ""'),
        "Contracts.OrderPlaced coupon: an optional field added (it has a default)",
        id="optional-field-added",
    ),
    pytest.param(
        BASE.replace('    note: str = ""\n', ""),
        "Contracts.OrderPlaced note: an optional field removed (consumers use its default)",
        id="optional-field-removed",
    ),
    pytest.param(
        BASE.replace("order_id: int", "order_id: int = 0"),
        "Contracts.OrderPlaced order_id: made optional (it has a default)",
        id="made-optional",
    ),
    pytest.param(
        ADDRESS
        + ORDER
        + 'class OrderShipped(Event, name="Contracts.OrderShipped"):\n    order_id: int\n'
        + SERVICE.replace("[OrderPlaced]", "[OrderPlaced, OrderShipped]"),
        "Contracts.OrderShipped: a new event",
        id="new-event",
    ),
]


@pytest.mark.parametrize(("new", "reported"), SAFE)
def test_a_safe_change_passes_the_check_and_is_listed(app_folder: Path, new: str, reported: str) -> None:
    result = snapshot_then_check(app_folder, new)

    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        "The contracts of Shop are compatible with contracts.lock.json; safe changes:",
        f"  - {reported}",
        "Record them with --write contracts.lock.json",
    ]


def test_write_then_check_passes_and_titles_and_descriptions_do_not_count(app_folder: Path) -> None:
    documented = BASE.replace("    order_id: int\n", '    """An order was placed."""\n\n    order_id: int\n')

    result = snapshot_then_check(app_folder, documented.replace("Address", "PostalAddress"))

    assert result.exit_code == 0, result.output
    assert result.output == "The contracts of Shop are compatible with contracts.lock.json (no change)\n"


def test_a_rename_is_one_event_gone_and_one_new(app_folder: Path) -> None:
    new = BASE.replace('name="Contracts.OrderPlaced"', 'name="Contracts.OrderWasPlaced"')

    result = snapshot_then_check(app_folder, new)

    assert result.exit_code == 1
    assert result.output.splitlines()[1:] == [
        "  - Contracts.OrderPlaced: the event is gone: its consumers get nothing",
        "Safe changes:",
        "  - Contracts.OrderWasPlaced: a new event",
    ]


def test_check_json_lists_breaking_and_safe_changes(app_folder: Path) -> None:
    new = BASE.replace("order_id: int", "order_id: str").replace("lines:", "x: int = 1\n    lines:")

    result = snapshot_then_check(app_folder, new, "--json")

    assert result.exit_code == 1
    assert json.loads(result.output) == {
        "service": "Shop",
        "compatible": False,
        "breaking": [
            {
                "event": "Contracts.OrderPlaced",
                "path": "order_id",
                "reason": "its type changed from integer to string",
            }
        ],
        "safe": [
            {
                "event": "Contracts.OrderPlaced",
                "path": "x",
                "reason": "an optional field added (it has a default)",
            }
        ],
    }


def test_check_json_of_a_compatible_service(app_folder: Path) -> None:
    result = snapshot_then_check(app_folder, BASE, "--json")

    assert result.exit_code == 0
    assert json.loads(result.output) == {"service": "Shop", "compatible": True, "breaking": [], "safe": []}


def test_the_snapshot_is_sorted_readable_json_that_keeps_the_other_services(app_folder: Path) -> None:
    other = app(app_folder, BASE.replace('Service("Shop"', 'Service("Warehouse"'))
    assert schema(other, "--write", "contracts.lock.json").exit_code == 0
    target = app(app_folder, BASE)

    result = schema(target, "--write", "contracts.lock.json", "--json")

    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {
        "service": "Shop",
        "written": "contracts.lock.json",
        "events": ["Contracts.OrderPlaced"],
        "versions": {"Contracts.OrderPlaced": 1},
    }
    text = (app_folder / "contracts.lock.json").read_text()
    data = json.loads(text)
    assert data["format"] == 1
    assert list(data["services"]) == ["Shop", "Warehouse"]
    assert text == json.dumps(data, indent=2, sort_keys=True) + "\n"
    again = schema(target, "--write", "contracts.lock.json")
    assert again.output == "Wrote the contracts of Shop (1 event(s)) to contracts.lock.json\n"
    assert (app_folder / "contracts.lock.json").read_text() == text  # stable: the same bytes again


def test_check_and_write_together_is_a_usage_error(app_folder: Path) -> None:
    result = schema(app(app_folder, BASE), "--check", "a.json", "--write", "b.json")

    assert result.exit_code == 2
    assert "Give --check FILE or --write FILE, not both" in result.output


def test_a_missing_or_foreign_snapshot_is_one_error_line(app_folder: Path) -> None:
    target = app(app_folder, BASE)
    missing = schema(target, "--check", "nowhere.json")
    assert missing.exit_code == 1
    assert "No such file" in missing.output
    assert "Traceback" not in missing.output

    (app_folder / "other.json").write_text('{"format": 1, "services": {"Warehouse": {}}}')
    foreign = schema(target, "--check", "other.json")
    assert foreign.exit_code == 1
    holds = "other.json holds no contracts of Shop (it has: Warehouse); write them with --write"
    assert holds in foreign.output

    (app_folder / "future.json").write_text('{"format": 2, "services": {}}')
    future = schema(target, "--check", "future.json")
    assert future.exit_code == 1
    assert "future.json has snapshot format 2; this eventrelay reads 1" in future.output


def test_a_change_within_a_recursive_model_is_named_by_its_path() -> None:
    class Node(BaseModel):
        name: str
        child: Node | None = None

    class RenumberedNode(BaseModel):
        name: int
        child: RenumberedNode | None = None

    old, new = Node.model_json_schema(), RenumberedNode.model_json_schema()

    assert [str(change) for change in compare({"Tree": old}, {"Tree": new})] == [
        "Tree name: its type changed from string to integer"
    ]
    assert compare({"Tree": old}, {"Tree": old}) == []
