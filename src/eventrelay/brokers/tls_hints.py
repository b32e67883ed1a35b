"""The hint that a connection error gets when a server may have wanted a client certificate (mutual TLS).

A server that demands a certificate from a client that sent none answers with an alert, or, over TLS 1.3
where it checks the certificate after the handshake, just closes the connection: the client then reads the
alert, or a reset, or fails its next write (a broken pipe) or read (an EOF), as timing has it. None of them
alone says what to do.
"""

from __future__ import annotations

import ssl

# A connection the server closed on the client (not a refusal to connect: a server that is down is no hint).
CLOSED = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError, ssl.SSLEOFError)
REFUSED_CERTIFICATE = ("reset", "Broken pipe", "EOF", "ALERT_BAD_CERTIFICATE", "ALERT_CERTIFICATE_REQUIRED")


def mutual_tls_hint(error: BaseException, options: str) -> str:
    """`"; if the server demands a client certificate (mutual TLS), give <options>"` when `error` looks like
    such a refusal, else `""`. Only for a TLS connection made without a client certificate."""
    if isinstance(error, CLOSED) or any(sign in str(error) for sign in REFUSED_CERTIFICATE):
        return f"; if the server demands a client certificate (mutual TLS), give {options}"
    return ""
