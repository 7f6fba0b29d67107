"""TLS contexts for lab servers and clients (RFC 3207, RFC 8314).

Servers present their domain's certificate; clients trust the lab CA and
nothing else, and check the host name. TLS 1.2 is the minimum, as RFC 8996
and RFC 8314 4.1 ask.
"""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet import ssl

MIN_TLS = ssl.TLSVersion.TLSv1_2


def server_context(cert_pem: Path) -> ssl.CertificateOptions:
    """Server-side TLS options from a PEM file holding key and certificate."""
    pem = Path(cert_pem).read_bytes()
    return ssl.CertificateOptions(
        privateKey=serialization.load_pem_private_key(pem, None),
        certificate=x509.load_pem_x509_certificate(pem),
        raiseMinimumTo=MIN_TLS,
    )


def client_context(ca_pem: Path, hostname: str):
    """Client-side TLS options that trust only the lab CA and verify ``hostname``."""
    authority = ssl.Certificate.loadPEM(Path(ca_pem).read_bytes())
    return ssl.optionsForClientTLS(
        hostname, trustRoot=authority, extraCertificateOptions={"raiseMinimumTo": MIN_TLS}
    )
