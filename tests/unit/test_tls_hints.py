"""The mutual-TLS hint: every way a server can close a TLS connection on a client without a certificate gets
it (which one the client sees is a matter of timing); a refusal to connect and a certificate failure do
not."""

from __future__ import annotations

import ssl

import pytest

from eventrelay.brokers.tls_hints import mutual_tls_hint

HINT = "; if the server demands a client certificate (mutual TLS), give tls_cert and tls_key"


@pytest.mark.parametrize(
    "error",
    [
        ConnectionResetError(104, "Connection reset by peer"),
        BrokenPipeError(32, "Broken pipe"),
        ConnectionAbortedError(103, "Software caused connection abort"),
        ssl.SSLEOFError(8, "EOF occurred in violation of protocol"),
        RuntimeError("[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] tlsv13 alert certificate required"),
        RuntimeError("Server connection reset: ConnectionResetError(104, 'Connection reset by peer')"),
    ],
    ids=repr,
)
def test_a_connection_the_server_closed_gets_the_hint(error: BaseException) -> None:
    assert mutual_tls_hint(error, "tls_cert and tls_key") == HINT


@pytest.mark.parametrize(
    "error",
    [
        ConnectionRefusedError(111, "Connection refused"),
        ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate has expired"),
    ],
    ids=repr,
)
def test_a_refusal_to_connect_or_a_certificate_failure_gets_none(error: BaseException) -> None:
    assert mutual_tls_hint(error, "tls_cert and tls_key") == ""
