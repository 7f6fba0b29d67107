"""Interop: our BDAT client (CHUNKING, RFC 3030) against Postfix's smtpd.

Our server's BDAT framing is pinned by protocol and property tests
(tests/test_smtpserver.py, tests/test_smtp_fuzz.py); this checks our
*client* against an independent implementation. Postfix 3.4 and later
offer CHUNKING by default. The message goes through a private Postfix and
Dovecot (the Postfix comparison's, benchmarks/compare_postfix.py) into a
Maildir, and must arrive byte for byte, its lone-dot line included.

Needs root and Debian's postfix, dovecot-imapd and dovecot-lmtpd; skipped
without them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

BODY = b"Subject: chunked\r\nMessage-ID: <chunking@sender.test>\r\n\r\nline one\r\n.\r\n..two dots\r\nlast\r\n"

SEND = r"""
import json, sys
from pathlib import Path
from twisted.internet import task
from agents.smtpclient import send
from agents.trace import Tracer

def main(reactor):
    trace = Tracer(Path(sys.argv[2]), "mta.sender.test", "mta", "sender.test")
    d = send(reactor, "127.0.0.1", int(sys.argv[1]), helo="mx.sender.test", mail_from="alice@sender.test",
             rcpt_tos=["bob@recipient.test"], content=bytes.fromhex(sys.argv[3]), tls="none", tracer=trace)
    d.addCallback(lambda r: print(json.dumps({"codes": [x.code for x in r.recipients],
                                              "extensions": sorted(r.extensions)})))
    return d

task.react(main)
"""


@pytest.fixture
def postfix():
    from compare_postfix import PrivatePostfix, missing_tools

    if os.geteuid() != 0 or missing_tools(need_postfix=True):
        pytest.skip("needs root and Debian's postfix, dovecot-imapd, dovecot-lmtpd")
    pf = PrivatePostfix(type("Args", (), {"keep": False})())
    try:
        pf.start()
    except Exception as e:  # noqa: BLE001 - e.g. the ports are taken by a comparison running now
        pf.stop()
        pytest.skip(f"private Postfix did not start: {e}")
    try:
        yield pf
    finally:
        pf.stop()


def test_our_bdat_client_delivers_through_postfix_byte_for_byte(postfix, tmp_path):
    trace = tmp_path / "client.jsonl"
    run = subprocess.run(
        [sys.executable, "-c", SEND, str(postfix.target[1]), str(trace), BODY.hex()],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert "CHUNKING" in result["extensions"] and result["codes"] == [250]
    lines = [e["line"] for e in map(json.loads, trace.read_text().splitlines()) if e["event"] == "line"]
    assert f"BDAT {len(BODY)} LAST" in lines and "DATA" not in lines
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        stored = [p for sub in ("new", "cur") for p in (postfix.maildir / sub).glob("*")]
        if stored:
            break
        time.sleep(0.05)
    (path,) = stored
    delivered = path.read_bytes().replace(b"\n", b"\r\n")  # Dovecot stores LF line ends
    assert delivered.endswith(BODY.split(b"\r\n\r\n", 1)[1])
    assert b"Subject: chunked\r\n" in delivered
