"""The services of a reliability scenario as OS processes: `Child` starts one, restarts it, stops it (SIGTERM)
or kills it, and reads its log and its peak memory."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path


class Child:
    """One service process; stdout and stderr go to `log`. `restarts` holds when it was started again."""

    def __init__(self, name: str, argv: list[str], cwd: Path, env: Mapping[str, str], finite: bool) -> None:
        self.name = name
        self.finite = finite  # a command that ends by itself (not a service that runs until stopped)
        self.argv = argv
        self.cwd = cwd
        self.env = dict(env)
        self.log = cwd / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.restarts: list[float] = []
        self.supervised = True  # False: `Scenario.supervise` leaves it dead after a kill

    def start(self) -> Child:
        with open(self.log, "ab") as log:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen(
                self.argv, cwd=self.cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def poll(self) -> int | None:
        assert self.process is not None
        return self.process.poll()

    def killed(self) -> bool:
        """Whether it died by SIGKILL (a kill point); fail if it died any other way than exit 0."""
        code = self.poll()
        if code not in (None, 0, -signal.SIGKILL):
            raise AssertionError(f"{self.name} exited with {code}:\n{self.tail()}")
        return code == -signal.SIGKILL

    def restart(self) -> None:
        self.restarts.append(time.time())
        self.start()

    def started_again(self) -> bool:
        """Whether the last restart has ended, or has logged that its service started."""
        return self.poll() is not None or self.tail(10**8).count(" started: ") > len(self.restarts)

    async def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while (code := self.poll()) is None:
            if time.monotonic() > deadline:
                await self._dump_stacks()
                raise AssertionError(f"{self.name} still running after {timeout}s:\n{self.tail(12000)}")
            await asyncio.sleep(0.02)
        return code

    async def _dump_stacks(self) -> None:
        """Have the stuck process write its threads' and tasks' stacks into its log (scenario_app's
        SIGUSR1 handler), so a failure shows where it waits."""
        size = self.log.stat().st_size if self.log.exists() else 0
        self.process.send_signal(signal.SIGUSR1)  # type: ignore[union-attr]
        for _ in range(100):  # up to 2 s for the dump to be written
            await asyncio.sleep(0.02)
            if self.log.exists() and self.log.stat().st_size > size and "end of stacks" in self.tail(200):
                return

    async def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then its exit code (a graceful stop is 0)."""
        if self.poll() is None:
            assert self.process is not None
            self.process.send_signal(signal.SIGTERM)
        return await self.wait(timeout)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else "(no output)"

    def peak_rss_kib(self) -> int:
        """VmHWM of the running process: its resident memory's high-water mark, in KiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        raise AssertionError("no VmHWM in /proc/<pid>/status")
