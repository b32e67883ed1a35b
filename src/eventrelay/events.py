"""Events (ETOs): typed, immutable pydantic models with a stable wire name.

```python
class ProductPriceChangedEto(Event, name="BookStore.Product.PriceChanged"):
    product_id: UUID
    new_price: Decimal
```

Without `name=` the wire name is `module.QualName`; declare one, since renaming a module would otherwise
break every subscriber. A generic event names itself after its type argument (ABP's `GenericEventName`):
`class EntityUpdatedEto(Event, Generic[E], name_postfix=".Updated")` makes `EntityUpdatedEto[UserEto]`
`"{name of UserEto}.Updated"`.

Unknown fields are ignored when decoding, so a subscriber may keep its own copy of a publisher's ETO class
with the same name and the fields it needs.

An event whose shape changed declares its version, `class X(Event, name=..., version=2)` (default 1); an
older message is brought up to it by upcasters (`eventrelay.upcasting`).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from eventrelay.errors import ConfigurationError

MAX_NAME_LENGTH = 256

# name -> class, to refuse two live classes with one name. Weak, so classes that are gone free their name.
_declared: weakref.WeakValueDictionary[str, type[Event]] = weakref.WeakValueDictionary()


def validate_event_name(name: object) -> str:
    """Return `name` if it can be an event name, or raise `ConfigurationError` saying why not."""
    if not isinstance(name, str):
        raise ConfigurationError(f"An event name must be a string, not {type(name).__name__}: {name!r}")
    if not name.strip() or name != name.strip():
        raise ConfigurationError(f"An event name must be non-empty with no surrounding spaces: {name!r}")
    if not name.isprintable():  # it is shown in terminals and logs, and routed by brokers
        raise ConfigurationError(f"An event name must have no control characters or line breaks: {name!r}")
    if len(name) > MAX_NAME_LENGTH:
        raise ConfigurationError(
            f"Event name is {len(name)} characters; the limit is {MAX_NAME_LENGTH}: {name[:60]!r}..."
        )
    return name


class Event(BaseModel):
    """Base class of every event transfer object (ETO): frozen, typed, tolerant of unknown fields."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    __event_name__: ClassVar[str]
    __event_declaration__: ClassVar[tuple[str | None, str, str]] = (None, "", "")
    __event_version__: ClassVar[int] = 1

    def __init_subclass__(
        cls,
        name: object = None,
        name_prefix: str = "",
        name_postfix: str = "",
        version: object = 1,
        **kwargs: Any,
    ) -> None:
        super().__init_subclass__(**kwargs)
        if name is not None:
            validate_event_name(name)
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ConfigurationError(f"{cls.__name__}: version= must be an integer from 1 up: {version!r}")
        cls.__event_declaration__ = (name, name_prefix, name_postfix)  # type: ignore[assignment]
        cls.__event_version__ = version

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        metadata = cls.__pydantic_generic_metadata__
        if metadata["parameters"]:
            if metadata["origin"] is None and cls.__event_declaration__[0] is not None:
                raise ConfigurationError(
                    f"{cls.__name__} is generic, so it is named after its type argument and name= would be "
                    "ignored: declare name_prefix= or name_postfix= instead, e.g. name_postfix='.Updated'"
                )
            return  # an open generic such as EntityUpdatedEto: only its parametrizations have names
        if metadata["origin"] is not None:
            name = _generic_name(metadata["origin"], metadata["args"])  # type: ignore[arg-type]
            cls.__event_version__ = metadata["origin"].__event_version__  # type: ignore[attr-defined]
        else:
            declared = cls.__event_declaration__[0]
            name = str(declared) if declared is not None else f"{cls.__module__}.{cls.__qualname__}"
        cls.__event_name__ = validate_event_name(name)
        _register(cls)


def _generic_name(origin: type[Event], args: tuple[Any, ...]) -> str:
    _, prefix, postfix = origin.__event_declaration__
    if len(args) != 1 or not (isinstance(args[0], type) and issubclass(args[0], Event)):
        raise ConfigurationError(
            f"{origin.__name__} takes exactly one Event type argument, e.g. {origin.__name__}[UserEto]"
        )
    return f"{prefix}{event_name(args[0])}{postfix}"


def _register(cls: type[Event]) -> None:
    name = cls.__event_name__
    existing = _declared.get(name)
    if existing is not None and _identity(existing) != _identity(cls):
        raise ConfigurationError(
            f"Two event classes are named {name!r}: {_identity(existing)} and {_identity(cls)}. "
            "Give one of them another name with `class ...(Event, name=...)`."
        )
    _declared[name] = cls


def _identity(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def event_name(event: type[Event] | Event) -> str:
    """The wire name of an event class or instance."""
    cls = event if isinstance(event, type) else type(event)
    try:
        return cls.__dict__["__event_name__"]  # type: ignore[no-any-return]
    except KeyError:
        raise ConfigurationError(
            f"{cls.__name__} is generic and has no wire name of its own; use it with a type argument, "
            f"e.g. {cls.__name__}[UserEto]"
        ) from None


def event_version(event: type[Event] | Event) -> int:
    """The version an event class (or instance) declares with `version=`; 1 if it declares none."""
    cls = event if isinstance(event, type) else type(event)
    return cls.__event_version__


@dataclass(frozen=True)
class DynamicEvent:
    """An event known only by name, with its JSON payload as a dict (ABP's `DynamicEventData`)."""

    name: str
    data: dict[str, Any] = field(default_factory=dict)
