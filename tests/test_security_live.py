"""Issue 4 over real sockets: every listener of a running lab, attacked byte by byte.

Two labs: the shared session ``lab`` (default settings), and ``seclab``, this
module's own, with a fast brute-force throttle, a per-user message limit of
three, a 20 000-octet size limit and ``enforce_sender = false``.

Each attack comes from its own loopback source address (Linux routes all of
127.0.0.0/8 to ``lo``), so the per-address throttles of one test never
touch another's.
"""

from __future__ import annotations

import base64
import imaplib
import json
import os
import poplib
import smtplib
import socket
import ssl
import subprocess
import sys
import time
import uuid
import warnings

import pytest

from agents.config import LabConfig
from agents.monitor import security_events
from support import make_lab, running
from wire import Wire, smtp_session

SECLAB_SECURITY = {
    "login_delay": 0.5,
    "login_max_delay": 1.0,
    "login_max_failures": 4,
    "login_window": 600.0,
    "rate_window": 600.0,
    "max_messages_per_user": 3,
    "max_messages_per_client": 100,
    "enforce_sender": False,
}
SECLAB_MAX_SIZE = 20_000


@pytest.fixture(scope="module")
def seclab(tmp_path_factory):
    sections = {**LabConfig.load(None).sections, "security": SECLAB_SECURITY}
    with running(make_lab(tmp_path_factory, sections=sections, max_message_size=SECLAB_MAX_SIZE)) as lab:
        yield lab


def ca(lab) -> str:
    return str(lab.home.ca_cert)


def tls_ctx(lab) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=ca(lab))


def plain(user: str, password: str) -> bytes:
    return base64.b64encode(f"\0{user}\0{password}".encode())


def mta(lab, source="127.0.0.1", domain="recipient.test") -> Wire:
    host, port = lab.endpoint(domain, "smtp")
    return smtp_session(host, port, source=source, helo=b"stranger.test")


def msa(lab, source, domain="sender.test") -> Wire:
    host, port = lab.endpoint(domain, "submission")
    return smtp_session(host, port, source=source, ca_file=ca(lab), tls_hostname=f"smtp.{domain}")


def message(message_id: str, body: bytes = b"hello\r\n") -> bytes:
    return (b"From: stranger@stranger.test\r\nTo: bob@recipient.test\r\nSubject: wire test\r\n"
            b"Message-ID: " + message_id.encode() + b"\r\n\r\n" + body)  # fmt: skip


def new_id(tag: str) -> str:
    return f"<{tag}.{uuid.uuid4().hex[:12]}@stranger.test>"


def events_named(lab, name: str, **match) -> list[dict]:
    return [e for e in security_events(lab.home.trace_dir)
            if e["event"] == name and all(e.get(k) == v for k, v in match.items())]  # fmt: skip


def wait_for_event(lab, name: str, timeout: float = 5.0, count: int = 1, **match) -> list[dict]:
    """The matching events once there are ``count`` of them (the trace is written as they happen)."""
    deadline = time.monotonic() + timeout
    while True:
        found = events_named(lab, name, **match)
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


# ---------------------------------------------------------------------------
# No open relay: the classic address tricks, from a stranger, against the MTA

#: (address, why it is a trick). ``{ip}`` is the MTA's own address literal.
RELAY_TRICKS = [
    ("user@elsewhere.test", "plain relaying"),
    ("user@ELSEWHERE.TEST", "upper-case foreign domain"),
    ("user%elsewhere.test@recipient.test", "percent hack"),
    ("user%elsewhere.test@RECIPIENT.TEST", "percent hack, upper-case local domain"),
    ("user%elsewhere.test@[{ip}]", "percent hack on an address literal"),
    ("user%elsewhere.test%recipient.test@recipient.test", "double percent hack"),
    ('"user@elsewhere.test"@recipient.test', "quoted local part hiding an @"),
    ('"user%elsewhere.test"@recipient.test', "quoted percent hack"),
    ('"user@elsewhere.test"', "quoted address without a domain"),
    ('"user@elsewhere.test"@[{ip}]', "quoted @ on an address literal"),
    ("@recipient.test:user@elsewhere.test", "source route"),
    ("@recipient.test,@mx.recipient.test:user@elsewhere.test", "source route with two hops"),
    ("elsewhere.test!user@recipient.test", "bang path"),
    ("elsewhere.test!user", "bang path without a domain"),
    ("elsewhere.test!user@[{ip}]", "bang path on an address literal"),
    ("user@elsewhere.test@recipient.test", "double @"),
    ("user@elsewhere.test@[{ip}]", "double @ with an address literal"),
    ("user@[127.0.0.1]", "address literal of another host"),
    ("user@[{ip}]", "address literal of the MTA itself"),
    ("user@elsewhere.test.", "foreign domain with a trailing dot"),
    ("bob@recipient.test.", "local domain with a trailing dot"),
    ("user%elsewhere.test@recipient.test.", "percent hack with a trailing dot"),
    ("postmaster@elsewhere.test", "postmaster of a foreign domain"),
    ("user@localhost", "localhost"),
]
SENDERS = ["spammer@stranger.test", "", "bob@recipient.test"]  # incl. <> and a forged local sender


@pytest.mark.parametrize("sender", SENDERS, ids=["stranger", "null", "forged-local"])
@pytest.mark.parametrize("trick, why", RELAY_TRICKS, ids=[why for _, why in RELAY_TRICKS])
def test_relay_trick_is_refused_with_5_7_1(lab, trick, why, sender):
    ip = lab.config.domain("recipient.test").address
    with mta(lab) as w:
        assert w.command(b"MAIL FROM:<" + sender.encode() + b">")[0] == 250
        code, lines = w.command(b"RCPT TO:<" + trick.format(ip=ip).encode() + b">")
        assert code in (550, 554) and lines[-1][4:10] == b"5.7.1 ", (why, lines)
        # ...and the refusal is a refusal, not a desynchronised session:
        assert w.command(b"RCPT TO:<bob@recipient.test>")[0] == 250
        assert w.command(b"DATA")[0] == 354


@pytest.mark.parametrize("rcpt", ["bob@recipient.test", "BOB@Recipient.TEST", '"bob"@recipient.test'])
def test_the_mta_still_takes_mail_for_its_own_users(lab, rcpt):
    """The control group: the table above would pass against a server that refuses everything."""
    with mta(lab) as w:
        assert w.command(b"MAIL FROM:<spammer@stranger.test>")[0] == 250
        code, lines = w.command(b"RCPT TO:<" + rcpt.encode() + b">")
        if rcpt.startswith('"'):  # a quoted local part is no trick, just not a user here
            assert lines[-1].startswith(b"550 5.1.1 "), lines
        else:
            assert code == 250, lines


def test_relay_refusals_are_security_events(lab):
    with mta(lab, source="127.0.0.77") as w:
        w.command(b"MAIL FROM:<spammer@stranger.test>")
        w.command(b"RCPT TO:<user%elsewhere.test@recipient.test>")
        w.command(b"RCPT TO:<@recipient.test:user@elsewhere.test>")
        w.command(b"RCPT TO:<user@elsewhere.test>")
    found = wait_for_event(lab, "security.relay_denied", count=3, peer="127.0.0.77")
    assert sorted(e["reason"] for e in found) == ["foreign domain", "percent hack", "source route"]
    assert {e["agent"] for e in found} == {"mta.recipient.test"}


# ---------------------------------------------------------------------------
# Framing over a real socket: pipelining, split lines, end-of-data bytes


def codes_of(w: Wire, n: int) -> list[int]:
    return [w.reply()[0] for _ in range(n)]


def test_several_commands_in_one_write(lab):
    mid = new_id("onewrite")
    with Wire(*lab.endpoint("recipient.test", "smtp")) as w:
        assert w.reply()[0] == 220
        w.send(b"EHLO stranger.test\r\nMAIL FROM:<s@stranger.test>\r\nRCPT TO:<bob@recipient.test>\r\n"
               b"DATA\r\n" + message(mid) + b".\r\nNOOP\r\nQUIT\r\n")  # fmt: skip
        assert codes_of(w, 7) == [250, 250, 250, 354, 250, 250, 221]
        assert w.closed()
    assert lab.wait_for("bob@recipient.test", mid)["subject"] == "wire test"


def test_lines_split_across_writes(lab):
    mid = new_id("split")
    script = (b"EHLO stranger.test\r\nMAIL FROM:<s@stranger.test>\r\nRCPT TO:<bob@recipient.test>\r\n"
              b"DATA\r\n" + message(mid, b"line one\r\n..dot line\r\n") + b".\r\nQUIT\r\n")  # fmt: skip
    # Cut inside a verb, between CR and LF, inside the address, and inside "\r\n.\r\n".
    end = script.index(b"\r\n.\r\nQUIT")
    cuts = [2, script.index(b"\n"), script.index(b"MAIL") + 6, script.index(b"bob") + 1,
            script.index(b"DATA") + 5, end + 1, end + 3, end + 4]  # fmt: skip
    with Wire(*lab.endpoint("recipient.test", "smtp")) as w:
        assert w.reply()[0] == 220
        w.send_slowly(script, sorted(cuts))
        assert codes_of(w, 6) == [250, 250, 250, 354, 250, 221]
    fetched = lab.wait_for("bob@recipient.test", mid)
    assert fetched["subject"] == "wire test"


SMUGGLED = b"MAIL FROM:<smuggler@evil.test>\r\nRCPT TO:<bob@recipient.test>\r\nDATA\r\nsmuggled\r\n"


@pytest.mark.parametrize("fake_end", [b"\n.\n", b"\r.\r", b"\r\n.\r", b"\n.\r\n", b"\r.\r\n", b"\r\n.\n"],
                         ids=["LF.LF", "CR.CR", "CRLF.CR", "LF.CRLF", "CR.CRLF", "CRLF.LF"])  # fmt: skip
def test_fake_end_of_data_never_ends_the_message(lab, fake_end):
    """SMTP smuggling (CVE-2023-51764 class): only CRLF.CRLF ends DATA; the bare
    CR/LF makes the message bad, answered once, after the real end."""
    with mta(lab) as w:
        assert w.command(b"MAIL FROM:<s@stranger.test>")[0] == 250
        assert w.command(b"RCPT TO:<bob@recipient.test>")[0] == 250
        assert w.command(b"DATA")[0] == 354
        w.send(message(new_id("smuggle"), b"before") + fake_end + SMUGGLED + b"\r\n.\r\n")
        code, lines = w.reply()
        assert (code, lines[-1][4:9]) == (554, b"5.6.0"), lines
        # Exactly one answer: the next reply is the NOOP's, not the smuggled MAIL's.
        assert w.quiet(0.3)
        assert w.command(b"NOOP") == (250, [b"250 2.0.0 OK"])


def test_starttls_injection_is_discarded(lab):
    """CVE-2011-0411: commands pipelined behind STARTTLS must not run inside TLS."""
    source = "127.0.0.78"
    host, port = lab.endpoint("recipient.test", "smtp")
    with Wire(host, port, source=source) as w:
        assert w.reply()[0] == 220
        assert w.command(b"EHLO stranger.test")[0] == 250
        w.send(b"STARTTLS\r\nMAIL FROM:<injected@evil.test>\r\n")
        assert w.reply() == (220, [b"220 2.0.0 Ready to start TLS"])
        w.starttls(ca(lab), "mx.recipient.test")
        assert w.quiet(0.3), "no reply to the injected MAIL may arrive over TLS"
        # Had the MAIL run after the handshake, this RCPT would be accepted.
        assert w.command(b"RCPT TO:<bob@recipient.test>")[0] == 503
        ehlo = w.command(b"EHLO stranger.test")[1]
        assert b"250 STARTTLS" not in ehlo and b"250-STARTTLS" not in ehlo
    assert wait_for_event(lab, "security.starttls_injection", peer=source)[0]["discarded"] == len(b"MAIL FROM:<injected@evil.test>\r\n")


def test_auth_before_tls_is_refused_everywhere(lab):
    host, port = lab.endpoint("sender.test", "submission")
    with Wire(host, port, source="127.0.0.79") as w:
        assert w.reply()[0] == 220
        ehlo = w.command(b"EHLO client.test")[1]
        assert not any(b"AUTH" in line for line in ehlo), "AUTH advertised before TLS"
        assert w.command(b"AUTH PLAIN " + plain("alice@sender.test", "alice-secret")) == (
            538, [b"538 5.7.11 Must issue a STARTTLS command first"])  # fmt: skip
        assert w.command(b"AUTH LOGIN")[0] == 538
        assert w.command(b"MAIL FROM:<alice@sender.test>")[0] == 530
    host, port = lab.endpoint("recipient.test", "imap")
    with Wire(host, port) as w:
        assert b"LOGINDISABLED" in w.line()
        w.send(b"a LOGIN bob@recipient.test bob-secret\r\n")
        assert w.line() == b"a BAD LOGIN is disabled before STARTTLS"
    host, port = lab.endpoint("recipient.test", "pop3")
    with Wire(host, port) as w:
        w.line()
        w.send(b"USER bob@recipient.test\r\n")
        assert w.line().startswith(b"-ERR [AUTH] Plaintext authentication disallowed")
    assert wait_for_event(lab, "security.cleartext_auth", peer="127.0.0.79")


def test_over_long_command_and_data_lines_keep_the_session_in_sync(lab):
    with mta(lab) as w:
        w.send(b"NOOP " + b"x" * 600 + b"\r\nNOOP\r\n")
        assert w.reply() == (500, [b"500 5.5.2 Line too long"])
        assert w.reply()[0] == 250
        assert w.command(b"MAIL FROM:<s@stranger.test>")[0] == 250
        assert w.command(b"RCPT TO:<bob@recipient.test>")[0] == 250
        assert w.command(b"DATA")[0] == 354
        w.send(message(new_id("long"), b"y" * 1001 + b"\r\n" + SMUGGLED) + b".\r\n")
        code, lines = w.reply()
        assert (code, lines[-1][4:9]) == (500, b"5.5.2")
        assert w.quiet(0.3)
        assert w.command(b"NOOP")[0] == 250
    with mta(lab) as w:
        w.send(b"NOOP " + b"z" * 70_000)  # never a line end: bounded buffer, then goodbye
        assert w.reply() == (421, [b"421 4.7.0 Line too long, closing connection"])
        assert w.closed()


def test_size_is_advertised_and_enforced_at_mail(lab):
    with mta(lab) as w:
        ehlo = w.command(b"EHLO stranger.test")[1]
        assert f"250-SIZE {lab.config.max_message_size}".encode() in ehlo
        code, lines = w.command(b"MAIL FROM:<s@stranger.test> SIZE=%d" % (lab.config.max_message_size + 1))
        assert (code, lines[-1][4:9]) == (552, b"5.3.4")
        assert w.command(b"MAIL FROM:<s@stranger.test> SIZE=1000")[0] == 250


def test_size_enforced_while_reading_without_a_size_parameter(seclab):
    with mta(seclab) as w:
        assert w.command(b"MAIL FROM:<s@stranger.test>")[0] == 250
        assert w.command(b"RCPT TO:<bob@recipient.test>")[0] == 250
        assert w.command(b"DATA")[0] == 354
        w.send(message(new_id("big"), b"0123456789" * 60 + b"\r\n") * 40 + b".\r\n")
        code, lines = w.reply()
        assert (code, lines[-1][4:9]) == (552, b"5.3.4")
        assert w.command(b"NOOP")[0] == 250


def test_101_recipients_in_one_write_the_last_gets_452_4_5_3(lab):
    cap = lab.config.max_recipients
    assert cap >= 100  # RFC 5321 4.5.3.1.8
    with mta(lab) as w:
        w.send(b"MAIL FROM:<s@stranger.test>\r\n" + b"RCPT TO:<bob@recipient.test>\r\n" * (cap + 1))
        replies = [w.reply() for _ in range(cap + 2)]
        assert [r[0] for r in replies[: cap + 1]] == [250] * (cap + 1)
        assert replies[-1] == (452, [b"452 4.5.3 Too many recipients"])
        assert w.command(b"RSET")[0] == 250


# ---------------------------------------------------------------------------
# Mailbox isolation over IMAP and POP3


#: Names that would leave bob's Maildir if joined to a path naively. (A name
#: like "~alice" is no escape: it is just a folder ".~alice" inside bob's.)
ESCAPES = ["../alice", "../../sender.test/alice", "/etc", "/etc/passwd", "..", ".",
           "INBOX/../../sender.test/alice", "Junk/../../../sender.test/alice", "../bob/.Junk",
           "\\..\\alice"]  # fmt: skip


def imap_as_bob(lab) -> imaplib.IMAP4:
    imap = imaplib.IMAP4(*lab.endpoint("recipient.test", "imap"), timeout=10)
    imap.starttls(ssl_context=tls_ctx(lab))
    imap.login("bob@recipient.test", "bob-secret")
    return imap


def quoted(name: str) -> str:
    return '"' + name + '"'


def test_imap_mailbox_names_cannot_escape_bobs_maildir(lab):
    root = lab.home.maildirs
    imap = imap_as_bob(lab)  # the login creates bob's default folders
    before = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_dir())
    try:
        for name in ESCAPES:
            q = quoted(name)
            assert imap.select(q)[0] == "NO", name
            assert imap.select(q, readonly=True)[0] == "NO", name
            assert imap.status(q, "(MESSAGES)")[0] == "NO", name
            assert imap.create(q)[0] == "NO", name
            assert imap.delete(q)[0] == "NO", name
            assert imap.rename("INBOX", q)[0] == "NO", name
            assert imap.append(q, None, None, b"Subject: x\r\n\r\nx\r\n")[0] == "NO", name
        imap.select("INBOX")
        assert imap.copy("1:*", quoted("../../sender.test/alice"))[0] == "NO"
    finally:
        imap.logout()
    after = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_dir())
    assert after == before, "a directory appeared or vanished outside the rules"


def test_imap_symlinked_folders_are_not_followed(lab):
    bob = lab.home.maildirs / "recipient.test" / "bob"
    alice = lab.home.maildirs / "sender.test" / "alice"
    links = {".Evil": os.path.relpath(alice, bob), ".Etc": "/etc"}
    for name, target in links.items():
        os.symlink(target, bob / name)
    try:
        imap = imap_as_bob(lab)
        try:
            listed = b" ".join(imap.list()[1])
            assert b"Evil" not in listed and b"Etc" not in listed
            for name in ("Evil", "Etc"):
                assert imap.select(name)[0] == "NO"
                assert imap.status(name, "(MESSAGES)")[0] == "NO"
                assert imap.append(name, None, None, b"Subject: x\r\n\r\nx\r\n")[0] == "NO"
        finally:
            imap.logout()
        assert not (alice / "new").exists() or all(b"Subject: x" not in p.read_bytes()
                                                    for p in (alice / "new").iterdir())  # fmt: skip
    finally:
        for name in links:
            (bob / name).unlink()


def test_pop3_shows_only_the_users_own_inbox(lab):
    marker = uuid.uuid4().hex
    sent = lab.send("alice@sender.test", "alice@sender.test", f"for alice only {marker}", "private\n")
    lab.wait_for("alice@sender.test", sent["message_id"])
    pop = poplib.POP3(*lab.endpoint("recipient.test", "pop3"), timeout=10)
    try:
        pop.stls(context=tls_ctx(lab))
        with pytest.raises(poplib.error_proto):
            pop.user("../sender.test/alice")
            pop.pass_("bob-secret")
    finally:
        pop.close()
    pop = poplib.POP3_SSL(*lab.endpoint("recipient.test", "pop3s"), context=tls_ctx(lab), timeout=10)
    try:
        pop.user("bob@recipient.test")
        pop.pass_("bob-secret")
        count, _ = pop.stat()
        for i in range(1, count + 1):
            assert marker.encode() not in b"\n".join(pop.top(i, 0)[1])
    finally:
        pop.quit()


# ---------------------------------------------------------------------------
# Sender ownership at the MSA


def submit(lab, source: str, user: str, password: str, envelope_from: str, header_from: str, domain: str):
    """One submission with smtplib; returns (MAIL reply, DATA reply or None, Message-ID)."""
    host, port = lab.endpoint(domain, "submission")
    mid = new_id("submit")
    with smtplib.SMTP(host, port, timeout=10, source_address=(source, 0)) as s:
        s.starttls(context=tls_ctx(lab))
        s.login(user, password)
        mail = s.mail(envelope_from)
        if mail[0] != 250:
            return mail, None, mid
        assert s.rcpt("bob@recipient.test")[0] == 250
        data = s.data(f"From: {header_from}\r\nTo: bob@recipient.test\r\nSubject: ownership\r\n"
                      f"Message-ID: {mid}\r\n\r\nhi\r\n".encode())  # fmt: skip
        return mail, data, mid


def test_msa_refuses_a_sender_the_user_does_not_own(lab):
    mail, _, _ = submit(lab, "127.0.0.80", "alice@sender.test", "alice-secret", "ceo@sender.test",
                        "alice@sender.test", "sender.test")  # fmt: skip
    assert mail[0] == 550 and mail[1].startswith(b"5.7.1")
    _, data, _ = submit(lab, "127.0.0.80", "alice@sender.test", "alice-secret", "alice@sender.test",
                        "The CEO <ceo@sender.test>", "sender.test")  # fmt: skip
    assert data[0] == 550 and data[1].startswith(b"5.7.1")
    spoofs = wait_for_event(lab, "security.sender_spoof", peer="127.0.0.80")
    assert {e["enforced"] for e in spoofs} == {True}


def test_spoofing_lesson_enforce_sender_false_accepts_but_records(seclab):
    mail, data, mid = submit(seclab, "127.0.0.81", "alice@sender.test", "alice-secret",
                             "ceo@sender.test", "The CEO <ceo@sender.test>", "sender.test")  # fmt: skip
    assert mail[0] == 250 and data[0] == 250
    assert seclab.wait_for("bob@recipient.test", mid)["from"] == "The CEO <ceo@sender.test>"
    spoofs = wait_for_event(seclab, "security.sender_spoof", count=2, peer="127.0.0.81")
    assert sorted(e["where"] for e in spoofs) == ["envelope", "header"]
    assert {e["enforced"] for e in spoofs} == {False}


# ---------------------------------------------------------------------------
# Rate limits at the MSA


def test_per_user_message_rate_limit_is_450_4_7_1(seclab):
    """Three messages per user, from three different addresses; the fourth is refused."""
    for i, source in enumerate(["127.0.0.91", "127.0.0.92", "127.0.0.93"]):
        mail, data, _ = submit(seclab, source, "bob@recipient.test", "bob-secret", "bob@recipient.test",
                               "bob@recipient.test", "recipient.test")  # fmt: skip
        assert (mail[0], data[0]) == (250, 250), i
    mail, data, _ = submit(seclab, "127.0.0.94", "bob@recipient.test", "bob-secret", "bob@recipient.test",
                           "bob@recipient.test", "recipient.test")  # fmt: skip
    assert mail[0] == 450 and mail[1].startswith(b"4.7.1 Too many messages from this user")
    limited = wait_for_event(seclab, "security.rate_limited", peer="127.0.0.94")
    assert limited[0]["scope"] == "user" and limited[0]["user"] == "bob@recipient.test"


# ---------------------------------------------------------------------------
# Brute force


def test_smtp_auth_brute_force_is_slowed_then_cut_off(seclab):
    source = "127.0.0.101"
    w = msa(seclab, source)
    timings, last = [], None
    for i in range(4):
        start = time.monotonic()
        last = w.command(b"AUTH PLAIN " + plain("alice@sender.test", f"guess{i}"))
        timings.append(time.monotonic() - start)
        if last[0] == 421:
            break
    assert len(timings) == 4 and last == (421, [b"421 4.7.0 Too many failed authentication attempts, closing connection"])
    for took, delay in zip(timings, [0.5, 1.0, 1.0, 1.0]):
        assert delay * 0.9 <= took < delay + 1.5, timings
    assert w.closed()
    w.close()
    # Same address, right password: still refused, at once.
    w = msa(seclab, source)
    assert w.command(b"AUTH PLAIN " + plain("alice@sender.test", "alice-secret"))[0] == 421
    w.close()
    # Another address is not affected, and a right password is never delayed.
    w = msa(seclab, "127.0.0.102")
    start = time.monotonic()
    assert w.command(b"AUTH PLAIN " + plain("alice@sender.test", "alice-secret"))[0] == 235
    assert time.monotonic() - start < 0.45
    w.close()


def imaps(lab, source) -> Wire:
    w = Wire(*lab.endpoint("recipient.test", "imap"), source=source)
    assert w.line().startswith(b"* OK")
    w.send(b"s STARTTLS\r\n")
    assert w.line() == b"s OK Begin TLS negotiation now"
    w.starttls(ca(lab), "imap.recipient.test")
    return w


def pop3s(lab, source) -> Wire:
    w = Wire(*lab.endpoint("recipient.test", "pop3s"), source=source)
    w.starttls(ca(lab), "imap.recipient.test")
    assert w.line().startswith(b"+OK")
    return w


def test_imap_login_brute_force_ends_with_bye(seclab):
    w = imaps(seclab, "127.0.0.103")
    for i in range(3):
        w.send(b"t%d LOGIN bob@recipient.test guess%d\r\n" % (i, i))
        assert w.line() == b"t%d NO LOGIN failed" % i
    w.send(b"t3 LOGIN bob@recipient.test guess3\r\n")
    assert w.line() == b"* BYE Too many failed logins, closing connection"
    assert w.line() == b"t3 NO LOGIN failed"
    assert w.closed()


def test_pop3_pass_brute_force_ends_with_err_and_one_throttle_serves_imap_and_pop3(seclab):
    source = "127.0.0.104"
    w = imaps(seclab, source)  # two guesses over IMAP...
    for i in range(2):
        w.send(b"t%d LOGIN bob@recipient.test guess%d\r\n" % (i, i))
        assert w.line() == b"t%d NO LOGIN failed" % i
    w.close()
    w = pop3s(seclab, source)  # ...and the allowance is not fresh on POP3
    for i in range(2, 4):
        w.send(b"USER bob@recipient.test\r\n")
        assert w.line().startswith(b"+OK")
        w.send(b"PASS guess%d\r\n" % i)
        reply = w.line()
    assert reply == b"-ERR [AUTH] Too many failed logins, closing connection"
    assert w.closed()
    failed = events_named(seclab, "security.login_failed", peer=source)
    assert [(e["protocol"], e["failures"]) for e in failed] == [("imap", 1), ("imap", 2), ("pop3", 3), ("pop3", 4)]


def test_tls_handshake_failure_is_a_security_event(seclab):
    with Wire(*seclab.endpoint("sender.test", "submissions"), source="127.0.0.105") as w:
        w.send(b"EHLO plaintext.test\r\n")  # not a TLS ClientHello
        w.closed()
    found = wait_for_event(seclab, "security.tls_failed", peer="127.0.0.105")
    assert found and found[0]["agent"] == "msa.sender.test"


@pytest.mark.parametrize("service, domain", [("submissions", "sender.test"), ("imaps", "recipient.test"),
                                             ("pop3s", "recipient.test")])  # fmt: skip
def test_tls_below_1_2_is_refused_and_1_2_is_accepted(seclab, service, domain):
    """RFC 8996 deprecates TLS 1.0 and 1.1; RFC 8314 4.1 asks for 1.2 or later."""
    source = {"submissions": "127.0.0.111", "imaps": "127.0.0.112", "pop3s": "127.0.0.113"}[service]
    address = seclab.endpoint(domain, service)
    host = f"smtp.{domain}" if service == "submissions" else f"imap.{domain}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # ssl.TLSVersion.TLSv1 and v1_1
        old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        old.load_verify_locations(ca(seclab))
        old.minimum_version, old.maximum_version = ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1
        old.set_ciphers("DEFAULT@SECLEVEL=0")  # let this client offer the old versions at all
    with socket.create_connection(address, source_address=(source, 0), timeout=10) as sock:
        with pytest.raises(ssl.SSLError, match="PROTOCOL_VERSION"):  # the server's alert
            old.wrap_socket(sock, server_hostname=host)
    failed = wait_for_event(seclab, "security.tls_failed", peer=source)
    assert failed and "unsupported protocol" in failed[0]["reason"]
    new = tls_ctx(seclab)
    new.maximum_version = ssl.TLSVersion.TLSv1_2
    with socket.create_connection(address, timeout=10) as sock:
        with new.wrap_socket(sock, server_hostname=host) as tls_sock:
            assert tls_sock.version() == "TLSv1.2"


def test_monitor_summarises_the_attacks_per_agent_and_client(seclab):
    # Make sure at least one attack is in the trace, whatever ran before.
    w = imaps(seclab, "127.0.0.106")
    w.send(b"a LOGIN bob@recipient.test nope\r\n")
    assert w.line() == b"a NO LOGIN failed"
    w.close()
    wait_for_event(seclab, "security.login_failed", peer="127.0.0.106")
    out = subprocess.run([sys.executable, "-m", "agents.cli", "--home", str(seclab.home.root), "monitor", "--json"],
                         capture_output=True, text=True, timeout=60, cwd=os.path.dirname(os.path.dirname(__file__)))  # fmt: skip
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["by_client"]["127.0.0.106"]["security.login_failed"] == 1
    assert "security.login_failed" in summary["by_agent"]["mda.recipient.test"]
