"""TLS against a RabbitMQ node of the tests' own (`tests/rabbitmq_nodes.py`) with only a TLS listener, which
verifies its clients (`verify_peer`, `fail_if_no_peer_cert`): mutual TLS. The certificates are made for the
session (`tests/certificates.py`); the node serves one file, which the test swaps for the expired certificate
and the one for another host, making the node read it again (`ssl:clear_pem_cache()`) instead of restarting.

Every case goes through the bus, with a password of the test's own that no error may show. And an `amqps://`
client pointed at a listener that does not speak TLS sends its TLS hello and nothing else: no credentials.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from eventrelay import DistributedEventBus
from eventrelay.errors import BrokerUnavailable
from tests.brokers.tls_common import FAST, deliver, unique
from tests.certificates import Certificates, make_certificates
from tests.rabbitmq_nodes import RabbitNode, rabbitmq_node
from tests.tls_servers import SECRET

pytestmark = pytest.mark.rabbitmq

USER = "tls-user"
CONFIG = """\
listeners.tcp = none
listeners.ssl.default = 127.0.0.1:{port}
ssl_options.cacertfile = {folder}/certs/ca.pem
ssl_options.certfile = {folder}/certs/served.pem
ssl_options.keyfile = {folder}/certs/server.key
ssl_options.verify = verify_peer
ssl_options.fail_if_no_peer_cert = true
"""


@pytest.fixture(scope="module")
def tls_node() -> Iterator[tuple[RabbitNode, Certificates]]:
    made: list[Certificates] = []

    def prepare(folder: Path) -> None:
        (folder / "certs").mkdir()
        made.append(make_certificates(folder / "certs"))
        shutil.copy(made[0].server_cert, folder / "certs" / "served.pem")

    with rabbitmq_node(CONFIG, prepare) as node:
        node.ctl("add_user", USER, SECRET)
        node.ctl("set_permissions", "-p", "/", USER, ".*", ".*", ".*")
        yield node, made[0]


def _serve(node: RabbitNode, cert: Path) -> None:
    """Make the node present `cert` to the next clients."""
    shutil.copy(cert, node.folder / "certs" / "served.pem")
    node.ctl("eval", "ssl:clear_pem_cache().")


async def _refused(url: str) -> str:
    """The error of a bus that cannot start on `url` (the broker's refusal), checked free of the password."""
    bus = DistributedEventBus(unique(), broker=url, settings=FAST)
    with pytest.raises(BrokerUnavailable) as caught:
        await bus.start()
    await bus.store.close()
    assert SECRET not in str(caught.value)
    return str(caught.value)


async def test_tls_node_verification_mutual_tls_and_each_refusal(
    tls_node: tuple[RabbitNode, Certificates],
) -> None:
    node, certs = tls_node
    base = f"amqps://{USER}:{SECRET}@127.0.0.1:{node.port}/?cafile={certs.ca}"
    client = f"&certfile={certs.client_cert}&keyfile={certs.client_key}"

    # The server verified with the CA, the client with its certificate: events go through.
    assert await deliver(base + client) == [0, 1, 2]

    # Mutual TLS: without a client certificate the node refuses the client. Whether the client reads the
    # node's alert or only the closed connection (a reset, a broken pipe) is a matter of timing: either way
    # the error says what to do.
    refused = await _refused(base)
    assert "certificate required" in refused.lower() or "give certfile and keyfile" in refused, refused

    # A client trusting another CA refuses the node.
    wrong_ca = f"amqps://{USER}:{SECRET}@127.0.0.1:{node.port}/?cafile={certs.other_ca}{client}"
    assert "CERTIFICATE_VERIFY_FAILED" in await _refused(wrong_ca)

    try:
        _serve(node, certs.expired_cert)
        assert "certificate has expired" in await _refused(base + client)
        _serve(node, certs.wrong_host_cert)
        assert "IP address mismatch" in await _refused(base + client)
    finally:
        _serve(node, certs.server_cert)
    assert await deliver(base + client) == [0, 1, 2]  # the swaps were what the client refused


async def test_an_amqps_client_sends_no_credentials_to_a_listener_without_tls(tmp_path: Path) -> None:
    certs = make_certificates(tmp_path)
    received = bytearray()

    async def plain_amqp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.extend(await reader.read(65536))  # what the client says first
        writer.write(b"AMQP\x00\x00\x09\x01")  # a plain AMQP 0-9-1 server's answer to anything but its header
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(plain_amqp, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        error = await _refused(f"amqps://{USER}:{SECRET}@127.0.0.1:{port}/?cafile={certs.ca}")
    assert received.startswith(b"\x16\x03"), "the client's first bytes were not a TLS handshake"
    assert SECRET.encode() not in received
    assert USER.encode() not in received
    assert "SSL" in error
