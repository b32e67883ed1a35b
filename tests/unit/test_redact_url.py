"""`redact_url` (issue 15, item 6): every password or token in a URL's user info and every query value whose
key names a secret become `***`; the scheme, user name, host, port, path and other options stay readable."""

from __future__ import annotations

import pytest

from eventrelay.config import redact_url

CASES = [
    ("amqp://guest:guest@127.0.0.1:5672/", "amqp://guest:***@127.0.0.1:5672/"),
    ("amqp:guest:s3cret@rabbit.internal", "amqp:guest:***@rabbit.internal"),
    ("amqp://guest:p@ss/w#rd@rabbit:5672/vhost", "amqp://guest:***@rabbit:5672/vhost"),
    ("nats://s3cret@127.0.0.1:4222", "nats://***@127.0.0.1:4222"),
    ("tls://s3cret@nats.internal:4222?tls_ca=/etc/ca.pem", "tls://***@nats.internal:4222?tls_ca=/etc/ca.pem"),
    ("nats://user:s3cret@127.0.0.1:4222", "nats://user:***@127.0.0.1:4222"),
    ("redis://:s3cret@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
    ("postgresql+asyncpg://app@db:5432/shop", "postgresql+asyncpg://app@db:5432/shop"),
    (
        "postgresql+asyncpg://app@db/shop?password=s3cret&ssl=require",
        "postgresql+asyncpg://app@db/shop?password=***&ssl=require",
    ),
    (
        "mysql+aiomysql://root@127.0.0.1/test?passwd=s3cret&pwd=s3cret&charset=utf8mb4",
        "mysql+aiomysql://root@127.0.0.1/test?passwd=***&pwd=***&charset=utf8mb4",
    ),
    (
        "kafka://127.0.0.1:9092?sasl_mechanism=PLAIN&sasl_plain_username=app&sasl_plain_password=s3cret",
        "kafka://127.0.0.1:9092?sasl_mechanism=PLAIN&sasl_plain_username=app&sasl_plain_password=***",
    ),
    (
        "kafka://k:9093?ssl_keyfile=/etc/key.pem&ssl_password=s3cret&auth_token=s3cret&client_secret=s3cret",
        "kafka://k:9093?ssl_keyfile=/etc/key.pem&ssl_password=***&auth_token=***&client_secret=***",
    ),
    ("redis://127.0.0.1:6379/0?group=a@b", "redis://127.0.0.1:6379/0?group=a@b"),  # `@` in the query
    ("redis://127.0.0.1:6379/0?password=s3@cret", "redis://127.0.0.1:6379/0?password=***"),
    ("amqp://u:s3cret@h/?heartbeat=5&token=s3cret", "amqp://u:***@h/?heartbeat=5&token=***"),
    ("amqp://u:s3cret@h/?PASSWORD=s3cret", "amqp://u:***@h/?PASSWORD=***"),
    ("redis://h/0?password=s3#cret&db=1", "redis://h/0?password=***&db=1"),
    ("amqp://u:s3?cret@h/", "amqp://u:***@h/"),  # an unescaped `?` in the password
    ("sqlite+aiosqlite:////tmp/shop.db", "sqlite+aiosqlite:////tmp/shop.db"),
    ("sqlite+aiosqlite:////tmp/a@b/shop.db?timeout=5", "sqlite+aiosqlite:////tmp/a@b/shop.db?timeout=5"),
    ("memory://", "memory://"),
    ("postgresql://u:s3cret@[::1]:5432/db", "postgresql://u:***@[::1]:5432/db"),
    ("", ""),
]


@pytest.mark.parametrize(("url", "shown"), CASES)
def test_redact_url_hides_every_password_and_token(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert "s3cret" not in redact_url(url)
    assert "s3" not in redact_url(url)
