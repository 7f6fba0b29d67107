"""End to end: real agent processes on loopback relay a message across two domains."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from agents.journey import hops

from support import assert_no_agents_left, make_lab


def test_status_lists_every_agent_alive(lab):
    status = lab.status()
    names = {a["name"] for a in status["agents"]}
    assert names == {"dns", "msa.sender.test", "mta.sender.test", "mda.sender.test",
                     "msa.recipient.test", "mta.recipient.test", "mda.recipient.test",
                     "mta2.recipient.test",  # recipient.test's backup MX (agents.exchangers)
                     "mta.attacker.test"}  # attacker.test has no mailboxes: an MTA only
    assert all(a["alive"] for a in status["agents"])
    msa = next(a for a in status["agents"] if a["name"] == "msa.sender.test")
    assert set(msa["endpoints"]) == {"submission", "submissions"}
    assert status["ca_cert"].endswith("ca.pem")


def test_message_travels_every_hop(lab):
    sent = lab.send("alice@sender.test", "bob@recipient.test", "e2e", "through every hop\n")
    assert sent["accepted"], sent
    msg = lab.wait_for("bob@recipient.test", sent["message_id"])
    assert msg["subject"] == "e2e"
    assert msg["body"].strip() == "through every hop"
    # One Received: per accepting hop, newest first: MDA, MTA (recipient), MTA (sender), MSA.
    received = " ".join(msg["received"])
    for host in ("imap.recipient.test", "mx.recipient.test", "mx.sender.test", "smtp.sender.test"):
        assert f"by {host}" in received
    assert "with ESMTPSA" in received and "with LMTP" in received and "with ESMTPS" in received
    # RFC 8314 7.4: each hop that used TLS says which version, submission included.
    assert "by smtp.sender.test (mailpipe) with ESMTPSA (TLSv1.3)" in received
    path = [(h["from"], h["to"]) for h in hops(lab.trace(), sent["message_id"])]
    assert path[:5] == [
        ("mua", "msa.sender.test"),
        ("msa.sender.test", "mta.sender.test"),
        ("mta.sender.test", "mta.recipient.test"),
        ("mta.recipient.test", "mda.recipient.test"),
        ("mda.recipient.test", "mua"),
    ]


def test_implicit_tls_submission_on_465(lab):
    sent = lab.send("alice@sender.test", "bob@recipient.test", "via 465", "implicit TLS\n", implicit_tls=True)
    assert sent["accepted"]
    assert lab.wait_for("bob@recipient.test", sent["message_id"])["subject"] == "via 465"


def test_reply_from_bob_to_alice(lab):
    sent = lab.send("bob@recipient.test", "alice@sender.test", "re: e2e", "got it\n")
    msg = lab.wait_for("alice@sender.test", sent["message_id"])
    assert msg["from"] == "bob@recipient.test"


def test_msa_adds_message_id_and_date(lab):
    sent = lab.send("alice@sender.test", "bob@recipient.test", "headers", "x\n")
    msg = lab.wait_for("bob@recipient.test", sent["message_id"])
    assert msg["date"] and msg["message_id"] == sent["message_id"]


def test_cli_status_json(lab):
    out = subprocess.run([sys.executable, "-m", "agents.cli", "--home", str(lab.home.root), "status", "--json"],
                         capture_output=True, text=True, check=True).stdout
    status = json.loads(out)
    assert {"home", "ca_cert", "agents"} <= set(status)
    for a in status["agents"]:
        assert {"name", "role", "domain", "pid", "alive", "endpoints"} <= set(a)


def test_second_lab_with_same_addresses_fails_with_clear_error(lab, tmp_path):
    from agents.lab import Lab, LabError

    twin = Lab(home=tmp_path / "twin", config=lab.config)
    with pytest.raises(LabError, match="already in use"):
        twin.up()
    assert_no_agents_left(twin)


def test_two_labs_side_by_side(tmp_path_factory, lab):
    other = make_lab(tmp_path_factory)
    with other:
        sent = other.send("alice@sender.test", "bob@recipient.test", "second lab", "hi\n")
        assert other.wait_for("bob@recipient.test", sent["message_id"])["subject"] == "second lab"
    assert_no_agents_left(other)


def test_killed_mta_keeps_message_and_delivers_after_restart(tmp_path_factory):
    lab = make_lab(tmp_path_factory)
    with lab:
        lab.stop_agent("mta.recipient.test")
        lab.stop_agent("mta2.recipient.test")  # and its backup MX, or that one takes the mail
        sent = lab.send("alice@sender.test", "bob@recipient.test", "waits in queue", "x\n")
        assert sent["accepted"]
        lab.start_agent("mta.recipient.test")
        lab.start_agent("mta2.recipient.test")
        msg = lab.wait_for("bob@recipient.test", sent["message_id"], timeout=40)
        assert msg["subject"] == "waits in queue"
        deferred = [e for e in lab.trace() if e["event"] == "deferred" and e["agent"] == "mta.sender.test"]
        assert deferred, "the sender's MTA should have deferred at least once"
    assert_no_agents_left(lab)


def test_watch_prints_new_mail_as_it_arrives_via_idle(lab):
    import os
    import time

    watcher = subprocess.Popen(
        [sys.executable, "-m", "agents", "mua", "--home", str(lab.home.root), "watch", "bob@recipient.test",
         "--count", "1", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    try:
        # Wait until the watcher is in IDLE (it says so on stderr) before sending.
        assert "watching" in watcher.stderr.readline()
        time.sleep(0.3)
        sent = lab.send("alice@sender.test", "bob@recipient.test", "watched", "x\n")
        out, _ = watcher.communicate(timeout=30)
    finally:
        watcher.kill()
    shown = json.loads(out.strip().splitlines()[-1])
    assert shown["message_id"] == sent["message_id"] and shown["subject"] == "watched"


def test_cli_demo_runs_end_to_end(tmp_path):
    from support import free_subnet
    from agents.config import LabConfig

    config = tmp_path / "lab.toml"
    config.write_text(LabConfig.load(None).relocated(free_subnet()).to_toml())
    out = subprocess.run([sys.executable, "-m", "agents.cli", "--home", str(tmp_path / "home"),
                          "--config", str(config), "demo"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "arrived in Bob's INBOX" in out.stdout
    for hop in ("mua -> msa.sender.test", "mta.sender.test -> mta.recipient.test", "mta.recipient.test -> mda.recipient.test"):
        assert hop in out.stdout
    assert "end to end" in out.stdout


def test_one_line_errors_for_a_missing_lab_and_a_dead_agent(tmp_path_factory, tmp_path):
    from support import running

    out = subprocess.run([sys.executable, "-m", "agents.cli", "--home", str(tmp_path / "nolab"), "send",
                          "--from", "alice@sender.test", "--to", "bob@recipient.test"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert out.stderr.strip().splitlines()[-1].startswith("mailpipe: no lab CA at")
    assert "mailpipe up" in out.stderr
    with running(make_lab(tmp_path_factory)) as lab:
        lab.stop_agent("msa.sender.test")
        out = subprocess.run([sys.executable, "-m", "agents.cli", "--home", str(lab.home.root), "send",
                              "--from", "alice@sender.test", "--to", "bob@recipient.test"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode != 0
        last = out.stderr.strip().splitlines()[-1]
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr
        assert "is that agent running?" in last and "mailpipe status" in last
