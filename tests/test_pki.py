"""The lab CA and domain certificates."""

from cryptography import x509

from agents.pki import ensure_ca, ensure_host_cert


def test_domain_certificate_names_every_host_and_the_address(tmp_path):
    path = ensure_host_cert(tmp_path, "x.test", ["mx.x.test", "smtp.x.test"], "127.0.9.1")
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["mx.x.test", "smtp.x.test"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.9.1"]
    assert oct(path.stat().st_mode & 0o777) == "0o600"  # it holds the private key
    assert ensure_host_cert(tmp_path, "x.test", ["mx.x.test"], "127.0.9.1").read_bytes() == path.read_bytes()


def test_certificates_are_reissued_when_the_ca_is_recreated(tmp_path):
    first = ensure_host_cert(tmp_path, "x.test", ["mx.x.test"], "127.0.9.1").read_bytes()
    (tmp_path / "ca.pem").unlink()
    (tmp_path / "ca.key").unlink()
    ca, _ = ensure_ca(tmp_path)
    second = ensure_host_cert(tmp_path, "x.test", ["mx.x.test"], "127.0.9.1").read_bytes()
    assert second != first
    x509.load_pem_x509_certificates(second)[0].verify_directly_issued_by(ca)
