"""RabbitMQ nodes of the tests' own, beside the machine's node (rabbit@localhost), which they never touch.

```python
with rabbitmq_node("listeners.tcp.default = 127.0.0.1:{port}") as node:   # one node, a config of our own
    node.url("guest:guest")                                                 # amqp://guest:guest@127.0.0.1:PORT/
with rabbitmq_cluster(3) as nodes:                                          # three nodes clustered at start
    nodes[0].kill(); nodes[0].start(); nodes[0].wait_started()              # SIGKILL, then back on its data
```

Each node has a name of its own (`er<pid><letter>@localhost`), free ports for AMQP and Erlang distribution,
and a temporary folder (config, data, logs, an empty plugins file: the management plugin would take the
machine's port 15672). It runs as the `rabbitmq` user, through Debian's `rabbitmq-server`, so it shares that
user's Erlang cookie with `rabbitmqctl`; epmd is shared. A cluster forms through classic peer discovery (each
node's config lists the others), with no join calls. Stopping is `rabbitmqctl stop`, then SIGKILL of the
node's Erlang VM by its pid; the folder is removed. A missing `rabbitmq-server` skips, or fails under CI.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.server_process import accepts, free_port
from tests.servers import servers_required

SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
CTL = "rabbitmqctl"
USER = "rabbitmq"
START_TIMEOUT = 120.0  # seconds: an Erlang VM boots in about 7 s alone; three at once on 2 busy cores, more
STOP_TIMEOUT = 60.0


def _require() -> None:
    if os.access(SERVER, os.X_OK) and shutil.which(CTL):
        return
    reason = f"RabbitMQ nodes of the tests' own need {SERVER} and {CTL} (Debian's rabbitmq-server package)"
    if servers_required():
        pytest.fail(reason)
    pytest.skip(reason)


class RabbitNode:
    """One extra RabbitMQ node in `folder` (see the module docstring). `config` is rabbitmq.conf, where
    `{port}` stands for the node's AMQP (or TLS) port."""

    def __init__(self, name: str, folder: Path, config: str) -> None:
        self.name = f"{name}@localhost"
        self.folder = folder
        self.port, self.dist_port = free_port(), free_port()
        self.config = config
        self.process: subprocess.Popen[bytes] | None = None
        self.beam_pid: int | None = None  # the Erlang VM, which a SIGKILL must hit (not the script)
        self.started_in: float | None = None  # seconds the last start took, to the listener accepting
        self._started = 0.0  # monotonic time of the last start
        for sub in ("mnesia", "log"):
            (folder / sub).mkdir(exist_ok=True)
        (folder / "enabled_plugins").write_text("[].\n")
        self.write_config(config)

    def write_config(self, config: str) -> None:
        """(Re)write rabbitmq.conf; read at the next start."""
        self.config = config
        (self.folder / "rabbitmq.conf").write_text(config.format(port=self.port) + "\n")
        shutil.chown(self.folder, USER)
        for path in self.folder.rglob("*"):
            shutil.chown(path, USER)

    def url(self, credentials: str = "guest:guest", scheme: str = "amqp") -> str:
        return f"{scheme}://{credentials}@127.0.0.1:{self.port}/"

    @property
    def log(self) -> Path:
        return self.folder / "rabbitmq-server.log"

    def start(self) -> None:
        """Start the node (without waiting for it: `wait_started`)."""
        env = {
            **os.environ,
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.folder / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.folder / "log"),
            "RABBITMQ_CONFIG_FILE": str(self.folder / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.folder / "enabled_plugins"),
        }
        self.beam_pid = None
        self._started = time.monotonic()
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                ["runuser", "-u", USER, "--", SERVER], env=env, stdout=log, stderr=subprocess.STDOUT,
                cwd=self.folder, start_new_session=True,
            )  # fmt: skip

    def wait_started(self, timeout: float = START_TIMEOUT) -> float:
        """Wait until the node's listener accepts (RabbitMQ opens it last, once booted); the seconds the start
        took. Fails with the node's log if it ended or took longer than `timeout`."""
        assert self.process is not None, "start() first"
        deadline = time.monotonic() + timeout
        while not accepts(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"RabbitMQ node {self.name} did not start:\n{self.tail()}")
            time.sleep(0.1)
        self.started_in = time.monotonic() - self._started
        self.beam_pid = int(self.ctl("eval", "list_to_integer(os:getpid()).").strip())
        return self.started_in

    def ctl(self, *args: str, timeout: float = 60.0) -> str:
        """`rabbitmqctl -n NODE ARGS`; its output. Fails with its output if it fails."""
        done = subprocess.run(
            [CTL, "-q", "-n", self.name, *args], capture_output=True, text=True, timeout=timeout, check=False
        )
        if done.returncode != 0:
            raise AssertionError(f"rabbitmqctl {' '.join(args)} on {self.name}: {done.stdout}{done.stderr}")
        return done.stdout

    def rss_kib(self) -> int:
        """The resident memory of the node's Erlang VM, in KiB."""
        for line in Path(f"/proc/{self.beam_pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError(f"no VmRSS for {self.name}")

    def kill(self) -> None:
        """SIGKILL the node's Erlang VM (a crash: nothing is flushed or said to the other nodes)."""
        if self.beam_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.beam_pid, signal.SIGKILL)
        if self.process is not None:
            self.process.wait(STOP_TIMEOUT)

    def stop(self) -> None:
        """Stop the node: `rabbitmqctl stop`, or SIGKILL if that fails."""
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
            self.ctl("stop", timeout=STOP_TIMEOUT)
            self.process.wait(STOP_TIMEOUT)
        if self.process.poll() is None:
            if self.beam_pid is None:  # still booting: its VM is the script's child
                self.beam_pid = _beam_of(self.process.pid)
            self.kill()

    def tail(self, chars: int = 4000) -> str:
        logs = [self.log, *sorted((self.folder / "log").glob("*.log"))]
        return "".join(p.read_text(errors="replace")[-chars:] for p in logs if p.exists())


def _beam_of(pid: int) -> int | None:
    """The Erlang VM among `pid`'s descendants (runuser -> sh -> beam.smp), if any."""
    done = subprocess.run(["ps", "-e", "-o", "pid=,ppid=,comm="], capture_output=True, text=True, check=True)
    children: dict[int, list[tuple[int, str]]] = {}
    for line in done.stdout.splitlines():
        own, parent, command = line.split(None, 2)
        children.setdefault(int(parent), []).append((int(own), command))
    todo = [pid]
    while todo:
        for child, name in children.get(todo.pop(), []):
            if name.startswith("beam"):
                return child
            todo.append(child)
    return None


def _stop_all(nodes: list[RabbitNode]) -> None:
    """Stop `nodes` at once (each stop waits seconds for its node to shut down)."""
    with ThreadPoolExecutor(len(nodes)) as pool:
        list(pool.map(RabbitNode.stop, nodes))


@contextlib.contextmanager
def _folder() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="eventrelay-rabbitmq-"))
    folder.chmod(0o755)  # the node runs as the rabbitmq user
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def rabbitmq_node(config: str, prepare: Callable[[Path], None] | None = None) -> Iterator[RabbitNode]:
    """A started node with rabbitmq.conf `config` (`{port}`: its port, `{folder}`: its folder), stopped and
    removed on exit. `prepare(folder)`, if given, runs before the start (to write certificates there)."""
    _require()
    with _folder() as folder:
        if prepare is not None:
            prepare(folder)
        node = RabbitNode(f"er{os.getpid()}t", folder, config.replace("{folder}", str(folder)))
        try:
            node.start()
            node.wait_started()
            yield node
        finally:
            node.stop()


@contextlib.contextmanager
def rabbitmq_cluster(size: int = 3) -> Iterator[list[RabbitNode]]:
    """`size` started nodes clustered through classic peer discovery, stopped and removed on exit."""
    _require()
    with contextlib.ExitStack() as stack:
        folders = [stack.enter_context(_folder()) for _ in range(size)]
        names = [f"er{os.getpid()}{chr(ord('a') + i)}" for i in range(size)]
        peers = "\n".join(
            f"cluster_formation.classic_config.nodes.{i + 1} = {name}@localhost"
            for i, name in enumerate(names)
        )
        config = (
            "listeners.tcp.default = 127.0.0.1:{port}\n"
            "cluster_formation.peer_discovery_backend = classic_config\n" + peers
        )
        nodes = [RabbitNode(name, folder, config) for name, folder in zip(names, folders, strict=True)]
        stack.callback(_stop_all, nodes)
        nodes[0].start()  # the seed: the others join it rather than race to form clusters of their own
        nodes[0].wait_started()
        for node in nodes[1:]:
            node.start()
        for node in nodes[1:]:
            node.wait_started()
        running = nodes[0].ctl("eval", "length(rabbit_nodes:all_running()).").strip()
        assert running == str(size), f"the cluster has {running} running nodes, not {size}"
        yield nodes
