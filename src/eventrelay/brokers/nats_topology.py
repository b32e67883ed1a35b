"""The NATS adapter's JetStream topology: one stream per solution, one durable pull consumer per
(subscriber, event name).

The stream captures `<prefix>.>` with interest retention, file storage, `max_age`, `duplicate_window` and
`replicas`; one that exists with other limits is used as it is if it routes alike (with a warning when it
has fewer replicas than asked). Its consumers have its replicas (JetStream's default). A consumer is named
`<subscriber>_<name>_<digest>` (readable, and unique by the digest), filters the subject of its name, acks
explicitly and delivers what is published after its creation. A draining one (unbound, still delivering what
was queued before) says so in its description and has a 5 minute inactive threshold, so that the server reaps
a drain nobody finishes. Creating a stream or consumer is tried again for up to 30 s while JetStream does not
answer in time (`answered`): a cluster electing leaders answers late, and a start or bind waits for it.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import itertools
import logging
import re
from collections.abc import Awaitable, Callable, Container, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

from eventrelay.brokers import nats_wire
from eventrelay.brokers.base import reconnect_pause
from eventrelay.errors import ConfigurationError

logger = logging.getLogger(__name__)

_ABANDONED = 300.0  # the inactive_threshold of a draining consumer, so that the server reaps an abandoned one
_DRAINING = "draining"  # how a draining consumer's description begins
# JetStream's errors for replicas it cannot place: not clustered, no resources, more than 5, too few peers
_NO_REPLICAS = {10074, 10023, 10052, 10005}
_STREAM_NOT_FOUND = 10059
_UNAVAILABLE = 10008  # "JetStream system temporarily unavailable": no meta leader (yet)
PATIENCE = 30.0  # how long a stream or consumer is created again while JetStream does not answer in time

T = TypeVar("T")


@dataclass(eq=False)
class Consumer:
    """A durable consumer as this process sees it, with its open pull request, if any."""

    subscriber: str
    name: str
    cutoff: int | None = None  # draining: the last stream sequence published before the unbind
    request: Request | None = None

    @functools.cached_property
    def durable(self) -> str:
        return durable(self.subscriber, self.name)


@dataclass(eq=False)
class Request:
    """A pull request: `batch` messages asked of `consumer`, answered on the inbox subject ending `token`."""

    token: str
    consumer: Consumer
    batch: int
    got: int = 0


class Pulled(NamedTuple):
    """A message pulled from a consumer; also the token of its delivery."""

    consumer: Consumer
    msg: Msg


async def declare_stream(
    js: JetStreamContext, stream: str, prefix: str, options: Mapping[str, float]
) -> None:
    """Create the stream, or check that the one there routes as this adapter needs."""
    subjects, interest = [f"{prefix}.>"], api.RetentionPolicy.INTEREST
    max_age = options["max_age"]
    config = api.StreamConfig(
        name=stream,
        subjects=subjects,
        retention=interest,
        storage=api.StorageType.FILE,
        max_age=max_age,
        duplicate_window=min(options["duplicate_window"], max_age or float("inf")),
        num_replicas=int(options["replicas"]),
    )
    try:
        await _add_stream(js, config)
    except nats.js.errors.BadRequestError as exc:  # it exists with other limits: fine if it routes alike
        _refuse_replicas(exc, config)
        found = (await js.stream_info(stream)).config
        if (found.subjects, found.retention) != (subjects, interest):
            raise ConfigurationError(
                f"NATS stream {stream!r} exists with subjects {found.subjects} and retention "
                f"{found.retention}; this broker needs {subjects} and interest retention: delete that stream "
                "or give this broker another (`stream` option)"
            ) from None
        if (found.num_replicas or 1) < (asked := config.num_replicas or 1):  # more than asked is no harm
            logger.warning(
                "NATS stream %r exists with %s replicas, fewer than the %s asked (`replicas` option); it is "
                "used as it is: raise its replicas on the server (nats stream edit %s --replicas %s)",
                stream,
                found.num_replicas or 1,
                asked,
                stream,
                asked,
            )


async def declare(
    js: JetStreamContext,
    stream: str,
    prefix: str,
    options: Mapping[str, float],
    consumers: Sequence[api.ConsumerConfig],
) -> None:
    """The stream (`declare_stream`), then `consumers` (each created, or updated in place)."""
    await declare_stream(js, stream, prefix, options)
    for consumer in consumers:
        await add_consumer(js, stream, consumer)


async def add_consumer(js: JetStreamContext, stream: str, config: api.ConsumerConfig, tries: int = 6) -> None:
    """Create the consumer (or update it in place), trying again while its stream is not found: in a cluster,
    a stream just created can be unknown for a moment to the server that creates the consumer (nats-server
    2.9 answered "stream not found" to a bind right after the stream's creation, in our tests)."""
    adding = functools.partial(js.add_consumer, stream, config)
    for attempt in range(1, tries + 1):
        try:
            await answered(adding, f"create consumer {config.durable_name!r}")
            return
        except nats.js.errors.NotFoundError as exc:
            if attempt == tries or exc.err_code != _STREAM_NOT_FOUND:
                raise
            logger.debug("NATS stream %r not found by the consumer's server yet; trying again", stream)
            await asyncio.sleep(0.1 * attempt)


async def declare_again(
    declare: Callable[[Sequence[api.ConsumerConfig]], Awaitable[None]],
    consumers: Sequence[api.ConsumerConfig],
    connected: Callable[[], bool],
) -> None:
    """`declare(consumers)` after a reconnect, tried until JetStream answers (a cluster that lost a node
    answers once it has elected new leaders), the connection is lost again (the next reconnect declares
    again) or the stream there is not one this broker can use (`ConfigurationError`, logged)."""
    for failures in itertools.count(1):
        try:
            await declare(consumers)
            return
        except Exception as exc:
            known = isinstance(exc, nats.errors.Error | ConfigurationError)  # their text says enough
            again = connected() and not isinstance(exc, ConfigurationError)  # a misconfiguration stays
            pause = reconnect_pause(failures)
            logger.warning(
                "Could not declare the NATS stream and consumers again%s: %r",
                f", trying again in {pause:.1f}s" if again else "",
                exc,
                exc_info=not known,
            )
            if not again:
                return
            await asyncio.sleep(pause)


async def _add_stream(js: JetStreamContext, config: api.StreamConfig, tries: int = 5) -> None:
    """Create the stream, trying again after a server error (500). nats-server 2.9 removes an account's
    stream folder when its last stream is deleted; a stream created meanwhile fails with "error creating
    store for stream" (its log: "mkdir .../streams: no such file or directory"), and the next try creates
    the folder again (seen in `make soak`)."""
    for attempt in range(1, tries + 1):
        try:
            await answered(functools.partial(js.add_stream, config), f"create stream {config.name!r}")
            return
        except nats.js.errors.ServerError as exc:
            _refuse_replicas(exc, config)
            if attempt == tries:
                raise
            logger.warning("NATS could not create stream %r, trying again: %s", config.name, exc)
            await asyncio.sleep(0.05 * attempt)


async def answered(call: Callable[[], Awaitable[T]], what: str, patience: float = PATIENCE) -> T:
    """`call()`, tried again for up to `patience` seconds while JetStream does not answer within nats-py's
    timeout (5 s) or answers that it is temporarily unavailable. A cluster electing its meta leader, or the
    leaders of a new stream's replicas, answers late (on a loaded machine, after more than 5 s); creating a
    stream or consumer again with the same configuration is harmless."""
    loop = asyncio.get_running_loop()
    deadline, failures = loop.time() + patience, 0
    while True:
        try:
            return await call()
        except (nats.errors.TimeoutError, nats.js.errors.ServiceUnavailableError) as exc:
            # "no responders" is a ServiceUnavailableError without a code: a server without JetStream
            late = not isinstance(exc, nats.js.errors.ServiceUnavailableError) or exc.err_code == _UNAVAILABLE
            if not late:
                raise
            if (left := deadline - loop.time()) <= 0:
                raise nats.errors.Error(
                    f"JetStream did not {what} within {patience:.0f}s ({exc}): check that a majority of the "
                    "cluster's servers run and have elected a meta leader (`nats server report jetstream`)"
                ) from exc
            logger.warning("JetStream did not %s in time (%s); trying again", what, exc)
            failures += 1
            await asyncio.sleep(min(reconnect_pause(failures), left))


def _refuse_replicas(exc: nats.js.errors.APIError, config: api.StreamConfig) -> None:
    """A clear error when JetStream cannot place the replicas asked for."""
    if exc.err_code in _NO_REPLICAS and (config.num_replicas or 1) > 1:
        raise ConfigurationError(
            f"NATS cannot keep stream {config.name!r} with {config.num_replicas} replicas "
            f"({exc.description}): ask for at most as many replicas as the cluster has JetStream "
            "servers running, 5 at most (`replicas` option; 1 on a single server)"
        ) from None


def durable(subscriber: str, name: str) -> str:
    """The durable consumer name of (subscriber, event name): readable, and unique by a digest."""
    digest = hashlib.sha256(f"{subscriber}\0{name}".encode()).hexdigest()[:12]
    return re.sub(r"[^A-Za-z0-9_-]+", "-", f"{subscriber[:60]}_{name[-100:]}_{digest}")


def config(consumer: Consumer, prefix: str, options: Mapping[str, float]) -> api.ConsumerConfig:
    """The consumer's configuration, with the adapter's `ack_wait` and `max_ack_pending`."""
    draining = consumer.cutoff is not None
    return api.ConsumerConfig(
        durable_name=consumer.durable,
        filter_subject=nats_wire.subject(prefix, consumer.name),
        description=f"{_DRAINING + ': ' if draining else ''}{consumer.subscriber} <- {consumer.name}",
        deliver_policy=api.DeliverPolicy.NEW,
        ack_policy=api.AckPolicy.EXPLICIT,
        ack_wait=options["ack_wait"],
        max_ack_pending=int(options["max_ack_pending"]),
        inactive_threshold=_ABANDONED if draining else None,
    )


def draining(info: Any) -> bool:
    """Whether the consumer of `info` (a `ConsumerInfo`) is draining."""
    return (info.config.description or "").startswith(_DRAINING)


async def consumer_info(js: JetStreamContext, stream: str, durable: str) -> Any:
    """The consumer's `nats.js.api.ConsumerInfo`, or None when it does not exist. (Typed Any: nats-py makes
    every field optional, and a reply that found the consumer has them all.)

    A consumer deleted while the server looks it up (another instance finishing a drain) comes back as a
    reply with no fields and no error, which nats-py fails to read with a TypeError (seen in CI).
    """
    try:
        return await js.consumer_info(stream, durable)
    except nats.js.errors.NotFoundError:
        return None
    except TypeError:  # only reading the reply raises it: the request itself raises nats' own errors
        return None


async def unbound(
    js: JetStreamContext, stream: str, prefix: str, subscriber: str, known: Container[str]
) -> list[Consumer] | None:
    """The subscriber's consumers on the server that are neither `known` (by durable name) nor draining;
    None when they could not be listed (the caller tries again later)."""
    found: list[Consumer] = []
    offset = 0
    while True:
        try:
            page = await js.consumers_info(stream, offset)
        except TypeError:  # nats-py fails on a consumer deleted while listed
            logger.debug("Could not list the consumers of %s; the next fetch tries again", stream)
            return None
        if not page:
            return found
        offset += len(page)
        for info in page:
            name = nats_wire.name_of(prefix, info.config.filter_subject or "")
            durable_name = info.config.durable_name or ""
            if name is None or durable_name in known or draining(info):
                continue
            if durable_name == durable(subscriber, name):
                found.append(Consumer(subscriber, name))
