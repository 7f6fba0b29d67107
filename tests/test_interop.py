"""Interop: independent clients (smtplib, imaplib, poplib, swaks, curl) against the lab."""

from __future__ import annotations

import imaplib
import poplib
import shutil
import smtplib
import ssl
import subprocess
import uuid
from email.message import EmailMessage

import pytest


def tls_context(lab) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(lab.home.ca_cert))
    return ctx


def message(subject: str, sender="alice@sender.test", to="bob@recipient.test") -> tuple[EmailMessage, str]:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = sender, to, subject
    msg_id = f"<{uuid.uuid4().hex}@interop.test>"
    msg["Message-ID"] = msg_id
    msg.set_content("interop body\n.leading dot line\n")
    return msg, msg_id


def submit_with_smtplib(lab, msg):
    host, port = lab.endpoint("sender.test", "submission")
    with smtplib.SMTP(host, port, local_hostname="client.test", timeout=10) as s:
        s.ehlo()
        assert "auth" not in s.esmtp_features, "AUTH must not be offered before TLS"
        s.starttls(context=_hostname_ctx(lab))
        s.ehlo()
        assert "PLAIN" in s.esmtp_features["auth"]
        s.login("alice@sender.test", "alice-secret")
        refused = s.send_message(msg)
    assert refused == {}


def _hostname_ctx(lab):
    # Python checks the certificate against the host we connect to: an IP
    # here, which the lab certificate lists as well as the host names.
    return tls_context(lab)


def test_smtplib_submission_then_imaplib_fetch(lab):
    msg, msg_id = message("smtplib to imaplib")
    submit_with_smtplib(lab, msg)
    lab.wait_for("bob@recipient.test", msg_id)
    host, port = lab.endpoint("recipient.test", "imap")
    with imaplib.IMAP4(host, port) as imap:
        assert "LOGINDISABLED" in imap.capabilities
        imap.starttls(ssl_context=tls_context(lab))
        imap.login("bob@recipient.test", "bob-secret")
        imap.select("INBOX")
        typ, data = imap.search(None, "HEADER", "Message-ID", msg_id)
        assert typ == "OK" and data[0]
        num = data[0].split()[-1]
        typ, fetched = imap.fetch(num, "(RFC822)")
        raw = fetched[0][1]
        assert b"\r\n.leading dot line\r\n" in raw
        assert b"Subject: smtplib to imaplib" in raw


def test_poplib_retr_over_stls(lab):
    msg, msg_id = message("for poplib")
    submit_with_smtplib(lab, msg)
    lab.wait_for("bob@recipient.test", msg_id)
    host, port = lab.endpoint("recipient.test", "pop3")
    pop = poplib.POP3(host, port, timeout=10)
    try:
        pop.stls(context=tls_context(lab))
        pop.user("bob@recipient.test")
        pop.pass_("bob-secret")
        count, _size = pop.stat()
        found = False
        for i in range(1, count + 1):
            _resp, lines, _octets = pop.retr(i)
            if any(msg_id.encode() in l for l in lines):
                found = True
                assert b".leading dot line" in lines
        assert found
    finally:
        pop.quit()


def test_mta_refuses_relay_for_strangers(lab):
    host, port = lab.endpoint("recipient.test", "smtp")
    with smtplib.SMTP(host, port, timeout=10, source_address=("127.0.0.1", 0)) as s:
        s.ehlo("stranger.test")
        s.mail("someone@stranger.test")
        code, text = s.rcpt("victim@elsewhere.test")
        assert code == 554 and text.startswith(b"5.7.1")
        code, _ = s.rcpt("bob@recipient.test")  # but mail for its own users is fine
        assert code == 250


def test_msa_requires_auth(lab):
    host, port = lab.endpoint("sender.test", "submission")
    with smtplib.SMTP(host, port, timeout=10) as s:
        s.starttls(context=tls_context(lab))
        s.ehlo()
        code, text = s.mail("alice@sender.test")
        assert code == 530 and text.startswith(b"5.7.0")


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks not installed")
def test_swaks_submission(lab):
    host, port = lab.endpoint("sender.test", "submission")
    msg_id = f"<{uuid.uuid4().hex}@swaks.test>"
    out = subprocess.run(
        ["swaks", "--server", f"{host}:{port}", "--tls", "--tls-verify", "--tls-ca-path", str(lab.home.ca_cert),
         "--auth", "PLAIN", "--auth-user", "alice@sender.test", "--auth-password", "alice-secret",
         "--from", "alice@sender.test", "--to", "bob@recipient.test", "--ehlo", "swaks.test",
         "--header", f"Message-Id: {msg_id}", "--header", "Subject: from swaks"],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "250 2.0.0" in out.stdout
    assert lab.wait_for("bob@recipient.test", msg_id)["subject"] == "from swaks"


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_curl_smtp_imap_pop3(lab, tmp_path):
    msg_id = f"<{uuid.uuid4().hex}@curl.test>"
    body = tmp_path / "msg.txt"
    body.write_bytes(
        f"From: alice@sender.test\r\nTo: bob@recipient.test\r\nSubject: from curl\r\nMessage-ID: {msg_id}\r\n\r\nhi\r\n".encode()
    )
    s_host, s_port = lab.endpoint("sender.test", "submission")
    ca = str(lab.home.ca_cert)
    common = ["curl", "-sS", "--ssl-reqd", "--cacert", ca, "--max-time", "30"]
    subprocess.run(
        common + ["--resolve", f"smtp.sender.test:{s_port}:{s_host}", f"smtp://smtp.sender.test:{s_port}",
                  "--mail-from", "alice@sender.test", "--mail-rcpt", "bob@recipient.test",
                  "--user", "alice@sender.test:alice-secret", "--upload-file", str(body)],
        check=True, capture_output=True, timeout=60,
    )
    lab.wait_for("bob@recipient.test", msg_id)
    i_host, i_port = lab.endpoint("recipient.test", "imap")
    listing = subprocess.run(
        common + ["--resolve", f"imap.recipient.test:{i_port}:{i_host}", f"imap://imap.recipient.test:{i_port}/INBOX",
                  "-X", f'SEARCH HEADER Message-ID "{msg_id}"', "--user", "bob@recipient.test:bob-secret"],
        check=True, capture_output=True, text=True, timeout=60,
    ).stdout
    uid = listing.split()[-1]
    fetched = subprocess.run(
        common + ["--resolve", f"imap.recipient.test:{i_port}:{i_host}",
                  f"imap://imap.recipient.test:{i_port}/INBOX;MAILINDEX={uid}",
                  "--user", "bob@recipient.test:bob-secret"],
        check=True, capture_output=True, text=True, timeout=60,
    ).stdout
    assert "Subject: from curl" in fetched
    p_host, p_port = lab.endpoint("recipient.test", "pop3")
    pop_list = subprocess.run(
        common + ["--resolve", f"imap.recipient.test:{p_port}:{p_host}", f"pop3://imap.recipient.test:{p_port}/",
                  "--user", "bob@recipient.test:bob-secret"],
        check=True, capture_output=True, text=True, timeout=60,
    ).stdout
    assert pop_list.strip(), "POP3 LIST should show at least one message"


def test_poplib_over_implicit_tls_pop3s(lab):
    host, port = lab.endpoint("recipient.test", "pop3s")
    pop = poplib.POP3_SSL(host, port, context=tls_context(lab), timeout=10)
    try:
        pop.user("bob@recipient.test")
        pop.pass_("bob-secret")
        assert pop.stat()[0] >= 0
    finally:
        pop.quit()


def test_imaplib_over_implicit_tls_imaps(lab):
    host, port = lab.endpoint("recipient.test", "imaps")
    with imaplib.IMAP4_SSL(host, port, ssl_context=tls_context(lab)) as imap:
        assert "LOGINDISABLED" not in imap.capabilities
        imap.login("bob@recipient.test", "bob-secret")
        assert imap.select("INBOX")[0] == "OK"
