"""Throwaway certificates for the TLS tests, made with the `openssl` command in a temporary folder.

```python
certificates = make_certificates(tmp_path)
certificates.ca                   # the CA the clients trust
certificates.server_cert          # signed by it for 127.0.0.1 and localhost, valid for two days
certificates.expired_cert         # the same name and key, valid only in January 2020
certificates.wrong_host_cert      # the same key, for elsewhere.invalid only
certificates.client_cert          # a client certificate it signed (mutual TLS), key `client_key`
certificates.other_ca             # a CA that signed nothing here: trusting only it, a client refuses all
```

The three server certificates share `server_key`. Keys are P-256.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

OPENSSL = "/usr/bin/openssl"

_CONFIG = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[wrong_host]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:elsewhere.invalid
[client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
# `openssl ca`, only for the expired certificate: `openssl x509` of OpenSSL 3.0 cannot date one in the past.
[testca]
database = index.txt
new_certs_dir = .
certificate = ca.pem
private_key = ca.key
serial = serial
default_md = sha256
policy = anything
unique_subject = no
[anything]
commonName = supplied
"""


@dataclass(frozen=True)
class Certificates:
    """PEM files: a CA, the server certificates it signed (good, expired, for another host), a client
    certificate it signed, and another CA."""

    ca: Path
    server_cert: Path
    server_key: Path
    other_ca: Path
    """A CA that signed nothing here: a client trusting only it must refuse the server."""
    expired_cert: Path
    wrong_host_cert: Path
    client_cert: Path
    client_key: Path


def make_certificates(directory: Path) -> Certificates:
    """Generate the certificates into `directory`."""
    config = directory / "openssl.cnf"
    config.write_text(_CONFIG)

    def openssl(*args: str) -> None:
        subprocess.run([OPENSSL, *args], check=True, capture_output=True, cwd=directory)

    key = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-config", str(config))
    for name in ("ca", "other_ca"):
        subj = f"/CN=eventrelay test {name}"
        openssl("req", "-x509", *key, "-extensions", "ca", "-days", "2", "-subj", subj,
                "-keyout", f"{name}.key", "-out", f"{name}.pem")  # fmt: skip
    openssl("req", "-new", *key, "-subj", "/CN=127.0.0.1", "-keyout", "server.key", "-out", "server.csr")
    openssl(
        "req", "-new", *key, "-subj", "/CN=eventrelay client", "-keyout", "client.key", "-out", "client.csr"
    )
    openssl("req", "-new", "-key", "server.key", "-config", str(config), "-subj", "/CN=elsewhere.invalid",
            "-out", "wrong_host.csr")  # fmt: skip
    signed = ("-CA", "ca.pem", "-CAkey", "ca.key", "-days", "2", "-extfile", str(config))
    for serial, (csr, extensions, out) in enumerate(
        [
            ("server", "server", "server"),
            ("wrong_host", "wrong_host", "wrong_host"),
            ("client", "client", "client"),
        ],
        start=2,
    ):
        openssl("x509", "-req", "-in", f"{csr}.csr", *signed, "-set_serial", str(serial),
                "-extensions", extensions, "-out", f"{out}.pem")  # fmt: skip
    (directory / "index.txt").write_text("")
    (directory / "serial").write_text("10\n")
    openssl("ca", "-batch", "-config", str(config), "-name", "testca", "-in", "server.csr",
            "-startdate", "20200101000000Z", "-enddate", "20200102000000Z", "-extfile", str(config),
            "-extensions", "server", "-notext", "-out", "expired.pem")  # fmt: skip
    return Certificates(
        ca=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        other_ca=directory / "other_ca.pem",
        expired_cert=directory / "expired.pem",
        wrong_host_cert=directory / "wrong_host.pem",
        client_cert=directory / "client.pem",
        client_key=directory / "client.key",
    )
