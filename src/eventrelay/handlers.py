"""Handlers: `DistributedEventHandler[E]` classes and async functions, their context and retry policy, and the
registry of a service's subscribed handlers."""

from __future__ import annotations

import inspect
import random
import types
import typing
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Generic, TypeVar, Union

from eventrelay.envelope import TENANT_ID, BusHeaders
from eventrelay.errors import ConfigurationError
from eventrelay.events import DynamicEvent, Event, event_name, validate_event_name

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

    from eventrelay.uow import UnitOfWork

E = TypeVar("E", bound=Event | DynamicEvent)


class Retry(Exception):  # a control signal, read as `raise Retry(after=30)`
    """Raise from a handler to try this message again after `after` seconds (counts as an attempt)."""

    def __init__(self, after: float | timedelta = 0.0, reason: str = "handler asked to retry") -> None:
        self.after = after.total_seconds() if isinstance(after, timedelta) else float(after)
        super().__init__(reason)


class Reject(Exception):  # a control signal, read as `raise Reject("unknown product")`
    """Raise from a handler to send this message to the dead letters now, with `reason`."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how fast a failing handler is tried again: exponential backoff with jitter.

    Attempt n (n >= 1 failed attempts so far) waits `initial_delay * multiplier**(n-1)`, capped at
    `max_delay`, then reduced by a random fraction of up to `jitter`. After `max_attempts` attempts the
    message becomes a dead letter.
    """

    max_attempts: int = 5
    initial_delay: float = 1.0
    max_delay: float = 60.0
    multiplier: float = 2.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ConfigurationError("RetryPolicy.max_attempts must be at least 1")
        if not 0.0 <= self.jitter <= 1.0:
            raise ConfigurationError("RetryPolicy.jitter is a fraction from 0.0 to 1.0")
        if self.initial_delay < 0 or self.max_delay < 0 or self.multiplier < 1:
            raise ConfigurationError("RetryPolicy delays must be >= 0 and the multiplier >= 1")

    def delay(self, failed_attempts: int) -> float:
        """Seconds to wait after `failed_attempts` failures."""
        try:
            base = min(self.max_delay, self.initial_delay * self.multiplier ** max(0, failed_attempts - 1))
        except OverflowError:  # an absurd attempt count (from a foreign header): the longest delay
            base = self.max_delay
        return base * (1.0 - self.jitter * random.random())


@dataclass(frozen=True)
class Context(BusHeaders):
    """What a handler knows about the message it is handling, and the unit of work it runs in."""

    message_id: str
    event_name: str
    subscriber: str
    handler: str
    attempt: int
    headers: Mapping[str, str]
    key: str | None
    unit_of_work: UnitOfWork

    @property
    def session(self) -> AsyncSession:
        """The unit of work's SQLAlchemy session: the handler's writes commit with the inbox record."""
        return self.unit_of_work.session


current_context: ContextVar[Context | None] = ContextVar("eventrelay_context", default=None)
"""The context of the handler running in this task, whence `publish` stamps correlation, causation, tenant."""


def with_body_tenant(headers: Mapping[str, str], event: object) -> Mapping[str, str]:
    """`headers`, with the tenant the event carries in its body when no header names one: ABP 8/9 send it
    only there, as `tenantId` of a multi-tenant ETO or `entity.tenantId` of an entity event."""
    if TENANT_ID in headers:
        return headers
    for holder in (event, getattr(event, "entity", None)):
        if "tenant_id" in getattr(type(holder), "model_fields", ()):
            tenant = getattr(holder, "tenant_id", None)
            if tenant is not None:
                return {**headers, TENANT_ID: str(tenant)}
    return headers


class DistributedEventHandler(ABC, Generic[E]):
    """Base class of handler classes. The bus makes a fresh instance for every message.

    Handle several events with a union: `DistributedEventHandler[UserCreatedEto | UserDeletedEto]`.
    """

    _context: Context | None = None

    @property
    def context(self) -> Context:
        """The message context; set by the bus before `handle_event` runs."""
        if self._context is None:
            raise ConfigurationError(f"{type(self).__name__}.context is only set while the bus runs it")
        return self._context

    @abstractmethod
    async def handle_event(self, event: E) -> object:
        """Handle one event. Raise to retry, `Retry` to retry after a delay, `Reject` to dead-letter.

        A handler of a request (`bus.request`) returns the reply, an event; what a handler returns for an
        ordinary event is ignored."""


Invoke = Callable[[Event | DynamicEvent, Context], Awaitable[object]]


@dataclass(frozen=True, eq=False)
class HandlerSpec:
    """A subscribed handler as the bus runs it."""

    name: str
    events: Mapping[str, type[Event] | None]  # wire name -> class, None for a dynamic (dict) handler
    invoke: Invoke
    retry: RetryPolicy | None
    target: object
    batch: bool = True  # shares one unit of work (a savepoint each) with the other messages of a fetch


class Registry:
    """The handlers one service subscribed, by name and by event name, in subscription order."""

    def __init__(self, service: str) -> None:
        self.service = service
        self._specs: dict[str, HandlerSpec] = {}
        self._by_event: dict[str, list[HandlerSpec]] = {}

    def add(self, spec: HandlerSpec) -> list[str]:
        """Register `spec`; return the event names no handler took before (to bind)."""
        if spec.name in self._specs:
            raise ConfigurationError(
                f"{spec.name} is already subscribed in {self.service}; pass name= to add it twice"
            )
        self._specs[spec.name] = spec
        new = [name for name in spec.events if name not in self._by_event]
        for name in spec.events:
            self._by_event.setdefault(name, []).append(spec)
        return new

    def remove(self, handler: str | object) -> list[str]:
        """Remove a handler, given by its name or by what was subscribed; return the event names no handler
        takes any more (to unbind). Removing one not registered does nothing."""
        spec = self._specs.get(handler) if isinstance(handler, str) else None
        spec = spec or next((s for s in self._specs.values() if s.target is handler), None)
        if spec is None:
            return []
        del self._specs[spec.name]
        gone = []
        for name in spec.events:
            remaining = [s for s in self._by_event[name] if s is not spec]
            if remaining:
                self._by_event[name] = remaining
            else:
                del self._by_event[name]
                gone.append(name)
        return gone

    def get(self, handler: str) -> HandlerSpec | None:
        """The handler registered under `handler`, if any."""
        return self._specs.get(handler)

    def handlers_for(self, event: str) -> list[HandlerSpec]:
        """The handlers of an event name, in subscription order."""
        return list(self._by_event.get(event, ()))

    @property
    def event_names(self) -> list[str]:
        """The event names handled, sorted."""
        return sorted(self._by_event)

    def __len__(self) -> int:
        return len(self._specs)


def resolve_handler(
    target: object,
    *,
    event: str | type[Event] | None = None,
    factory: Callable[[], DistributedEventHandler[Any]] | None = None,
    name: str | None = None,
    retry: RetryPolicy | None = None,
    batch: bool = True,
) -> HandlerSpec:
    """Turn what `bus.subscribe` was given into a `HandlerSpec`, or raise `ConfigurationError`."""
    if isinstance(target, type) and issubclass(target, DistributedEventHandler):
        handler_cls = target
        types_ = _handled_types(target)
        make = factory or handler_cls

        async def invoke(ev: Event | DynamicEvent, ctx: Context) -> object:
            instance = make()
            instance._context = ctx
            return await instance.handle_event(ev)

    elif inspect.iscoroutinefunction(target):
        if factory is not None:
            raise ConfigurationError("factory= is for handler classes; a function needs none")
        types_ = _function_types(target)
        takes_context = len(inspect.signature(target).parameters) >= 2
        fn = target

        async def invoke(ev: Event | DynamicEvent, ctx: Context) -> object:
            return await (fn(ev, ctx) if takes_context else fn(ev))

    elif isinstance(target, DistributedEventHandler):
        raise ConfigurationError(
            f"Subscribe the class {type(target).__name__}, not an instance: the bus makes one per message. "
            "Pass factory=lambda: YourHandler(dependencies) to give it dependencies."
        )
    else:
        raise ConfigurationError(
            f"Cannot subscribe {target!r}: pass a DistributedEventHandler subclass or an async function"
        )
    events = _event_map(types_, event, target)
    return HandlerSpec(name or _qualified(target), events, invoke, retry, target, batch)


def _event_map(
    types_: tuple[type, ...], event: str | type[Event] | None, target: object
) -> dict[str, type[Event] | None]:
    if isinstance(event, str):
        # Subscribing by name: a typed handler gets its class, a DynamicEvent handler the dict payload.
        typed = [t for t in types_ if issubclass(t, Event)]
        if len(typed) > 1:
            raise ConfigurationError(f"{_qualified(target)} handles several classes; event= names one event")
        return {validate_event_name(event): typed[0] if typed else None}
    if event is not None:
        return {event_name(event): event}
    typed_only = [t for t in types_ if issubclass(t, Event)]
    if not typed_only or len(typed_only) != len(types_):
        raise ConfigurationError(
            f"{_qualified(target)} handles DynamicEvent: say which with event='Some.Event.Name'"
        )
    return {event_name(t): t for t in typed_only}


def _handled_types(cls: type) -> tuple[type, ...]:
    declared = getattr(cls, "__handled_events__", None)
    if declared is not None:  # a generic handler base that works its events out itself (EntitySynchronizer)
        return tuple(declared())
    for klass in cls.__mro__:
        for base in getattr(klass, "__orig_bases__", ()):
            if typing.get_origin(base) is DistributedEventHandler:
                (arg,) = typing.get_args(base)
                return _union_members(arg, cls)
    raise ConfigurationError(
        f"{cls.__name__} must name its event: class {cls.__name__}(DistributedEventHandler[MyEto])"
    )


def _function_types(fn: Callable[..., Any]) -> tuple[type, ...]:
    params = list(inspect.signature(fn).parameters)
    if not params or len(params) > 2:
        raise ConfigurationError(f"{_qualified(fn)} must take (event) or (event, context)")
    try:
        hints = typing.get_type_hints(fn)
    except NameError as exc:  # a string annotation naming a class defined inside a function
        raise ConfigurationError(
            f"Cannot resolve the annotations of {_qualified(fn)}: {exc}. Define the event class at module "
            "level, or use a handler class: class H(DistributedEventHandler[MyEto])"
        ) from exc
    if params[0] not in hints:
        raise ConfigurationError(f"Annotate the event parameter of {_qualified(fn)}, e.g. (event: MyEto)")
    return _union_members(hints[params[0]], fn)


def _union_members(arg: Any, owner: object) -> tuple[type, ...]:
    members = typing.get_args(arg) if typing.get_origin(arg) in (Union, types.UnionType) else (arg,)
    for member in members:
        if not (isinstance(member, type) and issubclass(member, Event | DynamicEvent)):
            raise ConfigurationError(f"{_qualified(owner)} handles {member!r}, which is not an Event class")
    return tuple(members)


def _qualified(target: object) -> str:
    module = getattr(target, "__module__", type(target).__module__)
    qualname = getattr(target, "__qualname__", type(target).__qualname__)
    return f"{module}.{qualname}"
