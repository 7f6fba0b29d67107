"""The spool and the delivery queue, driven by a fake clock (no reactor, no sockets)."""

from __future__ import annotations

import email
import email.policy

from twisted.internet import defer, task

from agents.dsn import bounce_maker
from agents.queue import DeliveryQueue, Outcome
from agents.spool import Spool

MESSAGE = b"From: a@x.test\r\nTo: b@y.test\r\nSubject: s\r\nMessage-ID: <1@x.test>\r\n\r\nbody\r\n"


def sync(f, *args, **kwargs):
    return defer.maybeDeferred(f, *args, **kwargs)


class FakeTransport:
    """Answers each attempt with the next scripted list of codes per recipient."""

    def __init__(self, *script):
        self.script = list(script)
        self.calls = []

    def __call__(self, item, content):
        self.calls.append((list(item.pending), content))
        step = self.script.pop(0)
        if isinstance(step, Exception):
            return defer.fail(step)
        return defer.succeed([Outcome(r, code, f"{code // 100}.0.0", "x")
                              for r in item.pending for code in [step.get(r, 250)]])


def make_queue(tmp_path, transport, **kw):
    clock = task.Clock()
    spool = Spool(tmp_path / "spool")
    q = DeliveryQueue(spool, transport, reactor=clock, run_blocking=sync, retry_min=10, retry_max=40,
                      lifetime=kw.pop("lifetime", 1000), **kw)
    return q, spool, clock


def test_message_is_on_disk_before_accept_fires_and_removed_after_delivery(tmp_path):
    transport = FakeTransport({})
    q, spool, clock = make_queue(tmp_path, transport)
    qids = []
    q.accept("a@x.test", ["b@y.test"], MESSAGE).addCallback(qids.append)
    assert qids and (spool.queue / f"{qids[0]}.msg").exists()
    assert spool.content(qids[0]) == MESSAGE
    clock.advance(0)
    assert transport.calls == [(["b@y.test"], MESSAGE)]
    assert list(spool.queue.iterdir()) == []


def test_temporary_failure_retries_with_backoff_only_for_failed_recipients(tmp_path):
    transport = FakeTransport({"c@y.test": 451}, {"c@y.test": 451}, {})
    q, spool, clock = make_queue(tmp_path, transport)
    q.accept("a@x.test", ["b@y.test", "c@y.test"], MESSAGE)
    clock.advance(0)
    assert len(transport.calls) == 1
    clock.advance(7)  # first retry after ~10 s (jitter 0.8-1.2)
    assert len(transport.calls) == 1
    clock.advance(6)
    assert transport.calls[1][0] == ["c@y.test"]
    clock.advance(15)  # second retry after ~20 s
    assert len(transport.calls) == 2
    clock.advance(10)
    assert len(transport.calls) == 3
    assert list(spool.queue.iterdir()) == []


def test_recovery_after_crash_picks_up_pending_recipients(tmp_path):
    transport = FakeTransport({"c@y.test": 451})
    q, spool, clock = make_queue(tmp_path, transport)
    q.accept("a@x.test", ["b@y.test", "c@y.test"], MESSAGE)
    clock.advance(0)
    # "Crash": a new queue over the same spool directory.
    transport2 = FakeTransport({})
    q2, _, clock2 = make_queue(tmp_path, transport2)
    assert q2.recover().result == 1
    clock2.advance(100)
    assert transport2.calls == [(["c@y.test"], MESSAGE)]


def test_half_written_files_are_ignored_and_corrupt_ones_quarantined(tmp_path):
    spool = Spool(tmp_path / "spool")
    (spool.tmp / "half").write_bytes(b"{partial")
    (spool.queue / "BAD.msg").write_bytes(b"not json\r\n" + MESSAGE)
    items, corrupt = spool.recover()
    assert items == [] and corrupt == ["BAD"]
    assert (spool.corrupt / "BAD.msg").exists()
    assert list(spool.tmp.iterdir()) == []


def test_permanent_failure_bounces_to_sender_with_a_dsn(tmp_path):
    transport = FakeTransport({"b@y.test": 550}, {})
    q, spool, clock = make_queue(tmp_path, transport, make_bounce=bounce_maker("mx.x.test", "x.test"))
    q.accept("a@x.test", ["b@y.test"], MESSAGE)
    clock.advance(0)
    clock.advance(0)
    (recipients, dsn) = transport.calls[1]
    assert recipients == ["a@x.test"]
    msg = email.message_from_bytes(dsn, policy=email.policy.default)
    assert msg.get_content_type() == "multipart/report"
    status = [p for p in msg.walk() if p.get_content_type() == "message/delivery-status"][0]
    text = status.as_string()
    assert "Final-Recipient: rfc822; b@y.test" in text and "Action: failed" in text and "Status: 5.0.0" in text


def test_a_bounce_is_never_bounced(tmp_path):
    transport = FakeTransport({"a@x.test": 550})
    bounces = []
    q, spool, clock = make_queue(tmp_path, transport, make_bounce=lambda *a: bounces.append(a) or b"")
    q.accept("", ["a@x.test"], MESSAGE)
    clock.advance(0)
    assert bounces == [] and list(spool.queue.iterdir()) == []


def test_expired_message_bounces(tmp_path):
    transport = FakeTransport({"b@y.test": 451}, {})
    q, spool, clock = make_queue(tmp_path, transport, lifetime=-1, make_bounce=bounce_maker("mx.x.test", "x.test"))
    q.accept("a@x.test", ["b@y.test"], MESSAGE)
    clock.advance(0)
    clock.advance(0)
    assert transport.calls[1][0] == ["a@x.test"]
    assert b"5.4.7" in transport.calls[1][1]


def test_whole_attempt_failure_counts_as_temporary(tmp_path):
    transport = FakeTransport(ConnectionRefusedError("refused"), {})
    q, spool, clock = make_queue(tmp_path, transport)
    q.accept("a@x.test", ["b@y.test"], MESSAGE)
    clock.advance(0)
    assert len(q.items) == 1
    clock.advance(20)
    assert len(transport.calls) == 2 and q.items == {}


def test_per_recipient_refusals_survive_a_whole_transaction_failure(tmp_path):
    from agents.smtpclient import RecipientResult, SMTPDeliveryError

    refused = SMTPDeliveryError(450, "4.2.1", "all refused", recipients=[
        RecipientResult("b@y.test", 550, "5.1.1", "no such user"),
        RecipientResult("c@y.test", 450, "4.2.1", "try later"),
    ])
    transport = FakeTransport(refused, {})
    bounces = []
    q, spool, clock = make_queue(tmp_path, transport, make_bounce=lambda item, c, failed: bounces.append(failed) or b"x")
    q.accept("a@x.test", ["b@y.test", "c@y.test"], MESSAGE)
    clock.advance(0)
    assert [o.address for o in bounces[0]] == ["b@y.test"]
    assert q.items and list(q.items.values())[0].pending == ["c@y.test"]


# ---------------------------------------------------------------------------
# The schedule: Postfix defaults, backoff, lifetime, delay warnings (task.Clock)

import errno
import json
import random
from pathlib import Path

import pytest
from twisted.python.failure import Failure

from agents.dsn import make_dsn
from agents.queue import (POSTFIX_LIFETIME, POSTFIX_RETRY_MAX, POSTFIX_RETRY_MIN, NoSuchMessage, backoff,
                          queue_settings, spool_failure_reply)
import os

import agents.spool as spool_module
from agents import durable
from agents.spool import CorruptSpoolFile, QueuedMessage


class Recorder(FakeTransport):
    """A FakeTransport that also keeps each attempt's time and envelope sender."""

    def __init__(self, clock, *script):
        super().__init__(*script)
        self.clock, self.times, self.senders = clock, [], []

    def __call__(self, item, content):
        self.times.append(self.clock.seconds())
        self.senders.append(item.mail_from)
        return super().__call__(item, content)


class NoJitter(random.Random):
    def uniform(self, a, b):
        return 1.0


def clocked_queue(tmp_path, script, **kw):
    clock = task.Clock()
    transport = Recorder(clock, *script)
    q = DeliveryQueue(Spool(tmp_path / "spool"), transport, reactor=clock, run_blocking=sync,
                      rng=NoJitter(), **kw)
    return q, transport, clock


def test_defaults_are_postfix_and_the_lab_config_scales_them(tmp_path):
    from agents.config import LabConfig

    q = DeliveryQueue(Spool(tmp_path / "s"), FakeTransport(), reactor=task.Clock())
    assert (q.retry_min, q.retry_max, q.lifetime) == (300.0, 4000.0, 5 * 86400.0)
    assert (POSTFIX_RETRY_MIN, POSTFIX_RETRY_MAX, POSTFIX_LIFETIME) == (300.0, 4000.0, 432000.0)
    lab = queue_settings(LabConfig.load(None))
    assert lab["retry_min"] == 1.0 and lab["retry_max"] == 30.0 and lab["lifetime"] == 600.0
    assert lab["delay_warning"] == 20.0


def test_backoff_doubles_up_to_the_maximum_with_bounded_jitter():
    assert [backoff(n, 300, 4000, NoJitter()) for n in range(1, 7)] == [300, 600, 1200, 2400, 4000, 4000]
    rng = random.Random(1)
    delays = [backoff(1, 300, 4000, rng) for _ in range(200)]
    assert 240 <= min(delays) < 270 and 330 < max(delays) <= 360  # +-20 %, and really random
    assert len({round(d) for d in delays}) > 50


def test_postfix_schedule_with_a_clock_until_the_lifetime_bounces(tmp_path):
    """Retries at 300, 900, 2100, 4500, 8500 ... s; after 5 days one bounce, then nothing."""
    always_451 = [{"b@y.test": 451}] * 200
    bounces = []
    q, transport, clock = clocked_queue(
        tmp_path, always_451 + [{}],
        make_bounce=lambda item, content, failed: bounces.append(failed) or MESSAGE)
    q.accept("a@x.test", ["b@y.test"], MESSAGE)
    clock.advance(0)
    while not bounces:  # jump from one scheduled attempt to the next
        clock.advance(min(c.getTime() for c in clock.getDelayedCalls()) - clock.seconds())
    clock.advance(0)
    times = transport.times
    assert times[:6] == [0, 300, 900, 2100, 4500, 8500]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert max(gaps) == 4000
    assert times[-2] == POSTFIX_LIFETIME  # the last try is exactly at the deadline, not a backoff later
    assert [(o.code, o.status) for o in bounces[0]] == [(550, "5.4.7")]
    assert transport.senders[-1] == ""  # the bounce itself goes out from <>
    clock.advance(10 * 4000)
    assert q.items == {} and len(bounces) == 1


def test_delay_warning_is_sent_once_from_the_null_sender(tmp_path):
    script = [{"b@y.test": 451}] * 8 + [{}] * 3
    q, transport, clock = clocked_queue(
        tmp_path, script, retry_min=10, retry_max=40, lifetime=1000, delay_warning=25,
        make_bounce=bounce_maker("mx.x.test", "x.test"))
    q.accept("a@x.test", ["b@y.test"], MESSAGE)
    for _ in range(12):
        clock.advance(10)
    warnings = [c for c, s in zip(transport.calls, transport.senders) if s == ""]
    assert len(warnings) == 1
    rcpts, report = warnings[0]
    assert rcpts == ["a@x.test"]
    msg = email.message_from_bytes(report, policy=email.policy.default)
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    status = [p for p in msg.walk() if p.get_content_type() == "message/delivery-status"][0]
    recipient = status.get_payload()[1]  # blocks: per-message, then one per recipient
    assert recipient["Action"] == "delayed" and recipient["Status"].startswith("4.")
    assert recipient["Will-Retry-Until"]
    assert q.stats["delay_warnings"] == 1


def test_no_delay_warning_for_a_bounce(tmp_path):
    q, transport, clock = clocked_queue(
        tmp_path, [{"a@x.test": 451}] * 5 + [{}], retry_min=10, retry_max=10, lifetime=1000,
        delay_warning=5, make_bounce=bounce_maker("mx.x.test", "x.test"))
    q.accept("", ["a@x.test"], MESSAGE)
    for _ in range(8):
        clock.advance(10)
    assert set(transport.senders) == {""} and len(transport.calls) == 6
    assert q.stats["delay_warnings"] == 0


# ---------------------------------------------------------------------------
# DSNs, parsed back with the stdlib email package (RFC 3464)


def test_dsn_for_an_unknown_user_parses_with_status_5_1_1(tmp_path):
    q, transport, clock = clocked_queue(tmp_path, [ValueError("unused")])
    transport.script = []

    def refuse_then_take(item, content):
        transport.calls.append((list(item.pending), content))
        transport.senders.append(item.mail_from)
        if item.mail_from:
            return defer.succeed([Outcome("nobody@y.test", 550, "5.1.1", "<nobody@y.test>: user unknown")])
        return defer.succeed([Outcome(r, 250, "2.0.0", "ok") for r in item.pending])

    q.transport = refuse_then_take
    q.make_bounce = bounce_maker("mx.x.test", "x.test")
    q.accept("a@x.test", ["nobody@y.test"], MESSAGE, message_id="<1@x.test>")
    clock.advance(0)
    clock.advance(0)
    assert transport.senders == ["a@x.test", ""]  # the DSN comes from the null sender
    rcpts, dsn = transport.calls[1]
    assert rcpts == ["a@x.test"]
    msg = email.message_from_bytes(dsn, policy=email.policy.default)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["From"].addresses[0].username == "MAILER-DAEMON"
    assert msg["Auto-Submitted"] == "auto-replied"
    human, status, original = msg.get_payload()
    assert human.get_content_type() == "text/plain" and "nobody@y.test" in human.get_content()
    per_message, per_recipient = status.get_payload()
    assert per_message["Reporting-MTA"] == "dns; mx.x.test"
    assert per_recipient["Final-Recipient"] == "rfc822; nobody@y.test"
    assert per_recipient["Action"] == "failed"
    assert per_recipient["Status"] == "5.1.1"
    assert per_recipient["Diagnostic-Code"].startswith("smtp; 550 5.1.1")
    assert original.get_content_type() == "text/rfc822-headers"
    headers = email.message_from_bytes(original.get_payload(decode=True))
    assert headers["Message-ID"] == "<1@x.test>" and headers["Subject"] == "s"


def test_make_dsn_refuses_an_unknown_action():
    with pytest.raises(ValueError):
        make_dsn("mx.x.test", "x.test", "a@x.test", "Q1", [], MESSAGE, action="relayed")


def test_a_bounce_that_bounces_is_dropped_not_bounced_again(tmp_path):
    """The DSN itself fails permanently: it is dropped with a trace event, no third message."""
    q, transport, clock = clocked_queue(tmp_path, [{"b@y.test": 550}, {"a@x.test": 550}, {}],
                                        make_bounce=bounce_maker("mx.x.test", "x.test"))
    q.accept("a@x.test", ["b@y.test"], MESSAGE)
    for _ in range(4):
        clock.advance(0)
    assert transport.senders == ["a@x.test", ""]
    assert q.stats["bounce_dropped"] == 1 and q.items == {}


# ---------------------------------------------------------------------------
# Disk trouble and torn files


class FullSpool(Spool):
    def store(self, item, content):
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_spool_fails_accept_and_becomes_452_4_3_1(tmp_path):
    q = DeliveryQueue(FullSpool(tmp_path / "s"), FakeTransport(), reactor=task.Clock(), run_blocking=sync)
    failures = []
    q.accept("a@x.test", ["b@y.test"], MESSAGE).addErrback(failures.append)
    reply = spool_failure_reply(failures[0])
    assert (reply.code, reply.status) == (452, "4.3.1")
    assert q.items == {} and q.stats["spool_failed"] == 1


def test_spool_failure_reply_for_each_kind_of_error():
    def reply(error):
        return spool_failure_reply(Failure(error))

    assert reply(OSError(errno.EROFS, "Read-only file system")).status == "4.3.1"
    assert "not writable" in reply(OSError(errno.EACCES, "Permission denied")).text
    assert (reply(OSError(errno.EIO, "I/O error")).code, reply(OSError(errno.EIO, "x")).status) == (451, "4.3.0")
    other = reply(ValueError("not a disk problem"))
    assert isinstance(other, Failure)  # passed on: the protocol answers 451 4.3.0 itself


def test_a_failed_state_write_does_not_stop_the_retries(tmp_path):
    class StatelessSpool(Spool):
        def save_state(self, item):
            raise OSError(errno.ENOSPC, "No space left on device")

    clock = task.Clock()
    transport = FakeTransport({"b@y.test": 451}, {})
    q = DeliveryQueue(StatelessSpool(tmp_path / "s"), transport, reactor=clock, run_blocking=sync,
                      retry_min=10, retry_max=10)
    q.accept("a@x.test", ["b@y.test"], MESSAGE)
    clock.advance(0)
    clock.advance(15)
    assert len(transport.calls) == 2 and q.items == {}


def test_torn_state_file_starts_over_with_every_recipient(tmp_path):
    q, transport, clock = clocked_queue(tmp_path, [{"c@y.test": 451}])
    q.accept("a@x.test", ["b@y.test", "c@y.test"], MESSAGE)
    clock.advance(0)
    (qid,) = q.items
    state = Path(q.spool._state(qid))
    assert json.loads(state.read_bytes())["pending"] == ["c@y.test"]
    state.write_bytes(b'{"pending": ["c@y')  # the crash tore it
    items, corrupt = Spool(tmp_path / "spool").recover()
    assert corrupt == [] and items[0].pending == ["b@y.test", "c@y.test"]  # a duplicate, never a loss


def test_truncated_message_body_is_quarantined_not_delivered(tmp_path):
    spool = Spool(tmp_path / "spool")
    item = QueuedMessage("TORN", "a@x.test", ["b@y.test"])
    spool.store(item, MESSAGE)
    path = spool.queue / "TORN.msg"
    path.write_bytes(path.read_bytes()[:-10])  # a disk that lied about fsync
    with pytest.raises(CorruptSpoolFile, match="body is"):
        spool.load("TORN")
    items, corrupt = spool.recover()
    assert items == [] and corrupt == ["TORN"] and (spool.corrupt / "TORN.msg").exists()


def test_orphan_state_files_are_cleared_and_scan_is_read_only(tmp_path):
    spool = Spool(tmp_path / "spool")
    spool.store(QueuedMessage("KEEP", "a@x.test", ["b@y.test"]), MESSAGE)
    (spool.queue / "GONE.state").write_bytes(b"{}")
    (spool.tmp / "half").write_bytes(b"x")
    assert [i.queue_id for i in spool.scan()] == ["KEEP"]
    assert (spool.tmp / "half").exists()  # scan() touches nothing
    spool.recover()
    assert not (spool.queue / "GONE.state").exists() and not (spool.tmp / "half").exists()


def test_finished_files_are_recycled_not_deleted(tmp_path, monkeypatch):
    """The spool reuses a finished message's inode for the next one (see agents.spool)."""
    spool = Spool(tmp_path / "spool")
    spool.store(QueuedMessage("FIRST", "a@x.test", ["b@y.test"]), MESSAGE + b"x" * 500)
    inode = os.stat(spool.queue / "FIRST.msg").st_ino
    spool.remove("FIRST")
    assert not (spool.queue / "FIRST.msg").exists() and (spool.free / "FIRST").exists()
    synced = []
    monkeypatch.setattr(durable, "_fsync_directory_now", synced.append)
    spool.store(QueuedMessage("SECOND", "a@x.test", ["c@y.test"]), MESSAGE)
    assert os.stat(spool.queue / "SECOND.msg").st_ino == inode  # the same file, overwritten
    # The rename left free/ and entered queue/: both are made durable, so a
    # crash cannot leave the file with two names.
    assert sorted(synced) == sorted([str(spool.queue), str(spool.free)])
    assert list(spool.free.iterdir()) == [] and list(spool.tmp.iterdir()) == []
    loaded = spool.load("SECOND")  # cut to the new, shorter length: nothing of FIRST is left
    assert loaded.recipients == ["c@y.test"] and spool.content("SECOND") == MESSAGE


def test_free_files_are_bounded_and_cleared_at_start(tmp_path, monkeypatch):
    monkeypatch.setattr(spool_module, "MAX_FREE_FILES", 2)
    spool = Spool(tmp_path / "spool")
    for n in range(3):
        spool.store(QueuedMessage(f"M{n}", "a@x.test", ["b@y.test"]), MESSAGE)
    for n in range(3):
        spool.remove(f"M{n}")
    assert sorted(p.name for p in spool.free.iterdir()) == ["M0", "M1"]  # the third was deleted
    assert list(spool.queue.iterdir()) == []
    for n in range(2):
        spool.store(QueuedMessage(f"N{n}", "a@x.test", ["b@y.test"]), MESSAGE)  # reuses M1, M0
    monkeypatch.setattr(spool_module, "MAX_FREE_SIZE", len(MESSAGE))
    spool.store(QueuedMessage("BIG", "a@x.test", ["b@y.test"]), MESSAGE)
    spool.remove("BIG")  # envelope line + message: over the size limit, so deleted
    assert list(spool.free.iterdir()) == []
    monkeypatch.setattr(spool_module, "MAX_FREE_SIZE", 64 * 1024)
    spool.remove("N0")
    spool.remove("N1")
    # A free file a new message was being written over when the agent died:
    assert sorted(p.name for p in spool.free.iterdir()) == ["N0", "N1"]
    (spool.free / "N0").write_bytes(b"half of a new message")
    restarted = Spool(tmp_path / "spool")
    assert restarted.recover() == ([], [])
    assert list(restarted.free.iterdir()) == []  # trust nothing unsynced


def test_a_failed_write_over_a_free_file_leaves_nothing_behind(tmp_path, monkeypatch):
    spool = Spool(tmp_path / "spool")
    spool.store(QueuedMessage("OLD", "a@x.test", ["b@y.test"]), MESSAGE)
    spool.remove("OLD")

    def disk_error(fd):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "fsync", disk_error)
    with pytest.raises(OSError):
        spool.store(QueuedMessage("NEW", "a@x.test", ["b@y.test"]), MESSAGE)
    monkeypatch.undo()
    # No half-overwritten file is left anywhere, and none is counted as free:
    assert [list(d.iterdir()) for d in (spool.queue, spool.free, spool.tmp)] == [[], [], []]
    spool.store(QueuedMessage("NEXT", "a@x.test", ["b@y.test"]), MESSAGE)
    assert spool.content("NEXT") == MESSAGE


def test_a_vanished_free_file_means_a_new_file(tmp_path):
    spool = Spool(tmp_path / "spool")
    spool.store(QueuedMessage("OLD", "a@x.test", ["b@y.test"]), MESSAGE)
    spool.remove("OLD")
    (spool.free / "OLD").unlink()  # an operator cleaned up by hand
    spool.store(QueuedMessage("NEW", "a@x.test", ["b@y.test"]), MESSAGE)
    assert spool.content("NEW") == MESSAGE


# ---------------------------------------------------------------------------
# Operating the queue: list, show, hold, release, flush, delete


def test_hold_release_flush_and_delete(tmp_path):
    q, transport, clock = clocked_queue(tmp_path, [{"b@y.test": 451}] * 10, retry_min=100, retry_max=100)
    q.accept("a@x.test", ["b@y.test"], MESSAGE, message_id="<1@x.test>")
    clock.advance(0)
    (qid,) = q.items
    [entry] = q.list()
    assert entry["pending"] == ["b@y.test"] and entry["attempts"] == 1 and entry["last_error"].startswith("451")
    assert q.show(qid).result["headers"].startswith("From: a@x.test")

    q.hold(qid)
    clock.advance(500)
    assert len(transport.calls) == 1 and q.list()[0]["held"]
    assert q.flush() == 0  # held messages are not flushed
    recovered = DeliveryQueue(Spool(tmp_path / "spool"), FakeTransport(), reactor=task.Clock(), run_blocking=sync)
    recovered.recover()
    assert recovered.items[qid].held  # the hold survives a restart

    q.release(qid)
    clock.advance(0)
    assert len(transport.calls) == 2
    assert q.flush() == 1 and len(transport.calls) == 3  # now, not in 100 s
    assert q.flush(qid) == 1 and len(transport.calls) == 4

    q.delete(qid)
    clock.advance(1000)
    assert len(transport.calls) == 4 and q.items == {} and list(q.spool.queue.iterdir()) == []
    assert list(q.spool.free.iterdir()) == []  # deleted by an operator: gone, not kept for reuse
    with pytest.raises(NoSuchMessage):
        q.hold(qid)


def test_delete_during_an_attempt_forgets_the_message(tmp_path):
    pending = defer.Deferred()
    clock = task.Clock()
    q = DeliveryQueue(Spool(tmp_path / "s"), lambda item, content: pending, reactor=clock, run_blocking=sync)
    q.accept("a@x.test", ["b@y.test"], MESSAGE)
    clock.advance(0)
    (qid,) = q.items
    assert q.list()[0]["active"]
    q.delete(qid)
    pending.callback([Outcome("b@y.test", 451, "4.0.0", "later")])
    clock.advance(1000)
    assert q.items == {} and list(q.spool.queue.iterdir()) == []
