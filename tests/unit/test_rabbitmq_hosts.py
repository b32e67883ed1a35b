"""Multi-host RabbitMQ URLs (`eventrelay.brokers.rabbitmq_hosts`): one URL per node, the same credentials,
virtual host and options for each, the password never shown, and an error naming every host tried."""

from __future__ import annotations

import pytest

from eventrelay.brokers.options import url_query
from eventrelay.brokers.rabbitmq import RabbitMQBroker
from eventrelay.brokers.rabbitmq_hosts import Hosts, split_hosts
from eventrelay.config import redact_url
from eventrelay.errors import BrokerUnavailable, ConfigurationError

CLUSTER = "amqp://app:s3cret@rabbit1:5672,rabbit2:5673,rabbit3/shop?queue_type=quorum&heartbeat=5"


def test_each_host_gets_the_credentials_virtual_host_and_options() -> None:
    assert split_hosts(CLUSTER) == [
        "amqp://app:s3cret@rabbit1:5672/shop?queue_type=quorum&heartbeat=5",
        "amqp://app:s3cret@rabbit2:5673/shop?queue_type=quorum&heartbeat=5",
        "amqp://app:s3cret@rabbit3/shop?queue_type=quorum&heartbeat=5",
    ]
    assert split_hosts("amqps://h1,h2?cafile=/ca.pem") == [
        "amqps://h1?cafile=/ca.pem",
        "amqps://h2?cafile=/ca.pem",
    ]
    assert split_hosts("amqp://guest:guest@127.0.0.1:5672/") == ["amqp://guest:guest@127.0.0.1:5672/"]
    assert Hosts(split_hosts("amqp://u:p@[::1]:5672,[::1]:5673/")).names == ["::1:5672", "::1:5673"]


def test_the_broker_reads_its_options_once_and_gives_each_host_the_clients() -> None:
    broker = RabbitMQBroker(CLUSTER)
    assert broker.queue_type == "quorum"
    assert broker.hosts.urls == [
        "amqp://app:s3cret@rabbit1:5672/shop?heartbeat=5",
        "amqp://app:s3cret@rabbit2:5673/shop?heartbeat=5",
        "amqp://app:s3cret@rabbit3/shop?heartbeat=5",
    ]
    assert broker.hosts.names == ["rabbit1:5672", "rabbit2:5673", "rabbit3:5672"]
    assert RabbitMQBroker("amqps://u:p@a,b:6000/").hosts.names == ["a:5671", "b:6000"]


def test_redaction_and_option_errors_never_show_the_password() -> None:
    assert (
        redact_url(CLUSTER)
        == "amqp://app:***@rabbit1:5672,rabbit2:5673,rabbit3/shop?queue_type=quorum&heartbeat=5"
    )
    assert url_query(CLUSTER) == {"queue_type": "quorum", "heartbeat": "5"}
    with pytest.raises(ConfigurationError) as caught:
        RabbitMQBroker(CLUSTER + "&prefech=5")
    assert "Did you mean 'prefetch'" in str(caught.value)
    assert "s3cret" not in str(caught.value)
    with pytest.raises(ConfigurationError) as caught:
        split_hosts("amqp://app:s3cret@rabbit1,,rabbit3/")
    assert "empty host" in str(caught.value)
    assert "s3cret" not in str(caught.value)


async def test_connecting_tries_every_host_and_names_each_one_that_failed() -> None:
    hosts = Hosts(["amqp://u:p@127.0.0.1:1/", "amqp://u:p@127.0.0.1:2/"])
    with pytest.raises(ConnectionError) as caught:
        await hosts.connect(timeout=5)
    text = str(caught.value)
    assert "none of the 2 hosts" in text
    assert "127.0.0.1:1: " in text
    assert "127.0.0.1:2: " in text


async def test_the_bus_error_names_the_hosts_without_the_password() -> None:
    broker = RabbitMQBroker("amqp://app:s3cret@127.0.0.1:1,127.0.0.1:2/")
    with pytest.raises(BrokerUnavailable) as caught:
        await broker.start()
    await broker.close()
    text = str(caught.value)
    assert "127.0.0.1:1: " in text
    assert "127.0.0.1:2: " in text
    assert "s3cret" not in text


def test_after_a_lost_connection_the_next_host_is_tried_first() -> None:
    hosts = Hosts(split_hosts("amqp://a,b,c/"))
    assert hosts.current == 0
    hosts.lost()
    hosts.lost()
    hosts.lost()
    assert hosts.current == 0
    hosts.lost()
    assert hosts.names[hosts.current] == "b:5672"
