"""Tests for agents.lmtp (RFC 2033): LHLO, and one reply per recipient after DATA."""

from __future__ import annotations

import pytest
from twisted.internet import defer

from agents.lmtp import LMTPServer, LMTPServerFactory
from agents.smtpserver import Reply, ServerPolicy
from test_smtpserver import ENHANCED, RecordingHandler, codes, replies, talk
from test_smtpserver import connect as smtp_connect


def connect(handler=None, policy=None):
    policy = policy or ServerPolicy(hostname="lmtp.lab.test")
    handler = handler if handler is not None else RecordingHandler()
    proto, t, _ = smtp_connect(policy, handler, factory=LMTPServerFactory(policy, handler))
    return proto, t, handler


def transaction(proto, t, rcpts=(b"a@lab.test", b"b@lab.test", b"c@lab.test")):
    talk(proto, t, b"LHLO mta.lab.test\r\nMAIL FROM:<x@sender.test>\r\n")
    return codes(talk(proto, t, b"".join(b"RCPT TO:<" + r + b">\r\n" for r in rcpts)))


def test_greeting_says_lmtp_and_lhlo_lists_extensions_without_auth():
    proto, t, _ = connect()
    assert isinstance(proto, LMTPServer)
    assert replies(t) == [b"220 lmtp.lab.test LMTP mailpipe"]
    lines = talk(proto, t, b"LHLO mta.lab.test\r\n")
    assert lines[0] == b"250-lmtp.lab.test greets mta.lab.test"
    keywords = [line[4:] for line in lines[1:]]
    assert b"PIPELINING" in keywords and b"ENHANCEDSTATUSCODES" in keywords  # RFC 2033 5
    assert not any(k.startswith(b"AUTH") for k in keywords)
    assert codes(talk(proto, t, b"AUTH PLAIN\r\n")) == [500]


@pytest.mark.parametrize("verb", [b"HELO", b"EHLO"])
def test_helo_and_ehlo_are_not_lmtp(verb):
    proto, t, _ = connect()
    assert talk(proto, t, verb + b" mta.lab.test\r\n") == [b"500 5.5.1 This is LMTP: use LHLO (RFC 2033 4.1)"]
    assert codes(talk(proto, t, b"MAIL FROM:<x@sender.test>\r\n")) == [503]


def test_one_reply_per_accepted_recipient_in_rcpt_order():
    verdict = defer.Deferred()
    handler = RecordingHandler(
        RCPT=lambda s, e, addr, o: Reply(550, "5.1.1", "no such user") if addr.startswith("nobody") else None,
        DATA=lambda *a: verdict,
    )
    proto, t, _ = connect(handler)
    assert transaction(proto, t, (b"a@lab.test", b"nobody@lab.test", b"b@lab.test", b"c@lab.test")) == [
        250, 550, 250, 250,
    ]  # fmt: skip
    assert talk(proto, t, b"DATA\r\n") == [b"354 End data with <CR><LF>.<CR><LF>"]
    assert talk(proto, t, b"Subject: x\r\n\r\nhi\r\n.\r\nQUIT\r\n") == []
    verdict.callback([
        Reply(250, "2.0.0", "<a@lab.test> delivered"),
        Reply(452, "4.2.2", "<b@lab.test> mailbox full"),
        Reply(250, "2.0.0", "<c@lab.test> delivered"),
    ])  # fmt: skip
    assert replies(t) == [
        b"250 2.0.0 <a@lab.test> delivered",
        b"452 4.2.2 <b@lab.test> mailbox full",
        b"250 2.0.0 <c@lab.test> delivered",
        b"221 2.0.0 lmtp.lab.test closing connection",
    ]
    (_, _, envelope), = handler.called("DATA")
    assert envelope.rcpt_tos == ["a@lab.test", "b@lab.test", "c@lab.test"]
    assert envelope.content == b"Subject: x\r\n\r\nhi\r\n"


def test_single_reply_applies_to_every_recipient():
    proto, t, _ = connect(RecordingHandler(DATA=Reply(250, "2.0.0", "ok")))
    transaction(proto, t)
    assert codes(talk(proto, t, b"DATA\r\n.\r\n")) == [354, 250, 250, 250]


@pytest.mark.parametrize(
    "verdict",
    [lambda *a: [Reply(250, "2.0.0", "only one")], lambda *a: None,
     lambda *a: defer.fail(OSError("disk")), lambda *a: ["250 ok"] * 3],
    ids=["wrong-length", "none", "failure", "not-replies"],
)  # fmt: skip
def test_bad_handler_verdict_gives_451_per_recipient(verdict):
    proto, t, _ = connect(RecordingHandler(DATA=verdict))
    transaction(proto, t)
    lines = talk(proto, t, b"DATA\r\nhi\r\n.\r\nNOOP\r\n")
    assert codes(lines) == [354, 451, 451, 451, 250]


def test_rejected_message_gets_the_rejection_once_per_recipient():
    policy = ServerPolicy(hostname="lmtp.lab.test", max_message_size=100)
    proto, t, handler = connect(policy=policy)
    transaction(proto, t, (b"a@lab.test", b"b@lab.test"))
    lines = talk(proto, t, b"DATA\r\n" + b"x" * 98 + b"\r\n" + b"y\r\n" + b".\r\n")
    assert lines[1:] == [b"552 5.3.4 Message size exceeds fixed maximum message size"] * 2
    assert handler.delivered == []
    lines = talk(proto, t, b"RSET\r\n")
    assert lines == [b"250 2.0.0 OK"] and all(ENHANCED.match(x) for x in lines)


def test_lmtp_keeps_smtp_hardening_smuggling_and_line_limits():
    proto, t, handler = connect()
    transaction(proto, t, (b"a@lab.test",))
    lines = talk(proto, t, b"DATA\r\nhello\n.\r\nMAIL FROM:<evil@evil.test>\r\n.\r\n")
    assert codes(lines) == [354, 554]
    assert len(handler.called("MAIL")) == 1
    assert talk(proto, t, b"NOOP " + b"x" * 600 + b"\r\n") == [b"500 5.5.2 Line too long"]


def test_bdat_last_gets_one_reply_per_accepted_recipient():
    """RFC 3030 with RFC 2033 4.2: after BDAT LAST, as after the dot, one reply per recipient."""
    handler = RecordingHandler(
        RCPT=lambda s, e, addr, o: Reply(550, "5.1.1", "no such user") if addr.startswith("nobody") else None,
        DATA=lambda *a: [Reply(250, "2.0.0", "<a@lab.test> delivered"),
                         Reply(452, "4.2.2", "<b@lab.test> mailbox full")],
    )
    proto, t, _ = connect(handler)
    assert transaction(proto, t, (b"a@lab.test", b"nobody@lab.test", b"b@lab.test")) == [250, 550, 250]
    message = b"Subject: x\r\n\r\nhi\r\n.\r\n"  # the dot line is text here, not an end
    assert talk(proto, t, b"BDAT 4\r\nSubjBDAT %d LAST\r\n" % (len(message) - 4) + message[4:]) == [
        b"250 2.0.0 4 octets received",
        b"250 2.0.0 <a@lab.test> delivered",
        b"452 4.2.2 <b@lab.test> mailbox full",
    ]
    (_, _, envelope), = handler.called("DATA")
    assert envelope.content == message
