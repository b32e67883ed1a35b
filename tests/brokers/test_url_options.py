"""URL options, the same for every adapter (`eventrelay.brokers.options.UrlOptions`): an unknown option is
refused when the broker is made, with the closest known name and no password; a bad value has one message
style; the options of the client library pass through. Nothing here connects to a server."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from eventrelay.brokers.base import Broker
from eventrelay.brokers.kafka import KafkaBroker
from eventrelay.brokers.memory import MemoryBroker
from eventrelay.brokers.nats import NatsBroker
from eventrelay.brokers.options import UrlOptions, finite_number
from eventrelay.brokers.rabbitmq import RabbitMQBroker
from eventrelay.brokers.redis import RedisBroker
from eventrelay.brokers.sql import SqlBroker
from eventrelay.errors import ConfigurationError

SECRET = "s3cret"

# adapter, its URL (with a password where the scheme has one), a misspelt option and the one it means, and an
# option with a bad value and what the adapter says that option takes
ADAPTERS: dict[str, tuple[Callable[[str], Broker], str, str, str, str, str]] = {
    "rabbitmq": (
        RabbitMQBroker,
        f"amqp://guest:{SECRET}@127.0.0.1/",
        "prefech",
        "prefetch",
        "prefetch=0",
        "RabbitMQ URL option prefetch takes a whole number above 0, not '0'",
    ),
    "nats": (
        NatsBroker,
        f"nats://someone:{SECRET}@127.0.0.1:4222",
        "ack_wiat",
        "ack_wait",
        "ack_wait=soon",
        "NATS URL option ack_wait takes a number above 0, not 'soon'",
    ),
    "redis": (
        RedisBroker,
        f"redis://:{SECRET}@127.0.0.1:6379/0",
        "visiblity_timeout",
        "visibility_timeout",
        "poll=-1",
        "Redis URL option poll takes a number above 0, not '-1'",
    ),
    "kafka": (
        KafkaBroker,
        f"kafka://someone:{SECRET}@127.0.0.1:9092",
        "sesion_timeout",
        "session_timeout",
        "partitions=2.5",
        "Kafka URL option partitions takes a whole number above 0, not '2.5'",
    ),
    "sqlite": (
        SqlBroker,
        "sqlite+aiosqlite:///{tmp}/broker.db",
        "leese",
        "lease",
        "poll_max=nan",
        "SQL broker URL option poll_max takes a number above 0, not 'nan'",
    ),
    "postgresql": (
        SqlBroker,
        f"postgresql+asyncpg://postgres:{SECRET}@127.0.0.1/test",
        "comand_timeout",
        "command_timeout",
        "lease=0",
        "SQL broker URL option lease takes a number above 0, not '0'",
    ),
}


OWN_OPTIONS = {  # what each adapter reads itself, as its message lists them
    "rabbitmq": [
        "exchange",
        "exchange_type",
        "prefetch",
        "profile",
        "publish_timeout",
        "queue_type",
        "retry_delays",
        "single_active_consumer",
    ],
    "nats": [
        "ack_wait",
        "connect_timeout",
        "duplicate_window",
        "max_ack_pending",
        "max_age",
        "ping_interval",
        "prefix",
        "publish_timeout",
        "replicas",
        "stream",
        "tls_ca",
        "tls_cert",
        "tls_handshake_first",
        "tls_key",
    ],
    "redis": ["maxlen", "poll", "prefix", "visibility_timeout"],
    "kafka": [
        "partitions",
        "replication_factor",
        "session_timeout",
        "single_topic",
        "timeout",
        "topic_prefix",
    ],
    "sqlite": ["lease", "poll_max", "poll_min"],
    "postgresql": ["lease", "poll_max", "poll_min"],
}


def _url(base: str, tmp_path: Path, option: str) -> str:
    base = base.format(tmp=tmp_path)
    return f"{base}{'&' if '?' in base else '?'}{option}"


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_an_unknown_option_is_refused_when_the_broker_is_made(adapter: str, tmp_path: Path) -> None:
    make, base, typo, meant, _, _ = ADAPTERS[adapter]
    with pytest.raises(ConfigurationError, match=f"Unknown .* URL option '{typo}' in ") as caught:
        make(_url(base, tmp_path, f"{typo}=3"))
    text = str(caught.value)
    assert f"Did you mean '{meant}'?" in text
    assert f"options: {', '.join(sorted(OWN_OPTIONS[adapter]))}" in text  # every known option, listed
    assert SECRET not in text
    assert "***@" in text or adapter == "sqlite"  # the URL, redacted


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_a_bad_value_says_what_the_option_takes(adapter: str, tmp_path: Path) -> None:
    make, base, _, _, bad, message = ADAPTERS[adapter]
    with pytest.raises(ConfigurationError) as caught:
        make(_url(base, tmp_path, bad))
    assert str(caught.value) == message


def test_the_client_librarys_options_pass_through(tmp_path: Path) -> None:
    rabbitmq = RabbitMQBroker("amqp://guest:guest@127.0.0.1/?heartbeat=5&prefetch=10&cafile=/ca.pem")
    assert (rabbitmq.prefetch, rabbitmq.hosts.urls) == (
        10,
        ["amqp://guest:guest@127.0.0.1/?heartbeat=5&cafile=/ca.pem"],
    )
    redis = RedisBroker("redis://127.0.0.1:6379/0?socket_timeout=2&prefix=p:&max_connections=5")
    assert redis.url == "redis://127.0.0.1:6379/0?socket_timeout=2&max_connections=5"
    kafka = KafkaBroker("kafka://127.0.0.1:9092?compression.type=zstd&partitions=3")
    assert (kafka.config["compression.type"], kafka.partitions) == ("zstd", 3)
    sqlite = SqlBroker(f"sqlite+aiosqlite:///{tmp_path}/b.db?timeout=5&lease=3")
    assert (sqlite.lease, sqlite.url) == (3.0, f"sqlite+aiosqlite:///{tmp_path}/b.db?timeout=5")
    uri = SqlBroker(f"sqlite+aiosqlite:///{tmp_path}/b.db?uri=true&mode=rwc")  # SQLite's URI options
    assert uri.url.endswith("mode=rwc&uri=true")
    with pytest.raises(ConfigurationError, match="'mode'"):  # without uri=true, SQLite would ignore it
        SqlBroker(f"sqlite+aiosqlite:///{tmp_path}/b.db?mode=ro")
    postgresql = SqlBroker("postgresql+asyncpg://postgres@127.0.0.1/test?command_timeout=3&sslmode=disable")
    assert postgresql.url == "postgresql+asyncpg://postgres@127.0.0.1/test?command_timeout=3&sslmode=disable"


def test_the_getters() -> None:
    query = {"n": "2.5", "i": "100.0", "f": "1", "c": "b", "l": "3,1", "t": ("1", "7"), "s": "x"}
    options = UrlOptions("Test", "test://", query)
    assert options.number("n", 1.0) == 2.5
    assert options.integer("i", 0, minimum=1) == 100  # a whole number written with a decimal point
    assert options.flag("f") is True
    assert options.choice("c", ("a", "b")) == "b"
    assert options.numbers("l", "1") == [3.0, 1.0]
    assert options.integer("t", 0) == 7  # a key given twice (SQLAlchemy's URL.query): the last one wins
    assert options.string("s") == "x"
    assert options.number("absent", 4.0) == 4.0
    assert options.choice("absent too", ("a", "b")) == "a"
    assert options.finish() == {}


@pytest.mark.parametrize(
    ("raw", "read", "message"),
    [
        ("0", lambda o: o.number("x", 1.0), "takes a number above 0, not '0'"),
        ("-1", lambda o: o.number("x", 1.0, zero=True), "takes a number of 0 or more, not '-1'"),
        ("inf", lambda o: o.number("x", 1.0), "takes a number above 0, not 'inf'"),
        ("1.5", lambda o: o.integer("x", 1), "takes a whole number, not '1.5'"),
        ("yes", lambda o: o.flag("x"), "takes 0 or 1, not 'yes'"),
        ("1,,2", lambda o: o.numbers("x", "1"), "takes numbers above 0 separated by commas, not '1,,2'"),
    ],
)
def test_a_bad_value_has_one_message_style(
    raw: str, read: Callable[[UrlOptions], object], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=f"^Test URL option x {message}$"):
        read(UrlOptions("Test", "test://", {"x": raw}))


def test_an_unknown_option_without_a_close_one_lists_the_known_ones() -> None:
    options = UrlOptions(
        "Test", "test://u:pw@h/?zzz=1&b=2", {"zzz": "1", "b": "2"}, client="lib", passes={"b"}
    )
    options.string("alpha")
    with pytest.raises(ConfigurationError) as caught:
        options.finish()
    assert str(caught.value) == (
        "Unknown Test URL option 'zzz' in 'test://u:***@h/?zzz=1&b=2'. Test's options: alpha; lib's: b."
    )


def test_the_memory_broker_takes_no_url_options() -> None:
    MemoryBroker("memory://")
    with pytest.raises(
        ConfigurationError, match=r"Unknown Memory URL option 'x' .* Memory takes no options\."
    ):
        MemoryBroker("memory://?x=1")


def test_a_number_in_a_header_or_metadata() -> None:
    assert finite_number("2.5") == 2.5
    assert [finite_number(raw, 1) for raw in (None, "", "soon", "nan", "inf")] == [1, 1, 1, 1, 1]


@pytest.mark.parametrize("adapter", ["rabbitmq", "nats", "redis", "kafka"])
def test_an_unknown_option_given_empty_is_refused_too(adapter: str, tmp_path: Path) -> None:
    make, base, typo, meant, _, _ = ADAPTERS[adapter]
    with pytest.raises(ConfigurationError, match=f"Did you mean '{meant}'"):
        make(_url(base, tmp_path, f"{typo}="))
