"""The control channel (agents.control): AMP responders in memory, the blocking client on a real socket.

The agent side is driven through Twisted's in-memory transport (iosim), the
client side against a tiny AMP server in a thread, so neither needs a
running reactor.
"""

from __future__ import annotations

import socket
import threading
from types import SimpleNamespace

import pytest
from twisted.internet import defer, task
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.test import iosim

from agents.control import (
    AgentControl,
    AgentNotRunning,
    ControlClient,
    ControlError,
    ControlProtocol,
    FaultClear,
    FaultList,
    FaultSetCommand,
    QueueFlush,
    QueueHold,
    QueueList,
    QueueShow,
    Stats,
    read_box,
)
from agents.queue import DeliveryQueue, Outcome
from agents.spool import Spool
from agents.trace import NULL_TRACER

MESSAGE = b"From: a@x.test\r\nTo: b@y.test\r\nSubject: s\r\nMessage-ID: <c1@x.test>\r\n\r\nbody\r\n"


def agent(tmp_path, with_queue=True):
    clock = task.Clock()
    ctx = SimpleNamespace(reactor=clock, tracer=NULL_TRACER, home=SimpleNamespace(root=tmp_path),
                          spec=SimpleNamespace(name="mta.x.test", role="mta" if with_queue else "mda"))
    queue = None
    if with_queue:
        def transport(item, content):
            return defer.succeed([Outcome(r, 451, "4.4.1", "connection refused") for r in item.pending])

        queue = DeliveryQueue(Spool(tmp_path / "spool"), transport, reactor=clock, retry_min=60, retry_max=60,
                              run_blocking=lambda f, *a, **k: defer.maybeDeferred(f, *a, **k))
    return AgentControl(ctx, queue=queue, listen=False), clock


def call(control, command, **arguments):
    """One AMP call over an in-memory connection; returns the answer or raises its error."""
    client, server, pump = iosim.connectedServerAndClient(lambda: ControlProtocol(control), amp.AMP)
    box = []
    client.callRemote(command, **arguments).addBoth(box.append)
    pump.flush()
    if isinstance(box[0], Failure):
        box[0].raiseException()
    return box[0]


def test_queue_list_show_hold_flush_over_amp(tmp_path):
    control, clock = agent(tmp_path)
    for i in range(3):
        control.queue.accept("a@x.test", [f"b{i}@y.test"], MESSAGE, message_id=f"<c{i}@x.test>")
    clock.advance(0)
    page = call(control, QueueList, offset=0, limit=2)
    assert page["total"] == 3 and len(page["messages"]) == 2
    first = page["messages"][0]
    assert first["pending"] == ["b0@y.test"] and first["attempts"] == 1
    assert first["last_error"] == "451 4.4.1 connection refused" and first["size"] == len(MESSAGE)
    qid = first["queue_id"]
    shown = call(control, QueueShow, queue_id=qid)
    assert shown["message_id"] == "<c0@x.test>" and "Subject: s" in shown["headers"]
    call(control, QueueHold, queue_id=qid)
    assert call(control, QueueFlush)["flushed"] == 2  # the held one stays
    assert call(control, QueueList, offset=0, limit=100)["messages"][0]["held"] is True


def test_unknown_queue_id_is_an_amp_error(tmp_path):
    control, _ = agent(tmp_path)
    from agents.queue import NoSuchMessage

    with pytest.raises(NoSuchMessage):
        call(control, QueueShow, queue_id="NOPE")


def test_an_mda_has_faults_but_no_queue(tmp_path):
    control, _ = agent(tmp_path, with_queue=False)
    from agents.control import NoQueue

    with pytest.raises(NoQueue):
        call(control, QueueList, offset=0, limit=10)
    fault = call(control, FaultSetCommand, kind="drop", after_accept=True, seed=3)
    assert (fault["kind"], fault["stage"], fault["after_accept"], fault["seed"]) == ("drop", "data", True, 3)
    assert [f["id"] for f in call(control, FaultList)["faults"]] == [fault["id"]]
    with pytest.raises(ValueError):
        call(control, FaultSetCommand, kind="reply", code=250)
    assert call(control, FaultClear)["cleared"] == 1
    stats = call(control, Stats)
    assert stats["agent"] == "mta.x.test" and {c["name"] for c in stats["counters"]} == {"faults_fired"}


# ---------------------------------------------------------------------------
# The blocking client, against a one-shot AMP server in a thread


def serve_once(path, answer):
    """Accept one connection, read one box, answer with ``answer(request)``."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    seen = []

    def run():
        conn, _ = listener.accept()
        with conn:
            request = read_box(conn)
            seen.append(request)
            reply = answer(request)
            conn.sendall(reply.serialize())
        listener.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, seen


def test_client_writes_an_amp_box_and_decodes_the_answer(tmp_path):
    path = tmp_path / "a.ctl"

    def answer(request):
        box = QueueFlush.makeResponse({"flushed": 3}, None)
        box[b"_answer"] = request[b"_ask"]
        return box

    thread, seen = serve_once(path, answer)
    result = ControlClient(path, "mta.x.test").call(QueueFlush, queue_id="Q1")
    thread.join(5)
    assert result == {"flushed": 3}
    assert seen[0][b"_command"] == b"QueueFlush" and seen[0][b"queue_id"] == b"Q1"


def test_client_raises_the_agents_error(tmp_path):
    path = tmp_path / "a.ctl"

    def answer(request):
        return amp.AmpBox(_error=request[b"_ask"], _error_code=b"NO_SUCH_MESSAGE",
                          _error_description=b"'Q9'")

    thread, _ = serve_once(path, answer)
    with pytest.raises(ControlError) as e:
        ControlClient(path, "mta.x.test").call(QueueShow, queue_id="Q9")
    thread.join(5)
    assert e.value.code == "NO_SUCH_MESSAGE" and "Q9" in str(e.value)


def test_client_says_when_the_agent_is_not_running(tmp_path):
    with pytest.raises(AgentNotRunning, match="mailpipe start mta.x.test"):
        ControlClient(tmp_path / "none.ctl", "mta.x.test").call(Stats)
    stale = tmp_path / "stale.ctl"  # left behind by a kill -9
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()
    with pytest.raises(AgentNotRunning):
        ControlClient(stale, "mta.x.test").call(Stats)


def test_read_box_reads_the_wire_format():
    a, b = socket.socketpair()
    with a, b:
        a.sendall(b"\x00\x03key\x00\x05value\x00\x01k\x00\x00\x00\x00")
        assert read_box(b) == {b"key": b"value", b"k": b""}


def test_an_agent_dying_during_the_call_counts_as_not_running(tmp_path):
    path = tmp_path / "dying.ctl"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)

    def die():
        conn, _ = listener.accept()
        conn.close()  # what a process killed mid-call does to its connections
        listener.close()

    thread = threading.Thread(target=die, daemon=True)
    thread.start()
    with pytest.raises(AgentNotRunning, match="broke"):
        ControlClient(path, "mta.x.test").call(Stats)
    thread.join(5)
