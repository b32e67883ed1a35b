"""A three-node NATS JetStream cluster of the tests' own, on free ports of 127.0.0.1, for the cluster tests.

Each node is a `nats-server` process (`/usr/sbin/nats-server`, or `$NATS_SERVER`) with JetStream, a store
folder of its own under the session's temporary folder, a client port, a cluster (route) port and a monitoring
port, and routes to the two others. `nats_cluster()` starts the three, waits (bounded) until every node names
the same JetStream meta leader and that leader holds the others as current replicas, yields the
`NatsCluster`, and stops every node and removes the folders afterwards, even if a test failed. A test kills a
node with SIGKILL (`kill`) and starts it again on the same store folder (`restart`).

The machine's own NATS server on 4222 is never touched. A missing binary skips the tests that need the
cluster, or fails them under CI (``CI=true``) or with ``EVENTRELAY_REQUIRE_SERVERS=1`` (`tests/servers.py`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.servers import servers_required

HOST = "127.0.0.1"
NODES = 3
START_TIMEOUT = 60.0  # until a meta leader is elected; elections take seconds on a loaded machine
STOP_TIMEOUT = 10.0


def nats_server_binary() -> str | None:
    """`$NATS_SERVER`, else `nats-server` on PATH, else `/usr/sbin/nats-server`; None when none exists."""
    for candidate in (os.environ.get("NATS_SERVER"), shutil.which("nats-server"), "/usr/sbin/nats-server"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def _free_ports(count: int) -> list[int]:
    """`count` distinct ports free now (the sockets stay bound until all are chosen, so none repeats)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind((HOST, 0))
        return [sock.getsockname()[1] for sock in socks]


@dataclass
class Node:
    """One nats-server of the cluster."""

    name: str
    port: int  # clients
    route_port: int  # the other nodes
    http_port: int  # monitoring (`/jsz`, `/connz`)
    store: Path
    log: Path
    process: subprocess.Popen[bytes] | None = None

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def monitor(self, endpoint: str) -> dict[str, Any]:
        """A monitoring endpoint's JSON, e.g. `jsz` or `connz?subs=0`."""
        with urllib.request.urlopen(f"http://{HOST}:{self.http_port}/{endpoint}", timeout=2) as answer:
            found: dict[str, Any] = json.load(answer)
            return found


@dataclass
class NatsCluster:
    """Three nats-server processes with JetStream, routed to each other (see the module docstring)."""

    binary: str
    folder: Path
    name: str = field(default_factory=lambda: f"er-{uuid.uuid4().hex[:8]}")
    nodes: list[Node] = field(default_factory=list)
    started_in: float = 0.0  # seconds from the first start until the meta leader was elected

    def __post_init__(self) -> None:
        ports = _free_ports(3 * NODES)
        for k in range(NODES):
            store, log = self.folder / f"n{k}", self.folder / f"n{k}.log"
            store.mkdir()
            port, route_port, http_port = ports[3 * k : 3 * k + 3]
            self.nodes.append(Node(f"{self.name}-n{k}", port, route_port, http_port, store, log))

    def hosts(self) -> str:
        """`127.0.0.1:P0,127.0.0.1:P1,127.0.0.1:P2`: the client addresses, for a multi-host URL."""
        return ",".join(f"{HOST}:{node.port}" for node in self.nodes)

    def node_named(self, name: str) -> Node:
        [node] = [node for node in self.nodes if node.name == name]
        return node

    def _argv(self, node: Node) -> list[str]:
        routes = ",".join(f"nats://{HOST}:{n.route_port}" for n in self.nodes if n is not node)
        return [
            self.binary,
            *("-a", HOST, "-p", str(node.port), "-m", str(node.http_port)),
            *("-n", node.name, "--cluster_name", self.name, "--cluster", f"nats://{HOST}:{node.route_port}"),
            *("--routes", routes, "-js", "-sd", str(node.store), "-l", str(node.log)),
        ]

    def start(self, k: int) -> None:
        node = self.nodes[k]
        assert not node.running(), f"{node.name} is running already"
        node.process = subprocess.Popen(
            self._argv(node), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def kill(self, k: int) -> None:
        """SIGKILL node `k` and reap it: no clean shutdown, its store as the kill left it."""
        node = self.nodes[k]
        assert node.process is not None
        assert node.running(), f"{node.name} is not running"
        node.process.send_signal(signal.SIGKILL)
        node.process.wait(STOP_TIMEOUT)

    def restart(self, k: int) -> None:
        """Start node `k` again on its store folder (after `kill`)."""
        self.start(k)

    def heal(self) -> None:
        """Start again every node a test left dead, and wait for the meta leader: the next test gets three."""
        dead = [k for k, node in enumerate(self.nodes) if not node.running()]
        for k in dead:
            self.restart(k)
        if dead:
            wait_for(self, lambda: self.meta_leader() is not None, "meta leader after a heal")

    def meta_leader(self) -> str | None:
        """The JetStream meta leader's server name once every running node names it and it holds every other
        running node as a current replica; None until then (an election, a node still catching up)."""
        metas = []
        for node in self.nodes:
            if node.running():
                try:
                    metas.append(node.monitor("jsz").get("meta_cluster") or {})
                except (OSError, ValueError):  # still starting
                    return None
        leaders = {meta.get("leader") for meta in metas}
        if len(leaders) != 1 or None in leaders or any(meta.get("cluster_size") != NODES for meta in metas):
            return None
        [leader] = leaders
        [own] = [meta for node, meta in zip(self.running(), metas, strict=True) if node.name == leader] or [
            {}
        ]
        current = {replica["name"] for replica in own.get("replicas") or [] if replica.get("current")}
        others = {node.name for node in self.running() if node.name != leader}
        return str(leader) if others <= current else None

    def running(self) -> list[Node]:
        return [node for node in self.nodes if node.running()]

    def clients_of(self, k: int, name: str = "") -> int:
        """How many client connections node `k` has (those named `name`, if given)."""
        connections = self.nodes[k].monitor("connz?limit=1024").get("connections") or []
        return sum(1 for c in connections if not name or c.get("name") == name)

    def stop(self) -> None:
        """SIGTERM each running node, SIGKILL the ones that linger; reap them all."""
        for node in self.nodes:
            if node.running():
                assert node.process is not None
                node.process.send_signal(signal.SIGTERM)
        for node in self.nodes:
            if node.process is None:
                continue
            try:
                node.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                node.process.kill()
                node.process.wait(STOP_TIMEOUT)

    def logs(self, chars: int = 3000) -> str:
        return "\n".join(
            f"--- {node.name}:\n{node.log.read_text(errors='replace')[-chars:]}"
            for node in self.nodes
            if node.log.exists()
        )


def nats_cluster(folder: Path) -> Iterator[NatsCluster]:
    """Start the cluster in `folder`, wait until JetStream is ready, yield it; stop it and remove `folder`."""
    binary = nats_server_binary()
    if binary is None:
        reason = "no nats-server binary (install nats-server, or set NATS_SERVER to one)"
        if servers_required():
            pytest.fail(f"The NATS cluster tests need {reason}")
        pytest.skip(f"The NATS cluster tests are skipped: {reason}")
    assert binary is not None
    cluster = NatsCluster(binary, folder)
    try:
        began = time.monotonic()
        for k in range(NODES):
            cluster.start(k)
        wait_for(cluster, lambda: cluster.meta_leader() is not None, "a JetStream meta leader")
        cluster.started_in = time.monotonic() - began
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(folder, ignore_errors=True)


def wait_for(cluster: NatsCluster, condition: Any, what: str, timeout: float = START_TIMEOUT) -> None:
    """Poll `condition()` until true; fail after `timeout` seconds with the nodes' logs (or when a node that
    should run has died)."""
    deadline = time.monotonic() + timeout
    while not condition():
        dead = [n.name for n in cluster.nodes if n.process is not None and n.process.poll() not in (None, -9)]
        if dead or time.monotonic() > deadline:
            raise AssertionError(f"NATS cluster: no {what} after {timeout}s (dead: {dead})\n{cluster.logs()}")
        time.sleep(0.1)
