"""`UrlOptions`: the query options of a broker URL, read by typed getters and checked when the broker is made.

An adapter reads each of its own options with a getter, then calls `finish()`, which returns the options its
client library takes as they are (`passes`) and refuses any other with the closest known name:

    options = UrlOptions("RabbitMQ", url, url_query(url), client="aio-pika", passes={"heartbeat", "cafile"})
    prefetch = options.integer("prefetch", 100, minimum=1)
    client_options = options.finish()

Every message has one style: "RabbitMQ URL option prefetch takes a whole number above 0, not 'x'", and
"Unknown RabbitMQ URL option 'prefech' in 'amqp://guest:***@host/?prefech=5'. Did you mean 'prefetch'?
RabbitMQ's options: ...; aio-pika's: ...". A URL in a message is redacted (`redact_url`).
"""

from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from urllib.parse import parse_qsl, urlsplit

from eventrelay.config import redact_url
from eventrelay.errors import ConfigurationError

QueryValue = str | Sequence[str]  # SQLAlchemy's URL.query holds a tuple for a key given more than once


def url_query(url: str) -> dict[str, str]:
    """The options in `url`'s query; of a key given twice, the last. An option given empty counts too, so
    that a misspelt `?prefech=` is refused like any other."""
    return dict(parse_qsl(urlsplit(url).query, keep_blank_values=True))


class UrlOptions:
    """The options in a broker URL's query (see the module docstring)."""

    def __init__(
        self,
        broker: str,
        url: str,
        query: Mapping[str, QueryValue],
        *,
        client: str = "",
        passes: Collection[str] = (),
        note: str = "",
    ) -> None:
        """`broker` names the adapter in messages; `passes` are the options `client` (its library) takes as
        they are; `note` ends the unknown-option message (say which other options pass through)."""
        self.broker, self.client, self.note = broker, client, note
        self._url, self._query, self._passes = url, dict(query), frozenset(passes)
        self._read: set[str] = set()

    def _raw(self, name: str) -> str | None:
        self._read.add(name)
        value = self._query.get(name)
        return value if value is None or isinstance(value, str) else value[-1]  # the last one given wins

    def _refuse(self, name: str, takes: str, raw: str) -> ConfigurationError:
        return ConfigurationError(f"{self.broker} URL option {name} takes {takes}, not {raw!r}")

    def string(self, name: str, default: str = "") -> str:
        """The option as it is, or `default`."""
        raw = self._raw(name)
        return default if raw is None else raw

    def number(self, name: str, default: float, *, zero: bool = False) -> float:
        """A finite number above 0 (or 0 and above, with `zero`)."""
        if (raw := self._raw(name)) is None:
            return default
        if (number := finite_number(raw)) > 0 or (zero and number == 0):
            return number
        raise self._refuse(name, "a number of 0 or more" if zero else "a number above 0", raw)

    def integer(self, name: str, default: int, *, minimum: int | None = None) -> int:
        """A whole number (`100.0` is one), at least `minimum` if given."""
        if (raw := self._raw(name)) is None:
            return default
        number = finite_number(raw)
        if number.is_integer() and (minimum is None or number >= minimum):
            return int(number)
        at_least = {None: "", 0: " of 0 or more", 1: " above 0"}.get(minimum, f" of {minimum} or more")
        raise self._refuse(name, f"a whole number{at_least}", raw)

    def numbers(self, name: str, default: str) -> list[float]:
        """Numbers above 0 separated by commas (`default` is such a list), in the order given."""
        raw = self._raw(name)
        numbers = [finite_number(item) for item in (default if raw is None else raw).split(",")]
        if all(number > 0 for number in numbers):
            return numbers
        raise self._refuse(name, "numbers above 0 separated by commas", raw or default)

    def choice(self, name: str, choices: Sequence[str]) -> str:
        """One of `choices`; the first when the option is not given."""
        if (raw := self._raw(name)) is None:
            return choices[0]
        if raw in choices:
            return raw
        raise self._refuse(name, f"one of {', '.join(choices)}", raw)

    def flag(self, name: str, default: bool = False) -> bool:
        """`0` or `1`."""
        if (raw := self._raw(name)) is None:
            return default
        if raw in ("0", "1"):
            return raw == "1"
        raise self._refuse(name, "0 or 1", raw)

    def finish(self) -> dict[str, QueryValue]:
        """The options that pass through to the client library, in URL order; refuse any other that no getter
        read, naming the closest known option and every known one."""
        unknown = sorted(set(self._query) - self._read - self._passes)
        if unknown:
            raise self._unknown(unknown[0])
        return {name: value for name, value in self._query.items() if name not in self._read}

    def _unknown(self, name: str) -> ConfigurationError:
        known = sorted(self._read | self._passes)
        guess = difflib.get_close_matches(name, known, n=1)
        text = f"Unknown {self.broker} URL option {name!r} in {redact_url(self._url)!r}."
        text += f" Did you mean {guess[0]!r}?" if guess else ""
        own = ", ".join(sorted(self._read))
        text += f" {self.broker}'s options: {own}" if own else f" {self.broker} takes no options"
        text += f"; {self.client}'s: {', '.join(sorted(self._passes))}" if self._passes else ""
        return ConfigurationError(text + (f"; {self.note}." if self.note else "."))


def keyword_names(*targets: Callable[..., object]) -> frozenset[str]:
    """The names `targets` take as keyword arguments: a class's through every `__init__` of its MRO, since a
    client library's classes pass `**kwargs` up to their bases."""
    functions = [
        vars(cls)["__init__"]
        for target in targets
        for cls in (target.__mro__ if isinstance(target, type) else ())
        if "__init__" in vars(cls) and cls is not object
    ]
    functions += [target for target in targets if not isinstance(target, type)]
    keywords = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return frozenset(
        name
        for function in functions
        for name, parameter in inspect.signature(function).parameters.items()
        if parameter.kind in keywords and name != "self"
    )


def finite_number(raw: str | None, default: float = math.nan) -> float:
    """`raw` as a finite number; `default` when it is none (absent, not a number, infinite or NaN). The
    default NaN fails every check of a getter."""
    try:
        number = float(raw) if raw is not None else default
    except ValueError:
        return default
    return number if math.isfinite(number) else default
