"""TLS helpers for tests: a self-signed certificate for 127.0.0.1 and an HTTPS server on loopback.

(tests/test_forward.py builds a whole private CA with client certificates for mutual TLS; a server that is
its own trust anchor is all the outbound-verification tests need.)
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
from collections.abc import Iterator
from pathlib import Path

from gateway.serving import serve_in_thread


def self_signed(directory: Path, common_name: str = "127.0.0.1",
                dns_name: str | None = None) -> tuple[Path, Path]:
    """A throw-away self-signed certificate (its own CA) for 127.0.0.1, or for `dns_name` only (to test that
    the host name is checked, not just the chain); returns (cert.pem, key.pem)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        # CA:TRUE so that OpenSSL accepts the certificate as the trust anchor of its own chain
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(dns_name)] if dns_name else
                                                   [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                       critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "server.crt", directory / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


@contextlib.contextmanager
def serve_https(app, cert: Path, key: Path, ready_timeout: float = 15.0) -> Iterator[str]:
    """Run `app` under uvicorn with TLS (no client certificate asked) in a thread; yield its https URL."""
    tls = {"ssl_certfile": str(cert), "ssl_keyfile": str(key)}
    with serve_in_thread(app, ready_timeout=ready_timeout, **tls) as url:
        yield url
