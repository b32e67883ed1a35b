"""Servers that a test starts as processes of its own (Tansu, the TLS listeners): a free port to give one, a
bounded wait until it accepts connections, and a stop by its process id."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess

HOST = "127.0.0.1"
STOP_TIMEOUT = 10.0


def free_port() -> int:
    """A port of 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def accepts(port: int, host: str = HOST, timeout: float = 0.5) -> bool:
    """Whether something accepts a TCP connection on `host`:`port` within `timeout` seconds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def stop(process: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT) -> None:
    """Stop a server by its process id: SIGTERM, then SIGKILL if it lingers past `timeout`."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout)
