"""Settings: where a bus connects and its tunables, as one frozen dataclass; the default broker URLs."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Self

from eventrelay.errors import ConfigurationError
from eventrelay.handlers import RetryPolicy
from eventrelay.json_style import JSON_STYLES, JsonStyle

MEMORY_BROKER = "memory://"
"""The broker of a `DistributedEventBus` given none: in the process, like the outbox and inbox of a bus with
no database. A bus object lives in one process (a test, a script), and nothing it does is meant to last."""
EMBEDDED_BROKER = "sqlite+aiosqlite:///eventrelay-broker.db"
"""The broker of a `Service` given none: one SQLite file in the working folder, shared by the service
processes started there. A service is a process of its own: in memory, its events would never reach another
service, and would vanish with the process."""


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Where a bus connects, how it consumes, relays and cleans up. Every field has a production default."""

    broker_url: str | None = None
    """The broker (`{prefix}BROKER_URL`); None: `EMBEDDED_BROKER` for a `Service`, `MEMORY_BROKER` for a bare
    `DistributedEventBus`."""
    database_url: str | None = None
    """The database of the outbox, inbox and dead letters (`{prefix}DATABASE_URL`); None: in memory."""
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    """Retry policy of handlers subscribed without one."""
    max_in_flight: int = 100
    """Messages fetched but not finished, per bus: the bound on memory and concurrency."""
    max_batches: int = 1
    """Batches (the messages of one fetch, in one unit of work) handled at once, per bus. While one runs, the
    messages that arrive wait and make the next batch larger: fewer round trips a message under load (on
    PostgreSQL + RabbitMQ here, 2 at once made batches of 22 on average instead of 82, and cost more CPU per
    message). Handlers subscribed with `batch=False` run beside them, up to `max_in_flight`."""
    max_message_bytes: int = 1024 * 1024
    """Bodies larger than this are dead-lettered before decoding."""
    fetch_timeout: float = 1.0
    """How long one fetch waits for messages; bounds how fast a stop is noticed by brokers that poll."""
    relay_batch_size: int = 100
    relay_poll_interval: float = 1.0
    """The relay wakes at once after a local commit; this is only the fallback poll."""
    relay_lease: float = 10.0
    """How long the relay holds a batch it claimed: a publish the broker has not confirmed by then is given
    up (the broker counts as unavailable), and the rows of a relay that died are sent again after it."""
    inbox_retention: timedelta = timedelta(days=7)
    """How long inbox records are kept: a duplicate older than this is no longer recognised."""
    inbox_cleanup_interval: timedelta = timedelta(hours=1)
    create_tables: bool = True
    """Create the outbox, inbox and dead-letter tables at start (turn off when migrations own them)."""
    shutdown_timeout: float = 30.0
    """On stop, how long in-flight handlers may take to finish, and the outbox to drain."""
    handler_timeout: float = 300.0
    """A handler still running after this many seconds is cancelled: a failed attempt (retried, then dead)."""
    metrics: bool = False
    """Count and time messages in Prometheus metrics, `bus.metrics` (needs `eventrelay[metrics]`)."""
    metrics_port: int = 0
    """When above 0, metrics are on and `Service.run` serves them at `http://{metrics_host}:{port}/metrics`."""
    metrics_host: str = "127.0.0.1"
    reply_tracebacks: bool = False
    """Send a failing request handler's traceback to the asker (`RemoteError.traceback`): for debugging only,
    since it shows this service's code and data to another."""
    json_style: JsonStyle = "eventrelay"
    """How event bodies are written and read: `"eventrelay"` (field names as declared, read exactly) or
    `"abp"` (ABP's System.Text.Json conventions: camelCase out, any case in, decimals as numbers; see
    `eventrelay.json_style`). A bus on a broker with `profile=abp` (RabbitMQ) uses `"abp"` whatever this
    says."""

    @classmethod
    def from_env(cls, prefix: str = "EVENTRELAY_", environ: Mapping[str, str] | None = None) -> Self:
        """Settings from `{prefix}FIELD` variables (e.g. `ORDER_MAX_IN_FLIGHT=50`), defaults for the rest.

        `{prefix}BROKER_URL` and `{prefix}DATABASE_URL` give the URLs. Durations are seconds;
        `{prefix}RETRY_MAX_ATTEMPTS`, `..._RETRY_INITIAL_DELAY`, `..._RETRY_MAX_DELAY` set the retry policy;
        booleans are `true`/`false`/`1`/`0`.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = env.get(f"{prefix}{f.name.upper()}")
            if raw is not None and f.name != "retry":
                values[f.name] = _parse(f"{prefix}{f.name.upper()}", raw, f.default)
        retry = {
            name: _parse(f"{prefix}RETRY_{name.upper()}", env[f"{prefix}RETRY_{name.upper()}"], default)
            for name, default in (("max_attempts", 0), ("initial_delay", 0.0), ("max_delay", 0.0))
            if f"{prefix}RETRY_{name.upper()}" in env
        }
        if retry:
            values["retry"] = dataclasses.replace(RetryPolicy(), **retry)
        return cls(**values)

    def __post_init__(self) -> None:
        for name in ("max_in_flight", "max_batches", "max_message_bytes", "relay_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigurationError(f"Settings.{name} must be at least 1")
        for name in (
            "fetch_timeout",
            "relay_poll_interval",
            "relay_lease",
            "shutdown_timeout",
            "handler_timeout",
        ):
            if getattr(self, name) <= 0:
                raise ConfigurationError(f"Settings.{name} must be more than 0 seconds")
        if self.json_style not in JSON_STYLES:
            raise ConfigurationError(
                f"Settings.json_style is one of {', '.join(JSON_STYLES)}: {self.json_style!r}"
            )
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigurationError("Settings.metrics_port must be from 0 (off) to 65535")
        for name in ("inbox_retention", "inbox_cleanup_interval"):  # <= 0 would purge every inbox record
            if getattr(self, name) <= timedelta(0):
                raise ConfigurationError(f"Settings.{name} must be more than 0 seconds")


# Query keys that hold a secret (matched within the key, any case); key material *paths* stay readable.
SECRET_KEYS = (
    "password",
    "passwd",
    "pwd",
    "passphrase",
    "token",
    "secret",
    "credential",
    "apikey",
    "api_key",
)
# Schemes whose user info without a colon is a user name; elsewhere (nats://TOKEN@host) it may be a token.
USER_NAME_SCHEMES = frozenset(
    {"postgresql", "postgres", "mysql", "mariadb", "amqp", "amqps", "redis", "rediss"}
)
SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:(//)?")


def redact_url(url: str) -> str:
    """`url` for messages and logs: its user info's password or token, and every query value whose key names
    a secret, replaced by `***`; the host and the rest unchanged."""
    match = SCHEME.match(url)
    head, rest = (match.group(), url[match.end() :]) if match else ("", url)
    before_query, question, query = rest.partition("?")
    if rest.startswith("/"):  # no host, a path (sqlite:///a@b.db): no user info
        userinfo = None
    elif "@" in before_query:
        userinfo, _, rest = before_query.rpartition("@")
        rest += question + query
    elif "@" in query and not re.match(r"[^@]*[=&]", query):
        userinfo, _, rest = rest.partition("@")  # an unescaped `?` in the password
    else:
        userinfo = None
    if userinfo is not None:
        user, colon, _ = userinfo.partition(":")
        scheme = head.split(":")[0].split("+")[0].lower()
        if colon:
            head += f"{user}:***@"
        else:
            head += f"{userinfo}@" if scheme in USER_NAME_SCHEMES else "***@"
    place, question, query = rest.partition("?")
    if not question:
        return head + rest
    pairs = []  # a `#` stays in its value: one in a password must not show what follows it
    for pair in query.split("&"):
        key, equals, _ = pair.partition("=")
        if equals and any(word in key.lower() for word in SECRET_KEYS):
            pair = f"{key}=***"
        pairs.append(pair)
    return f"{head}{place}?{'&'.join(pairs)}"


def _parse(variable: str, raw: str, default: object) -> Any:
    try:
        if isinstance(default, bool):
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError(raw)
            return raw.lower() in ("true", "1")
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
        if isinstance(default, timedelta):
            return timedelta(seconds=float(raw))
        if isinstance(default, str) or default is None:  # None: the URLs, unset by default
            return raw
    except ValueError:
        kind = type(default).__name__ if not isinstance(default, timedelta) else "number of seconds"
        raise ConfigurationError(f"{variable}={raw!r} is not a valid {kind}") from None
    raise ConfigurationError(f"{variable} cannot be set from the environment")
