"""Group commit: publishes outside a unit of work that arrive together share one outbox transaction."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from eventrelay import DistributedEventBus, DynamicEvent
from eventrelay.group_commit import GroupCommit
from eventrelay.testing import wait_until_idle


class Recorder:
    """A commit that records each group; call number n (from 1) waits inside the transaction while `held[n]`
    is not set, and raises `failing[n]` if given."""

    def __init__(self, held: int = 0) -> None:
        self.groups: list[list[int]] = []
        self.calls = 0
        self.entered = {n: asyncio.Event() for n in range(1, held + 1)}
        self.held = {n: asyncio.Event() for n in range(1, held + 1)}
        self.failing: dict[int, Exception] = {}

    async def commit(self, items: list[int]) -> None:
        self.calls += 1
        call = self.calls
        if call in self.held:
            self.entered[call].set()
            await self.held[call].wait()
        if call in self.failing:
            raise self.failing[call]
        self.groups.append(items)


async def test_writes_that_arrive_while_one_commits_share_the_next_transaction() -> None:
    recorder = Recorder(held=1)
    group = GroupCommit(recorder.commit)
    first = asyncio.create_task(group.write(0))
    await recorder.entered[1].wait()
    rest = [asyncio.create_task(group.write(n)) for n in range(1, 6)]
    await asyncio.sleep(0)  # they queue behind the commit in progress
    recorder.held[1].set()
    await asyncio.gather(first, *rest)
    assert recorder.groups == [[0], [1, 2, 3, 4, 5]]


async def test_a_failed_commit_raises_in_every_writer_of_its_group_and_the_next_write_works() -> None:
    recorder = Recorder(held=1)
    recorder.failing[2] = RuntimeError("database is locked")
    group = GroupCommit(recorder.commit)
    first = asyncio.create_task(group.write(0))
    await recorder.entered[1].wait()
    rest = [asyncio.create_task(group.write(n)) for n in (1, 2)]
    await asyncio.sleep(0)
    recorder.held[1].set()
    results = await asyncio.gather(first, *rest, return_exceptions=True)
    assert results[0] is None
    assert [str(r) for r in results[1:]] == ["database is locked", "database is locked"]
    await group.write(3)
    assert recorder.groups == [[0], [3]]


async def test_a_writer_cancelled_while_its_group_commits_does_not_cancel_the_commit() -> None:
    """The COMMIT may have reached the database already: cancelling it under the others would write their
    items a second time (a unique violation on the outbox's message id, raised to callers whose events
    were committed)."""
    recorder = Recorder(held=2)
    group = GroupCommit(recorder.commit)
    blocker = asyncio.create_task(group.write(0))
    await recorder.entered[1].wait()
    first = asyncio.create_task(group.write(1))
    others = [asyncio.create_task(group.write(n)) for n in (2, 3)]
    await asyncio.sleep(0)
    recorder.held[1].set()
    await recorder.entered[2].wait()  # [1, 2, 3] commits ...
    first.cancel()  # ... and the writer of 1 is cancelled meanwhile
    with pytest.raises(asyncio.CancelledError):
        await first
    recorder.held[2].set()
    await asyncio.wait_for(asyncio.gather(blocker, *others), 5)
    assert recorder.groups == [[0], [1, 2, 3]]


async def test_a_writer_cancelled_before_its_group_commits_is_not_written() -> None:
    recorder = Recorder(held=1)
    group = GroupCommit(recorder.commit)
    blocker = asyncio.create_task(group.write(0))
    await recorder.entered[1].wait()
    gone = asyncio.create_task(group.write(1))
    kept = asyncio.create_task(group.write(2))
    await asyncio.sleep(0)
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    recorder.held[1].set()
    await asyncio.wait_for(asyncio.gather(blocker, kept), 5)
    assert recorder.groups == [[0], [2]]


async def test_concurrent_publishes_outside_a_unit_of_work_all_arrive_once(tmp_path: Path) -> None:
    received: list[int] = []

    async def record(event: DynamicEvent) -> None:
        received.append(event.data["n"])

    async with DistributedEventBus(
        "GroupCommit", broker="memory://", database=f"sqlite:///{tmp_path}/service.db"
    ) as bus:
        await bus.subscribe(record, event="GroupCommit.Counted")
        await asyncio.gather(*(bus.publish("GroupCommit.Counted", {"n": n}) for n in range(200)))
        await wait_until_idle(bus)
    assert sorted(received) == list(range(200))
