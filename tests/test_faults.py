"""Fault injection (agents.faults) and the MTA's answer to a full disk, at protocol level.

No sockets: an SMTPServer on a StringTransport, a task.Clock for delays, a
spool in a temporary directory.
"""

from __future__ import annotations

import errno
from types import SimpleNamespace

import pytest
from twisted.internet import defer, task

from agents.config import AgentSpec, LabConfig
from agents.faults import Fault, FaultSet, FaultyHandler, FaultySpool
from agents.ledger import DeliveryLedger, LedgerStore
from agents.lmtp import LMTPServerFactory
from agents.queue import DeliveryQueue
from agents.smtpserver import HANGUP, Reply, ServerPolicy, SMTPHandler
from agents.spool import Spool
from agents.trace import NULL_TRACER
from test_smtpserver import PEER, RecordingHandler, RecordingTracer, codes, connect, ehlo, replies, talk

MESSAGE = b"From: alice@sender.test\r\nTo: bob@recipient.test\r\nMessage-ID: <f1@sender.test>\r\n\r\nhi\r\n"


def faulty(*faults, clock=None, handler=None, tracer=None):
    """A session whose handler has ``faults`` (dicts of Fault arguments) in front of it."""
    fs = FaultSet()
    for f in faults:
        fs.add(**f)
    inner = handler or RecordingHandler()
    wrapped = FaultyHandler(inner, fs, clock or task.Clock(), tracer or NULL_TRACER)
    proto, t, _ = connect(handler=wrapped, tracer=tracer)
    return proto, t, inner, fs


def transaction(proto, t, rcpt=b"bob@lab.test"):
    lines = ehlo(proto, t)
    lines += talk(proto, t, b"MAIL FROM:<alice@sender.test>\r\n")
    lines += talk(proto, t, b"RCPT TO:<" + rcpt + b">\r\n")
    return lines


# ---------------------------------------------------------------------------
# The protocol's one addition: a handler may hang up instead of answering


def test_hangup_verdict_drops_the_connection_without_a_reply():
    handler = RecordingHandler(DATA=HANGUP)
    proto, t, _ = connect(handler=handler)
    replies(t)
    transaction(proto, t)
    assert codes(talk(proto, t, b"DATA\r\n")) == [354]
    assert talk(proto, t, MESSAGE + b".\r\nNOOP\r\n") == []  # nothing after the dot, ever
    assert t.disconnected and t.disconnecting
    assert handler.delivered == [MESSAGE]


def test_without_faults_the_wrapper_changes_nothing():
    proto, t, inner, _ = faulty()
    assert codes(replies(t)) == [220]
    lines = transaction(proto, t)
    assert codes(lines) == [250, 250, 250]
    assert codes(talk(proto, t, b"DATA\r\n")) == [354]
    assert codes(talk(proto, t, MESSAGE + b".\r\n")) == [250]
    assert [c[0] for c in inner.calls] == ["CONNECT", "EHLO", "MAIL", "RCPT", "DATA"]


# ---------------------------------------------------------------------------
# The kinds


def test_refuse_answers_421_instead_of_the_greeting_and_closes():
    tracer = RecordingTracer()
    proto, t, inner, fs = faulty({"kind": "refuse"}, tracer=tracer)
    lines = replies(t)
    assert lines[0].startswith(b"421 4.3.2 fault injected") and t.disconnecting
    assert tracer.first("fault")["kind"] == "refuse"
    assert fs.faults[0].fired == 1


def test_refuse_with_554_keeps_the_session_but_refuses_everything():
    proto, t, _, _ = faulty({"kind": "refuse", "code": 554})
    assert replies(t)[0].startswith(b"554 5.3.2")
    assert codes(talk(proto, t, b"EHLO c.test\r\n")) == [503]  # RFC 5321 3.1: only QUIT now


def test_reply_at_rcpt_answers_for_the_agent_and_count_limits_it():
    proto, t, inner, fs = faulty({"kind": "reply", "stage": "rcpt", "code": 452, "status": "4.2.2", "count": 1})
    replies(t)
    lines = transaction(proto, t)
    assert lines[-1].startswith(b"452 4.2.2 fault injected by mailpipe (reply at rcpt")
    assert inner.called("RCPT") == []  # the agent was not asked
    assert codes(talk(proto, t, b"RCPT TO:<bob@lab.test>\r\n")) == [250]  # count=1: spent
    assert (fs.faults[0].seen, fs.faults[0].fired) == (2, 1)


def test_reply_at_data_for_lmtp_is_one_reply_per_recipient():
    fs = FaultSet()
    fs.add("reply", stage="data", code=451)
    inner = RecordingHandler(DATA=[Reply(250, "2.0.0", "ok")] * 2)
    factory = LMTPServerFactory(ServerPolicy(hostname="lmtp.lab.test"), FaultyHandler(inner, fs, task.Clock()))
    proto = factory.buildProtocol(PEER)
    proto.callLater = task.Clock().callLater
    from twisted.internet.testing import StringTransport

    t = StringTransport(peerAddress=PEER)
    proto.makeConnection(t)
    talk(proto, t, b"LHLO c.test\r\nMAIL FROM:<a@x.test>\r\n")
    talk(proto, t, b"RCPT TO:<b@lab.test>\r\nRCPT TO:<c@lab.test>\r\nDATA\r\n")
    assert codes(talk(proto, t, MESSAGE + b".\r\n")) == [451, 451]
    assert inner.delivered == []


def test_delay_holds_the_reply_until_the_clock_moves():
    clock = task.Clock()
    proto, t, inner, _ = faulty({"kind": "delay", "stage": "mail", "delay": 5.0}, clock=clock)
    replies(t)
    ehlo(proto, t)
    assert talk(proto, t, b"MAIL FROM:<alice@sender.test>\r\n") == []
    clock.advance(4.9)
    assert replies(t) == []
    clock.advance(0.2)
    assert codes(replies(t)) == [250]  # then the agent's own answer
    assert len(inner.called("MAIL")) == 1


def test_delay_and_reply_combine():
    clock = task.Clock()
    proto, t, _, _ = faulty({"kind": "delay", "stage": "rcpt", "delay": 2.0},
                            {"kind": "reply", "stage": "rcpt", "code": 550, "status": "5.1.1"}, clock=clock)
    replies(t)
    assert codes(transaction(proto, t)) == [250, 250]
    clock.advance(2)
    assert codes(replies(t)) == [550]


def test_drop_at_data_hangs_up_before_the_agent_has_the_message():
    proto, t, inner, _ = faulty({"kind": "drop"})
    replies(t)
    transaction(proto, t)
    talk(proto, t, b"DATA\r\n")
    assert talk(proto, t, MESSAGE + b".\r\n") == [] and t.disconnected
    assert inner.delivered == []


def test_drop_after_accept_hangs_up_after_the_agent_took_it():
    """The recipe for a duplicate: stored, but the client never hears 250."""
    proto, t, inner, _ = faulty({"kind": "drop", "after_accept": True})
    replies(t)
    transaction(proto, t)
    talk(proto, t, b"DATA\r\n")
    assert talk(proto, t, MESSAGE + b".\r\n") == [] and t.disconnected
    assert inner.delivered == [MESSAGE]


def test_probability_is_deterministic_for_a_seed():
    def pattern(seed):
        f = Fault("reply", probability=0.3, seed=seed)
        return [f.roll() for _ in range(200)]

    assert pattern(7) == pattern(7)
    assert pattern(7) != pattern(8)
    assert 30 < sum(pattern(7)) < 90  # about 30 % of 200


@pytest.mark.parametrize("args, message", [
    ({"kind": "explode"}, "unknown fault kind"),
    ({"kind": "reply", "stage": "quit"}, "unknown stage"),
    ({"kind": "refuse", "stage": "rcpt"}, "refuse happens at connect"),
    ({"kind": "refuse", "code": 450}, "421"),
    ({"kind": "reply", "code": 250}, "must be a failure"),
    ({"kind": "reply", "code": 451, "status": "5.1.1"}, "must be like 4"),
    ({"kind": "delay"}, "delay > 0"),
    ({"kind": "drop", "code": 451}, "takes no reply code"),
    ({"kind": "reply", "after_accept": True}, "after_accept"),
    ({"kind": "reply", "probability": 1.5}, "probability"),
])
def test_bad_faults_are_refused_with_a_reason(args, message):
    with pytest.raises(ValueError, match=message):
        Fault(**args)


# ---------------------------------------------------------------------------
# A full disk: the MTA answers 452 4.3.1, never 250


def mta_context(tmp_path):
    config = LabConfig.load(None)
    domain = config.domain("recipient.test")
    spec = AgentSpec("mta.recipient.test", "mta", domain.name, domain.address, {"smtp": 1025})
    return SimpleNamespace(config=config, domain=domain, spec=spec, tracer=NULL_TRACER, reactor=task.Clock(),
                           home=SimpleNamespace(root=tmp_path))


def test_disk_full_fault_makes_the_mta_answer_452_4_3_1(tmp_path):
    from agents.mta import TransferPolicy

    ctx = mta_context(tmp_path)
    faults = FaultSet()
    spool = Spool(tmp_path / "spool")
    queue = DeliveryQueue(FaultySpool(spool, faults), lambda item, content: defer.Deferred(),
                          reactor=ctx.reactor, run_blocking=lambda f, *a, **k: defer.maybeDeferred(f, *a, **k))
    faults.add("disk-full", count=1)
    proto, t, _ = connect(handler=TransferPolicy(ctx, queue))
    replies(t)
    transaction(proto, t, rcpt=b"bob@recipient.test")
    talk(proto, t, b"DATA\r\n")
    lines = talk(proto, t, MESSAGE + b".\r\n")
    assert lines[-1].startswith(b"452 4.3.1 Insufficient system storage")
    assert list(spool.queue.iterdir()) == [] and queue.items == {}
    # The disk has room again (count=1): the client's retry is accepted and spooled.
    talk(proto, t, b"MAIL FROM:<alice@sender.test>\r\nRCPT TO:<bob@recipient.test>\r\nDATA\r\n")
    assert codes(talk(proto, t, MESSAGE + b".\r\n")) == [250]
    assert len(list(spool.queue.glob("*.msg"))) == 1


def test_unwritable_spool_directory_is_452_too(tmp_path):
    from agents.mta import TransferPolicy

    class ReadOnlySpool(Spool):  # what a chmod 0555 spool does (root ignores chmod, so simulate it)
        def store(self, item, content):
            raise PermissionError(errno.EACCES, "Permission denied", str(self.tmp))

    ctx = mta_context(tmp_path)
    queue = DeliveryQueue(ReadOnlySpool(tmp_path / "s"), lambda i, c: defer.Deferred(), reactor=ctx.reactor,
                          run_blocking=lambda f, *a, **k: defer.maybeDeferred(f, *a, **k))
    proto, t, _ = connect(handler=TransferPolicy(ctx, queue))
    replies(t)
    transaction(proto, t, rcpt=b"bob@recipient.test")
    talk(proto, t, b"DATA\r\n")
    assert talk(proto, t, MESSAGE + b".\r\n")[-1].startswith(b"452 4.3.1 Insufficient system storage: the spool is not writable")


# ---------------------------------------------------------------------------
# The MDA's ledger: duplicates counted, never dropped


class MemoryStore:
    def __init__(self):
        self.files = []

    def deliver(self, address, content, folder="INBOX"):
        self.files.append((address, folder, content))
        return defer.succeed(f"file{len(self.files)}")


def test_ledger_counts_duplicates_and_remembers_them_across_restarts(tmp_path):
    tracer = RecordingTracer()
    path = tmp_path / "delivered.jsonl"
    store = LedgerStore(MemoryStore(), DeliveryLedger(path), tracer)
    for rcpt in ("bob@recipient.test", "BOB@recipient.test", "carol@recipient.test"):
        store.deliver(rcpt, MESSAGE)
    assert store.ledger.duplicates == 1 and len(store._store.files) == 3  # delivered every time
    assert tracer.first("duplicate") == {"message_id": "<f1@sender.test>", "rcpt": "BOB@recipient.test",
                                         "copies": 2, "maildir_file": "file2"}
    store.ledger.close()
    with open(path, "a") as f:
        f.write('{"message_id": "<torn')  # a crash mid-line
    again = LedgerStore(MemoryStore(), DeliveryLedger(path), tracer)
    assert again.ledger.duplicates == 1
    again.deliver("bob@recipient.test", MESSAGE)
    assert again.ledger.duplicates == 2


def test_disk_full_fault_at_the_mda_fails_the_delivery(tmp_path):
    faults = FaultSet()
    faults.add("disk-full")
    store = LedgerStore(MemoryStore(), DeliveryLedger(tmp_path / "l.jsonl"), NULL_TRACER, faults)
    failures = []
    store.deliver("bob@recipient.test", MESSAGE).addErrback(failures.append)
    assert failures[0].value.errno == errno.ENOSPC and store._store.files == []


class _Quiet(SMTPHandler):
    pass


def test_wrapper_passes_other_attributes_through():
    inner = _Quiet()
    inner.is_own_msa = lambda session: True
    wrapped = FaultyHandler(inner, FaultSet(), task.Clock())
    assert wrapped.is_own_msa(None) is True
