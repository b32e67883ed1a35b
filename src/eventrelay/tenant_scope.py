"""The tenant in scope in a task: set by `bus.tenant(id)` and around a handler, read where a transaction
begins (its database) and where an event is stamped (its `x-tenant-id`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

_tenant: ContextVar[str | None] = ContextVar("eventrelay_tenant", default=None)


def current_tenant() -> str | None:
    """The tenant in scope in this task (`async with bus.tenant(id):`, or a handler's message), if any."""
    return _tenant.get()


@contextlib.contextmanager
def tenant_scope(tenant_id: str | None) -> Iterator[None]:
    """Make `tenant_id` the tenant in scope within the block."""
    token = _tenant.set(tenant_id)
    try:
        yield
    finally:
        _tenant.reset(token)
