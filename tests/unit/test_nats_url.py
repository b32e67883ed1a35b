"""NATS broker URLs with several hosts (a cluster) and the `replicas` option: what nats-py is given, what a
log shows (never the password), and the clear error for a host list written wrong. No server is needed."""

from __future__ import annotations

import pytest

from eventrelay.brokers.nats import NatsBroker
from eventrelay.brokers.nats_url import Servers, parse_servers
from eventrelay.config import redact_url
from eventrelay.errors import ConfigurationError

PATH = "a NATS URL has no path; for several hosts write the scheme and the credentials once"
CLUSTER = "nats://app:s3cret@n1.internal:4222,n2.internal:4223,n3.internal?stream=shop&replicas=3"


@pytest.mark.parametrize(
    ("url", "servers"),
    [
        ("nats://127.0.0.1:4222", Servers(["nats://127.0.0.1:4222"])),
        ("nats://nats.internal", Servers(["nats://nats.internal:4222"])),
        (
            CLUSTER,
            Servers(
                ["nats://n1.internal:4222", "nats://n2.internal:4223", "nats://n3.internal:4222"],
                user="app",
                password="s3cret",
            ),
        ),
        ("tls://t0ken@h1:4222,h2:4223", Servers(["tls://h1:4222", "tls://h2:4223"], token="t0ken")),
        ("nats://a%40b:p%3As%2C@h1,h2", Servers(["nats://h1:4222", "nats://h2:4222"], "a@b", "p:s,")),
        ("nats://u:p@ss,w@h1:1,[::1]:2", Servers(["nats://h1:1", "nats://[::1]:2"], "u", "p@ss,w")),
    ],
)
def test_every_host_gets_the_one_set_of_credentials(url: str, servers: Servers) -> None:
    assert parse_servers(url) == servers


def test_nats_py_is_given_the_credentials_as_options() -> None:
    """Servers learnt from the cluster (INFO `connect_urls`) carry no credentials: nats-py logs in to them
    with its options, so the credentials go there, not into each server's URL."""
    assert parse_servers(CLUSTER).credentials() == {"user": "app", "password": "s3cret"}
    assert parse_servers("nats://t0ken@h1,h2").credentials() == {"token": "t0ken"}
    assert parse_servers("nats://h1,h2").credentials() == {}
    assert all("s3cret" not in url for url in parse_servers(CLUSTER).urls)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (CLUSTER, "nats://app:***@n1.internal:4222,n2.internal:4223,n3.internal?stream=shop&replicas=3"),
        ("nats://t0ken@h1:4222,h2:4223", "nats://***@h1:4222,h2:4223"),
        ("tls://u:p@ss,w@h1,h2?tls_handshake_first=1", "tls://u:***@h1,h2?tls_handshake_first=1"),
    ],
)
def test_a_cluster_url_is_shown_without_its_secret(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    broker = NatsBroker(url)
    assert broker.safe_url == shown.partition("?")[0]
    for secret in ("s3cret", "t0ken", "p@ss,w"):
        assert secret not in broker.safe_url


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("nats://u:s3cret@h1:4222,nats://h2:4223", PATH),
        ("nats://u:s3cret@h1:4222/shop", PATH),
        ("nats://u:s3cret@h1:4222,,h2", "'' is not a host or host:port"),
        ("nats://u:s3cret@h1:4222,h2:port", "'h2:port' is not a host or host:port"),
        ("nats://u:s3cret@h1:4222,h2:70000", "'h2:70000' is not a host or host:port"),
    ],
)
def test_a_host_list_written_wrong_is_refused_clearly(url: str, says: str) -> None:
    with pytest.raises(ConfigurationError, match=says) as refused:
        NatsBroker(url)
    assert "s3cret" not in str(refused.value)
    assert "u:***@" in str(refused.value)


def test_replicas_is_a_whole_number_above_0() -> None:
    assert NatsBroker("nats://h1").options["replicas"] == 1
    assert NatsBroker(CLUSTER).options["replicas"] == 3
    for bad in ("0", "-1", "1.5", "three"):
        with pytest.raises(ConfigurationError, match=f"replicas takes a whole number above 0, not '{bad}'"):
            NatsBroker(f"nats://h1?replicas={bad}")
