"""The queue in a real lab: faults, queue tools, bounces, backup MX, null MX, duplicates.

One lab for the module, with the retry schedule scaled down further
(0.5 s doubling to 2 s), a 3 s delay warning, and an extra domain that
publishes a null MX. Every test clears the faults it set.
"""

from __future__ import annotations

import email
import email.policy
import json
import subprocess
import sys
import time
from dataclasses import replace

import pytest

from agents.audit import mailbox_ids, maildir_files
from agents.config import Domain
from agents.lab import Lab, LabError
from support import make_lab, running

BOB, ALICE = "bob@recipient.test", "alice@sender.test"
RECIPIENT_MTAS = ("mta.recipient.test", "mta2.recipient.test")


@pytest.fixture(scope="module")
def qlab(tmp_path_factory):
    base = make_lab(tmp_path_factory).config
    subnet = base.dns_address.split(".")[1]
    nomail = Domain("nomail.test", f"127.{subnet}.4.1", False, {"null_mx": True})
    config = replace(base, retry_min=0.5, retry_max=2.0, domains=base.domains + (nomail,),
                     sections={**base.sections, "queue": {"delay_warning": 3.0}})
    with running(Lab(home=tmp_path_factory.mktemp("qlab"), config=config)) as lab:
        yield lab


@pytest.fixture
def lab(qlab):
    yield qlab
    for spec in qlab.config.agents():  # whatever a test stopped comes back, without faults
        if not qlab.is_running(spec.name):
            qlab.start_agent(spec.name)
    qlab.clear_faults()


def wait_until(predicate, timeout=20.0, step=0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout} s waiting for {predicate.__name__}")


def cli(lab, *args) -> str:
    proc = subprocess.run([sys.executable, "-m", "agents.cli", "--home", str(lab.home.root), *args],
                          capture_output=True, text=True, timeout=60, env=lab._agent_env())
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def queued(lab, agent, message_id):
    return [m for m in lab.queue(agent) if m["message_id"] == message_id]


def reports_to(lab, user, subject_start):
    """The DSNs in ``user``'s mailbox whose Subject starts with ``subject_start``, parsed."""
    out = []
    for path in maildir_files(lab.home.root, user):
        msg = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
        if str(msg["Subject"] or "").startswith(subject_start):
            out.append(msg)
    return out


def reports_about(lab, user, subject_start, message_id):
    """The reports whose text/rfc822-headers part is the header of ``message_id``."""
    out = []
    for msg in reports_to(lab, user, subject_start):
        original = [p for p in msg.walk() if p.get_content_type() == "text/rfc822-headers"]
        headers = email.message_from_bytes(original[0].get_payload(decode=True))
        if headers["Message-ID"] == message_id:
            out.append(msg)
    return out


def report_about(lab, user, subject_start, message_id):
    def find():
        found = reports_about(lab, user, subject_start, message_id)
        return found[0] if found else None

    find.__name__ = f"a report about {message_id}"
    return find


def delivery_status(report):
    status = next(p for p in report.walk() if p.get_content_type() == "message/delivery-status")
    per_message, *per_recipient = status.get_payload()
    return per_message, per_recipient


# ---------------------------------------------------------------------------


def test_queue_tools_and_faults_from_the_command_line(lab):
    for mta in RECIPIENT_MTAS:
        out = json.loads(cli(lab, "fault", "set", mta, "reply", "--stage", "rcpt", "--code", "451", "--json"))
        assert (out["kind"], out["code"], out["status"]) == ("reply", 451, "4.3.0")
    assert "reply 451 4.3.0 at rcpt" in cli(lab, "fault", "list")
    sent = lab.send(ALICE, BOB, "held for a while", "x\n")
    mid = sent["message_id"]
    entry = wait_until(lambda: [m for m in queued(lab, "mta.sender.test", mid) if m["last_error"]])[0]
    assert entry["live"] and entry["pending"] == [BOB]
    assert "fault injected by mailpipe" in entry["last_error"]

    qid = entry["queue_id"]
    assert "held" not in cli(lab, "queue", "hold", qid)  # finds the agent by itself
    listing = cli(lab, "queue", "list")
    assert f"{qid}!" in listing and "== mta.sender.test: 1 message" in listing
    shown = json.loads(cli(lab, "queue", "show", qid, "--json"))
    assert shown["held"] and "Subject: held for a while" in shown["headers"]
    attempts = shown["attempts"]
    time.sleep(2.5)
    assert queued(lab, "mta.sender.test", mid)[0]["attempts"] == attempts  # held: no more tries

    assert cli(lab, "fault", "clear").strip() == "2 fault(s) cleared"
    cli(lab, "queue", "release", qid)
    assert lab.wait_for(BOB, mid)["subject"] == "held for a while"
    stats = json.loads(cli(lab, "queue", "stats", "--agent", "mta.sender.test", "--json"))["mta.sender.test"]
    assert stats["deferred"] >= 1 and stats["held"] == 1 and stats["released"] == 1


def test_a_late_message_brings_one_delay_warning(lab):
    for mta in RECIPIENT_MTAS:  # (not "refuse": the sender's MTA reuses an open connection)
        lab.fault(mta, "reply", stage="mail", code=450, status="4.7.0")
    mid = lab.send(ALICE, BOB, "slow one", "x\n")["message_id"]
    report = wait_until(report_about(lab, ALICE, "Delayed Mail", mid), timeout=20)
    _, [rcpt] = delivery_status(report)
    assert rcpt["Action"] == "delayed" and rcpt["Status"] == "4.7.0" and rcpt["Will-Retry-Until"]
    lab.clear_faults()
    lab.control.flush("mta.sender.test")
    lab.wait_for(BOB, mid)
    assert len(reports_about(lab, ALICE, "Delayed Mail", mid)) == 1  # one warning, however many tries


def test_disk_full_at_the_msa_is_452_4_3_1_and_the_next_try_works(lab):
    fault = lab.fault("msa.sender.test", "disk-full", count=1)
    assert fault["stage"] == "spool"
    refused = lab.send(ALICE, BOB, "no room", "x\n")
    assert (refused["recipients"][0]["code"], refused["recipients"][0]["status"]) == (452, "4.3.1")
    assert not refused["accepted"]
    assert not [m for m in lab.queue("msa.sender.test") if m["message_id"] == refused["message_id"]]
    again = lab.send(ALICE, BOB, "room again", "x\n")
    assert again["accepted"]
    lab.wait_for(BOB, again["message_id"])
    assert lab.control.stats("msa.sender.test")["counters"]["spool_failed"] >= 1


def test_unknown_user_bounces_to_alice_with_status_5_1_1(lab):
    mid = lab.send(ALICE, "nobody@recipient.test", "to nobody", "x\n")["message_id"]
    report = wait_until(report_about(lab, ALICE, "Undelivered Mail", mid))
    assert report["Return-Path"] == "<>"  # the envelope sender of a bounce is null (RFC 5321 4.5.5)
    assert report["From"].addresses[0].username == "MAILER-DAEMON"
    assert report.get_content_type() == "multipart/report"
    per_message, [rcpt] = delivery_status(report)
    assert per_message["Reporting-MTA"] == "dns; mx.sender.test"
    assert rcpt["Final-Recipient"] == "rfc822; nobody@recipient.test"
    assert (rcpt["Action"], rcpt["Status"]) == ("failed", "5.1.1")
    assert rcpt["Diagnostic-Code"].startswith("smtp; 550 5.1.1")


def test_null_mx_bounces_at_once_with_556_5_1_10(lab):
    mid = lab.send(ALICE, "anyone@nomail.test", "to a null MX", "x\n")["message_id"]
    report = wait_until(report_about(lab, ALICE, "Undelivered Mail", mid))
    _, [rcpt] = delivery_status(report)
    assert rcpt["Status"] == "5.1.10" and "null MX" in rcpt["Diagnostic-Code"]
    tries = [e for e in lab.trace() if e["event"] == "dequeued" and e.get("message_id") == mid
             and e["agent"] == "mta.sender.test"]
    assert len(tries) == 1  # no retries for a domain that said it takes no mail


def test_the_backup_mx_takes_over_while_the_primary_is_down(lab):
    lab.stop_agent("mta.recipient.test")
    mid = lab.send(ALICE, BOB, "via the backup", "x\n")["message_id"]
    waiting = wait_until(lambda: [m for m in queued(lab, "mta2.recipient.test", mid) if m["attempts"]])[0]
    assert waiting["pending"] == [BOB] and "refused" in waiting["last_error"]
    assert not queued(lab, "mta.sender.test", mid)  # the sender's MTA is done with it
    lab.start_agent("mta.recipient.test")
    lab.control.flush("mta2.recipient.test")
    msg = lab.wait_for(BOB, mid)
    received = " ".join(msg["received"])
    assert "by mx2.recipient.test" in received and "by mx.recipient.test" in received
    assert received.index("by mx.recipient.test") < received.index("by mx2.recipient.test")  # newest first


def test_queue_of_a_killed_agent_is_read_from_its_spool_and_recovered(lab):
    for mta in RECIPIENT_MTAS:
        lab.fault(mta, "reply", stage="mail", code=421)
    mid = lab.send(ALICE, BOB, "survives kill -9", "x\n")["message_id"]
    wait_until(lambda: queued(lab, "mta.sender.test", mid))
    lab.kill_agent("mta.sender.test")
    [entry] = queued(lab, "mta.sender.test", mid)
    assert entry["live"] is False and entry["pending"] == [BOB]  # on disk, the spool keeps it
    lab.clear_faults()
    lab.start_agent("mta.sender.test")
    lab.wait_for(BOB, mid)
    assert any(e["event"] == "recovered" and e.get("message_id") == mid for e in lab.trace())


def test_a_lost_reply_makes_a_counted_duplicate_never_a_loss(lab):
    before = lab.control.stats("mda.recipient.test")["counters"]["duplicates"]
    lab.fault("mda.recipient.test", "drop", after_accept=True, count=1)
    mid = lab.send(ALICE, BOB, "said twice", "x\n")["message_id"]
    lab.wait_for(BOB, mid)
    wait_until(lambda: lab.control.stats("mda.recipient.test")["counters"]["duplicates"] == before + 1)
    assert mailbox_ids(lab.home.root, BOB)[mid] == 2
    dup = [e for e in lab.trace() if e["event"] == "duplicate" and e.get("message_id") == mid]
    assert len(dup) == 1 and dup[0]["copies"] == 2


def test_control_errors_are_one_clear_line(lab):
    with pytest.raises(LabError, match="keeps no queue"):
        lab.queue("mda.recipient.test")
    with pytest.raises(LabError, match="no queued message"):
        lab.control.hold("NOSUCHID")
    with pytest.raises(LabError, match="unknown fault kind"):
        lab.fault("mta.sender.test", "explode")
    lab.stop_agent("mda.sender.test")
    with pytest.raises(LabError, match="not running"):
        lab.fault("mda.sender.test", "drop")
