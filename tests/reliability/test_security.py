"""Security basics: nothing on the receive path unpickles or evaluates; a message's size is checked before it
is parsed; passwords in URLs never reach the CLI's output or its errors.

The scenario tests check the rest of "credentials never appear": every broker URL there carries a password
(PostgreSQL trusts 127.0.0.1, Redis's default user and NATS take any), and the crash, outage and poison tests
assert that it shows in no child process's log, no CLI output and no dead-letter record.
"""

from __future__ import annotations

import ast
import asyncio
import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from pydantic import BaseModel

from eventrelay import Context, DistributedEventBus, DynamicEvent, Event, RetryPolicy, Settings
from eventrelay.envelope import Message, new_message_id
from eventrelay.errors import ConfigurationError
from eventrelay.stores.base import DEAD_LETTER_BODY_MAX
from tests.conftest import POSTGRESQL_PORT
from tests.faultproxy import FaultProxy
from tests.reliability.harness import Figures, Report, Scenario, adapter_kind
from tests.reliability.under_test import BrokerUnderTest

pytestmark = pytest.mark.reliability

SOURCE = Path(__file__).parents[2] / "src" / "eventrelay"
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "marshal", "shelve", "jsonpickle", "yaml"}
UNSAFE_CALLS = {"eval", "exec", "compile", "__import__"}


def _unsafe(path: Path) -> list[str]:
    """Imports of deserializers that run code, and calls of eval/exec/compile, in one module."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name.partition(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module.partition(".")[0]]
        line = getattr(node, "lineno", 0)
        found += [f"{path.name}:{line} imports {name}" for name in names if name in UNSAFE_MODULES]
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in UNSAFE_CALLS:
            found.append(f"{path.name}:{line} calls {node.func.id}()")
    return found


def test_nothing_in_the_library_unpickles_or_evaluates() -> None:
    modules = sorted(SOURCE.rglob("*.py"))
    assert len(modules) > 20  # the guard looks where the code is
    found = [finding for module in modules for finding in _unsafe(module)]
    assert not found, found


def test_the_guard_finds_what_it_looks_for(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("import pickle\nfrom yaml import load\nx = eval('1')\nexec('y = 2')\n")
    assert len(_unsafe(sample)) == 4


LIMIT = 128 * 1024  # over what a dead letter keeps of a body over the limit
HUGE = b"[" * (4 * LIMIT)  # invalid JSON, and large: parsing it would be the waste a limit prevents


class Sized(Event, name="Security.Sized"):
    n: int


async def test_an_oversized_body_is_dead_lettered_without_being_parsed(
    adapter_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    report: Report,
    names: dict[str, str],
) -> None:
    parsed: list[int] = []
    real_loads, real_validate = json.loads, BaseModel.model_validate_json.__func__  # type: ignore[attr-defined]

    def loads(text: Any, *args: Any, **kwargs: Any) -> Any:
        parsed.append(len(text))
        return real_loads(text, *args, **kwargs)

    def validate(cls: type[BaseModel], data: Any, *args: Any, **kwargs: Any) -> Any:
        parsed.append(len(data))
        return real_validate(cls, data, *args, **kwargs)

    async def typed(event: Sized, context: Context) -> None:
        raise AssertionError("never handled")

    async def dynamic(event: DynamicEvent, context: Context) -> None:
        raise AssertionError("never handled")

    settings = Settings(max_message_bytes=LIMIT, fetch_timeout=0.2, shutdown_timeout=10)
    database = f"sqlite+aiosqlite:///{tmp_path}/limit.db"
    # The broker fixture's subscriber: the fixture deletes its queues (RabbitMQ) after the test.
    bus = DistributedEventBus(names["subscriber"], broker=adapter_url, database=database, settings=settings)
    await bus.subscribe(typed)
    await bus.subscribe(dynamic, event="Security.Dynamic")
    async with bus:
        monkeypatch.setattr("eventrelay.codec.json.loads", loads)
        monkeypatch.setattr(BaseModel, "model_validate_json", classmethod(validate))
        sent = [Message(new_message_id(), name, HUGE) for name in ("Security.Sized", "Security.Dynamic")]
        await bus.broker.publish(sent)
        async with asyncio.timeout(30):
            while True:
                if len(letters := await bus.dead_letters()) == len(sent):
                    break
                await asyncio.sleep(0.02)
        monkeypatch.undo()
        for letter in letters:  # a truncated body cannot be handled as it was sent
            with pytest.raises(ConfigurationError, match="cannot be replayed faithfully"):
                await bus.replay(letter.id)
        assert len(await bus.dead_letters()) == len(sent)  # and the letters stay
    assert {letter.message.id for letter in letters} == {m.id for m in sent}
    for letter in letters:
        assert letter.reason == (
            f"cannot decode: message is {len(HUGE)} bytes, over the limit of {LIMIT}; "
            f"the dead letter keeps its first {DEAD_LETTER_BODY_MAX} bytes"
        )
        # Issue 15: the whole body was stored; a flood of them filled the store. Its start and size are kept.
        assert letter.message.body == HUGE[:DEAD_LETTER_BODY_MAX]
        assert letter.truncated_from == len(HUGE)
    assert not [size for size in parsed if size >= len(HUGE)], "a body over the limit was parsed"
    report.add(
        Figures(
            "security: body over max_message_bytes",
            adapter_kind(adapter_url),
            len(sent),
            0,
            0,
            len(letters),
            None,
            f"{len(HUGE) // 1024} KiB of invalid JSON, limit {LIMIT // 1024} KiB: dead letters keep the "
            f"first {DEAD_LETTER_BODY_MAX // 1024} KiB and the size; never parsed, replay refused",
        )
    )


async def test_passwords_in_urls_never_reach_the_cli_output_or_errors(
    postgresql_url: str, tmp_path: Path, names: dict[str, str]
) -> None:
    secret = f"pw-{uuid.uuid4().hex[:16]}"
    scheme, _, rest = postgresql_url.partition("://")
    user, _, place = rest.partition("@")
    async with FaultProxy(POSTGRESQL_PORT) as proxy:
        # The service's database and its broker (the SQL broker, on the same server) behind the proxy.
        address = f"{scheme}://{user}:{secret}@{place}".replace(f":{POSTGRESQL_PORT}/", ":{port}/")
        broker = BrokerUnderTest("postgresql", address, POSTGRESQL_PORT, {}, **names, secret=secret)
        database = broker.url(proxy.port)
        run = Scenario(tmp_path, broker, broker_url=broker.url(proxy.port), subscriber_database=database)
        try:
            outputs: list[tuple[str, int, str]] = []

            async def cli(*args: str) -> int:
                done = await run.cli(*args)
                outputs.append((" ".join(args), done.returncode, done.stdout + done.stderr))
                return done.returncode

            assert await cli("db", "init", database) == 0
            assert await cli("dead-letters", "list", "app:subscriber", "--json") == 0
            assert await cli("events", "app:subscriber") == 0
            async with proxy.down():  # every command now fails, saying where it could not connect
                assert await cli("db", "init", database) == 1
                assert await cli("dead-letters", "list", "app:subscriber") == 1
                assert await cli("dead-letters", "replay", "app:subscriber", "--all") == 1
                assert await cli("run", "app:subscriber") == 1
            bad_port = database.replace(f":{proxy.port}/", ":not-a-port/")
            assert await cli("db", "init", bad_port) == 1
            assert await cli("db", "init", database.replace(scheme, "nosuchdb+driver")) == 1
        finally:
            await run.close()
    for command, code, output in outputs:
        assert secret not in output, f"`eventrelay {command}` showed the password:\n{output}"
        if code:
            assert "Error: " in output, output  # one line that says what went wrong
    shown = "\n".join(output for _, _, output in outputs)
    assert ":***@127.0.0.1" in shown  # where the errors name the URL, it is there, redacted


DEPTH = 10_000
DEEP = ('{"n": ' + "[" * DEPTH + "]" * DEPTH + "}").encode()  # valid JSON, nested past the recursion limit


async def test_json_nested_too_deeply_is_dead_lettered_once_not_redelivered(
    adapter_url: str, tmp_path: Path, report: Report, names: dict[str, str]
) -> None:
    handled: list[str] = []

    async def typed(event: Sized, context: Context) -> None:
        handled.append("typed")

    async def dynamic(event: DynamicEvent, context: Context) -> None:
        handled.append("dynamic")

    # One attempt: before issue 15 the dynamic one raised RecursionError past the decode-error handling and
    # came back endlessly (985 deliveries in 12 s), never a dead letter.
    settings = Settings(retry=RetryPolicy(max_attempts=1), fetch_timeout=0.2, shutdown_timeout=10)
    database = f"sqlite+aiosqlite:///{tmp_path}/deep.db"
    # The broker fixture's subscriber: the fixture deletes its queues (RabbitMQ) after the test.
    bus = DistributedEventBus(names["subscriber"], broker=adapter_url, database=database, settings=settings)
    await bus.subscribe(typed)
    await bus.subscribe(dynamic, event="Security.Dynamic")
    async with bus:
        sent = [Message(new_message_id(), name, DEEP) for name in ("Security.Sized", "Security.Dynamic")]
        await bus.broker.publish(sent)
        async with asyncio.timeout(30):
            while True:
                if len(await bus.dead_letters()) >= len(sent):
                    break
                await asyncio.sleep(0.02)
        await asyncio.sleep(0.5)  # time to come again, were it redelivered
        letters = await bus.dead_letters()
    assert not handled
    assert sorted(letter.message.id for letter in letters) == sorted(m.id for m in sent)  # once each
    for letter in letters:
        assert letter.reason.startswith("cannot decode: "), letter.reason
        assert letter.message.body == DEEP
    dynamic_letter = next(letter for letter in letters if letter.message.name == "Security.Dynamic")
    assert dynamic_letter.reason == "cannot decode: body of 'Security.Dynamic' is nested too deeply to decode"
    report.add(
        Figures(
            "security: JSON nested 10,000 deep",
            adapter_kind(adapter_url),
            len(sent),
            0,
            0,
            len(letters),
            None,
            "typed and dynamic event, max_attempts=1: one dead letter each, never redelivered",
        )
    )


RUN_APP = """
from eventrelay import Context, Event
from eventrelay.service import Service


class Pinged(Event, name="Security.Pinged"):
    n: int


async def pong(event: Pinged, context: Context) -> None:
    pass


service = Service("{name}", database="sqlite+aiosqlite:///run.db", broker={broker!r}, handlers=[pong])
"""


async def test_a_nats_token_and_a_password_option_never_reach_the_cli_output(
    nats_broker: BrokerUnderTest, postgresql_url: str, tmp_path: Path, names: dict[str, str]
) -> None:
    token, secret = f"tk-{uuid.uuid4().hex[:16]}", f"pw-{uuid.uuid4().hex[:16]}"
    port = nats_broker.server_port
    broker = f"nats://{token}@127.0.0.1:{port}?{urlencode(nats_broker.options)}"  # the server takes any token
    (tmp_path / "runapp.py").write_text(RUN_APP.format(name=names["subscriber"], broker=broker))
    path = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path}
    command = [sys.executable, "-m", "eventrelay"]

    # PostgreSQL trusts 127.0.0.1: the password option is ignored, and must not be shown.
    init = await asyncio.to_thread(
        subprocess.run,
        [*command, "db", "init", f"{postgresql_url}?password={secret}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert init.returncode == 0, init.stderr
    assert secret not in init.stdout + init.stderr
    assert "?password=***" in init.stdout

    log = tmp_path / "run.log"
    with log.open("wb") as stderr:
        process = await asyncio.create_subprocess_exec(
            *command, "run", "runapp:service", cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=stderr
        )
    try:
        async with asyncio.timeout(60):
            while f"{names['subscriber']} started: database" not in log.read_text():
                assert process.returncode is None, log.read_text()
                await asyncio.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(60):
            assert await process.wait() == 0, log.read_text()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    output = log.read_text()
    assert token not in output, output
    assert f"broker nats://***@127.0.0.1:{port}" in output, output
