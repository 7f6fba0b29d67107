"""TLS contexts for lab servers and clients (RFC 3207, RFC 8314).

Servers present their domain's certificate; clients trust the lab CA and
nothing else, and check the host name. TLS 1.2 is the minimum, as RFC 8996
and RFC 8314 4.1 ask.

A full handshake costs a key exchange, a certificate chain and a signature
that the client must check. When a client comes back to a server it has
talked to, both can skip the certificate part: the server gave the client a
*session ticket* (RFC 8446 2.2 and 4.6.1 for TLS 1.3, RFC 5077 for 1.2), and
the client presents it in its next ClientHello. Servers here issue tickets;
clients keep the latest one per server name in :data:`CLIENT_SESSIONS`.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from zope.interface import implementer

MIN_TLS = ssl.TLSVersion.TLSv1_2


def server_context(cert_pem: Path) -> ssl.CertificateOptions:
    """Server-side TLS options from a PEM file holding key and certificate.

    Session tickets are on, so a returning client resumes its session
    (the ticket keys live in this process: after a restart, clients simply
    fall back to a full handshake).
    """
    pem = Path(cert_pem).read_bytes()
    return ssl.CertificateOptions(
        privateKey=serialization.load_pem_private_key(pem, None),
        certificate=x509.load_pem_x509_certificate(pem),
        raiseMinimumTo=MIN_TLS,
        enableSessionTickets=True,
    )


@implementer(IOpenSSLClientConnectionCreator)
class ResumingClientOptions:
    """Twisted's client TLS options for one server name, plus its last session.

    Certificate and host name checks are Twisted's own (``optionsForClientTLS``),
    and they also run on a resumed session, against the certificate that
    OpenSSL keeps with the session. The client calls :meth:`remember` once
    the connection has proved itself (after the EHLO that follows STARTTLS,
    by when a TLS 1.3 server has also sent its ticket). OpenSSL takes a
    session back only into the context that made it, so one object (one
    context) serves every connection to that name.
    """

    def __init__(self, inner, hostname: str):
        self._inner, self.hostname = inner, hostname
        self.session: SSL.Session | None = None

    def clientConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        connection = self._inner.clientConnectionForTLS(tlsProtocol)
        if self.session is not None:
            connection.set_session(self.session)
        return connection

    def remember(self, connection: SSL.Connection) -> None:
        """Keep ``connection``'s session for the next connection to this name."""
        session = connection.get_session()
        if session is not None:
            self.session = session


class TLSSessions:
    """The client's memory of servers: one :class:`ResumingClientOptions` per name.

    Keyed by the CA and the name the client verifies, so a session is only
    ever offered to a server that proved that same name; a server that cannot
    use it (it restarted, or it is another server of that name) just does a
    full handshake. A few hundred names at most, the oldest forgotten first.
    """

    def __init__(self, limit: int = 256):
        self.limit = limit
        self._options: OrderedDict[tuple[bytes, str], ResumingClientOptions] = OrderedDict()

    def options(self, ca_pem: bytes, hostname: str) -> ResumingClientOptions:
        key = (ca_pem, hostname)
        options = self._options.get(key)
        if options is None:
            options = self._options[key] = ResumingClientOptions(_verifying(ca_pem, hostname), hostname)
        self._options.move_to_end(key)
        while len(self._options) > self.limit:
            self._options.popitem(last=False)
        return options


#: Every client in this process shares one memory (an agent's relay client,
#: the MUA): sessions are worth keeping for as long as the process lives.
CLIENT_SESSIONS = TLSSessions()


def client_context(ca_pem: Path, hostname: str, sessions: TLSSessions | None = CLIENT_SESSIONS):
    """Client-side TLS options that trust only the lab CA and verify ``hostname``.

    With ``sessions`` (the default: the process's memory) the options offer
    the last session with ``hostname``; ``None`` always does a full handshake.
    """
    pem = Path(ca_pem).read_bytes()
    if sessions is not None:
        return sessions.options(pem, hostname)
    return _verifying(pem, hostname)


def _verifying(ca_pem: bytes, hostname: str):
    """Twisted's client options: trust only this CA, check ``hostname``, TLS 1.2 or later."""
    return ssl.optionsForClientTLS(
        hostname, trustRoot=ssl.Certificate.loadPEM(ca_pem),
        extraCertificateOptions={"raiseMinimumTo": MIN_TLS},
    )


def session_resumed(connection) -> bool | None:
    """Whether a finished handshake resumed an earlier session (None: cannot tell).

    pyOpenSSL has no wrapper for ``SSL_session_reused``; its cffi binding does.
    """
    try:
        from OpenSSL.SSL import _lib

        return bool(_lib.SSL_session_reused(connection._ssl))
    except Exception:
        return None
