"""The two services of a reliability scenario. The harness copies this file to `<tmp>/app.py` and runs it as
OS processes; the test process never imports it.

- `eventrelay run app:subscriber`: the subscriber. Its handler writes each event's effect (a row of `effects`)
  in its unit of work, so the effect commits together with the inbox record.
- `eventrelay run app:publisher`: the publisher as a running service, i.e. its relay (outbox -> broker).
- `python app.py publish COUNT [--no-relay]`: commits numbered events through the outbox, each in a unit of
  work that also writes its business row (`sent`), from the first number not committed yet (so a restarted
  publisher resumes), then waits for its relay to send them (`--no-relay`: leaves them in the outbox).

Everything else comes from the environment (`RELIABILITY_*`, set by `tests/reliability/harness.py`), read once
at import. Faults are injected from inside, at exact points: `RELIABILITY_KILL` lists where the process
kills itself with SIGKILL, once per point (a marker file in `RELIABILITY_DIR` remembers it across restarts
and holds the time of the kill):

- `commit:N`  right after the unit of work that published event N committed, before the relay sends it;
- `relay:N`   in the relay, after the broker confirmed the rows of a batch up to event N, before the relay
              deleted them from the outbox;
- `handler:N` in the middle of the handler of event N (its effect written, not committed);
- `ack:N`     after the handler of event N committed, before the broker's ack.

The marker also holds the pid of the process that took the kill; each effect holds the pid that wrote it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import faulthandler
import gc
import json
import os
import signal
import sqlite3
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, Field
from sqlalchemy import Column, Float, Integer, MetaData, String, Table, func, insert, select

from eventrelay import Context, Delivery, Event, Message, RetryPolicy, Settings
from eventrelay.brokers.base import Broker
from eventrelay.service import Service

ENV = os.environ
DIR = Path(ENV.get("RELIABILITY_DIR", "."))
BROKER = ENV["RELIABILITY_BROKER_URL"]
FIXED = ENV.get("RELIABILITY_FIXED") == "1"  # the next deployment: the handler bugs below are fixed
PAUSE = float(ENV.get("RELIABILITY_HANDLER_PAUSE", "0"))  # seconds a handler takes
PAD = int(ENV.get("RELIABILITY_PAD", "0"))  # bytes of padding per event (for the backlog)
RATE = float(ENV.get("RELIABILITY_RATE", "0"))  # events per second published; 0: as fast as it goes
PER_UNIT = int(ENV.get("RELIABILITY_PER_UNIT", "1"))  # events (and business rows) per unit of work
KEYS = int(ENV.get("RELIABILITY_KEYS", "0"))  # K > 0: event n is published with the ordering key n % K
LOG_STARTS = ENV.get("RELIABILITY_LOG_STARTS") == "1"  # append "<pid> <n>" to started.log as a handler starts
# The handler of an event numbered at least this, its effect written, waits for `<dir>/release` before its
# unit of work may commit: work held in flight for as long as the test wants (-1: none is held).
HOLD_FROM = int(ENV.get("RELIABILITY_HOLD_FROM", "-1"))


def _kill_points(spec: str) -> dict[str, set[int]]:
    points: dict[str, set[int]] = {}
    for part in filter(None, spec.split(";")):
        point, _, numbers = part.partition(":")
        points[point] = {int(n) for n in numbers.split(",") if n}
    return points


KILL = _kill_points(ENV.get("RELIABILITY_KILL", ""))


def _dump_stacks(_signum: int, _frame: object) -> None:
    """SIGUSR1 (sent by the harness to a process that did not end in time): every thread's stack, every
    asyncio task's chain of awaits, and the SQLite connections with an open transaction, into the log."""
    faulthandler.dump_traceback(all_threads=True)
    try:
        tasks = asyncio.all_tasks(asyncio.get_running_loop())
    except RuntimeError:  # no loop running
        tasks = set()
    for task in tasks:
        print(f"--- {task!r}", file=sys.stderr)
        awaiting: Any = task.get_coro()
        while awaiting is not None:  # Task.print_stack shows the outermost coroutine only
            frame = getattr(awaiting, "cr_frame", None) or getattr(awaiting, "ag_frame", None)
            if frame is not None:
                code = frame.f_code
                print(f"    {code.co_filename}:{frame.f_lineno} {code.co_name}", file=sys.stderr)
            awaiting = getattr(awaiting, "cr_await", None) or getattr(awaiting, "ag_await", None)
    for connection in gc.get_objects():
        if isinstance(connection, sqlite3.Connection):
            try:
                state = "in a transaction" if connection.in_transaction else "idle"
            except sqlite3.Error as exc:
                state = str(exc)
            print(f"--- sqlite3 connection {id(connection):#x}: {state}", file=sys.stderr)
    print("--- end of stacks", file=sys.stderr, flush=True)


signal.signal(signal.SIGUSR1, _dump_stacks)

metadata = MetaData()
sent = Table(
    "sent",
    metadata,
    Column("n", Integer, primary_key=True, autoincrement=False),
    Column("committed_at", Float, nullable=False),
)
effects = Table(
    "effects",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("n", Integer, nullable=False),
    Column("message_id", String(64), nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("handled_at", Float, nullable=False),
    Column("pid", Integer, nullable=False),  # the subscriber instance whose unit of work wrote it
)


class Numbered(Event, name="Reliability.Numbered"):
    # The fixed deployment also reads `number`, the field's name in a publisher of a newer version.
    n: int = Field(validation_alias=AliasChoices("n", "number") if FIXED else "n")
    kind: str = "ok"  # "raise": the handler always fails; "hang": the handler never returns (until fixed)
    pad: str = ""


def _settings(variable: str) -> Settings:
    """Quick settings for a test, with the fields `variable` holds (JSON) on top."""
    changes: dict[str, Any] = json.loads(ENV.get(variable, "{}"))
    retry = RetryPolicy(**changes.pop("retry", {"max_attempts": 3, "initial_delay": 0.05, "max_delay": 0.2}))
    quick = Settings(
        retry=retry,
        relay_poll_interval=0.2,
        relay_lease=2.0,  # a killed relay's rows come back soon (as the brokers' leases of 1 s)
        relay_batch_size=50,
        fetch_timeout=0.2,
        shutdown_timeout=10.0,
        handler_timeout=5.0,
    )
    return dataclasses.replace(quick, **changes)


def die_if(point: str, n: object, **details: object) -> None:
    """SIGKILL this process if `point:n` is a kill point not taken yet; leave the time in a marker file."""
    if not isinstance(n, int) or n not in KILL.get(point, ()):
        return
    marker = DIR / f"killed-{point}-{n}.json"
    if marker.exists():
        return
    # Written whole, then renamed: a test that polls for the marker never reads it half-written.
    partial = marker.with_name(f"{marker.name}.partial")
    partial.write_text(json.dumps({"time": time.time(), "pid": os.getpid(), **details}))
    os.replace(partial, marker)
    os.kill(os.getpid(), signal.SIGKILL)


def number(body: bytes) -> object:
    """The event number in a body, or None when the body is not one of ours."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    return data.get("n") if isinstance(data, dict) else None


def log_start(n: int) -> None:
    with open(DIR / "started.log", "a") as log:  # one short append: a line is never torn
        log.write(f"{os.getpid()} {n}\n")


async def released() -> None:
    """Return once the test created `<dir>/release` (it is another process: the file is looked for)."""
    while True:
        if (DIR / "release").exists():
            return
        await asyncio.sleep(0.01)


async def apply(event: Numbered, context: Context) -> None:
    if event.kind == "raise" and not FIXED:
        raise RuntimeError(
            f"the handler of event {event.n} always fails (a bug, fixed in the next deployment)"
        )
    if event.kind == "hang" and not FIXED:
        await asyncio.sleep(3600)  # a call that never answers (fixed in the next deployment)
    if LOG_STARTS:
        log_start(event.n)
    await context.session.execute(
        insert(effects).values(
            n=event.n,
            message_id=context.message_id,
            attempt=context.attempt,
            handled_at=time.time(),
            pid=os.getpid(),
        )
    )
    if PAUSE:
        await asyncio.sleep(PAUSE)
    if 0 <= HOLD_FROM <= event.n:
        await released()
    die_if("handler", event.n)


publisher = Service(
    ENV["RELIABILITY_PUBLISHER"],
    database=f"sqlite+aiosqlite:///{DIR / 'publisher.db'}",
    broker=BROKER,
    publishes=[Numbered],
    settings=_settings("RELIABILITY_PUBLISHER_SETTINGS"),
)
subscriber = Service(
    ENV["RELIABILITY_SUBSCRIBER"],
    database=ENV.get("RELIABILITY_SUBSCRIBER_DATABASE", f"sqlite+aiosqlite:///{DIR / 'subscriber.db'}"),
    broker=BROKER,
    handlers=[apply],
    settings=_settings("RELIABILITY_SUBSCRIBER_SETTINGS"),
)
if FIXED:  # the next deployment also handles the event under the name a newer publisher gives it
    subscriber.subscribe(apply, event="Reliability.Renamed", name="app.apply_renamed")


def _kill_in_relay(broker: Broker) -> None:
    """Wrap the publisher's broker: die after the broker confirmed part of a batch (`relay:N`)."""
    publish = broker.publish

    async def publish_or_die(messages: Sequence[Message]) -> None:
        for index, message in enumerate(messages):
            n = number(message.body)
            if n in KILL["relay"] and not (DIR / f"killed-relay-{n}.json").exists():
                await publish(messages[: index + 1])  # confirmed by the broker; the outbox still has them
                die_if("relay", n, index=index, batch=len(messages))
        await publish(messages)

    broker.publish = publish_or_die  # type: ignore[method-assign]


def _kill_before_ack(broker: Broker) -> None:
    """Wrap the subscriber's broker: die after the handler committed, before the ack (`ack:N`)."""
    ack, ack_many = broker.ack, broker.ack_many

    async def ack_or_die(delivery: Delivery) -> None:
        die_if("ack", number(delivery.message.body))
        await ack(delivery)

    async def ack_many_or_die(deliveries: Sequence[Delivery]) -> None:  # a batch's handlers committed
        for delivery in deliveries:
            die_if("ack", number(delivery.message.body))
        await ack_many(deliveries)

    broker.ack = ack_or_die  # type: ignore[method-assign]
    broker.ack_many = ack_many_or_die  # type: ignore[method-assign]


if "relay" in KILL:
    _kill_in_relay(publisher.bus.broker)
if "ack" in KILL:
    _kill_before_ack(subscriber.bus.broker)


async def publish(count: int, relay: bool) -> None:
    bus = publisher.bus
    if relay:
        await publisher.start()
    else:
        await bus.store.create_tables()
    try:
        async with bus.store.engine.connect() as conn:  # type: ignore[attr-defined]
            n = int(await conn.scalar(select(func.coalesce(func.max(sent.c.n) + 1, 0))) or 0)
        started = time.monotonic() - (n / RATE if RATE else 0)
        while n < count:
            numbers = range(n, min(n + PER_UNIT, count))
            async with bus.unit_of_work() as uow:
                for m in numbers:
                    await uow.session.execute(insert(sent).values(n=m, committed_at=time.time()))
                    await bus.publish(Numbered(n=m, pad="x" * PAD), key=str(m % KEYS) if KEYS else None)
            for m in numbers:
                die_if("commit", m)
            n = numbers[-1] + 1
            if RATE:
                await asyncio.sleep(max(0.0, started + n / RATE - time.monotonic()))
        while relay:  # until the relay sent everything (it tries again while the broker is away)
            if not (await bus.store.outbox_backlog())[0]:
                break
            await asyncio.sleep(0.05)
    finally:
        if relay:
            await publisher.stop()  # sends what the outbox still holds
        else:
            await bus.store.close()


if __name__ == "__main__":
    if sys.argv[1] != "publish":
        raise SystemExit(f"usage: {sys.argv[0]} publish COUNT [--no-relay]")
    asyncio.run(publish(int(sys.argv[2]), relay="--no-relay" not in sys.argv))
