"""The exceptions eventrelay raises, as one tree.

```
EventRelayError
├── ConfigurationError      a wrong declaration, URL, option or missing extra: fix the code or settings
├── BrokerError             the broker failed; raised by adapters, translated from the client library
│   ├── BrokerUnavailable   cannot reach the broker (connection refused, reset, timed out): try again later
│   └── PublishFailed       the broker refused a message (too large, no such destination, ...)
├── StoreError              the database behind the outbox, inbox or dead letters failed
├── UnitOfWorkError         no unit of work, or no database behind it, where one is needed
├── DecodeError             a received message cannot become an event (bytes, JSON or validation)
└── HandlerTimeout          a handler ran past Settings.handler_timeout (a failed attempt)
```

`Retry` and `Reject` in `eventrelay.handlers` are not errors: a handler raises them to steer delivery.
"""

from __future__ import annotations

from collections.abc import Mapping


class EventRelayError(Exception):
    """Base class of every exception eventrelay raises."""


class ConfigurationError(EventRelayError):
    """A declaration, URL or option is wrong; the message says how to fix it."""


class BrokerError(EventRelayError):
    """The broker failed."""


class BrokerUnavailable(BrokerError):
    """The broker cannot be reached; the operation may succeed later."""


class PublishFailed(BrokerError):
    """The broker refused a message.

    `refused` maps the positions (in the published sequence) of the messages the broker refused to why; the
    others of that publish were accepted. `None`: the adapter cannot tell which, so none counts as accepted.
    """

    def __init__(self, text: str, refused: Mapping[int, str] | None = None) -> None:
        super().__init__(text)
        self.refused = refused


class StoreError(EventRelayError):
    """The outbox, inbox or dead-letter storage failed; the message says at what, `__cause__` is the
    database client's error. What user code runs through a unit of work's session keeps its own errors."""


class UnitOfWorkError(EventRelayError):
    """A unit of work (or a database behind it) is needed and there is none."""


class DecodeError(EventRelayError):
    """A received message cannot be turned into an event."""


class HandlerTimeout(EventRelayError):
    """A handler ran past its time limit and was cancelled; the attempt counts as failed."""


class RequestTimeout(EventRelayError):
    """No reply to a request came within its timeout. `event` is the request's event name."""

    def __init__(self, text: str, event: str) -> None:
        super().__init__(text)
        self.event = event


class RemoteError(EventRelayError):
    """The service answering a request failed: `type` and `message` are its exception's (`traceback` only
    when that service sets `Settings.reply_tracebacks`); `service` is the service that failed."""

    def __init__(self, type: str, message: str, service: str, traceback: str | None = None) -> None:
        super().__init__(f"{service} failed to answer: {type}: {message}")
        self.type, self.message, self.service, self.traceback = type, message, service, traceback
