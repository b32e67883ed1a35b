"""A database as the message broker: `sqlite+aiosqlite:///path/broker.db` (the embedded default: one file
shared by the service processes of one machine) or `postgresql+asyncpg://user@host/db`.

Two tables (prefix `eventrelay_broker_`): `bindings` (subscriber, name) and `deliveries`, one row per message
per bound subscriber, written at publish (fan-out). A fetch claims up to `max_count` due, unleased rows of
its subscriber in one statement (`UPDATE ... WHERE id IN (SELECT ... LIMIT n) RETURNING`; on PostgreSQL the
inner select is `FOR UPDATE SKIP LOCKED`), leasing them for `lease` seconds; the adapter renews the leases
of what it holds, so a consumer that dies (even by SIGKILL) loses them and the rows come back with
`attempt + 1`. An ack deletes the row, so the tables hold only what is still owed.

Waking up: on PostgreSQL a publish sends `NOTIFY`, and fetchers `LISTEN`, so they wake at once (a LISTEN
connection lost in an outage is opened again by the next fetch that reaches the database). On SQLite
fetchers poll: first a cheap read (no write lock) and only then the claim; the pause between empty polls
starts at `poll_min` (1 ms) and doubles up to `poll_max` (50 ms) while idle, and drops back to `poll_min`
as soon as a message arrives. The trade-off: an idle service notices a new message within `poll_max`, and
each idle fetcher costs one small read per `poll_max`. A publish in the same process wakes its fetchers at
once on both databases. SQLite runs in WAL mode; the adapter checkpoints the WAL every few seconds and caps
its size (`journal_size_limit`), so the files do not grow without bound under steady traffic.

Replies (`bus.request`): the generic reply channel (a subscription of the process's own), whose close also
deletes the replies that came too late to be fetched, so that a process leaves no row behind.

URL options (query string): `lease` (30 s), `poll_min` (0.001 s), `poll_max` (0.05 s). The database
driver's own go to it: SQLite's `timeout` (how long a statement waits for a lock), `uri` and the others
`sqlite3.connect` takes (with `uri=true`, those of SQLite's URI filenames too, such as `mode`), or asyncpg's
connect keywords and libpq's TLS names (`sslmode`, `sslrootcert`, ...). Another option is an error when the
broker is made.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from sqlalchemy import (
    Column,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    bindparam,
    case,
    delete,
    exists,
    func,
    insert,
    literal,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.util import asbool

from eventrelay.brokers.base import (
    Arrivals,
    Broker,
    LeaseKeeper,
    Replies,
    SubscriptionReplies,
    delivery_token,
)
from eventrelay.brokers.options import UrlOptions, keyword_names
from eventrelay.config import redact_url
from eventrelay.envelope import Delivery, Message
from eventrelay.errors import BrokerUnavailable, ConfigurationError, PublishFailed
from eventrelay.sql import (
    DATABASE_ERRORS,
    ID,
    MESSAGE_COLUMNS,
    TIME,
    connection_lost,
    create_all,
    create_engine,
    database_said,
    insert_if_absent,
    lease_ran_out,
    message_columns,
    message_of,
    message_rows,
    outside_transaction,
    read_only,
)
from eventrelay.stores.base import utcnow

logger = logging.getLogger(__name__)

_BOUND = tuple(
    f"b_{column}" for column in MESSAGE_COLUMNS
)  # the fan-out's parameters for the message columns
_CHANNEL = "eventrelay_broker"
_SQLITE_OPTIONS = {
    "uri",
    "timeout",
    "isolation_level",
    "detect_types",
    "check_same_thread",
    "cached_statements",
}
_SQLITE_URI_OPTIONS = {"vfs", "mode", "cache", "psow", "nolock", "immutable"}  # https://sqlite.org/uri.html


def _tables(metadata: MetaData, prefix: str) -> tuple[Table, Table]:
    bindings = Table(
        f"{prefix}bindings",
        metadata,
        Column("subscriber", String(200), nullable=False),
        Column("name", String(256), nullable=False),
        PrimaryKeyConstraint("subscriber", "name", name=f"pk_{prefix}bindings"),
    )
    deliveries = Table(
        f"{prefix}deliveries",
        metadata,
        Column("id", ID, primary_key=True, autoincrement=True),
        Column("subscriber", String(200), nullable=False),
        *message_columns(),
        Column("attempt", Integer, nullable=False),
        Column("available_at", TIME, nullable=False),
        Column("lease_until", TIME),
        Index(f"ix_{prefix}deliveries_subscriber", "subscriber", "id"),
        sqlite_autoincrement=True,
    )
    return bindings, deliveries


class SqlBroker(Broker):
    """A broker in a SQLite file or a PostgreSQL database (see the module docstring)."""

    def __init__(self, url: str, prefix: str = "eventrelay_broker_") -> None:
        parsed = make_url(url)
        if parsed.get_backend_name() not in ("sqlite", "postgresql"):
            raise ConfigurationError(f"The SQL broker runs on SQLite or PostgreSQL, not {redact_url(url)!r}")
        options = _url_options(url, parsed)
        self.lease = options.number("lease", 30.0)
        self.poll_min = options.number("poll_min", 0.001)
        self.poll_max = options.number("poll_max", 0.05)
        self.url = parsed.set(query=options.finish()).render_as_string(hide_password=False)
        self.engine = create_engine(self.url)
        self.metadata = MetaData()
        self.bindings, self.deliveries = _tables(self.metadata, prefix)
        self._held: dict[int, Delivery] = {}
        self._unacked: set[int] = set()
        self._ack_lock = asyncio.Lock()
        self._delete_by_id = delete(self.deliveries).where(self.deliveries.c.id == bindparam("row_id"))
        self._fan_out = _fan_out(self.bindings, self.deliveries)
        self._fan_out_arrays = _fan_out_arrays(self.bindings, self.deliveries, self.engine.dialect)
        self._bind = insert_if_absent(self.bindings, self.engine.dialect.name)
        self._arrivals = Arrivals()
        self._leases = LeaseKeeper("SQL broker", self.lease, lambda: list(self._held), self._renew)
        self._tasks: list[asyncio.Task[None]] = []
        self._listener: AsyncConnection | None = None
        self._notified: Any = None  # the asyncpg connection that LISTENs, to see that it is still open
        self._listening = asyncio.Lock()  # one LISTEN again at a time
        self._sqlite = self.engine.dialect.name == "sqlite"

    # --- lifecycle -----------------------------------------------------------------------------------

    async def start(self) -> None:
        async with self._translate("connect to"):
            await create_all(self.engine, self.metadata)
            if self._sqlite:
                async with outside_transaction(self.engine) as conn:
                    await conn.exec_driver_sql("PRAGMA journal_size_limit = 8388608")
            if not self._sqlite:
                await self._listen()
        self._leases.start()
        if self._sqlite:
            self._tasks = [asyncio.create_task(self._checkpoint(), name="eventrelay-broker-checkpoint")]

    async def close(self) -> None:
        await self._leases.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await self._listener.close()
        await self.engine.dispose()

    async def _listen(self) -> None:
        self._listener = await self.engine.connect()
        raw = await self._listener.get_raw_connection()
        driver: Any = raw.driver_connection
        await driver.add_listener(_CHANNEL, lambda *_: self._arrivals.wake())
        self._notified = driver

    async def _listen_again(self) -> None:
        """LISTEN on a new connection when the old one was lost (an outage); until then fetchers poll."""
        # One at a time: fetchers that found the connection lost together each opened one, and the one
        # overwritten was never closed (the garbage collector's warning about a connection not checked in).
        async with self._listening:
            if self._notified is not None and not self._notified.is_closed():
                return  # another fetcher listened again meanwhile
            if self._listener is not None:
                with contextlib.suppress(Exception):
                    await self._listener.invalidate()
            self._listener = self._notified = None
            try:
                await self._listen()
            except Exception as exc:  # the next fetch tries again
                logger.debug("Could not LISTEN again: %s", exc)

    # --- the port ------------------------------------------------------------------------------------

    async def publish(self, messages: Sequence[Message]) -> None:
        if not messages:
            return
        now = utcnow()
        values = message_rows(messages, _BOUND, b_now=now)
        async with self._translate("publish to"), self.engine.begin() as conn:
            if self._sqlite:
                await conn.execute(self._fan_out, values)
            else:
                # One statement, not executemany: asyncpg's executemany waits for its socket to drain
                # between writes, and a cancel (the relay's lease running out) landing there hangs it for
                # good, as it never sends the Sync the server waits for (asyncpg 0.32).
                arrays = {column: [value[column] for value in values] for column in _BOUND}
                await conn.execute(self._fan_out_arrays, {**arrays, "b_now": now})
                await conn.exec_driver_sql(f"NOTIFY {_CHANNEL}")
        self._arrivals.wake()

    async def bind(self, subscriber: str, name: str) -> None:
        async with self._translate("bind on"), self.engine.begin() as conn:
            await conn.execute(self._bind, {"subscriber": subscriber, "name": name})

    async def unbind(self, subscriber: str, name: str) -> None:
        async with self._translate("unbind on"), self.engine.begin() as conn:
            await conn.execute(
                delete(self.bindings).where(
                    self.bindings.c.subscriber == subscriber, self.bindings.c.name == name
                )
            )

    async def open_replies(self, instance: str) -> Replies:
        """The generic reply channel, whose close deletes what it leaves (see the module docstring)."""
        return await _SqlReplies(self, instance).open()

    async def delete_subscription(self, subscriber: str) -> None:
        """Delete `subscriber`'s bindings and every delivery row it still has."""
        async with self._translate("clean up"), self.engine.begin() as conn:
            await conn.execute(delete(self.bindings).where(self.bindings.c.subscriber == subscriber))
            await conn.execute(delete(self.deliveries).where(self.deliveries.c.subscriber == subscriber))

    async def fetch(self, subscriber: str, max_count: int, timeout: float) -> list[Delivery]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        pause = self.poll_min
        while True:
            batch = await self._claim(subscriber, max_count)
            if not self._sqlite and (self._notified is None or self._notified.is_closed()):
                await self._listen_again()  # the database answered the claim: it is back
            if batch:
                return batch
            remaining = deadline - loop.time()
            if remaining <= 0:
                return []
            woken = await self._arrivals.wait(min(pause, remaining))
            pause = self.poll_min if woken else min(pause * 2, self.poll_max)

    async def ack(self, delivery: Delivery) -> None:
        await self.ack_many([delivery])

    async def ack_many(self, deliveries: Sequence[Delivery]) -> None:
        row_ids = {self._let_go(delivery) for delivery in deliveries}
        self._unacked |= row_ids
        # Group commit: whoever holds the lock deletes every ack waiting so far, in one transaction.
        async with self._ack_lock:
            if not row_ids & self._unacked:
                return  # an earlier holder deleted them with its batch
            batch, self._unacked = self._unacked, set()
            try:
                async with self._translate("ack on"), self.engine.begin() as conn:
                    await conn.execute(self._delete_by_id, [{"row_id": i} for i in batch])
            except BaseException:
                self._unacked |= batch  # the others' acks stay pending; their own calls retry them
                raise

    async def retry(self, delivery: Delivery, delay: float) -> None:
        row_id = self._let_go(delivery)
        due = utcnow() + timedelta(seconds=max(0.0, delay))
        await self._update(row_id, attempt=self.deliveries.c.attempt + 1, available_at=due, lease_until=None)

    async def release(self, delivery: Delivery) -> None:
        await self._update(self._let_go(delivery), lease_until=None)
        self._arrivals.wake()

    async def pending_count(self, subscriber: str) -> int:
        """Deliveries still owed to `subscriber` (queued, leased or waiting for a retry)."""
        async with read_only(self.engine) as conn:
            count = await conn.scalar(
                select(func.count())
                .select_from(self.deliveries)
                .where(self.deliveries.c.subscriber == subscriber)
            )
        return int(count or 0)

    # --- internals -----------------------------------------------------------------------------------

    async def _claim(self, subscriber: str, max_count: int) -> list[Delivery]:
        t = self.deliveries
        now = utcnow()
        claimable = (t.c.subscriber == subscriber) & (t.c.available_at <= now)
        claimable &= lease_ran_out(t.c.lease_until, now)
        async with self._translate("fetch from"):
            if self._sqlite:  # a read first: most idle polls end here, without the write lock
                async with read_only(self.engine) as conn:
                    if not await conn.scalar(select(exists().where(claimable))):
                        return []
            ids = select(t.c.id).where(claimable).order_by(t.c.id).limit(max_count)
            if not self._sqlite:
                ids = ids.with_for_update(skip_locked=True)
            claim = (
                update(t)
                .where(t.c.id.in_(ids.scalar_subquery()))
                .values(
                    lease_until=now + timedelta(seconds=self.lease),
                    # A lease that ran out means the consumer died mid-handler: that was an attempt.
                    attempt=case((t.c.lease_until.is_not(None), t.c.attempt + 1), else_=t.c.attempt),
                )
                .returning(
                    t.c.id, t.c.message_id, t.c.name, t.c.body, t.c.headers, t.c.ordering_key, t.c.attempt
                )
            )
            async with self.engine.begin() as conn:
                rows = list(await conn.execute(claim))
        batch = []
        for row in sorted(rows, key=lambda r: r.id):
            delivery = Delivery(message_of(row), row.attempt, row.id)
            self._held[row.id] = delivery
            batch.append(delivery)
        return batch

    def _let_go(self, delivery: Delivery) -> int:
        row_id = delivery_token(delivery, int, "SqlBroker")
        self._held.pop(row_id, None)
        return row_id

    async def _update(self, row_id: int, **values: Any) -> None:
        async with self._translate("update"), self.engine.begin() as conn:
            await conn.execute(update(self.deliveries).where(self.deliveries.c.id == row_id).values(**values))

    async def _renew(self, held: Sequence[int]) -> None:
        until = utcnow() + timedelta(seconds=self.lease)
        async with self.engine.begin() as conn:
            await conn.execute(
                update(self.deliveries).where(self.deliveries.c.id.in_(held)).values(lease_until=until)
            )

    async def _checkpoint(self) -> None:
        while True:
            await asyncio.sleep(5.0)
            try:
                async with outside_transaction(self.engine) as conn:
                    await conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)")
            except DATABASE_ERRORS:
                logger.debug("WAL checkpoint skipped", exc_info=True)

    @contextlib.asynccontextmanager
    async def _translate(self, action: str) -> Any:
        try:
            yield
        except DATABASE_ERRORS as exc:
            if connection_lost(exc) or action == "connect to":  # refused at start (a certificate, a password)
                raise BrokerUnavailable(
                    f"Could not {action} the SQL broker at {redact_url(self.url)}: {database_said(exc)}"
                ) from exc
            raise PublishFailed(f"Could not {action} the SQL broker: {database_said(exc)}") from exc


class _SqlReplies(SubscriptionReplies):
    """The generic reply channel; its close deletes its binding and the rows of replies nobody fetched.

    A cancelled `receive` (the asker stopping) leaves its fetch running rather than cancel it inside a
    transaction, where SQLAlchemy can lose the connection to the garbage collector; `close` waits for it.
    """

    broker: SqlBroker
    _receiving: asyncio.Task[list[Message]] | None = None

    async def receive(self, timeout: float) -> list[Message]:
        if self._receiving is None:
            self._receiving = asyncio.ensure_future(super().receive(timeout))
        receiving = self._receiving
        try:
            return await asyncio.shield(receiving)
        finally:
            if receiving.done():
                self._receiving = None

    async def close(self) -> None:
        if self._receiving is not None:
            await asyncio.gather(self._receiving, return_exceptions=True)  # its replies come too late
        await self.broker.delete_subscription(self.subscriber)


def _fan_out(bindings: Table, deliveries: Table) -> Any:
    """An INSERT of one message's delivery rows, one per subscriber bound to its name (run per message)."""
    copies = select(
        bindings.c.subscriber,
        bindparam("b_message_id", type_=String),
        bindings.c.name,
        bindparam("b_body", type_=LargeBinary),
        bindparam("b_headers", type_=Text),
        bindparam("b_ordering_key", type_=String),
        literal(1),
        bindparam("b_now", type_=TIME),
    ).where(bindings.c.name == bindparam("b_name", type_=String))
    columns = ("subscriber", *MESSAGE_COLUMNS, "attempt")
    return insert(deliveries).from_select([*columns, "available_at"], copies)


def _fan_out_arrays(bindings: Table, deliveries: Table, dialect: Any) -> Any:
    """PostgreSQL: one INSERT of the delivery rows of many messages, given as arrays, in message order (the
    ids, which fetches order by, are drawn in the order of the SELECT)."""
    quote = dialect.identifier_preparer.quote
    statement = text(
        f"INSERT INTO {quote(deliveries.name)} "
        "(subscriber, message_id, name, body, headers, ordering_key, attempt, available_at) "
        "SELECT b.subscriber, m.message_id, m.name, m.body, m.headers, m.ordering_key, 1, :b_now "
        "FROM unnest(:b_message_id, :b_name, :b_body, :b_headers, :b_ordering_key) "
        "WITH ORDINALITY AS m(message_id, name, body, headers, ordering_key, ord) "
        f"JOIN {quote(bindings.name)} AS b ON b.name = m.name ORDER BY m.ord, b.subscriber"
    )
    return statement.bindparams(
        bindparam("b_message_id", type_=ARRAY(String)),
        bindparam("b_name", type_=ARRAY(String)),
        bindparam("b_body", type_=ARRAY(LargeBinary)),
        bindparam("b_headers", type_=ARRAY(Text)),
        bindparam("b_ordering_key", type_=ARRAY(String)),
        bindparam("b_now", type_=TIME),
    )


def _url_options(url: str, parsed: URL) -> UrlOptions:
    """The URL's options, knowing those of the database driver: SQLite's (and, with `uri=true`, those of its
    URI filenames), asyncpg's, or for another PostgreSQL driver any."""
    if parsed.get_backend_name() == "sqlite":
        uri = asbool(parsed.query.get("uri", False))  # as SQLAlchemy reads it
        passes = _SQLITE_OPTIONS | (_SQLITE_URI_OPTIONS if uri else set())
        return UrlOptions("SQL broker", url, parsed.query, client="sqlite3", passes=passes)
    if parsed.get_driver_name() == "asyncpg":
        return UrlOptions("SQL broker", url, parsed.query, client="asyncpg", passes=_asyncpg_options())
    return UrlOptions("SQL broker", url, parsed.query, passes=set(parsed.query))  # the driver checks its own


@functools.cache
def _asyncpg_options() -> frozenset[str]:
    """asyncpg's connect keywords (those a URL can give), SQLAlchemy's for it, and the libpq TLS names that
    `create_engine` turns into asyncpg's."""
    import asyncpg  # here: asyncpg is an extra, needed only for a PostgreSQL URL

    unusable = {"dsn", "loop", "connection_class", "record_class"}  # no URL text can be one
    added = {"prepared_statement_cache_size", "sslmode", "sslrootcert", "sslcert", "sslkey"}
    return keyword_names(asyncpg.connect) - unusable | added
