"""Tests for agents.smtpclient: the SMTP/LMTP client every hop uses.

Most tests are protocol-level and need no sockets: ``send()`` runs against a
``MemoryReactorClock``, we connect the protocol it builds to a
``StringTransport``, feed it server replies and read what it wrote. A few
tests at the end talk real TLS over loopback to a tiny server.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionLost, ConnectionRefusedError
from twisted.internet.protocol import Factory
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from twisted.trial import unittest as trial
from zope.interface import implementer

from agents import pki
from agents.smtpclient import (
    ClientSession,
    ConnectionCache,
    SMTPDeliveryError,
    SendResult,
    encode_data,
    normalize_line_breaks,
    open_session,
    parse_status,
    send,
)
from agents.tls import server_context
from agents.trace import NULL_TRACER, Tracer

# --- Helpers ---------------------------------------------------------------------


def server_reads(stream: bytes) -> tuple[bytes, bytes]:
    """Read DATA as an RFC 5321 server does: lines up to ".", unstuffed.
    Returns the message and whatever follows it (read as commands)."""
    lines = []
    while True:
        line, stream = stream.split(b"\r\n", 1)
        if line == b".":
            return b"".join(line + b"\r\n" for line in lines), stream
        lines.append(line[1:] if line.startswith(b".") else line)


class FakeTLSTransport(StringTransport):
    """A StringTransport that records STARTTLS instead of doing it."""

    def __init__(self):
        super().__init__(
            hostAddress=IPv4Address("TCP", "127.0.0.2", 40000),
            peerAddress=IPv4Address("TCP", "127.0.0.3", 25),
        )
        self.tls_context = None
        self.tls_started_after = None  # bytes written before startTLS

    def startTLS(self, context):
        self.tls_context = context
        self.tls_started_after = self.value()


@pytest.fixture
def ca_pem(tmp_path):
    pki.ensure_host_cert(tmp_path, "lab.test", ["mx.lab.test"], "127.0.0.1")
    return tmp_path / "ca.pem"


class Session:
    """``send()`` wired to a fake reactor and transport; we play the server."""

    def __init__(self, **kwargs):
        self.reactor = MemoryReactorClock()
        options = dict(
            helo="mx.a.test",
            mail_from="alice@a.test",
            rcpt_tos=["bob@b.test"],
            content=b"Subject: hi\r\n\r\nHello\r\n",
            tls="none",
            timeout=30,
        )
        options.update(kwargs)
        self.d = send(self.reactor, "127.0.0.3", 25, **options)
        self.outcome = []
        self.d.addBoth(self.outcome.append)
        _, _, factory, _, self.bind = self.reactor.tcpClients[0]
        self.protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.3", 25))
        self.transport = FakeTLSTransport()
        self.protocol.makeConnection(self.transport)
        self._read = 0

    def reply(self, *lines: bytes) -> None:
        """The server sends these lines, in one TCP segment."""
        self.protocol.dataReceived(b"".join(line + b"\r\n" for line in lines))

    def sent(self) -> bytes:
        """Bytes the client wrote since the last call."""
        data = self.transport.value()[self._read :]
        self._read = len(self.transport.value())
        return data

    @property
    def result(self) -> SendResult:
        assert len(self.outcome) == 1, "the Deferred has not fired"
        outcome = self.outcome[0]
        if isinstance(outcome, Failure):
            outcome.raiseException()
        return outcome

    @property
    def error(self) -> SMTPDeliveryError:
        assert len(self.outcome) == 1, "the Deferred has not fired"
        return self.outcome[0].trap(SMTPDeliveryError) and self.outcome[0].value

    def greet_and_ehlo(self, *extensions: bytes) -> None:
        self.reply(b"220 mx.b.test ESMTP")
        assert self.sent() == b"EHLO mx.a.test\r\n"
        ehlo = [b"250-mx.b.test"] + [b"250-" + e for e in extensions]
        ehlo[-1] = b"250 " + ehlo[-1][4:]
        self.reply(*ehlo)


def read_trace(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- Message encoding -------------------------------------------------------------

LINE = b"x" * 62 + b"\r\n"  # 64 octets: 256 of them fill 16 KiB exactly


def test_dot_line_at_16k_chunk_boundary_is_stuffed():
    content = LINE * 256 + b".\r\nRCPT TO:<injected@b.test>\r\nDATA\r\n.hidden\r\n"
    assert content.index(b"\r\n.\r\n") + 2 == 16384
    payload = encode_data(content)
    message, rest = server_reads(payload)
    assert message == content
    assert rest == b""  # nothing left over to run as commands
    assert payload[16384:16388] == b"..\r\n"


def test_dot_on_first_line_is_stuffed():
    assert encode_data(b".hidden\r\nbody\r\n") == b"..hidden\r\nbody\r\n.\r\n"
    assert encode_data(b".\r\n") == b"..\r\n.\r\n"


def test_data_always_ends_with_crlf_dot_crlf():
    assert encode_data(b"no final newline") == b"no final newline\r\n.\r\n"
    assert encode_data(b"line\r\n") == b"line\r\n.\r\n"
    assert encode_data(b"") == b".\r\n"  # right after "354": the empty message


@pytest.mark.parametrize(
    "content",
    [b"a\n.\nMAIL FROM:<x>\n", b"a\r.\rb", b"a\n.\r\nb", b"a\r\n.\rb", b"a\r.\r\nb"],
)
def test_bare_cr_and_lf_become_crlf_and_cannot_end_data(content):
    """The 2023 SMTP-smuggling end-of-data variants never reach the wire."""
    payload = encode_data(content)
    assert not re.search(rb"\r(?!\n)|(?<!\r)\n", payload)  # no bare CR or LF
    message, rest = server_reads(payload)
    assert rest == b""  # the "." lines stayed inside the message
    assert message == normalize_line_breaks(content)


def test_parse_status():
    assert parse_status(550, "5.1.1 No such user") == ("5.1.1", "No such user")
    assert parse_status(250, "2.0.0 Ok\n2.0.0 more") == ("2.0.0", "Ok\nmore")
    assert parse_status(451, "Try later") == ("4.0.0", "Try later")
    assert parse_status(250, "5.1.1 class mismatch") == ("2.0.0", "5.1.1 class mismatch")


# --- SMTP sessions -------------------------------------------------------------------


def test_session_partial_rcpt_rejection_and_mail_parameters():
    content = LINE * 256 + b".\r\nafter\r\n\xc3\xa9t\xc3\xa9\r\n"
    s = Session(rcpt_tos=["bob@b.test", "nobody@b.test", "carol@b.test"], content=content)
    s.greet_and_ehlo(b"SIZE 10000000", b"8BITMIME", b"ENHANCEDSTATUSCODES")
    assert s.sent() == b"MAIL FROM:<alice@a.test> SIZE=%d BODY=8BITMIME\r\n" % len(content)
    s.reply(b"250 2.1.0 Ok")
    assert s.sent() == b"RCPT TO:<bob@b.test>\r\n"
    s.reply(b"250 2.1.5 Ok")
    assert s.sent() == b"RCPT TO:<nobody@b.test>\r\n"
    s.reply(b"550 5.1.1 No such user")
    assert s.sent() == b"RCPT TO:<carol@b.test>\r\n"
    s.reply(b"250 2.1.5 Ok")
    assert s.sent() == b"DATA\r\n"
    s.reply(b"354 End data with <CR><LF>.<CR><LF>")
    message, rest = server_reads(s.sent())
    assert message == content and rest == b""
    assert s.outcome == []
    s.reply(b"250 2.0.0 Ok: queued as 1234")
    assert s.sent() == b"QUIT\r\n"
    result = s.result
    assert [(r.address, r.code, r.status) for r in result.recipients] == [
        ("bob@b.test", 250, "2.0.0"),
        ("nobody@b.test", 550, "5.1.1"),
        ("carol@b.test", 250, "2.0.0"),
    ]
    assert result.recipients[1].permanent and not result.recipients[1].ok
    assert result.recipients[0].text == "Ok: queued as 1234"
    assert result.server == "mx.b.test" and not result.tls and not result.ok
    assert "SIZE" in result.extensions
    assert {"start", "connected", "done"} <= result.timings.keys()


def test_null_sender_and_no_parameters_without_extensions():
    s = Session(mail_from="")
    s.greet_and_ehlo(b"PIPELINING")
    # PIPELINING carries no MAIL parameter, but lets RCPT ride along (RFC 2920).
    assert s.sent() == b"MAIL FROM:<>\r\nRCPT TO:<bob@b.test>\r\n"


def test_all_recipients_refused_fails_with_each_reply():
    s = Session(rcpt_tos=["x@b.test", "y@b.test"])
    s.greet_and_ehlo(b"8BITMIME")
    s.reply(b"250 Ok")
    s.sent()
    s.reply(b"550 5.1.1 No such user")
    s.reply(b"452 4.2.2 Mailbox full")
    assert s.sent() == b"RCPT TO:<y@b.test>\r\nQUIT\r\n"
    error = s.error
    assert not error.permanent  # y@ may work later, so do not bounce both
    assert (error.code, error.status) == (452, "4.2.2")
    assert [r.code for r in error.recipients] == [550, 452]


def test_data_refusal_applies_to_every_accepted_recipient():
    s = Session(rcpt_tos=["x@b.test", "y@b.test"])
    s.greet_and_ehlo(b"8BITMIME")
    s.reply(b"250 Ok", b"250 Ok", b"250 Ok")
    s.reply(b"554 5.6.0 Message content rejected")
    s.reply(b"221 Bye")
    assert [(r.code, r.status) for r in s.result.recipients] == [(554, "5.6.0")] * 2


@pytest.mark.parametrize(
    "step, reply, permanent",
    [("greeting", b"554 5.7.1 Go away", True), ("MAIL", b"451 4.3.0 Try later", False)],
)
def test_whole_transaction_failures_quit_and_errback(step, reply, permanent):
    s = Session()
    if step == "greeting":
        s.reply(reply)
    else:
        s.greet_and_ehlo(b"8BITMIME")
        assert s.sent().startswith(b"MAIL")
        s.reply(reply)
    assert s.sent() == b"QUIT\r\n"
    error = s.error
    assert error.permanent is permanent and error.stage == step
    assert str(error).startswith(f"{step}: {reply.decode()}")


def test_helo_fallback_when_ehlo_is_refused():
    s = Session()
    s.reply(b"220 old.b.test SMTP")
    s.sent()
    s.reply(b"500 Command unrecognized")
    assert s.sent() == b"HELO mx.a.test\r\n"
    s.reply(b"250 old.b.test")
    assert s.sent() == b"MAIL FROM:<alice@a.test>\r\n"


def test_message_too_big_for_announced_size_is_not_sent():
    s = Session(content=b"x" * 2000)
    s.greet_and_ehlo(b"SIZE 1000")
    assert s.sent() == b"QUIT\r\n"
    assert (s.error.code, s.error.status, s.error.permanent) == (552, "5.3.4", True)


def test_non_ascii_address_needs_smtputf8():
    s = Session(rcpt_tos=["jos\u00e9@b.test"])
    s.greet_and_ehlo(b"SMTPUTF8", b"8BITMIME")
    assert s.sent() == b"MAIL FROM:<alice@a.test> SMTPUTF8\r\n"
    s.reply(b"250 Ok")
    assert s.sent() == "RCPT TO:<jos\u00e9@b.test>\r\n".encode()

    s = Session(rcpt_tos=["jos\u00e9@b.test"])
    s.greet_and_ehlo(b"8BITMIME")
    assert s.error.status == "5.6.7"


def test_unsafe_address_is_refused_before_connecting():
    with pytest.raises(ValueError):
        send(
            MemoryReactorClock(), "127.0.0.3", 25, helo="a", mail_from="a@a.test",
            rcpt_tos=["b@b.test>\r\nRCPT TO:<evil@c.test"], content=b"", tls="none",
        )


# --- LMTP ------------------------------------------------------------------------------


def test_lmtp_reads_one_reply_per_accepted_recipient():
    s = Session(lmtp=True, rcpt_tos=["bob@b.test", "nobody@b.test", "carol@b.test"])
    s.reply(b"220 lmtp.b.test LMTP")
    assert s.sent() == b"LHLO mx.a.test\r\n"
    s.reply(b"250-lmtp.b.test", b"250 ENHANCEDSTATUSCODES")
    s.reply(b"250 2.1.0 Ok", b"250 2.1.5 Ok", b"550 5.1.1 No such user", b"250 2.1.5 Ok")
    assert s.sent().endswith(b"DATA\r\n")
    s.reply(b"354 Go ahead")
    s.sent()
    s.reply(b"250 2.0.0 bob stored")
    assert s.outcome == [] and s.sent() == b""  # carol's verdict is still to come
    s.reply(b"452 4.2.2 carol is over quota")
    assert s.sent() == b"QUIT\r\n"
    assert [(r.address, r.code, r.status) for r in s.result.recipients] == [
        ("bob@b.test", 250, "2.0.0"),
        ("nobody@b.test", 550, "5.1.1"),
        ("carol@b.test", 452, "4.2.2"),
    ]


def test_lmtp_has_no_helo_fallback():
    s = Session(lmtp=True)
    s.reply(b"220 lmtp.b.test LMTP")
    s.sent()
    s.reply(b"500 5.5.1 What?")
    assert s.sent() == b"QUIT\r\n"
    assert s.error.stage == "LHLO"


def test_lmtp_connection_lost_after_some_replies_keeps_them():
    s = Session(lmtp=True, rcpt_tos=["bob@b.test", "carol@b.test"])
    s.reply(b"220 lmtp.b.test LMTP")
    s.reply(b"250 lmtp.b.test")
    s.reply(b"250 Ok", b"250 Ok", b"250 Ok", b"354 Go ahead")
    s.reply(b"250 2.0.0 bob stored")
    s.protocol.connectionLost(Failure(ConnectionLost()))
    bob, carol = s.result.recipients
    assert bob.ok  # delivered: retrying would duplicate it
    assert (carol.code, carol.status) == (421, "4.4.2")


# --- CHUNKING (RFC 3030) -----------------------------------------------------------------


def test_bdat_sends_envelope_and_message_in_one_write_without_dot_stuffing():
    content = b"Subject: hi\r\n\r\n.\r\n.dotted\r\nbare\nLF\r\n"
    s = Session(content=content, rcpt_tos=["bob@b.test", "carol@b.test"])
    s.greet_and_ehlo(b"PIPELINING", b"CHUNKING", b"ENHANCEDSTATUSCODES")
    chunk = normalize_line_breaks(content)  # CRLF everywhere, the dots as they are
    assert s.sent() == (b"MAIL FROM:<alice@a.test>\r\nRCPT TO:<bob@b.test>\r\nRCPT TO:<carol@b.test>\r\n"
                        b"BDAT %d LAST\r\n" % len(chunk) + chunk)
    s.reply(b"250 2.1.0 Ok", b"250 2.1.5 Ok", b"550 5.1.1 No such user", b"250 2.0.0 Ok: queued as Q1")
    assert s.sent() == b"QUIT\r\n"
    assert [(r.address, r.code) for r in s.result.recipients] == [("bob@b.test", 250), ("carol@b.test", 550)]


def test_bdat_needs_pipelining_too():
    """Without PIPELINING the envelope goes in lock step, and then DATA as before."""
    s = Session()
    s.greet_and_ehlo(b"CHUNKING")
    assert s.sent() == b"MAIL FROM:<alice@a.test>\r\n"
    s.reply(b"250 Ok")
    assert s.sent() == b"RCPT TO:<bob@b.test>\r\n"
    s.reply(b"250 Ok")
    assert s.sent() == b"DATA\r\n"


@pytest.mark.parametrize("replies, stage, code", [
    ((b"550 5.7.1 Sender refused", b"503 5.5.1 Need MAIL", b"503 5.5.1 Need MAIL command"), "MAIL", 550),
    ((b"250 Ok", b"550 5.1.1 No such user", b"554 5.5.1 No valid recipients"), "RCPT", 550),
])  # fmt: skip
def test_bdat_refused_with_its_envelope_fails_the_message(replies, stage, code):
    s = Session(rcpt_tos=["bob@b.test"])
    s.greet_and_ehlo(b"PIPELINING", b"CHUNKING")
    s.sent()
    s.reply(*replies)
    assert (s.error.stage, s.error.code) == (stage, code)
    assert s.sent() == b"QUIT\r\n"  # in step: the three replies were read, none is missing


def test_lmtp_bdat_reads_one_reply_per_accepted_recipient():
    s = Session(lmtp=True, rcpt_tos=["bob@b.test", "nobody@b.test", "carol@b.test"])
    s.reply(b"220 lmtp.b.test LMTP")
    s.sent()
    s.reply(b"250-lmtp.b.test", b"250-PIPELINING", b"250 CHUNKING")
    assert s.sent().endswith(b"RCPT TO:<carol@b.test>\r\nBDAT 22 LAST\r\nSubject: hi\r\n\r\nHello\r\n")
    s.reply(b"250 2.1.0 Ok", b"250 2.1.5 Ok", b"550 5.1.1 No such user", b"250 2.1.5 Ok",
            b"250 2.0.0 bob stored")
    assert s.outcome == [] and s.sent() == b""  # carol's verdict is still to come
    s.reply(b"452 4.2.2 carol is over quota")
    assert [(r.address, r.code) for r in s.result.recipients] == [
        ("bob@b.test", 250), ("nobody@b.test", 550), ("carol@b.test", 452)]


def test_lmtp_bdat_connection_lost_before_any_verdict_delivers_nobody():
    """The message went out with the envelope, but no verdict came: nobody has it
    for sure, so every accepted recipient is retried (never counted as delivered)."""
    s = Session(lmtp=True, rcpt_tos=["bob@b.test", "carol@b.test"])
    s.reply(b"220 lmtp.b.test LMTP")
    s.reply(b"250-lmtp.b.test", b"250-PIPELINING", b"250 CHUNKING")
    s.reply(b"250 Ok", b"250 Ok", b"250 Ok")
    s.protocol.connectionLost(Failure(ConnectionLost()))
    assert s.error.code == 421 and "retry may duplicate" in str(s.error)


# --- STARTTLS and AUTH -------------------------------------------------------------------


def test_starttls_discards_bytes_after_220_then_ehlo_again(ca_pem, tmp_path):
    trace = tmp_path / "trace.jsonl"
    s = Session(
        tls="starttls", ca_cert=ca_pem, tls_hostname="mx.lab.test",
        username="alice@a.test", password="s3cret",
        tracer=Tracer(trace, "mua", "mua", "a.test"),
    )
    s.greet_and_ehlo(b"STARTTLS", b"8BITMIME")
    assert s.sent() == b"STARTTLS\r\n"
    # A man in the middle appends a forged EHLO reply without AUTH to the 220;
    # taken as the answer to our next EHLO, it would end the session in clear.
    s.reply(b"220 2.0.0 Ready to start TLS", b"250 mx.b.test forged")
    assert s.transport.tls_context is not None
    assert s.transport.tls_started_after.endswith(b"STARTTLS\r\n")
    assert s.sent() == b"EHLO mx.a.test\r\n"
    assert s.outcome == []  # the forged line was not read as a reply
    s.reply(b"250-mx.b.test", b"250 AUTH PLAIN LOGIN")
    plain = base64.b64encode(b"\0alice@a.test\0s3cret")
    assert s.sent() == b"AUTH PLAIN " + plain + b"\r\n"
    s.reply(b"235 2.7.0 Authentication successful")
    assert s.sent() == b"MAIL FROM:<alice@a.test>\r\n"
    events = read_trace(trace)
    assert any(e["event"] == "tls.discarded" and e["octets"] == 22 for e in events)
    assert b"s3cret" not in trace.read_bytes() and plain not in trace.read_bytes()


def test_auth_login_secrets_are_masked_in_the_trace(ca_pem, tmp_path):
    trace = tmp_path / "trace.jsonl"
    s = Session(
        tls="starttls", ca_cert=ca_pem, tls_hostname="mx.lab.test",
        username="alice@a.test", password="s3cret",
        tracer=Tracer(trace, "mua", "mua", "a.test"),
    )
    s.greet_and_ehlo(b"STARTTLS")
    s.reply(b"220 Ready")
    s.sent()
    s.reply(b"250-mx.b.test", b"250 AUTH LOGIN")
    assert s.sent() == b"AUTH LOGIN\r\n"
    s.reply(b"334 " + base64.b64encode(b"Username:"))
    assert s.sent() == base64.b64encode(b"alice@a.test") + b"\r\n"
    s.reply(b"334 " + base64.b64encode(b"Password:"))
    assert s.sent() == base64.b64encode(b"s3cret") + b"\r\n"
    s.reply(b"535 5.7.8 Authentication credentials invalid")
    assert s.sent() == b"QUIT\r\n"
    assert (s.error.code, s.error.status, s.error.permanent) == (535, "5.7.8", True)
    client_lines = [e["line"] for e in read_trace(trace) if e.get("dir") == "C"]
    assert client_lines[-4:] == ["AUTH LOGIN", "***", "***", "QUIT"]
    assert base64.b64encode(b"s3cret") not in trace.read_bytes()


def test_required_starttls_not_offered_fails_temporarily(ca_pem):
    s = Session(tls="starttls", ca_cert=ca_pem)
    s.greet_and_ehlo(b"8BITMIME")
    assert s.sent() == b"QUIT\r\n"
    assert (s.error.status, s.error.permanent) == ("4.7.4", False)


def test_opportunistic_continues_in_clear_without_starttls(ca_pem):
    s = Session(tls="opportunistic", ca_cert=ca_pem)
    s.greet_and_ehlo(b"8BITMIME")
    assert s.sent() == b"MAIL FROM:<alice@a.test>\r\n"
    assert s.transport.tls_context is None


def test_credentials_are_never_sent_in_clear(ca_pem):
    s = Session(tls="opportunistic", ca_cert=ca_pem, username="alice", password="pw")
    s.greet_and_ehlo(b"AUTH PLAIN LOGIN")
    assert s.sent() == b"QUIT\r\n"
    assert s.error.status == "5.7.11"
    with pytest.raises(ValueError):
        Session(tls="none", username="alice", password="pw")


# --- Failures without a reply -------------------------------------------------------------


def test_timeout_errbacks_and_drops_the_connection():
    s = Session(timeout=10)
    s.reply(b"220 mx.b.test ESMTP")
    s.reactor.advance(9)
    assert s.outcome == []
    s.reactor.advance(1)
    assert (s.error.status, s.error.permanent) == ("4.4.2", False)
    assert "EHLO" in str(s.error)
    assert s.transport.disconnecting


def test_connection_lost_mid_transaction_errbacks_temporarily():
    s = Session()
    s.greet_and_ehlo()
    s.reply(b"250 Ok", b"250 Ok", b"354 Go ahead")
    s.protocol.connectionLost(Failure(ConnectionLost("reset")))
    assert (s.error.status, s.error.permanent) == ("4.4.2", False)
    assert "duplicate" in s.error.text  # RFC 1047: it may have been delivered


def test_garbage_reply_drops_the_connection():
    s = Session()
    s.reply(b"hello, I am not an SMTP server")
    assert not s.error.permanent
    assert s.transport.disconnecting and s.sent() == b""


def test_connection_refused_and_bind_address():
    clock = MemoryReactorClock()
    d = send(
        clock, "127.0.0.3", 25, helo="mx.a.test", mail_from="", rcpt_tos=["b@b.test"],
        content=b"x", tls="none", bind_address="127.0.0.2",
    )
    _, _, factory, _, bind = clock.tcpClients[0]
    assert bind == ("127.0.0.2", 0)
    outcome = []
    d.addErrback(outcome.append)
    factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
    assert outcome[0].value.status == "4.4.1"
    assert "refused" in outcome[0].value.text


def test_connect_that_never_completes_times_out():
    clock = MemoryReactorClock()
    d = send(
        clock, "127.0.0.3", 25, helo="mx.a.test", mail_from="", rcpt_tos=["b@b.test"],
        content=b"x", tls="none", timeout=5,
    )
    outcome = []
    d.addErrback(outcome.append)
    clock.advance(5)
    assert "no connection within 5s" in outcome[0].value.text


def test_cancel_drops_the_connection():
    s = Session()
    s.reply(b"220 mx.b.test ESMTP")
    s.d.cancel()
    assert s.outcome[0].check(defer.CancelledError)
    assert s.transport.disconnecting


def test_trace_has_directions_and_relay_events(tmp_path):
    trace = tmp_path / "trace.jsonl"
    s = Session(tracer=Tracer(trace, "mta", "mta", "a.test"))
    s.greet_and_ehlo()
    s.reply(b"250 Ok", b"250 Ok", b"354 Go", b"250 Ok", b"221 Bye")
    assert s.result.ok
    events = read_trace(trace)
    names = [e["event"] for e in events if e["event"] != "line"]
    for name in ["relay.connect", "relay.connected", "relay.reply", "relay.data", "relay.done"]:
        assert name in names
    lines = [(e["dir"], e["line"]) for e in events if e["event"] == "line"]
    assert lines[:2] == [("S", "220 mx.b.test ESMTP"), ("C", "EHLO mx.a.test")]


# --- Sessions: several transactions on one connection ----------------------------------


class FakeTLSTransportCountingWrites(FakeTLSTransport):
    """Also keeps each write() apart, to see what went out together."""

    def __init__(self):
        super().__init__()
        self.writes: list[bytes] = []

    def write(self, data):
        self.writes.append(data)
        super().write(data)


class SessionWire(Session):
    """``open_session()`` wired to a fake reactor and transport; we play the server."""

    def __init__(self, **kwargs):
        self.reactor = MemoryReactorClock()
        options = dict(helo="mx.a.test", tls="none", timeout=30)
        options.update(kwargs)
        self.d = open_session(self.reactor, "127.0.0.3", 25, **options)
        self.outcome = []
        self.d.addBoth(self.outcome.append)
        _, _, factory, _, _ = self.reactor.tcpClients[0]
        self.protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.3", 25))
        self.transport = FakeTLSTransportCountingWrites()
        self.protocol.makeConnection(self.transport)
        self._read = 0

    def ready(self, *extensions: bytes) -> ClientSession:
        self.greet_and_ehlo(*extensions)
        session = self.result
        assert isinstance(session, ClientSession) and session.usable
        assert self.sent() == b""  # idle: nothing is sent until a transaction
        return session

    def transact(self, session, mail_from="alice@a.test", rcpt_tos=("bob@b.test",), **kw):
        outcome = []
        session.send(mail_from, list(rcpt_tos), b"Subject: hi\r\n\r\nHello\r\n", **kw).addBoth(
            outcome.append
        )
        return outcome


def settled(outcome):
    assert len(outcome) == 1, "the Deferred has not fired"
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    return outcome[0]


def test_two_transactions_share_one_connection_and_one_ehlo(tmp_path):
    trace = tmp_path / "trace.jsonl"
    tracer = Tracer(trace, "mta", "mta", "a.test")
    w = SessionWire(tracer=tracer)
    session = w.ready(b"8BITMIME")
    first = w.transact(session, tracer=tracer.bind(message_id="<one@a.test>"))
    assert w.sent() == b"MAIL FROM:<alice@a.test>\r\n"  # no PIPELINING: lock step
    w.reply(b"250 Ok")
    assert w.sent() == b"RCPT TO:<bob@b.test>\r\n"
    w.reply(b"250 Ok")
    assert w.sent() == b"DATA\r\n"
    w.reply(b"354 Go ahead")
    w.sent()
    w.reply(b"250 2.0.0 queued as 1")
    assert w.sent() == b""  # no QUIT: the connection stays for the next message
    one = settled(first)
    assert one.ok and (one.count, one.conn) == (1, session.conn)

    second = w.transact(session, rcpt_tos=["carol@b.test"], tracer=tracer.bind(message_id="<two@a.test>"))
    # Straight to MAIL, on the same transport: no greeting, no EHLO, no RSET.
    assert w.sent() == b"MAIL FROM:<alice@a.test>\r\n"
    w.reply(b"250 Ok", b"250 Ok", b"354 Go ahead")
    w.sent()
    w.reply(b"250 2.0.0 queued as 2")
    two = settled(second)
    assert two.ok and two.count == 2 and two.conn == one.conn
    assert two.recipients[0].address == "carol@b.test"
    assert two.timings["connected"] < two.timings["start"]  # the connection was older
    assert session.transactions == 2 and session.usable

    events = read_trace(trace)
    ehlos = [e for e in events if e.get("line", "").startswith("EHLO")]
    assert len(ehlos) == 1
    # Transaction lines carry their own message; connection events carry none.
    mails = [e for e in events if e.get("line", "").startswith("MAIL")]
    assert [e["message_id"] for e in mails] == ["<one@a.test>", "<two@a.test>"]
    connected = next(e for e in events if e["event"] == "relay.connected")
    assert "message_id" not in connected
    numbers = [(e["number"], e["message_id"]) for e in events if e["event"] == "relay.transaction"]
    assert numbers == [(1, "<one@a.test>"), (2, "<two@a.test>")]
    tracer.close()


def test_refused_mail_keeps_the_session_and_the_next_one_starts_with_rset():
    w = SessionWire()
    session = w.ready(b"ENHANCEDSTATUSCODES")
    first = w.transact(session)
    w.sent()
    w.reply(b"550 5.7.1 Sender blocked")
    error = first[0].value
    assert isinstance(error, SMTPDeliveryError) and (error.stage, error.code) == ("MAIL", 550)
    assert session.usable and w.sent() == b""  # no QUIT: the server is in step with us

    second = w.transact(session, mail_from="")
    assert w.sent() == b"RSET\r\n"  # RFC 5321 4.1.1.5: start from a clean slate
    w.reply(b"250 2.0.0 Ok")
    assert w.sent() == b"MAIL FROM:<>\r\n"
    w.reply(b"250 Ok", b"250 Ok", b"354 Go ahead", b"250 2.0.0 Ok")
    assert settled(second).ok
    w.sent()
    third = w.transact(session)
    assert w.sent() == b"MAIL FROM:<alice@a.test>\r\n"  # that transaction ended cleanly
    assert third == []


def test_all_recipients_refused_keeps_the_session():
    w = SessionWire()
    session = w.ready()
    first = w.transact(session, rcpt_tos=["x@b.test"])
    w.reply(b"250 Ok", b"550 5.1.1 No such user")
    assert first[0].value.recipients[0].code == 550
    assert session.usable
    w.sent()
    w.transact(session)
    assert w.sent() == b"RSET\r\n"  # MAIL was accepted: the server holds a transaction


def test_pipelining_sends_mail_and_every_rcpt_in_one_write():
    w = SessionWire()
    session = w.ready(b"PIPELINING", b"8BITMIME")
    w.transport.writes.clear()
    outcome = w.transact(session, rcpt_tos=["bob@b.test", "nobody@b.test"])
    assert w.transport.writes == [
        b"MAIL FROM:<alice@a.test>\r\nRCPT TO:<bob@b.test>\r\nRCPT TO:<nobody@b.test>\r\n"
    ]
    w.sent()
    w.reply(b"250 Ok", b"250 Ok")
    assert w.sent() == b""  # DATA waits for the last RCPT reply (RFC 2920 3.1)
    w.reply(b"550 5.1.1 No such user")
    assert w.sent() == b"DATA\r\n"
    w.reply(b"354 Go ahead")
    w.sent()
    w.reply(b"250 2.0.0 Ok")
    assert [r.code for r in settled(outcome).recipients] == [250, 550]


def test_pipelined_refused_mail_reads_every_reply_then_rset_rides_along():
    w = SessionWire()
    session = w.ready(b"PIPELINING")
    first = w.transact(session, rcpt_tos=["bob@b.test", "carol@b.test"])
    w.sent()
    w.reply(b"451 4.3.0 Try later")
    assert first == []  # the RCPT replies are still due
    w.reply(b"503 5.5.1 Need MAIL", b"503 5.5.1 Need MAIL")
    assert (first[0].value.stage, first[0].value.code) == ("MAIL", 451)
    assert w.sent() == b"" and session.usable  # no DATA; in step
    w.transport.writes.clear()
    w.transact(session)
    assert w.transport.writes == [b"RSET\r\nMAIL FROM:<alice@a.test>\r\nRCPT TO:<bob@b.test>\r\n"]


def test_chunked_transactions_one_write_each_and_rset_only_after_a_refusal():
    """BDAT LAST ends a transaction on the server, whatever its verdict; a
    refused envelope (every RCPT) leaves MAIL behind, so RSET goes first next time."""
    w = SessionWire()
    session = w.ready(b"PIPELINING", b"CHUNKING")
    body = b"Subject: hi\r\n\r\nHello\r\n"
    envelope = b"MAIL FROM:<alice@a.test>\r\nRCPT TO:<bob@b.test>\r\nBDAT 22 LAST\r\n" + body
    first = w.transact(session)
    w.reply(b"250 Ok", b"250 Ok", b"550 5.7.1 Rejected by policy")
    assert [r.code for r in settled(first).recipients] == [550]
    w.transport.writes.clear()
    second = w.transact(session)
    assert w.transport.writes == [envelope]  # no RSET: the refused message ended its transaction
    w.reply(b"250 Ok", b"550 5.1.1 No such user", b"554 5.5.1 No valid recipients")
    assert second[0].value.code == 550
    w.transport.writes.clear()
    w.transact(session)
    assert w.transport.writes == [b"RSET\r\n" + envelope]


def test_transactions_queue_one_behind_the_other():
    w = SessionWire()
    session = w.ready()
    first = w.transact(session)
    second = w.transact(session, mail_from="carol@a.test")
    assert w.sent() == b"MAIL FROM:<alice@a.test>\r\n"  # only the first runs
    assert session.busy
    w.reply(b"250 Ok", b"250 Ok", b"354 Go")
    w.sent()
    w.reply(b"250 Ok")
    assert settled(first).ok
    assert w.sent() == b"MAIL FROM:<carol@a.test>\r\n"  # now the second
    assert second == []


def test_lmtp_session_reads_per_recipient_replies_each_time():
    w = SessionWire(lmtp=True)
    w.reply(b"220 lmtp.b.test LMTP")
    assert w.sent() == b"LHLO mx.a.test\r\n"
    w.reply(b"250-lmtp.b.test", b"250 PIPELINING")
    session = w.result
    for n in (1, 2):
        outcome = w.transact(session, rcpt_tos=["bob@b.test", "carol@b.test"])
        w.reply(b"250 Ok", b"250 Ok", b"250 Ok", b"354 Go")
        w.reply(b"250 2.0.0 bob stored")
        assert outcome == []
        w.reply(b"452 4.2.2 carol is over quota")
        result = settled(outcome)
        assert [(r.code, r.status) for r in result.recipients] == [(250, "2.0.0"), (452, "4.2.2")]
        assert result.count == n
    assert b"LHLO" not in w.sent().split(b"\r\n", 1)[1]  # one LHLO in all


def test_connection_lost_while_idle_makes_the_session_unusable():
    w = SessionWire()
    session = w.ready()
    w.protocol.connectionLost(Failure(ConnectionLost("reset by peer")))
    assert not session.usable
    outcome = w.transact(session)
    assert (outcome[0].value.status, outcome[0].value.code) == ("4.4.2", 421)
    assert w.sent() == b""


def test_421_to_mail_quits_and_the_session_is_dead():
    w = SessionWire()
    session = w.ready()
    first = w.transact(session)
    w.sent()
    w.reply(b"421 4.3.2 Shutting down")
    assert w.sent() == b"QUIT\r\n"
    assert first[0].value.code == 421 and not session.usable


def test_unsolicited_421_while_idle_drops_the_connection():
    w = SessionWire()
    session = w.ready()
    w.reply(b"421 4.4.2 mx.b.test Error: timeout exceeded")
    assert not session.usable and w.transport.disconnecting


def test_idle_session_has_no_command_timeout_but_a_transaction_does():
    w = SessionWire(timeout=10)
    session = w.ready()
    w.reactor.advance(60)  # idle: how long to keep it is the owner's choice
    assert session.usable
    outcome = w.transact(session)
    w.reactor.advance(10)
    assert outcome[0].value.status == "4.4.2" and "MAIL" in str(outcome[0].value)
    assert not session.usable


def test_close_quits_and_fires_when_the_connection_is_gone():
    w = SessionWire()
    session = w.ready()
    closed = []
    session.close().addBoth(closed.append)
    assert w.sent() == b"QUIT\r\n" and not session.usable
    w.reply(b"221 Bye")
    assert w.transport.disconnecting and closed == []
    w.protocol.connectionLost(Failure(ConnectionLost()))
    assert closed == [None]
    later = w.transact(session)
    assert later[0].value.status == "4.4.2"


def test_close_waits_for_the_running_transaction():
    w = SessionWire()
    session = w.ready()
    outcome = w.transact(session)
    session.close()
    assert w.sent() == b"MAIL FROM:<alice@a.test>\r\n"
    w.reply(b"250 Ok", b"250 Ok", b"354 Go")
    w.sent()
    w.reply(b"250 Ok")
    assert settled(outcome).ok
    assert w.sent() == b"QUIT\r\n"


# --- Real TLS over loopback ----------------------------------------------------------------


@implementer(IHandshakeListener)
class TinyServer(LineReceiver):
    """Just enough of an SMTP server to take messages, with STARTTLS and
    PIPELINING (it answers each line as it reads it, so replies stay in
    order). It counts connections and TLS handshakes."""

    def connectionMade(self):
        self.in_data, self.lines, self.tls = False, [], self.factory.implicit
        self.factory.connections += 1
        self.sendLine(b"220 mx.lab.test ESMTP tiny")

    def handshakeCompleted(self):
        self.factory.handshakes += 1

    def lineReceived(self, line):
        if self.in_data:
            if line == b".":
                self.in_data = False
                self.factory.messages.append(b"".join(x + b"\r\n" for x in self.lines))
                return self.sendLine(b"250 2.0.0 Ok")
            return self.lines.append(line[1:] if line.startswith(b".") else line)
        verb = line.split(b" ", 1)[0].upper()
        if verb == b"EHLO":
            self.sendLine(b"250-mx.lab.test" if self.tls else b"250-mx.lab.test\r\n250-STARTTLS")
            self.sendLine(b"250-PIPELINING\r\n250 8BITMIME")
        elif verb == b"STARTTLS":
            self.sendLine(b"220 2.0.0 Ready")
            self.transport.startTLS(self.factory.context)
            self.tls = True
        elif verb in (b"MAIL", b"RCPT", b"RSET"):
            self.sendLine(b"250 Ok")
        elif verb == b"DATA":
            self.in_data, self.lines = True, []
            self.sendLine(b"354 Go ahead")
        elif verb == b"QUIT":
            self.sendLine(b"221 Bye")
            self.transport.loseConnection()

    def connectionLost(self, reason):
        self.factory.closed.callback(None)


class LoopbackTLSTests(trial.TestCase):
    """Real sockets, real handshakes, the real reactor (run by trial, which
    also fails a test that leaves connections or timers behind)."""

    ca = None

    def temp_dir(self) -> Path:
        # Not trial's mktemp(): under pytest it would write into the cwd.
        path = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, path)
        return path

    def start_server(self, implicit: bool):
        pki_dir = self.temp_dir()
        pem = pki.ensure_host_cert(pki_dir, "lab.test", ["mx.lab.test"], "127.0.0.1")
        self.ca = pki_dir / "ca.pem"
        factory = Factory.forProtocol(TinyServer)
        factory.context, factory.implicit = server_context(pem), implicit
        factory.messages, factory.closed = [], defer.Deferred()
        factory.connections = factory.handshakes = 0
        if implicit:
            port = reactor.listenSSL(0, factory, factory.context, interface="127.0.0.1")
        else:
            port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return factory, port.getHost().port

    def deliver(self, port, tls, hostname, ca=None, tracer=NULL_TRACER):
        return send(
            reactor, "127.0.0.1", port, helo="mx.a.test", mail_from="alice@a.test",
            rcpt_tos=["bob@lab.test"], content=b".dot first\r\nbody\r\n", tls=tls,
            tls_hostname=hostname, ca_cert=ca or self.ca, timeout=5, tracer=tracer,
        )

    @defer.inlineCallbacks
    def test_starttls_verified_delivery(self):
        factory, port = self.start_server(implicit=False)
        trace = self.temp_dir() / "trace.jsonl"
        tracer = Tracer(trace, "mta", "mta", "a.test")
        self.addCleanup(tracer.close)
        result = yield self.deliver(port, "starttls", "mx.lab.test", tracer=tracer)
        yield factory.closed
        self.assertTrue(result.tls and result.ok)
        self.assertIn("tls", result.timings)
        self.assertEqual(factory.messages, [b".dot first\r\nbody\r\n"])
        done = [e for e in read_trace(trace) if e["event"] == "tls.done"]
        self.assertTrue(done[0]["version"].startswith("TLSv1."))

    @defer.inlineCallbacks
    def test_a_second_connection_resumes_the_tls_session(self):
        """RFC 8446 2.2: the server's ticket lets the next connection skip the
        certificate exchange; both ends trace ``resumed``."""
        for implicit, mode in ((False, "starttls"), (True, "implicit")):
            factory, port = self.start_server(implicit=implicit)
            trace = self.temp_dir() / "trace.jsonl"
            tracer = Tracer(trace, "mta", "mta", "a.test")
            self.addCleanup(tracer.close)
            for _ in range(3):
                factory.closed = defer.Deferred()
                result = yield self.deliver(port, mode, "mx.lab.test", tracer=tracer)
                yield factory.closed
                self.assertTrue(result.ok and result.tls)
            resumed = [e["resumed"] for e in read_trace(trace) if e["event"] == "tls.done"]
            self.assertEqual(resumed, [False, True, True], mode)

    @defer.inlineCallbacks
    def test_a_session_is_only_offered_for_its_own_name(self):
        factory, port = self.start_server(implicit=False)
        factory.closed = defer.Deferred()
        yield self.deliver(port, "starttls", "mx.lab.test")
        yield factory.closed
        # Another name (here the address, also in the certificate's names or
        # not) gets options of its own: nothing remembered, a full handshake.
        from agents.tls import CLIENT_SESSIONS

        pem = self.ca.read_bytes()
        self.assertIsNotNone(CLIENT_SESSIONS.options(pem, "mx.lab.test").session)
        self.assertIsNone(CLIENT_SESSIONS.options(pem, "other.lab.test").session)

    @defer.inlineCallbacks
    def test_two_messages_over_one_session_one_tls_handshake(self):
        factory, port = self.start_server(implicit=False)
        session = yield open_session(
            reactor, "127.0.0.1", port, helo="mx.a.test", tls="starttls",
            tls_hostname="mx.lab.test", ca_cert=self.ca, timeout=5,
        )
        self.assertTrue(session.tls and session.usable)
        first = yield session.send("alice@a.test", ["bob@lab.test"], b"first\r\n")
        second = yield session.send("alice@a.test", ["carol@lab.test"], b"second\r\n")
        self.assertTrue(first.ok and second.ok)
        self.assertEqual((first.count, second.count), (1, 2))
        self.assertEqual(first.conn, second.conn)
        yield session.close()
        yield factory.closed
        self.assertEqual(factory.messages, [b"first\r\n", b"second\r\n"])
        self.assertEqual((factory.connections, factory.handshakes), (1, 1))

    @defer.inlineCallbacks
    def test_connection_cache_reuses_the_tls_connection(self):
        factory, port = self.start_server(implicit=False)
        trace = self.temp_dir() / "trace.jsonl"
        tracer = Tracer(trace, "mta", "mta", "a.test")
        self.addCleanup(tracer.close)
        cache = ConnectionCache(reactor, max_idle=5, tracer=tracer)
        for n in range(3):
            result = yield cache.send(
                "127.0.0.1", port, helo="mx.a.test", mail_from="alice@a.test",
                rcpt_tos=["bob@lab.test"], content=b"message %d\r\n" % n, tls="starttls",
                tls_hostname="mx.lab.test", ca_cert=self.ca, timeout=5,
                tracer=tracer.bind(queue_id=f"Q{n}"),
            )
            self.assertEqual(result.count, n + 1)
        yield cache.close_all()  # QUIT; also cancels the idle timer, or trial complains
        yield factory.closed
        self.assertEqual((factory.connections, factory.handshakes), (1, 1))
        self.assertEqual(len(factory.messages), 3)
        events = read_trace(trace)
        reuses = [(e["queue_id"], e["count"]) for e in events if e["event"] == "relay.reuse"]
        self.assertEqual(reuses, [("Q1", 2), ("Q2", 3)])
        closes = [e["reason"] for e in events if e["event"] == "relay.cache.close"]
        self.assertEqual(closes, ["shutdown"])

    @defer.inlineCallbacks
    def test_implicit_tls_verified_delivery(self):
        factory, port = self.start_server(implicit=True)
        result = yield self.deliver(port, "implicit", "mx.lab.test")
        yield factory.closed
        self.assertTrue(result.tls and result.ok)

    @defer.inlineCallbacks
    def _assert_bad_certificate_fails_promptly(self, tls, hostname, ca=None):
        factory, port = self.start_server(implicit=tls == "implicit")
        started = time.monotonic()
        d = self.deliver(port, tls, hostname, ca)
        error = yield self.assertFailure(d, SMTPDeliveryError)
        yield factory.closed
        self.assertLess(time.monotonic() - started, 2)  # not the 5 s timeout
        self.assertEqual((error.status, error.permanent), ("4.7.5", False))
        self.assertEqual(factory.messages, [])

    def test_starttls_wrong_hostname_fails_promptly(self):
        return self._assert_bad_certificate_fails_promptly("starttls", "mx.other.test")

    def test_implicit_tls_wrong_hostname_fails_promptly(self):
        """The endpoint gotcha: Twisted's own sender never fired here."""
        return self._assert_bad_certificate_fails_promptly("implicit", "mx.other.test")

    def test_untrusted_ca_fails_promptly(self):
        other = self.temp_dir()
        pki.ensure_ca(other)
        return self._assert_bad_certificate_fails_promptly(
            "starttls", "mx.lab.test", other / "ca.pem"
        )

    @defer.inlineCallbacks
    def test_connection_refused(self):
        listening = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
        free = listening.getHost().port
        yield listening.stopListening()
        error = yield self.assertFailure(self.deliver(free, "none", None), SMTPDeliveryError)
        self.assertEqual((error.status, error.permanent), ("4.4.1", False))
