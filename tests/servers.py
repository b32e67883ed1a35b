"""Reach the shared test servers (PostgreSQL, MariaDB, Redis, RabbitMQ, NATS) on this machine.

A test that needs a server calls :func:`require_server` first. When the server does not answer, the test is
skipped, or fails under CI (``CI=true``) or with ``EVENTRELAY_REQUIRE_SERVERS=1``, so that a missing server
can never make a CI run green by skipping.
"""

from __future__ import annotations

import functools
import os

import pytest

from tests.server_process import accepts

CONNECT_TIMEOUT = 1.0


@functools.cache
def _reachable(host: str, port: int) -> bool:
    """Whether a TCP connection to ``host:port`` succeeds; tried once per session for each address."""
    return accepts(port, host, CONNECT_TIMEOUT)


def servers_required() -> bool:
    """Whether a missing server is a failure rather than a reason to skip."""
    return os.environ.get("EVENTRELAY_REQUIRE_SERVERS") == "1" or os.environ.get("CI") == "true"


def require_server(name: str, port: int, host: str = "127.0.0.1") -> None:
    """Skip (or, under CI, fail) the calling test unless ``name`` answers on ``host:port``."""
    if _reachable(host, port):
        return
    if servers_required():
        pytest.fail(f"{name} is not reachable on {host}:{port}; start it (see DESIGN.md)")
    pytest.skip(f"{name} is not reachable on {host}:{port}")
