"""The hint that a connection error gets when a server may have wanted a client certificate (mutual TLS).

A server that demands a certificate from a client that sent none answers with an alert, or, over TLS 1.3
where it checks the certificate after the handshake, just resets the connection; the client reads the alert
only if it was in time. Either way the error alone does not say what to do.
"""

from __future__ import annotations

REFUSED_CERTIFICATE = ("reset", "ALERT_BAD_CERTIFICATE", "ALERT_CERTIFICATE_REQUIRED")


def mutual_tls_hint(error: BaseException, options: str) -> str:
    """`"; if the server demands a client certificate (mutual TLS), give <options>"` when `error` looks like
    such a refusal, else `""`. Only for a TLS connection made without a client certificate."""
    if isinstance(error, ConnectionResetError) or any(sign in str(error) for sign in REFUSED_CERTIFICATE):
        return f"; if the server demands a client certificate (mutual TLS), give {options}"
    return ""
