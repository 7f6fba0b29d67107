"""The lab certificate authority and one certificate per mail domain.

Real mail servers prove who they are with X.509 certificates issued by a CA
that clients trust. The lab makes its own CA on first start (kept in the lab
home) and issues each domain one certificate naming all its hosts
(``mx.D``, ``smtp.D``, ``imap.D``, ``lmtp.D``) and its IP address. Clients
verify against the lab CA only, never the system's roots.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = datetime.timedelta(days=825)


def _key_pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def ensure_ca(pki: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Load the lab CA from ``pki/``, creating it the first time."""
    cert_path, key_path = pki / "ca.pem", pki / "ca.key"
    if cert_path.exists() and key_path.exists():
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), None)
        return cert, key
    pki.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mailpipe lab CA")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    _write_private(key_path, _key_pem(key))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert, key


def _issued_by(pem_path: Path, ca_cert: x509.Certificate) -> bool:
    """Was this certificate signed by this CA? (Not if the CA was deleted and remade.)"""
    try:
        cert = x509.load_pem_x509_certificate(pem_path.read_bytes())
        cert.verify_directly_issued_by(ca_cert)
        return True
    except Exception:
        return False


def _names(pem_path: Path) -> set[str]:
    """The DNS names a certificate is valid for (its subjectAltName)."""
    try:
        cert = x509.load_pem_x509_certificate(pem_path.read_bytes())
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return set(sans.get_values_for_type(x509.DNSName))
    except Exception:
        return set()


def ensure_host_cert(pki: Path, domain: str, hostnames: list[str], address: str) -> Path:
    """Issue (once) ``pki/<domain>.pem``: key and certificate for a domain's hosts.

    Issued again if the CA was remade or the domain gained a host name (a
    backup MX): a client checks the name it connects to against the list.
    """
    path = pki / f"{domain}.pem"
    ca_cert, ca_key = ensure_ca(pki)
    if path.exists() and _issued_by(path, ca_cert) and set(hostnames) <= _names(path):
        return path
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    sans = [x509.DNSName(h) for h in hostnames]
    sans.append(x509.IPAddress(ipaddress.ip_address(address)))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write_private(path, _key_pem(key) + cert.public_bytes(serialization.Encoding.PEM))
    return path
