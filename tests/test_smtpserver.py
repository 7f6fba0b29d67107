"""Tests for agents.smtpserver: each known Twisted 26.10 SMTP gap has a regression test.

Protocol-level, no sockets (StringTransport, task.Clock), except one in-memory
implicit-TLS test (real OpenSSL over iosim) and one real STARTTLS over loopback.
"""

from __future__ import annotations

import base64
import re

import pytest
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.internet import defer, protocol, reactor, ssl, task
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import ITLSTransport
from twisted.internet.testing import StringTransport
from twisted.protocols.basic import LineReceiver
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test import iosim
from twisted.trial import unittest
from zope.interface import implementer

from agents.pki import ensure_host_cert
from agents.smtpserver import (
    DataState,
    MessageReader,
    Reply,
    ServerPolicy,
    SMTPHandler,
    SMTPServer,
    SMTPServerFactory,
    make_auth_portal,
)
from agents.tls import server_context
from agents.trace import Tracer, mask_secret

# ---------------------------------------------------------------------------
# Helpers (also used by tests/test_lmtp.py)

PEER = IPv4Address("TCP", "192.0.2.7", 40000)
ENHANCED = re.compile(rb"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3} ")


@implementer(ITLSTransport)
class FakeTLSTransport(StringTransport):
    """A StringTransport that can "start TLS": it records the context it got."""

    def __init__(self):
        super().__init__(peerAddress=PEER)
        self.tls_contexts = []

    def startTLS(self, ctx, normal=True):
        self.tls_contexts.append(ctx)
        self.sent_before_tls = self.value()  # what went out in plaintext


class RecordingHandler(SMTPHandler):
    """Accepts everything and records each hook call; ``verdicts`` overrides answers.

    A verdict is a value, or a callable taking the hook's arguments.
    """

    def __init__(self, **verdicts):
        self.calls: list[tuple] = []
        self.delivered: list[bytes] = []
        self.verdicts = verdicts

    def _answer(self, name, default, *args):
        self.calls.append((name, *args))
        v = self.verdicts.get(name, default)
        return v(*args) if callable(v) else v

    def handle_CONNECT(self, session):
        return self._answer("CONNECT", None, session)

    def handle_EHLO(self, session, hostname):
        return self._answer("EHLO", None, session, hostname)

    def handle_MAIL(self, session, envelope, address, options):
        return self._answer("MAIL", None, session, envelope, address, options)

    def handle_RCPT(self, session, envelope, address, options):
        return self._answer("RCPT", None, session, envelope, address, options)

    def handle_DATA(self, session, envelope):
        self.delivered.append(envelope.content)
        return self._answer("DATA", Reply(250, "2.0.0", "queued"), session, envelope)

    def called(self, name):
        return [c for c in self.calls if c[0] == name]


class RecordingTracer(Tracer):
    """Keeps events and (masked) transcript lines in memory."""

    def __init__(self):
        super().__init__(None, "test", "test", "lab.test")
        self.events: list[tuple[str, dict]] = []

    def event(self, name, **fields):
        self.events.append((name, fields))

    def line(self, conn, direction, data, peer=None):
        self.events.append(("line", {"dir": direction, "line": mask_secret(data)}))

    def names(self):
        return [n for n, _ in self.events]

    def first(self, name):
        return next(f for n, f in self.events if n == name)


def client_tls(ca_pem, hostname="mx.lab.test"):
    """Client TLS options trusting only the lab CA (verifies ``hostname``)."""
    return ssl.optionsForClientTLS(hostname, trustRoot=ssl.Certificate.loadPEM(ca_pem.read_bytes()))


class ClockedFactory(SMTPServerFactory):
    """Protocols whose idle timer runs on a private Clock, not the global reactor."""

    def buildProtocol(self, addr):
        proto = super().buildProtocol(addr)
        proto.callLater = task.Clock().callLater
        return proto


def connect(policy=None, handler=None, portal=None, tracer=None, transport=None,
            factory=None, clock=None):  # fmt: skip
    """A server protocol on a StringTransport; returns (protocol, transport, handler)."""
    policy = policy or ServerPolicy(hostname="mx.lab.test", tls_context=object())
    handler = handler if handler is not None else RecordingHandler()
    if factory is None:
        factory = SMTPServerFactory(policy, handler, portal=portal, tracer=tracer or Tracer(None, "t", "t", None))
    proto = factory.buildProtocol(PEER)
    proto.callLater = (clock or task.Clock()).callLater
    transport = transport if transport is not None else StringTransport(peerAddress=PEER)
    proto.makeConnection(transport)
    return proto, transport, handler


def replies(transport) -> list[bytes]:
    """Reply lines written since the last call (without CRLF); clears the transport."""
    data = transport.value()
    transport.clear()
    return [line for line in data.split(b"\r\n") if line]


def codes(lines) -> list[int]:
    """The code of each complete reply (its last line)."""
    return [int(line[:3]) for line in lines if line[3:4] == b" "]


def talk(proto, transport, data: bytes) -> list[bytes]:
    transport.clear()
    proto.dataReceived(data)
    return replies(transport)


def ehlo(proto, transport, name=b"client.test") -> list[bytes]:
    return talk(proto, transport, b"EHLO " + name + b"\r\n")


def plain(user: bytes, password: bytes) -> bytes:
    return base64.b64encode(b"\0" + user + b"\0" + password)


def auth_portal():
    checker = InMemoryUsernamePasswordDatabaseDontUse()
    checker.addUser(b"alice@lab.test", b"s3cret")
    return make_auth_portal(checker)


def tls_session(policy=None, handler=None, portal=None, tracer=None):
    """A session already through STARTTLS and the second EHLO."""
    transport = FakeTLSTransport()
    proto, t, handler = connect(policy, handler, portal, tracer, transport)
    talk(proto, t, b"EHLO client.test\r\nSTARTTLS\r\n")
    ehlo(proto, t)
    return proto, t, handler


def open_transaction(proto, t, rcpts=(b"bob@lab.test",)):
    lines = ehlo(proto, t)
    lines += talk(proto, t, b"MAIL FROM:<alice@sender.test>\r\n")
    for r in rcpts:
        lines += talk(proto, t, b"RCPT TO:<" + r + b">\r\n")
    return lines


def send_message(proto, t, body: bytes) -> list[bytes]:
    """DATA, then ``body`` (already dot-stuffed, ending before the final dot)."""
    assert codes(talk(proto, t, b"DATA\r\n")) == [354]
    return talk(proto, t, body + b".\r\n")


# ---------------------------------------------------------------------------
# Basics


def test_greeting_and_ehlo_keywords():
    proto, t, _ = connect(transport=FakeTLSTransport())
    assert replies(t) == [b"220 mx.lab.test ESMTP mailpipe"]
    lines = ehlo(proto, t)
    assert lines[0] == b"250-mx.lab.test greets client.test"
    keywords = [line[4:] for line in lines[1:]]
    assert keywords == [b"PIPELINING", b"SIZE 10485760", b"8BITMIME", b"ENHANCEDSTATUSCODES", b"CHUNKING",
                        b"STARTTLS"]


def test_full_transaction_hands_envelope_to_handler():
    proto, t, handler = connect()
    open_transaction(proto, t, rcpts=(b"bob@lab.test", b"carol@lab.test"))
    lines = send_message(proto, t, b"Subject: hi\r\n\r\nHello\r\n")
    assert lines == [b"250 2.0.0 queued"]
    (_, session, envelope), = handler.called("DATA")
    assert session.helo == "client.test" and session.esmtp and session.peer == "192.0.2.7"
    assert envelope.mail_from == "alice@sender.test"
    assert envelope.rcpt_tos == ["bob@lab.test", "carol@lab.test"]
    assert envelope.content == b"Subject: hi\r\n\r\nHello\r\n"
    # The transaction is over: a new MAIL is allowed, RCPT is not.
    assert codes(talk(proto, t, b"RCPT TO:<x@lab.test>\r\n")) == [503]


# ---------------------------------------------------------------------------
# Gap 1: AUTH before TLS, AUTH robustness (notes 1.2 #1, 1.3)


def test_auth_not_advertised_before_tls():
    proto, t, _ = connect(portal=auth_portal(), transport=FakeTLSTransport())
    assert not any(b"AUTH" in line for line in ehlo(proto, t))


def test_auth_before_starttls_is_538_not_accepted():
    proto, t, _ = connect(portal=auth_portal(), transport=FakeTLSTransport())
    ehlo(proto, t)
    lines = talk(proto, t, b"AUTH PLAIN " + plain(b"alice@lab.test", b"s3cret") + b"\r\n")
    assert lines == [b"538 5.7.11 Must issue a STARTTLS command first"]
    assert proto.session.user is None


def test_auth_advertised_and_accepted_after_starttls():
    proto, t, _ = tls_session(portal=auth_portal())
    lines = ehlo(proto, t)
    assert b"250 AUTH PLAIN LOGIN" in lines
    lines = talk(proto, t, b"AUTH PLAIN " + plain(b"alice@lab.test", b"s3cret") + b"\r\n")
    assert lines == [b"235 2.7.0 Authentication successful"]
    assert proto.session.user == "alice@lab.test"


def test_auth_plain_without_initial_response_and_login_mechanism():
    proto, t, _ = tls_session(portal=auth_portal())
    assert talk(proto, t, b"AUTH PLAIN\r\n") == [b"334 "]
    assert codes(talk(proto, t, plain(b"alice@lab.test", b"s3cret") + b"\r\n")) == [235]

    proto, t, _ = tls_session(portal=auth_portal())
    assert talk(proto, t, b"AUTH LOGIN\r\n") == [b"334 " + base64.b64encode(b"Username:")]
    assert talk(proto, t, base64.b64encode(b"alice@lab.test") + b"\r\n") == [
        b"334 " + base64.b64encode(b"Password:")
    ]
    assert codes(talk(proto, t, base64.b64encode(b"s3cret") + b"\r\n")) == [235]
    assert proto.session.user == "alice@lab.test"


def test_auth_without_mechanism_is_501_not_indexerror():
    proto, t, _ = tls_session(portal=auth_portal())
    assert talk(proto, t, b"AUTH\r\n") == [b"501 5.5.4 Syntax: AUTH mechanism [initial-response]"]
    assert talk(proto, t, b"NOOP\r\n") == [b"250 2.0.0 OK"]


def test_auth_malformed_plain_response_is_501_not_uncaught_illegalclientresponse():
    proto, t, _ = tls_session(portal=auth_portal())
    lines = talk(proto, t, b"AUTH PLAIN " + base64.b64encode(b"no-nul-separators") + b"\r\n")
    assert lines == [b"501 5.5.2 Malformed authentication response"]
    assert talk(proto, t, b"AUTH PLAIN !!!notbase64\r\n") == [b"501 5.5.2 Cannot decode response"]
    assert talk(proto, t, b"NOOP\r\n") == [b"250 2.0.0 OK"]


def test_auth_star_cancels_exchange():
    proto, t, _ = tls_session(portal=auth_portal())
    talk(proto, t, b"AUTH LOGIN\r\n")
    assert talk(proto, t, b"*\r\n") == [b"501 5.0.0 Authentication cancelled"]
    assert talk(proto, t, b"NOOP\r\n") == [b"250 2.0.0 OK"]


def test_auth_wrong_password_is_535_and_unknown_mechanism_504():
    proto, t, _ = tls_session(portal=auth_portal())
    lines = talk(proto, t, b"AUTH PLAIN " + plain(b"alice@lab.test", b"wrong") + b"\r\n")
    assert lines == [b"535 5.7.8 Authentication credentials invalid"]
    assert proto.session.user is None
    assert codes(talk(proto, t, b"AUTH GSSAPI\r\n")) == [504]


def test_auth_refused_when_already_authenticated_or_without_portal():
    proto, t, _ = tls_session(portal=auth_portal())
    talk(proto, t, b"AUTH PLAIN " + plain(b"alice@lab.test", b"s3cret") + b"\r\n")
    assert talk(proto, t, b"AUTH PLAIN " + plain(b"alice@lab.test", b"s3cret") + b"\r\n") == [
        b"503 5.5.1 Already authenticated"
    ]
    proto, t, _ = tls_session(portal=None)
    assert not any(b"AUTH" in line for line in ehlo(proto, t))
    assert talk(proto, t, b"AUTH PLAIN\r\n") == [b"503 5.5.1 AUTH not available"]


def test_auth_secrets_never_reach_the_trace():
    tracer = RecordingTracer()
    proto, t, _ = tls_session(portal=auth_portal(), tracer=tracer)
    talk(proto, t, b"AUTH PLAIN " + plain(b"alice@lab.test", b"s3cret") + b"\r\n")
    proto, t, _ = tls_session(portal=auth_portal(), tracer=tracer)
    talk(proto, t, b"AUTH LOGIN\r\n" + base64.b64encode(b"alice@lab.test") + b"\r\n")
    talk(proto, t, base64.b64encode(b"s3cret") + b"\r\n")
    traced = repr(tracer.events).encode()
    assert plain(b"alice@lab.test", b"s3cret") not in traced
    assert base64.b64encode(b"s3cret") not in traced and b"s3cret" not in traced
    results = [f for n, f in tracer.events if n == "auth.result"]
    assert [(r["ok"], r["user"]) for r in results] == [(True, "alice@lab.test")] * 2


def test_implicit_tls_offers_auth_not_starttls():
    policy = ServerPolicy(hostname="smtp.lab.test", tls_context=object(), implicit_tls=True)
    proto, t, _ = connect(policy, portal=auth_portal(), transport=FakeTLSTransport())
    assert proto.session.tls
    lines = ehlo(proto, t)
    assert b"250 AUTH PLAIN LOGIN" in lines and not any(b"STARTTLS" in x for x in lines)
    assert codes(talk(proto, t, b"STARTTLS\r\n")) == [503]
    assert codes(talk(proto, t, b"AUTH PLAIN " + plain(b"alice@lab.test", b"s3cret") + b"\r\n")) == [235]


# ---------------------------------------------------------------------------
# Gap 2: STARTTLS command injection and state reset (notes 1.2 #2, #3)


def test_starttls_discards_pipelined_injection():
    handler = RecordingHandler()
    transport = FakeTLSTransport()
    proto, t, _ = connect(handler=handler, transport=transport)
    ehlo(proto, t)
    lines = talk(proto, t, b"STARTTLS\r\nMAIL FROM:<injected@evil.test>\r\nRCPT TO:<v@lab.test>\r\n")
    assert lines == [b"220 2.0.0 Ready to start TLS"]
    assert len(transport.tls_contexts) == 1
    assert handler.called("MAIL") == []
    # Nothing from before the handshake survives: a new EHLO is needed.
    assert talk(proto, t, b"MAIL FROM:<a@lab.test>\r\n") == [b"503 5.5.1 Send HELO/EHLO first"]


def test_replies_held_for_a_group_go_out_in_plaintext_before_the_handshake():
    transport = FakeTLSTransport()
    proto, t, _ = connect(transport=transport)
    ehlo(proto, t)
    talk(proto, t, b"NOOP\r\nSTARTTLS\r\n")
    assert transport.sent_before_tls == b"250 2.0.0 OK\r\n220 2.0.0 Ready to start TLS\r\n"


def test_starttls_resets_session_and_is_not_offered_twice():
    proto, t, _ = connect(transport=FakeTLSTransport())
    ehlo(proto, t, b"before.test")
    talk(proto, t, b"STARTTLS\r\n")
    assert proto.session.helo is None and not proto.session.esmtp and proto.session.tls
    lines = ehlo(proto, t, b"after.test")
    assert not any(b"STARTTLS" in x for x in lines)
    assert talk(proto, t, b"STARTTLS\r\n") == [b"503 5.5.1 TLS already active"]
    assert proto.session.helo == "after.test"


def test_starttls_refused_in_transaction_with_args_or_when_unavailable():
    proto, t, _ = connect(transport=FakeTLSTransport())
    ehlo(proto, t)
    assert codes(talk(proto, t, b"STARTTLS now\r\n")) == [501]
    talk(proto, t, b"MAIL FROM:<a@b.test>\r\n")
    assert codes(talk(proto, t, b"STARTTLS\r\n")) == [503]
    proto, t, _ = connect()  # plain StringTransport cannot start TLS
    assert not any(b"STARTTLS" in x for x in ehlo(proto, t))
    assert talk(proto, t, b"STARTTLS\r\n") == [b"502 5.5.1 STARTTLS not available"]


# ---------------------------------------------------------------------------
# Gap 3: line length (RFC 5321 4.5.3.1) and the DATA desync (notes 1.11)


def test_command_line_over_512_octets_is_500_and_session_stays_in_sync():
    proto, t, _ = connect()
    ok = b"NOOP " + b"x" * (512 - 7) + b"\r\n"  # exactly 512 octets
    assert talk(proto, t, ok) == [b"250 2.0.0 OK"]
    long = b"NOOP " + b"x" * 600 + b"\r\n"
    lines = talk(proto, t, long[:300])
    assert lines == []
    lines = talk(proto, t, long[300:] + b"NOOP\r\n")
    assert lines == [b"500 5.5.2 Line too long", b"250 2.0.0 OK"]


def test_data_line_over_1000_octets_reads_to_end_then_rejects_once():
    """Twisted replies at once and returns to command mode: the rest of the
    body then runs as commands. Here it stays data until the final dot."""
    proto, t, handler = connect()
    open_transaction(proto, t)
    body = (b"Subject: x\r\n\r\n" + b"y" * 1200 + b"\r\n"
            b"MAIL FROM:<evil@evil.test>\r\nRCPT TO:<victim@lab.test>\r\nDATA\r\nsmuggled\r\n")  # fmt: skip
    assert codes(talk(proto, t, b"DATA\r\n")) == [354]
    assert talk(proto, t, body) == []  # still reading data
    assert talk(proto, t, b".\r\n") == [b"500 5.5.2 Line too long in message data (max 1000 octets)"]
    assert handler.delivered == [] and len(handler.called("MAIL")) == 1
    assert talk(proto, t, b"NOOP\r\n") == [b"250 2.0.0 OK"]


def test_data_line_of_exactly_1000_octets_is_accepted():
    proto, t, handler = connect()
    open_transaction(proto, t)
    line = b"z" * 998 + b"\r\n"
    assert codes(send_message(proto, t, line)) == [250]
    assert handler.delivered == [line]


@pytest.mark.parametrize("in_data", [False, True])
def test_unbounded_line_without_crlf_hits_buffer_limit_421(in_data):
    proto, t, _ = connect()
    if in_data:
        open_transaction(proto, t)
        talk(proto, t, b"DATA\r\n")
    lines = talk(proto, t, b"A" * (64 * 1024 + 1))
    assert lines == [b"421 4.7.0 Line too long, closing connection"]
    assert t.disconnecting
    assert talk(proto, t, b"\r\nNOOP\r\n") == []


# ---------------------------------------------------------------------------
# Gap 4: bare CR / bare LF and SMTP smuggling (RFC 5321 2.3.8, 4.1.1.4)


@pytest.mark.parametrize("line", [b"NOOP\n", b"NO\rOP\r\n", b"NOOP\r\r\n"])
def test_bare_cr_or_lf_in_command_is_500(line):
    proto, t, _ = connect()
    assert talk(proto, t, line + b"NOOP\r\n") == [b"500 5.5.2 Bare CR or LF not allowed, use CRLF", b"250 2.0.0 OK"]


def test_bare_lf_in_message_is_rejected_after_end_of_data():
    proto, t, handler = connect()
    open_transaction(proto, t)
    lines = send_message(proto, t, b"Subject: x\r\n\r\nline one\nline two\r\n")
    assert lines == [b"554 5.6.0 Bare CR or LF not allowed in message data"]
    assert handler.delivered == []


@pytest.mark.parametrize("fake_end", [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\r.\r"])
def test_smuggled_end_of_data_variants_do_not_end_data(fake_end):
    """CVE-2023-51764 class: only <CRLF>.<CRLF> ends DATA; the smuggled
    transaction after a fake end stays message text and is never executed."""
    proto, t, handler = connect()
    open_transaction(proto, t)
    smuggled = b"MAIL FROM:<smuggled@evil.test>\r\nRCPT TO:<victim@lab.test>\r\nDATA\r\nfake\r\n"
    lines = send_message(proto, t, b"Subject: x\r\n\r\nhello" + fake_end + smuggled)
    assert lines == [b"554 5.6.0 Bare CR or LF not allowed in message data"]
    assert len(handler.called("MAIL")) == 1 and handler.delivered == []


# ---------------------------------------------------------------------------
# Gap 5: the DATA state machine, dot-unstuffing and SIZE (RFC 1870)


def test_message_reader_states():
    def read(*lines, max_size=100, max_line=20):
        r = MessageReader(max_size, max_line)
        ends = [r.feed(line) for line in lines]
        return r, ends

    r, ends = read(b"a\r\n", b"..b\r\n", b".\r\n")
    assert ends == [False, False, True] and r.state is DataState.NOMINAL
    assert r.content() == b"a\r\n.b\r\n" and r.size == 7
    r, _ = read(b"x" * 30 + b"\r\n", b"ok\r\n", b".\r\n")
    assert r.state is DataState.TOO_LONG and r.content() == b""
    r, _ = read(*[b"x" * 15 + b"\r\n"] * 10, b".\r\n")
    assert r.state is DataState.TOO_MUCH and r.size == 170
    r, ends = read(b"a\n", b".\r\n", b"b\r\n", b".\r\n")  # \n.\r\n is not the end
    assert ends == [False, False, False, True] and r.state is DataState.BAD_NEWLINE
    r, ends = read(b".\r\n")  # the CRLF of "DATA\r\n" starts the end marker
    assert ends == [True] and r.content() == b""
    # RFC 5321 4.5.3.1.6: the stuffed dot does not count towards 1000.
    r, _ = read(b"." + b"x" * 18 + b"\r\n", b".\r\n")
    assert r.state is DataState.NOMINAL


@pytest.mark.parametrize("chunk", [16384, 1])
def test_dot_unstuffing_first_line_and_at_16k_boundary(chunk):
    """The handler gets the exact message: a leading-dot first line, and a
    leading-dot line that starts exactly at a 16 KiB read boundary (where
    Twisted's client mis-stuffs, notes 1.4), read in 16 KiB or 1-byte pieces."""
    proto, t, handler = connect()
    open_transaction(proto, t)
    first = b".first line starts with a dot\r\n"
    filler_len = 16384 - len(b"." + first)  # so the next line starts at 16384
    filler = b""
    while filler_len - len(filler) > 160:
        filler += b"f" * 78 + b"\r\n"
    filler += b"g" * (filler_len - len(filler) - 2) + b"\r\n"
    message = first + filler + b".at the boundary\r\n..two dots\r\n.\r\nend\r\n"
    wire = b"." + first + filler + b"..at the boundary\r\n...two dots\r\n..\r\nend\r\n.\r\n"
    assert wire.index(b"..at the boundary") == 16384
    assert codes(talk(proto, t, b"DATA\r\n")) == [354]
    for i in range(0, len(wire), chunk):
        proto.dataReceived(wire[i : i + chunk])
    assert codes(replies(t)) == [250]
    assert handler.delivered == [message]


def test_size_parameter_over_limit_is_552_at_mail():
    policy = ServerPolicy(hostname="mx.lab.test", max_message_size=1000)
    proto, t, _ = connect(policy)
    assert b"250-SIZE 1000" in ehlo(proto, t)
    assert talk(proto, t, b"MAIL FROM:<a@b.test> SIZE=1001\r\n") == [
        b"552 5.3.4 Message size exceeds fixed maximum message size"
    ]
    assert codes(talk(proto, t, b"MAIL FROM:<a@b.test> SIZE=1000\r\n")) == [250]
    assert codes(talk(proto, t, b"RSET\r\nMAIL FROM:<a@b.test> SIZE=big\r\n")) == [250, 501]


@pytest.mark.parametrize("size_param", [b"", b" SIZE=10"])
def test_size_enforced_while_reading_even_when_client_lied_or_sent_none(size_param):
    policy = ServerPolicy(hostname="mx.lab.test", max_message_size=1000)
    proto, t, handler = connect(policy)
    ehlo(proto, t)
    talk(proto, t, b"MAIL FROM:<a@b.test>" + size_param + b"\r\nRCPT TO:<b@lab.test>\r\n")
    lines = send_message(proto, t, b"x" * 98 + b"\r\n" * 1 + (b"y" * 98 + b"\r\n") * 10)
    assert lines == [b"552 5.3.4 Message size exceeds fixed maximum message size"]
    assert handler.delivered == []


# ---------------------------------------------------------------------------
# Gap 6: PIPELINING keeps reply order with Deferred hooks (Twisted #8126)


def test_pipelined_replies_stay_in_order_when_hook_returns_unfired_deferred():
    pending = defer.Deferred()
    handler = RecordingHandler(MAIL=lambda *a: pending)
    proto, t, _ = connect(handler=handler)
    ehlo(proto, t)
    lines = talk(proto, t, b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@lab.test>\r\nDATA\r\nhello\r\n.\r\nNOOP\r\n")
    assert lines == []  # nothing may overtake the pending MAIL reply
    assert handler.called("RCPT") == []
    pending.callback(None)
    assert codes(replies(t)) == [250, 250, 354, 250, 250]
    assert handler.delivered == [b"hello\r\n"]


def test_pending_data_verdict_holds_later_commands_and_250_only_when_handler_says():
    verdict = defer.Deferred()
    handler = RecordingHandler(DATA=lambda *a: verdict)
    proto, t, _ = connect(handler=handler)
    open_transaction(proto, t)
    assert send_message(proto, t, b"hi\r\n" + b"") == []
    assert talk(proto, t, b"QUIT\r\n") == []
    verdict.callback(Reply(250, "2.0.0", "Ok: queued as 42"))
    assert replies(t) == [b"250 2.0.0 Ok: queued as 42", b"221 2.0.0 mx.lab.test closing connection"]


class WriteCounter(StringTransport):
    """A StringTransport that counts its ``write`` calls: one call, one segment sent."""

    def __init__(self):
        super().__init__(peerAddress=PEER)
        self.writes = 0

    def write(self, data):
        self.writes += 1
        super().write(data)


def test_replies_to_a_pipelined_transaction_go_out_together_after_the_message_is_safe():
    """RFC 2920 3.2: MAIL and RCPT replies wait for the BDAT LAST verdict, then all
    three leave in one write (one send, one wake-up of the client)."""
    verdict = defer.Deferred()
    t = WriteCounter()
    proto, _, _ = connect(ServerPolicy(hostname="mx.lab.test"),
                          handler=RecordingHandler(DATA=lambda *a: verdict), transport=t)
    ehlo(proto, t)
    t.writes = 0
    assert talk(proto, t, b"MAIL FROM:<alice@sender.test>\r\nRCPT TO:<bob@lab.test>\r\n"
                          b"BDAT 4 LAST\r\nhi\r\n") == []
    verdict.callback(Reply(250, "2.0.0", "Ok: queued as 42"))
    assert replies(t) == [b"250 2.1.0 Sender OK", b"250 2.1.5 Recipient OK", b"250 2.0.0 Ok: queued as 42"]
    assert t.writes == 1


def test_replies_are_flushed_before_the_server_waits_for_input():
    """Never wait for the client with replies unsent (RFC 2920 3.2): a client that
    does not pipeline gets each answer at once, and so does one that sends DATA."""
    t = WriteCounter()
    proto, _, _ = connect(ServerPolicy(hostname="mx.lab.test"), transport=t)
    ehlo(proto, t)
    assert talk(proto, t, b"MAIL FROM:<alice@sender.test>\r\n") == [b"250 2.1.0 Sender OK"]
    t.writes = 0
    assert codes(talk(proto, t, b"RCPT TO:<bob@lab.test>\r\nDATA\r\n")) == [250, 354]
    assert t.writes == 1  # both replies, once the input ran out


def test_a_pending_hook_with_nothing_held_still_answers_when_it_fires():
    """A slow MAIL hook: no reply is lost or delayed beyond the hook itself."""
    pending = defer.Deferred()
    proto, t, _ = connect(handler=RecordingHandler(MAIL=lambda *a: pending))
    ehlo(proto, t)
    assert talk(proto, t, b"MAIL FROM:<a@b.test>\r\n") == []
    pending.callback(None)
    assert replies(t) == [b"250 2.1.0 Sender OK"]


def test_held_replies_go_out_before_the_connection_closes():
    """The 501 for a BDAT without size, after pipelined MAIL and RCPT: all three
    reach the client before the hang-up."""
    proto, t, _ = connect(ServerPolicy(hostname="mx.lab.test"))
    ehlo(proto, t)
    lines = talk(proto, t, b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@lab.test>\r\nBDAT lots\r\n")
    assert codes(lines) == [250, 250, 501] and t.disconnecting


def test_pipelining_pauses_transport_while_reply_pending():
    pending = defer.Deferred()
    policy = ServerPolicy(hostname="mx.lab.test", pipeline_high_water=1000)
    proto, t, _ = connect(policy, handler=RecordingHandler(MAIL=lambda *a: pending))
    ehlo(proto, t)
    proto.dataReceived(b"MAIL FROM:<a@b.test>\r\n" + b"NOOP\r\n" * 300)
    assert t.producerState == "paused"
    pending.callback(None)
    assert t.producerState == "producing"
    assert codes(replies(t)) == [250] * 301


# ---------------------------------------------------------------------------
# Gap 7: simple commands, extensions, enhanced status codes


@pytest.mark.parametrize(
    "command, reply",
    [
        (b"NOOP", b"250 2.0.0 OK"),
        (b"NOOP anything", b"250 2.0.0 OK"),
        (b"RSET", b"250 2.0.0 OK"),
        (b"VRFY bob", b"252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery"),
        (b"EXPN list", b"502 5.5.1 EXPN not implemented"),
        (b"FOO bar", b"500 5.5.1 Command unrecognized"),
        (b"", b"500 5.5.2 Syntax error"),
    ],
)
def test_simple_commands(command, reply):
    proto, t, _ = connect()
    assert talk(proto, t, command + b"\r\n") == [reply]


def test_help_and_quit():
    proto, t, _ = connect()
    (line,) = talk(proto, t, b"HELP\r\n")
    # HELP lists only what this listener can do: no STARTTLS on a transport
    # that cannot start TLS, no AUTH without a portal.
    assert line.startswith(b"214 2.0.0 Commands:") and b"MAIL" in line
    assert b"STARTTLS" not in line and b"AUTH" not in line
    assert talk(proto, t, b"QUIT\r\nNOOP\r\n") == [b"221 2.0.0 mx.lab.test closing connection"]
    assert t.disconnecting


@pytest.mark.parametrize(
    "params, code",
    [(b" BODY=8BITMIME", 250), (b" BODY=7bit", 250), (b" BODY=BINARYMIME", 501),
     (b" SMTPUTF8", 555), (b" X-FOO=1", 555), (b" =bad", 501)],
)  # fmt: skip
def test_mail_parameters_8bitmime_and_unknown(params, code):
    proto, t, _ = connect()
    ehlo(proto, t)
    (line,) = talk(proto, t, b"MAIL FROM:<a@b.test>" + params + b"\r\n")
    assert int(line[:3]) == code and ENHANCED.match(line)


def test_rcpt_parameters_are_555_and_helo_sessions_get_no_parameters():
    proto, t, _ = connect()
    ehlo(proto, t)
    talk(proto, t, b"MAIL FROM:<a@b.test>\r\n")
    assert codes(talk(proto, t, b"RCPT TO:<b@lab.test> NOTIFY=NEVER\r\n")) == [555]
    proto, t, _ = connect()
    talk(proto, t, b"HELO client.test\r\n")
    assert codes(talk(proto, t, b"MAIL FROM:<a@b.test> BODY=8BITMIME\r\n")) == [555]


def test_every_reply_carries_enhanced_status_except_greeting_and_ehlo():
    proto, t, _ = connect(handler=RecordingHandler(RCPT=lambda *a: Reply(550, "5.1.1", "no such user")))
    replies(t)
    script = [b"NOOP", b"MAIL FROM:<a@b.test>", b"EHLO c.test", b"RCPT TO:<x@y.test>",
              b"MAIL FROM:<a@b.test>", b"MAIL FROM:<a@b.test>", b"RCPT TO:<x@y.test>", b"DATA",
              b"RSET", b"VRFY x", b"HELP", b"BOGUS", b"MAIL FROM:<>", b"RCPT TO:<>", b"QUIT"]  # fmt: skip
    for command in script:
        lines = talk(proto, t, command + b"\r\n")
        if command.startswith(b"EHLO"):
            continue
        assert lines and all(ENHANCED.match(line) for line in lines), (command, lines)


# ---------------------------------------------------------------------------
# Gap 8: MAIL/RCPT syntax and command sequence


@pytest.mark.parametrize(
    "arg",
    [b"FROM:a@b.test", b"FROM:<@relay.test:a@b.test>", b"FROM:<a b@c.test>", b"FROM:<a@>",
     b"FROM:<a@b..test>", b"FROM<a@b.test>", b"FROM:<" + b"l" * 65 + b"@b.test>", b"FROM:<a@b\xc3\xa9.test>"],
)  # fmt: skip
def test_bad_mail_syntax_is_501_5_1_7(arg):
    proto, t, _ = connect()
    ehlo(proto, t)
    (line,) = talk(proto, t, b"MAIL " + arg + b"\r\n")
    assert line.startswith(b"501 5.1.7 ")


# A source route (<@a.test,@b.test:c@d.test>) is valid RFC 5321 syntax that
# asks for relaying: it gets 550 5.7.1, see tests/test_security.py.
@pytest.mark.parametrize("arg", [b"TO:<>", b"TO:<c@>", b"TO:c@d.test", b"TO:<c>"])
def test_bad_rcpt_syntax_is_501_5_1_3(arg):
    proto, t, _ = connect()
    ehlo(proto, t)
    talk(proto, t, b"MAIL FROM:<a@b.test>\r\n")
    (line,) = talk(proto, t, b"RCPT " + arg + b"\r\n")
    assert line.startswith(b"501 5.1.3 ")


def test_good_addresses_null_sender_quoted_local_part_literal_postmaster():
    proto, t, handler = connect()
    ehlo(proto, t)
    assert codes(talk(proto, t, b"MAIL FROM:<>\r\n")) == [250]
    assert handler.called("MAIL")[0][3] == ""
    for rcpt in [b'"john doe"@lab.test', b"x@[192.0.2.1]", b"Postmaster", b"a.b+tag@sub.lab.test"]:
        assert codes(talk(proto, t, b"RCPT TO:<" + rcpt + b">\r\n")) == [250], rcpt
    assert codes(talk(proto, t, b"RSET\r\nMAIL FROM: <spaced@b.test>\r\n")) == [250, 250]


def test_command_sequence_errors_are_503():
    proto, t, _ = connect()
    assert talk(proto, t, b"MAIL FROM:<a@b.test>\r\n") == [b"503 5.5.1 Send HELO/EHLO first"]
    ehlo(proto, t)
    assert talk(proto, t, b"RCPT TO:<a@b.test>\r\n") == [b"503 5.5.1 Need MAIL before RCPT"]
    assert talk(proto, t, b"DATA\r\n") == [b"503 5.5.1 Need MAIL command"]
    talk(proto, t, b"MAIL FROM:<a@b.test>\r\n")
    assert talk(proto, t, b"MAIL FROM:<a@b.test>\r\n") == [b"503 5.5.1 Nested MAIL command"]
    assert talk(proto, t, b"DATA\r\n") == [b"503 5.5.1 Need RCPT command"]


def test_data_with_no_valid_recipients_is_554():
    handler = RecordingHandler(RCPT=lambda *a: Reply(550, "5.1.1", "no such user"))
    proto, t, _ = connect(handler=handler)
    open_transaction(proto, t)
    assert talk(proto, t, b"DATA\r\n") == [b"554 5.5.1 No valid recipients"]


def test_too_many_recipients_is_452():
    policy = ServerPolicy(hostname="mx.lab.test", max_recipients=2)
    proto, t, _ = connect(policy)
    lines = open_transaction(proto, t, rcpts=(b"a@lab.test", b"b@lab.test", b"c@lab.test"))
    assert lines[-1] == b"452 4.5.3 Too many recipients"
    assert proto.envelope.rcpt_tos == ["a@lab.test", "b@lab.test"]


# ---------------------------------------------------------------------------
# Gap 9: require_auth


def test_require_auth_mail_without_auth_is_530():
    policy = ServerPolicy(hostname="smtp.lab.test", require_auth=True, tls_context=object())
    proto, t, _ = tls_session(policy, portal=auth_portal())
    assert talk(proto, t, b"MAIL FROM:<alice@lab.test>\r\n") == [b"530 5.7.0 Authentication required"]
    talk(proto, t, b"AUTH PLAIN " + plain(b"alice@lab.test", b"s3cret") + b"\r\n")
    assert codes(talk(proto, t, b"MAIL FROM:<alice@lab.test>\r\n")) == [250]


# ---------------------------------------------------------------------------
# Gap 10: idle timeout


def test_idle_timeout_is_421_4_4_2_and_close():
    clock = task.Clock()
    proto, t, _ = connect(ServerPolicy(hostname="mx.lab.test", timeout=30), clock=clock)
    replies(t)
    clock.advance(29)
    proto.dataReceived(b"NOOP\r\n")
    clock.advance(29)
    assert not t.disconnecting
    clock.advance(2)
    assert replies(t)[-1] == b"421 4.4.2 mx.lab.test Error: timeout exceeded"
    assert t.disconnecting


def test_no_idle_timeout_while_the_handler_is_the_slow_side():
    clock = task.Clock()
    verdict = defer.Deferred()
    handler = RecordingHandler(DATA=lambda *a: verdict)
    proto, t, _ = connect(ServerPolicy(hostname="mx.lab.test", timeout=30), handler, clock=clock)
    open_transaction(proto, t)
    send_message(proto, t, b"x\r\n")
    clock.advance(100)
    assert not t.disconnecting
    verdict.callback(Reply(250, "2.0.0", "ok"))
    clock.advance(31)
    assert t.disconnecting


# ---------------------------------------------------------------------------
# Handler contract


def test_hook_exception_is_451_and_session_continues():
    def boom(*args):
        raise RuntimeError("disk on fire")

    proto, t, _ = connect(handler=RecordingHandler(MAIL=boom))
    ehlo(proto, t)
    lines = talk(proto, t, b"MAIL FROM:<a@b.test>\r\nNOOP\r\n")
    assert lines == [b"451 4.3.0 Requested action aborted: local error in processing", b"250 2.0.0 OK"]
    assert proto.envelope.mail_from is None


@pytest.mark.parametrize(
    "verdict",
    [lambda *a: None, lambda *a: "250 ok", lambda *a: defer.fail(OSError("fsync failed"))],
    ids=["none", "string", "failed-deferred"],
)
def test_data_verdict_that_is_not_a_reply_is_451_never_250(verdict):
    proto, t, _ = connect(handler=RecordingHandler(DATA=verdict))
    open_transaction(proto, t)
    assert codes(send_message(proto, t, b"x\r\n")) == [451]


def test_handle_connect_can_refuse_then_only_quit_works():
    proto, t, _ = connect(handler=RecordingHandler(CONNECT=Reply(554, "5.7.1", "go away")))
    assert replies(t) == [b"554 5.7.1 go away"]
    assert codes(talk(proto, t, b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\n")) == [503, 503]
    assert codes(talk(proto, t, b"QUIT\r\n")) == [221]
    proto, t, _ = connect(handler=RecordingHandler(CONNECT=Reply(421, "4.3.2", "busy")))
    assert replies(t) == [b"421 4.3.2 busy"] and t.disconnecting


def test_handle_connect_crash_is_421_not_a_451_greeting():
    def boom(session):
        raise RuntimeError("dnsbl lookup failed")

    proto, t, _ = connect(handler=RecordingHandler(CONNECT=boom))
    assert replies(t) == [b"421 4.3.0 Requested action aborted: local error in processing"]
    assert t.disconnecting


def test_handle_ehlo_can_reject_and_rcpt_hook_can_refuse():
    handler = RecordingHandler(
        EHLO=lambda s, name: Reply(550, "5.7.1", "no") if name == "bad.test" else None,
        RCPT=lambda s, e, addr, o: Reply(550, "5.1.1", "unknown") if addr.startswith("x") else None,
    )
    proto, t, _ = connect(handler=handler)
    assert talk(proto, t, b"EHLO bad.test\r\n") == [b"550 5.7.1 no"]
    assert proto.session.helo is None
    lines = open_transaction(proto, t, rcpts=(b"x@lab.test", b"y@lab.test"))
    assert codes(lines)[-2:] == [550, 250] and proto.envelope.rcpt_tos == ["y@lab.test"]


def test_trace_records_lines_and_events():
    tracer = RecordingTracer()
    proto, t, _ = connect(tracer=tracer)
    open_transaction(proto, t)
    send_message(proto, t, b"abc\r\n")
    talk(proto, t, b"BOGUS\r\n")
    names = tracer.names()
    for name in ["connection.accepted", "smtp.ehlo", "smtp.mail", "smtp.rcpt", "smtp.data.start",
                 "smtp.data.end", "smtp.reject", "line"]:  # fmt: skip
        assert name in names, name
    assert tracer.first("smtp.data.end")["bytes"] == 5
    assert tracer.first("smtp.reject")["code"] == 500
    assert {"dir": "C", "line": b"EHLO client.test"} in [f for n, f in tracer.events if n == "line"]


# ---------------------------------------------------------------------------
# Real TLS


@pytest.fixture
def lab_pki(tmp_path):
    pem = ensure_host_cert(tmp_path, "lab.test", ["mx.lab.test"], "127.0.0.1")
    return server_context(pem), tmp_path / "ca.pem"


class _Collector(protocol.Protocol):
    def connectionMade(self):
        self.data = b""

    def dataReceived(self, data):
        self.data += data

    def take(self):
        data, self.data = self.data, b""
        return data.split(b"\r\n")[:-1]


def test_implicit_tls_in_memory_with_real_openssl(lab_pki):
    server_ctx, ca_pem = lab_pki
    tracer = RecordingTracer()
    policy = ServerPolicy(hostname="mx.lab.test", tls_context=server_ctx, implicit_tls=True, require_auth=True)
    inner = ClockedFactory(policy, RecordingHandler(), portal=auth_portal(), tracer=tracer)
    clock = task.Clock()  # TLS write aggregation flushes on it; the pump advances it
    server_factory = TLSMemoryBIOFactory(server_ctx, False, inner, clock=clock)
    app = _Collector()
    client_factory = TLSMemoryBIOFactory(
        client_tls(ca_pem), True, protocol.Factory.forProtocol(lambda: app), clock=clock
    )
    client, server, pump = iosim.connectedServerAndClient(
        lambda: server_factory.buildProtocol(PEER),
        lambda: client_factory.buildProtocol(PEER),
        clock=clock,
    )
    pump.flush()
    assert app.take() == [b"220 mx.lab.test ESMTP mailpipe"]
    smtp_server = server.wrappedProtocol
    assert smtp_server.session.tls and smtp_server.session.notes["tls_version"].startswith("TLSv1.")
    app.transport.write(b"EHLO client.test\r\nAUTH PLAIN " + plain(b"alice@lab.test", b"s3cret") + b"\r\n")
    pump.flush()
    lines = app.take()
    assert b"250 AUTH PLAIN LOGIN" in lines and not any(b"STARTTLS" in x for x in lines)
    assert lines[-1] == b"235 2.7.0 Authentication successful"
    assert "tls.done" in tracer.names()


class _LineClient(LineReceiver):
    """A tiny SMTP client for the loopback test: ``reply()`` waits for the next reply."""

    delimiter = b"\r\n"

    def __init__(self):
        self.lines, self.waiters, self.closed = [], [], defer.Deferred()

    def lineReceived(self, line):
        self.lines.append(line)
        if line[3:4] == b" " and self.waiters:
            lines, self.lines = self.lines, []
            self.waiters.pop(0).callback(lines)

    def reply(self, command: bytes | None = None) -> defer.Deferred:
        if command is not None:
            self.sendLine(command)
        d = defer.Deferred()
        self.waiters.append(d)
        return d

    def connectionLost(self, reason):
        self.closed.callback(None)


class RealStartTLSTests(unittest.TestCase):
    """STARTTLS on a real loopback TCP connection (trial runs the reactor)."""

    @defer.inlineCallbacks
    def test_starttls_then_auth_over_loopback(self):
        import tempfile
        from pathlib import Path

        pki = Path(tempfile.mkdtemp())
        pem = ensure_host_cert(pki, "lab.test", ["mx.lab.test"], "127.0.0.1")
        server_lost = defer.Deferred()

        class Server(SMTPServer):
            def connectionLost(self, reason):
                super().connectionLost(reason)
                server_lost.callback(None)

        factory = SMTPServerFactory(
            ServerPolicy(hostname="mx.lab.test", tls_context=server_context(pem)),
            RecordingHandler(), portal=auth_portal(),
        )  # fmt: skip
        factory.protocol = Server
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        client = _LineClient()
        greeting = client.reply()
        yield connectProtocol(endpoint, client)
        self.assertEqual((yield greeting), [b"220 mx.lab.test ESMTP mailpipe"])
        lines = yield client.reply(b"EHLO client.test")
        self.assertIn(b"250 STARTTLS", lines)
        self.assertFalse(any(b"AUTH" in x for x in lines))
        # The injected MAIL shares the TCP segment with STARTTLS; the server
        # must drop it, so the first reply under TLS is the one to EHLO.
        client.transport.write(b"STARTTLS\r\nMAIL FROM:<injected@evil.test>\r\n")
        self.assertEqual((yield client.reply()), [b"220 2.0.0 Ready to start TLS"])
        client.transport.startTLS(client_tls(pki / "ca.pem"))
        lines = yield client.reply(b"EHLO client.test")
        self.assertEqual(lines[0], b"250-mx.lab.test greets client.test")
        self.assertIn(b"250 AUTH PLAIN LOGIN", lines)
        self.assertFalse(any(b"STARTTLS" in x for x in lines))
        lines = yield client.reply(b"AUTH PLAIN " + plain(b"alice@lab.test", b"s3cret"))
        self.assertEqual(lines, [b"235 2.7.0 Authentication successful"])
        self.assertEqual((yield client.reply(b"QUIT"))[0][:3], b"221")
        yield client.closed
        yield server_lost


# ---------------------------------------------------------------------------
# CHUNKING: BDAT (RFC 3030)


def mail_and_rcpt(proto, t, rcpt=b"bob@lab.test") -> list[int]:
    ehlo(proto, t)
    return codes(talk(proto, t, b"MAIL FROM:<alice@sender.test>\r\nRCPT TO:<" + rcpt + b">\r\n"))


def test_bdat_takes_the_message_in_one_round_trip_without_dot_stuffing():
    """MAIL, RCPT and BDAT LAST with the message, in one write: three replies, in order.
    A line that is only "." is text in BDAT: nothing is unstuffed and nothing ends early."""
    proto, t, handler = connect(ServerPolicy(hostname="mx.lab.test"))
    ehlo(proto, t)
    message = b"Subject: dots\r\n\r\n.\r\n..two\r\nMAIL FROM:<evil@x.test>\r\n"
    lines = talk(proto, t, b"MAIL FROM:<alice@sender.test>\r\nRCPT TO:<bob@lab.test>\r\n"
                           b"BDAT %d LAST\r\n" % len(message) + message + b"NOOP\r\n")
    assert codes(lines) == [250, 250, 250, 250]
    assert handler.delivered == [message]
    assert len(handler.called("MAIL")) == 1  # the MAIL line inside the chunk was data


def test_bdat_refused_before_mail_still_reads_its_octets():
    proto, t, handler = connect(ServerPolicy(hostname="mx.lab.test"))
    ehlo(proto, t)
    assert talk(proto, t, b"BDAT 12 LAST\r\nQUIT\r\nRSET\r\nNOOP\r\n") == [
        b"503 5.5.1 Need MAIL command", b"250 2.0.0 OK"]  # QUIT and RSET were the chunk
    assert handler.delivered == [] and not t.disconnecting


def test_bdat_with_every_recipient_refused_gets_554_and_stays_in_step():
    handler = RecordingHandler(RCPT=Reply(550, "5.1.1", "no such user"))
    proto, t, _ = connect(ServerPolicy(hostname="mx.lab.test"), handler=handler)
    assert mail_and_rcpt(proto, t) == [250, 550]
    assert talk(proto, t, b"BDAT 5 LAST\r\nhello" + b"NOOP\r\n") == [
        b"554 5.5.1 No valid recipients", b"250 2.0.0 OK"]
    assert handler.delivered == []


def test_bdat_without_a_size_is_refused_and_the_session_ends():
    """Nobody can tell where a chunk of unknown size ends: 501, then hang up."""
    proto, t, _ = connect(ServerPolicy(hostname="mx.lab.test"))
    assert mail_and_rcpt(proto, t) == [250, 250]
    assert talk(proto, t, b"BDAT lots\r\nNOOP\r\n") == [b"501 5.5.4 Syntax: BDAT <size> [LAST]"]
    assert t.disconnecting


def test_data_after_bdat_is_refused_and_bdat_goes_on():
    proto, t, handler = connect(ServerPolicy(hostname="mx.lab.test"))
    assert mail_and_rcpt(proto, t) == [250, 250]
    assert talk(proto, t, b"BDAT 9\r\nSubject: ") == [b"250 2.0.0 9 octets received"]
    assert talk(proto, t, b"DATA\r\n") == [b"503 5.5.1 DATA after BDAT: send the rest with BDAT"]
    assert codes(talk(proto, t, b"BDAT 6 LAST\r\nhi\r\n\r\n")) == [250]
    assert handler.delivered == [b"Subject: hi\r\n\r\n"]


def test_bdat_over_the_size_limit_is_refused_at_that_chunk_and_read_to_its_end():
    proto, t, handler = connect(ServerPolicy(hostname="mx.lab.test", max_message_size=10))
    assert mail_and_rcpt(proto, t) == [250, 250]
    assert talk(proto, t, b"BDAT 8\r\n12345678") == [b"250 2.0.0 8 octets received"]
    assert talk(proto, t, b"BDAT 8\r\n9abcdefg") == [
        b"552 5.3.4 Message size exceeds fixed maximum message size"]
    # The transaction is over: the next chunk has no MAIL to belong to.
    assert talk(proto, t, b"BDAT 3 LAST\r\nxyzNOOP\r\n") == [b"503 5.5.1 Need MAIL command", b"250 2.0.0 OK"]
    assert handler.delivered == []


@pytest.mark.parametrize("content, reply", [
    (b"bare\nLF\r\n", b"554 5.6.0 Bare CR or LF not allowed in message data"),
    (b"x" * 999 + b"\r\n", b"500 5.5.2 Line too long in message data (max 1000 octets)"),
])  # fmt: skip
def test_bdat_messages_follow_the_same_line_rules_as_data(content, reply):
    proto, t, handler = connect(ServerPolicy(hostname="mx.lab.test"))
    assert mail_and_rcpt(proto, t) == [250, 250]
    assert talk(proto, t, b"BDAT %d LAST\r\n" % len(content) + content) == [reply]
    assert handler.delivered == []


def test_a_last_line_without_crlf_gets_one():
    proto, t, handler = connect(ServerPolicy(hostname="mx.lab.test"))
    assert mail_and_rcpt(proto, t) == [250, 250]
    assert codes(talk(proto, t, b"BDAT 16 LAST\r\nSubject: x\r\n\r\nhi")) == [250]
    assert handler.delivered == [b"Subject: x\r\n\r\nhi\r\n"]


def test_chunking_can_be_switched_off():
    proto, t, _ = connect(ServerPolicy(hostname="mx.lab.test", chunking=False))
    assert b"250-CHUNKING" not in ehlo(proto, t)
    assert talk(proto, t, b"BDAT 3 LAST\r\n") == [b"500 5.5.1 Command unrecognized"]
    assert b"BDAT" not in talk(proto, t, b"HELP\r\n")[0]
