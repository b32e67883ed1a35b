"""Group commit: outbox writes that arrive while another is committing share the next transaction."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class GroupCommit(Generic[T]):
    """Writes items with `commit(items)`, one call at a time; the items that wait meanwhile go together.

    `await write(item)` returns once the transaction holding `item` has committed, and raises what that
    commit raised. The commits run in a task of their own: a caller cancelled while its group commits does
    not cancel the commit (which may have reached the database already) under the others of its group; its
    item may then be committed although its caller was cancelled, as with any cancel during a commit.
    """

    def __init__(self, commit: Callable[[list[T]], Awaitable[None]]) -> None:
        self._commit = commit
        self._waiting: list[tuple[T, asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def write(self, item: T) -> None:
        """Write `item` in the next transaction; return once it committed."""
        done = asyncio.get_running_loop().create_future()
        self._waiting.append((item, done))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.ensure_future(self._flush())
        try:
            await done
        except asyncio.CancelledError:
            # Not taken into a commit yet: not written at all.
            self._waiting = [(i, f) for i, f in self._waiting if f is not done]
            raise

    async def settle(self) -> None:
        """Wait until the writes handed in so far have committed or failed."""
        if self._flusher is not None:
            await asyncio.wait({self._flusher})

    async def _flush(self) -> None:
        while self._waiting:
            group, self._waiting = self._waiting, []
            try:
                await self._commit([item for item, _ in group])
            except BaseException as exc:
                for _, future in group:
                    if future.done():
                        pass
                    elif isinstance(exc, asyncio.CancelledError):
                        future.cancel()
                    else:
                        future.set_exception(exc)
                if not isinstance(exc, Exception):
                    raise
                continue
            for _, future in group:
                if not future.done():
                    future.set_result(None)
