"""Sagas: a process that spans several events, with typed state kept in the service's own database.

A `Saga[State]` subclass declares its steps with `@step`; each step handles one event class, finds its saga by
the key `correlate` reads from the event, and runs in the handler's unit of work: the state it leaves, the
events it publishes and the inbox record commit together, so a redelivered event never advances a saga twice.
Concurrent events for one saga take turns on its row (`SELECT ... FOR UPDATE`; SQLite has one writer at a
time anyway), and a version column catches a write that did not hold the lock.
"""

from __future__ import annotations

import inspect
import logging
import re
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, TypeVar

from pydantic import BaseModel
from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    delete,
    insert,
    select,
    update,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.exc import SQLAlchemyError

from eventrelay.envelope import printable
from eventrelay.errors import ConfigurationError, EventRelayError, StoreError
from eventrelay.events import Event, event_name
from eventrelay.handlers import Context, HandlerSpec, Reject, RetryPolicy
from eventrelay.stores.base import Store, utcnow
from eventrelay.uow import due_time

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

logger = logging.getLogger(__name__)

S = TypeVar("S", bound=BaseModel)
F = TypeVar("F", bound=Callable[..., Any])

TIMEOUT = "x-eventrelay-saga-timeout"
"""The header of an event a saga scheduled to itself (`Saga.schedule`): the saga's name."""

# `eventrelay.sql.TIME`, written again: importing it would load the SQL plumbing (about 30 ms) at every
# `import eventrelay`, since sagas are part of the face.
_TIME = DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
_STATE = Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")


class SagaConflict(EventRelayError):
    """A saga's row changed under a step that did not hold its lock; the step is tried again."""


@dataclass(frozen=True)
class _Step:
    method: str
    event: type[Event]
    correlate: Callable[[Any], object]
    starts: bool


def step(*, correlate: str | Callable[[Any], object], starts: bool = False) -> Callable[[F], F]:
    """Declare a saga method a step: it handles the event class its parameter is annotated with.

    `correlate` reads the saga's key from the event: a field name (`"order_id"`) or a function
    (`lambda e: e.order_id`). With `starts`, the event starts a saga when none has its key (for one that
    has, the step runs on its state, with `is_new` False); without it, an event whose saga does not exist
    is a dead letter (or ignored, with the saga's `if_missing="ignore"`).
    """
    if isinstance(correlate, str):
        field = correlate
        read: Callable[[Any], object] = lambda event: getattr(event, field)  # noqa: E731
    elif callable(correlate):
        read = correlate
    else:
        raise ConfigurationError(f"correlate= is a field name or a function of the event, not {correlate!r}")

    def mark(method: F) -> F:
        if not inspect.iscoroutinefunction(method):
            raise ConfigurationError(f"Saga step {method.__qualname__} must be an async def")
        method.__saga_step__ = (read, starts)  # type: ignore[attr-defined]
        return method

    return mark


@dataclass(frozen=True)
class SagaRecord:
    """One saga as stored: what `eventrelay sagas` and the dashboard show."""

    saga: str
    key: str
    state: Mapping[str, Any]
    completed: bool
    version: int
    created_at: datetime
    updated_at: datetime
    timeout_at: datetime | None


class Saga(Generic[S]):
    """Base class of sagas. Subscribe the class (`await bus.subscribe(OrderFulfilment)`); the bus makes an
    instance per event (with `factory=` if given) and runs the step the event's class names.

    Class options: `class OrderFulfilment(Saga[State], table=..., keep_completed=..., if_missing=...)`.
    `table` names its table (default `eventrelay_saga_<class name in snake_case>`); `keep_completed` keeps a
    completed saga's row, marked completed, so that late events for it are ignored (default), where False
    deletes it; `if_missing="ignore"` ignores an event whose saga does not exist instead of dead-lettering it.
    """

    table: ClassVar[str]
    keep_completed: ClassVar[bool]
    if_missing: ClassVar[Literal["dead-letter", "ignore"]]
    _steps: ClassVar[dict[str, _Step]]
    _state_type: ClassVar[type[BaseModel]]
    _table: ClassVar[Table]

    # Per instance once set; class-level defaults, so that a subclass's own __init__ need not call ours.
    _context: Context | None = None
    _state: S | None = None
    _completed = False
    _timeout: tuple[str, datetime] | None = None
    key = ""
    """The saga's key, read from the event by the step's `correlate`."""
    is_new = False
    """Whether this step is starting the saga (no saga had its key)."""

    def __init_subclass__(
        cls,
        *,
        table: str | None = None,
        keep_completed: bool = True,
        if_missing: Literal["dead-letter", "ignore"] = "dead-letter",
        **kwargs: Any,
    ) -> None:
        super().__init_subclass__(**kwargs)
        if if_missing not in ("dead-letter", "ignore"):
            raise ConfigurationError(
                f"{cls.__name__}: if_missing is 'dead-letter' or 'ignore', not {if_missing!r}"
            )
        cls.table = table or getattr(cls, "table", None) or f"eventrelay_saga_{_snake(cls.__name__)}"
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,62}", cls.table):
            raise ConfigurationError(
                f"{cls.__name__}'s table {cls.table!r} is not a plain SQL name of at most 63 characters: "
                f"pass table='...' (class {cls.__name__}(Saga[...], table='order_sagas'))"
            )
        cls.keep_completed, cls.if_missing = keep_completed, if_missing
        state = _state_type(cls)
        if state is None:  # a generic base of sagas (`class Audited(Saga[S])`): its subclasses are the sagas
            return
        cls._state_type = state
        cls._steps = _steps(cls)
        cls._table = define_saga_table(cls, MetaData())

    # --- what a step uses ---------------------------------------------------------------------------

    @property
    def context(self) -> Context:
        """The context of the event this step handles (its unit of work, headers, attempt)."""
        if self._context is None:
            raise ConfigurationError(f"{type(self).__name__}.context is only set while the bus runs a step")
        return self._context

    @property
    def state(self) -> S:
        """The saga's state; a starting step sets it (`self.state = FulfilmentState(...)`)."""
        if self._state is None:
            raise ConfigurationError(
                f"{type(self).__name__} has no state yet: its starting step sets self.state = "
                f"{self._state_type.__name__}(...)"
            )
        return self._state

    @state.setter
    def state(self, value: S) -> None:
        if not isinstance(value, self._state_type):
            raise ConfigurationError(f"{type(self).__name__}.state is a {self._state_type.__name__}")
        self._state = value

    async def publish(self, event: Event, *, key: str | None = None) -> str:
        """Publish `event` in this step's unit of work (it leaves only if the step commits); return its id."""
        return self.context.unit_of_work.publish(event, key=key).id

    async def schedule(
        self, event: Event, *, delay: float | timedelta | None = None, at: datetime | None = None
    ) -> str:
        """Send `event` to this saga after `delay` (or `at`): its timeout. A saga has one timeout at a
        time: scheduling again replaces it (the earlier one is ignored when it comes), and a timeout that
        comes after the saga completed does nothing. Return the event's message id."""
        if event_name(event) not in self._steps:
            raise ConfigurationError(
                f"{type(self).__name__} has no step for {type(event).__name__}, its timeout"
            )
        due = due_time(delay, at)
        if due is None:
            raise ConfigurationError("schedule() takes delay= or at=")
        message = self.context.unit_of_work.publish(event, headers={TIMEOUT: self.table}, available_at=due)
        self._timeout = (message.id, due)
        return message.id

    def complete(self) -> None:
        """End the saga once this step commits: its row is marked completed (or deleted, with
        `keep_completed=False`), and later events for it are ignored."""
        self._completed = True

    # --- how the bus runs a step --------------------------------------------------------------------

    async def _run(self, event: Event) -> None:
        context = self.context
        step = self._steps[context.event_name]
        self.key = key = _key(step.correlate(event), type(self), step)
        session = context.unit_of_work.session
        table = self._table
        row = (await session.execute(select(table).where(table.c.key == key).with_for_update())).first()
        shown = f"{type(self).__name__} {printable(key)!r}"
        timeout = context.headers.get(TIMEOUT) == self.table
        if timeout and (row is None or row.completed or row.timeout_id != context.message_id):
            logger.debug("Timeout of %s ignored: the saga completed or scheduled another", shown)
            return
        if row is not None and row.completed:
            logger.info("%s ignored by %s: the saga has completed", printable(context.event_name), shown)
            return
        if row is None and not step.starts:
            if self.if_missing == "ignore":
                return
            raise Reject(
                f"no {type(self).__name__} saga has the key {key!r} and {step.event.__name__} starts none"
            )
        self.is_new = row is None
        if row is not None:
            self._state = self._state_type.model_validate_json(row.state)  # type: ignore[assignment]
        await getattr(self, step.method)(event)
        await self._save(session, row, timeout)

    async def _save(self, session: AsyncSession, row: Any, timeout: bool) -> None:
        table, now = self._table, utcnow()
        if self._completed and not self.keep_completed:
            if row is not None:
                await session.execute(delete(table).where(table.c.key == self.key))
            return
        values: dict[str, Any] = {"state": self.state.model_dump_json(), "completed": self._completed}
        values["updated_at"] = now
        if self._timeout is not None:
            values["timeout_id"], values["timeout_at"] = self._timeout
        elif timeout or self._completed:  # the timeout came (or no longer matters)
            values["timeout_id"] = values["timeout_at"] = None
        if row is None:
            await session.execute(insert(table).values(key=self.key, version=1, created_at=now, **values))
            return
        result = await session.execute(
            update(table)
            .where(table.c.key == self.key, table.c.version == row.version)
            .values(version=row.version + 1, **values)
        )
        if result.rowcount != 1:  # type: ignore[attr-defined]
            raise SagaConflict(f"{type(self).__name__} {self.key!r} changed under this step; it runs again")


def define_saga_table(saga: type[Saga[Any]], metadata: MetaData) -> Table:
    """Add `saga`'s table to `metadata` (yours, for migrations) and return it."""
    return Table(
        saga.table,
        metadata,
        Column("key", String(255), primary_key=True),
        Column("state", _STATE, nullable=False),
        Column("version", Integer, nullable=False),
        Column("completed", Boolean, nullable=False),
        Column("created_at", _TIME, nullable=False),
        Column("updated_at", _TIME, nullable=False),
        Column("timeout_at", _TIME),
        Column("timeout_id", String(64)),
    )


def saga_spec(
    saga: type[Saga[Any]],
    *,
    factory: Callable[[], Saga[Any]] | None = None,
    name: str | None = None,
    retry: RetryPolicy | None = None,
    batch: bool = True,
) -> HandlerSpec:
    """The handler the bus runs for `saga`'s steps."""
    if "_steps" not in saga.__dict__:
        raise ConfigurationError(f"{saga.__name__} leaves its state open: subscribe a saga that names it")
    make = factory or saga

    async def invoke(event: Any, context: Context) -> None:
        instance = make()
        instance._context = context
        await instance._run(event)

    events: dict[str, type[Event] | None] = {name_: s.event for name_, s in saga._steps.items()}
    return HandlerSpec(name or f"{saga.__module__}.{saga.__qualname__}", events, invoke, retry, saga, batch)


async def create_saga_tables(store: Store, sagas: list[type[Saga[Any]]]) -> None:
    """Create the tables of `sagas` that do not exist yet."""
    metadata = MetaData()
    for saga in sagas:
        define_saga_table(saga, metadata)
    await store.create_tables_of(metadata)


async def saga_records(
    store: Store, saga: type[Saga[Any]], *, limit: int = 100, completed: bool = False, key: str | None = None
) -> list[SagaRecord]:
    """`saga`'s open sagas (and completed ones, with `completed`), oldest first; only the one of `key`, if
    given (open or completed)."""
    table = saga._table
    query = select(table).order_by(table.c.created_at, table.c.key).limit(limit)
    if key is not None:
        query = query.where(table.c.key == key)
    elif not completed:
        query = query.where(table.c.completed.is_(False))
    try:
        async with store.transaction() as tx:
            rows = (await tx.session.execute(query)).all()
    except SQLAlchemyError as exc:
        said = getattr(exc, "orig", None) or exc
        raise StoreError(
            f"Could not read the {saga.__name__} sagas from {saga.table}: {said}. "
            "If the table is missing, start the service once or run `eventrelay db init MODULE:SERVICE`"
        ) from exc
    return [
        SagaRecord(
            saga.__name__,
            row.key,
            saga._state_type.model_validate_json(row.state).model_dump(mode="json"),
            row.completed,
            row.version,
            row.created_at,
            row.updated_at,
            row.timeout_at,
        )
        for row in rows
    ]


def _key(value: object, saga: type[Saga[Any]], step: _Step) -> str:
    if value is None or value == "":
        raise Reject(f"{saga.__name__}: {step.event.__name__} carries no saga key (correlate gave {value!r})")
    key = str(value)
    if len(key) > 255:
        raise Reject(f"{saga.__name__}: the key from {step.event.__name__} is over 255 characters")
    return key


def _snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


def _state_type(cls: type) -> type[BaseModel] | None:
    """The class's state model; None for a generic base that leaves it open."""
    for klass in cls.__mro__:
        for base in getattr(klass, "__orig_bases__", ()):
            origin = typing.get_origin(base)
            if origin is Saga or (isinstance(origin, type) and issubclass(origin, Saga)):
                (arg,) = typing.get_args(base)
                if isinstance(arg, TypeVar):
                    return None
                if isinstance(arg, type) and issubclass(arg, BaseModel):
                    return arg
                raise ConfigurationError(f"{cls.__name__}'s state is a pydantic model, not {arg!r}")
    raise ConfigurationError(f"{cls.__name__} must name its state: class {cls.__name__}(Saga[MyState])")


def _steps(cls: type) -> dict[str, _Step]:
    steps: dict[str, _Step] = {}
    for attr, method in inspect.getmembers(cls, inspect.iscoroutinefunction):
        marked = getattr(method, "__saga_step__", None)
        if marked is None:
            continue
        correlate, starts = marked
        params = list(inspect.signature(method).parameters)
        hints = typing.get_type_hints(method)
        event = hints.get(params[1]) if len(params) == 2 else None
        if not (isinstance(event, type) and issubclass(event, Event)):
            raise ConfigurationError(
                f"Saga step {cls.__name__}.{attr} takes (self, event) with the event's class annotated, "
                "e.g. async def placed(self, event: OrderPlacedEto) -> None"
            )
        name = event_name(event)
        if name in steps:
            raise ConfigurationError(
                f"{cls.__name__} has two steps for {event.__name__}: {steps[name].method} and {attr}"
            )
        steps[name] = _Step(attr, event, correlate, starts)
    if not steps:
        raise ConfigurationError(f"{cls.__name__} has no steps: mark its methods with @step(correlate=...)")
    return steps
