"""Handlers are type-checked by mypy.

This file is itself checked by the project's strict mypy run: the `assert_type` calls below fail that run if
`DistributedEventHandler[A | B]` ever stops giving `handle_event` an `A | B`. The tests then run mypy on two
small snippets, a correct handler and one whose `handle_event` takes the wrong event, to show that mypy
accepts the first and reports the second.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import ClassVar, assert_type

import mypy.api
import pytest

from eventrelay import Context, DistributedEventBus, DistributedEventHandler, Event
from eventrelay.testing import RecordingBroker, wait_until_idle

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "tests.typing.test_handler_types"


class ProductCreatedEto(Event, name=f"{PREFIX}.ProductCreated"):
    product_id: int


class ProductDeletedEto(Event, name=f"{PREFIX}.ProductDeleted"):
    product_id: int
    reason: str


class SyncProducts(DistributedEventHandler[ProductCreatedEto | ProductDeletedEto]):
    seen: ClassVar[list[str]] = []

    async def handle_event(self, event: ProductCreatedEto | ProductDeletedEto) -> None:
        assert_type(event, ProductCreatedEto | ProductDeletedEto)
        assert_type(self.context, Context)
        if isinstance(event, ProductDeletedEto):
            assert_type(event, ProductDeletedEto)
            SyncProducts.seen.append(f"deleted {event.product_id}: {event.reason}")
        else:
            assert_type(event, ProductCreatedEto)
            SyncProducts.seen.append(f"created {event.product_id}")


async def test_the_checked_union_handler_runs_for_both_events() -> None:
    SyncProducts.seen = []
    async with DistributedEventBus("Catalog", broker=RecordingBroker()) as bus:
        await bus.subscribe(SyncProducts)
        await bus.publish(ProductCreatedEto(product_id=1), key="p1")
        await bus.publish(ProductDeletedEto(product_id=1, reason="discontinued"), key="p1")
        await wait_until_idle(bus)

    assert SyncProducts.seen == ["created 1", "deleted 1: discontinued"]


CORRECT = """
    from typing import ClassVar, assert_type

    from eventrelay import DistributedEventHandler, Event


    class A(Event, name="snippet.A"):
        a: int


    class B(Event, name="snippet.B"):
        b: str


    class HandleBoth(DistributedEventHandler[A | B]):
        async def handle_event(self, event: A | B) -> None:
            assert_type(event, A | B)


    class HandleA(DistributedEventHandler[A]):
        async def handle_event(self, event: A) -> None:
            assert_type(event.a, int)
"""

WRONG_EVENT = """
    from eventrelay import DistributedEventHandler, Event


    class A(Event, name="snippet.A"):
        a: int


    class C(Event, name="snippet.C"):
        c: int


    class HandleA(DistributedEventHandler[A]):
        async def handle_event(self, event: C) -> None:
            pass
"""


@pytest.fixture(scope="module")
def mypy_report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """Run mypy once, with the project's configuration and cache, on both snippets: error lines per file."""
    folder = tmp_path_factory.mktemp("snippets")
    correct = folder / "correct_handler.py"
    wrong = folder / "wrong_event_handler.py"
    correct.write_text(textwrap.dedent(CORRECT))
    wrong.write_text(textwrap.dedent(WRONG_EVENT))
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.chdir(ROOT)  # mypy_path in pyproject.toml is relative to the working directory
        stdout, stderr, status = mypy.api.run(
            [
                "--config-file",
                str(ROOT / "pyproject.toml"),
                "--cache-dir",
                str(ROOT / ".mypy_cache"),  # warm after `make test`, so this takes a second or two
                str(correct),
                str(wrong),
            ]
        )
    assert stderr == "", stderr
    assert status in (0, 1), stdout
    errors = [line for line in stdout.splitlines() if ": error:" in line]
    # By file name, not path: for a file it has seen unchanged, mypy repeats the cached errors, which name
    # the temporary folder of an earlier run.
    return {
        "correct": [line for line in errors if Path(line.partition(":")[0]).name == correct.name],
        "wrong": [line for line in errors if Path(line.partition(":")[0]).name == wrong.name],
        "all": errors,
    }


def test_mypy_accepts_a_handler_of_its_events_and_of_a_union(mypy_report: dict[str, list[str]]) -> None:
    assert mypy_report["correct"] == []


def test_mypy_reports_a_handle_event_that_takes_another_event(mypy_report: dict[str, list[str]]) -> None:
    line = (
        textwrap.dedent(WRONG_EVENT).splitlines().index("    async def handle_event(self, event: C) -> None:")
    )
    [error] = mypy_report["wrong"]
    assert f':{line + 1}: error: Argument 1 of "handle_event" is incompatible with supertype' in error
    assert 'supertype defines the argument type as "A"' in error
    assert error.endswith("[override]")
    assert len(mypy_report["all"]) == 1
