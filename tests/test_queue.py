"""The spool and the delivery queue, driven by a fake clock (no reactor, no sockets)."""

from __future__ import annotations

import email
import email.policy

from twisted.internet import defer, task

from agents.dsn import bounce_maker
from agents.queue import DeliveryQueue, Outcome
from agents.spool import Spool

MESSAGE = b"From: a@x.test\r\nTo: b@y.test\r\nSubject: s\r\nMessage-ID: <1@x.test>\r\n\r\nbody\r\n"


def sync(f, *args):
    return defer.maybeDeferred(f, *args)


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
