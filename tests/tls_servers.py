"""TLS listeners of real servers, started by the tests: PostgreSQL 15, Redis and NATS with JetStream, each a
process of its own on a free port of 127.0.0.1 with a temporary folder, never the machine's shared servers.

```python
servers = TlsServers(make_certificates(tmp_path))
port = servers.redis("verify")      # started at the first call, then the same one; closed by servers.close()
```

A server is started for one of these certificate set-ups (`Setup`), all signed by `certificates.ca` unless
named otherwise:

- `"verify"`: the server certificate for 127.0.0.1; a client certificate is not asked for.
- `"mutual"`: the same, and the server demands a client certificate signed by the CA (mutual TLS).
  PostgreSQL has one cluster for both: the role `mtls` must show a client certificate (`clientcert=verify-ca`
  in pg_hba.conf), `postgres` need not.
- `"expired"`: a certificate that expired in 2020.
- `"wrong_host"`: a certificate for elsewhere.invalid only.

Plaintext is refused by every one of them (PostgreSQL: `hostssl` lines only; Redis: `--port 0`; NATS: a `tls`
block). Redis and NATS ask for a password (`SECRET`, NATS's user `USER`), so that credentials are in play;
PostgreSQL trusts the connection (a password in the URL is sent only if asked for). A binary that is missing
skips the test, or fails it under CI (`tests/servers.py`).
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import pytest

from tests.certificates import Certificates
from tests.server_process import HOST, accepts, free_port, stop
from tests.servers import servers_required

Setup = Literal["verify", "mutual", "expired", "wrong_host"]
Start = Callable[[contextlib.ExitStack, Path, int, Setup], None]  # starts a server in a folder, on a port
SECRET = "s3cret-not-for-logs"  # the servers' password, which must never show in an error or a log
USER = "someone"  # NATS's user
MTLS_ROLE = "mtls"  # the PostgreSQL role that must show a client certificate
START_TIMEOUT = 30.0
POSTGRESQL_BIN = Path("/usr/lib/postgresql/15/bin")
REDIS_SERVER = "redis-server"
NATS_SERVER = "/usr/sbin/nats-server"


class TlsServers:
    """Starts each (kind, `Setup`) once, at its first use, and stops them all at `close()`."""

    def __init__(self, certificates: Certificates) -> None:
        self.certificates = certificates
        self._ports: dict[tuple[str, str], int] = {}
        self._sockets: dict[int, Path] = {}  # a PostgreSQL cluster's folder (its Unix socket), by port
        self._stack = contextlib.ExitStack()

    def close(self) -> None:
        """Stop every server started and remove its folder."""
        self._stack.close()

    def postgresql(self, setup: Setup) -> int:
        """The port of a PostgreSQL cluster with `ssl=on` (one cluster for "verify" and "mutual")."""
        setup = "verify" if setup == "mutual" else setup
        return self._started("PostgreSQL", setup, self._postgresql)

    def redis(self, setup: Setup) -> int:
        """The TLS port of a Redis with `--requirepass SECRET` and no plaintext port."""
        return self._started("Redis", setup, self._redis)

    def nats(self, setup: Setup) -> int:
        """The port of a nats-server with JetStream, user `USER` and password `SECRET`, and a `tls` block."""
        return self._started("NATS", setup, self._nats)

    def create_database(self, port: int, name: str) -> None:
        """Create database `name` in the cluster on `port` (removed with the cluster)."""
        self._psql(port, f'CREATE DATABASE "{name}"')

    # --- starting ------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def own_nats(self, setup: Setup) -> Iterator[int]:
        """The port of a NATS server as `nats()` starts, but the caller's own, stopped when the block ends."""
        with contextlib.ExitStack() as stack:
            yield self._start(stack, "NATS", setup, self._nats)

    def _started(self, kind: str, setup: Setup, start: Start) -> int:
        key = (kind, setup)
        if key not in self._ports:
            self._ports[key] = self._start(self._stack, kind, setup, start)
        return self._ports[key]

    def _start(self, stack: contextlib.ExitStack, kind: str, setup: Setup, start: Start) -> int:
        directory = Path(tempfile.mkdtemp(prefix=f"er-tls-{kind.lower()}-{setup}-"))
        stack.callback(shutil.rmtree, directory, ignore_errors=True)
        port = free_port()
        start(stack, directory, port, setup)
        return port

    def _certificate(self, setup: Setup) -> Path:
        certificates = self.certificates
        named = {"expired": certificates.expired_cert, "wrong_host": certificates.wrong_host_cert}
        return named.get(setup, certificates.server_cert)

    def _postgresql(self, stack: contextlib.ExitStack, directory: Path, port: int, setup: Setup) -> None:
        if not (POSTGRESQL_BIN / "postgres").is_file():
            _unavailable("PostgreSQL 15", f"no {POSTGRESQL_BIN}/postgres")
        data = directory / "data"
        files = {"server.pem": self._certificate(setup), "server.key": self.certificates.server_key}
        files["ca.pem"] = self.certificates.ca
        for name, source in files.items():
            shutil.copyfile(source, directory / name)
        (directory / "server.key").chmod(0o600)  # PostgreSQL refuses a key others may read
        shutil.chown(directory, "postgres")
        for path in directory.iterdir():
            shutil.chown(path, "postgres")
        self._as_postgres(directory, "initdb", "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync")
        settings = {
            "port": str(port),
            "listen_addresses": f"'{HOST}'",
            "unix_socket_directories": f"'{directory}'",
            "ssl": "on",
            "ssl_cert_file": f"'{directory}/server.pem'",
            "ssl_key_file": f"'{directory}/server.key'",
            "ssl_ca_file": f"'{directory}/ca.pem'",
            "fsync": "off",
            "max_connections": "50",
            "shared_buffers": "16MB",
        }
        with (data / "postgresql.conf").open("a") as conf:
            conf.writelines(f"{name} = {value}\n" for name, value in settings.items())
        # No `host` line: a client that does not ask for TLS is refused.
        (data / "pg_hba.conf").write_text(
            "local all postgres trust\n"
            f"hostssl all {MTLS_ROLE} {HOST}/32 trust clientcert=verify-ca\n"
            f"hostssl all all {HOST}/32 trust\n"
        )
        log = directory / "postgresql.log"
        self._sockets[port] = directory
        pg_ctl = ("pg_ctl", "-D", str(data), "-l", str(log))
        self._stack.callback(
            self._as_postgres, directory, *pg_ctl, "-m", "immediate", "-w", "stop", check=False
        )
        try:
            self._as_postgres(directory, *pg_ctl, "-w", "-t", str(int(START_TIMEOUT)), "start")
        except subprocess.CalledProcessError:
            _unavailable("PostgreSQL 15", f"its cluster did not start: {_tail(log)}")
        self._psql(port, f'CREATE ROLE "{MTLS_ROLE}" SUPERUSER LOGIN')

    def _as_postgres(self, directory: Path, tool: str, *args: str, check: bool = True) -> None:
        """Run a PostgreSQL tool as the user postgres (initdb refuses root), in `directory`."""
        command = ["runuser", "-u", "postgres", "--", str(POSTGRESQL_BIN / tool), *args]
        subprocess.run(command, cwd=directory, check=check, capture_output=True, timeout=START_TIMEOUT)

    def _psql(self, port: int, statement: str) -> None:
        """Run `statement` as postgres, through the cluster's Unix socket (in its folder)."""
        host = str(self._sockets[port])
        command = [
            str(POSTGRESQL_BIN / "psql"),
            "-h",
            host,
            "-p",
            str(port),
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-c",
            statement,
        ]
        subprocess.run(command, check=True, capture_output=True, timeout=START_TIMEOUT)

    def _redis(self, stack: contextlib.ExitStack, directory: Path, port: int, setup: Setup) -> None:
        if shutil.which(REDIS_SERVER) is None:
            _unavailable("Redis", f"no {REDIS_SERVER} on PATH")
        certificates = self.certificates
        command = [REDIS_SERVER, "--bind", HOST, "--port", "0", "--tls-port", str(port)]
        command += ["--tls-cert-file", str(self._certificate(setup))]
        command += [
            "--tls-key-file",
            str(certificates.server_key),
            "--tls-ca-cert-file",
            str(certificates.ca),
        ]
        command += ["--tls-auth-clients", "yes" if setup == "mutual" else "no", "--requirepass", SECRET]
        command += ["--save", "", "--appendonly", "no", "--dir", str(directory)]
        command += ["--logfile", str(directory / "redis.log")]
        self._spawn(stack, "Redis", command, port, directory / "redis.log")

    def _nats(self, stack: contextlib.ExitStack, directory: Path, port: int, setup: Setup) -> None:
        if not Path(NATS_SERVER).is_file():
            _unavailable("NATS", f"no {NATS_SERVER}")
        certificates = self.certificates
        config = directory / "nats.conf"
        config.write_text(
            f'listen: "{HOST}:{port}"\n'
            f'authorization {{ user: "{USER}", password: "{SECRET}" }}\n'
            f'jetstream {{ store_dir: "{directory}/js", max_memory_store: 64MB, max_file_store: 256MB }}\n'
            f'tls {{ cert_file: "{self._certificate(setup)}", key_file: "{certificates.server_key}",'
            f' ca_file: "{certificates.ca}", verify: {str(setup == "mutual").lower()}, timeout: 5 }}\n'
        )
        log = directory / "nats.log"
        self._spawn(stack, "NATS", [NATS_SERVER, "-c", str(config), "-l", str(log)], port, log)

    def _spawn(
        self, stack: contextlib.ExitStack, kind: str, command: list[str], port: int, log: Path
    ) -> None:
        """Start `command` (stopped at `close()`) and wait, bounded, until it accepts on `port`."""
        with (log.parent / "output.log").open("wb") as output:
            process = subprocess.Popen(
                command, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        stack.callback(stop, process)
        deadline = time.monotonic() + START_TIMEOUT
        while not accepts(port):
            if process.poll() is not None or time.monotonic() > deadline:
                output_text = _tail(log.parent / "output.log")
                _unavailable(kind, f"{command[0]} did not start on {HOST}:{port}: {_tail(log)} {output_text}")
            time.sleep(0.02)


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-2000:] if log.exists() else ""


def _unavailable(kind: str, reason: str) -> None:
    if servers_required():
        pytest.fail(f"A {kind} server with TLS is needed: {reason}")
    pytest.skip(f"A {kind} server with TLS is not available: {reason}")
