"""Group commit: outbox writes that arrive while another is committing share the next transaction."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class GroupCommit(Generic[T]):
    """Writes items with `commit(items)`, one call at a time; the items that wait meanwhile go together.

    `await write(item)` returns once the transaction holding `item` has committed, and raises what that
    commit raised. A caller cancelled while it commits hands the others of its group on to the next one.
    """

    def __init__(self, commit: Callable[[list[T]], Awaitable[None]]) -> None:
        self._commit = commit
        self._lock = asyncio.Lock()
        self._waiting: list[tuple[T, asyncio.Future[None]]] = []

    async def write(self, item: T) -> None:
        """Write `item` in the next transaction; return once it committed."""
        done = asyncio.get_running_loop().create_future()
        self._waiting.append((item, done))
        try:
            async with self._lock:
                if not done.done():  # else a caller before us committed it
                    await self._commit_waiting()
        except BaseException:
            if not done.done():
                done.cancel()
                self._waiting = [(i, f) for i, f in self._waiting if f is not done]
            raise
        await done

    async def _commit_waiting(self) -> None:
        group, self._waiting = self._waiting, []
        try:
            await self._commit([item for item, _ in group])
        except asyncio.CancelledError:
            self._waiting[:0] = [(i, f) for i, f in group if not f.done()]  # theirs to commit, not lost
            raise
        except BaseException as exc:
            for _, future in group:
                if not future.done():
                    future.set_exception(exc)
            return
        for _, future in group:
            if not future.done():
                future.set_result(None)
