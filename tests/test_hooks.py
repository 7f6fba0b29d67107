"""The hook API: verdicts, containment of failing hooks, and the SMTP wiring (no sockets)."""

from __future__ import annotations

import pytest
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from agents.hooks import (
    CONTINUE, HookContext, HookedHandler, HookRunner, Hook, MessageView, accept, event_of,
    load_file, reject, tempfail,
)
from agents.smtpserver import Reply, ServerPolicy, SMTPHandler, SMTPServerFactory


PEER = IPv4Address("TCP", "192.0.2.9", 4000)


class Storing(SMTPHandler):
    def __init__(self):
        self.stored = []

    def handle_DATA(self, session, envelope):
        self.stored.append(envelope.content)
        return Reply(250, "2.0.0", "stored")


def server(hooks, clock=None):
    ctx = HookContext("mta.x.test", "mta", "x.test", clock=(clock or task.Clock()).seconds)
    inner = Storing()
    handler = HookedHandler(inner, HookRunner(hooks, ctx))
    proto = SMTPServerFactory(ServerPolicy(hostname="mx.x.test"), handler).buildProtocol(PEER)
    proto.callLater = task.Clock().callLater  # idle timers on a fake clock, not the reactor
    t = StringTransport(peerAddress=PEER)
    proto.makeConnection(t)
    t.clear()
    return proto, t, inner


def say(proto, t, data: bytes) -> list[bytes]:
    t.clear()
    proto.dataReceived(data)
    return [l for l in t.value().split(b"\r\n") if l]


def transaction(proto, t, rcpt=b"b@x.test"):
    say(proto, t, b"EHLO c.test\r\n")
    say(proto, t, b"MAIL FROM:<a@y.test>\r\n")
    return say(proto, t, b"RCPT TO:<" + rcpt + b">\r\n")


def test_event_names_come_from_function_names():
    assert event_of("on_rcpt") == "rcpt" and event_of("hook_data") == "data"
    assert event_of("on_nonsense") is None and event_of("helper") is None


def test_reject_and_tempfail_become_replies_and_the_session_goes_on():
    hooks = [Hook("t:on_rcpt", "rcpt", lambda ctx, s, e, a: reject("no", 550, "5.7.1") if a.startswith("bad") else None)]
    proto, t, _ = server(hooks)
    assert transaction(proto, t, b"bad@x.test") == [b"550 5.7.1 no"]
    assert say(proto, t, b"RCPT TO:<good@x.test>\r\n")[0].startswith(b"250")


def test_greylisting_style_hook_with_an_injected_clock():
    clock = task.Clock()

    def on_rcpt(ctx, session, envelope, address):
        key = (session.peer, envelope.mail_from, address)
        first = ctx.state.setdefault("seen", {}).setdefault(key, ctx.clock())
        if ctx.clock() - first < 60:
            return tempfail("greylisted, try again in a minute")
        return CONTINUE

    proto, t, _ = server([Hook("grey:on_rcpt", "rcpt", on_rcpt)], clock)
    assert transaction(proto, t)[0].startswith(b"451 4.7.1")
    clock.advance(61)
    proto2, t2, _ = server([Hook("grey:on_rcpt", "rcpt", on_rcpt)], clock)
    # A new server shares nothing: state lives in the context of one runner.
    assert transaction(proto2, t2)[0].startswith(b"451")


def test_a_hook_that_raises_is_contained_with_a_tempfail():
    def broken(ctx, session, envelope, address):
        raise RuntimeError("student bug")

    trace = []
    proto, t, _ = server([Hook("bug:on_rcpt", "rcpt", broken)])
    proto.factory.handler.runner.ctx.tracer = type("T", (), {"event": lambda self, n, **f: trace.append((n, f))})()
    assert transaction(proto, t) == [b"451 4.3.0 Requested action aborted: local error in processing"]
    assert trace[0][0] == "hook.error" and trace[0][1]["hook"] == "bug:on_rcpt"
    assert say(proto, t, b"NOOP\r\n") == [b"250 2.0.0 OK"]


def test_a_hook_returning_garbage_is_contained_too():
    proto, t, _ = server([Hook("g:on_mail", "mail", lambda *a: "yes please")])
    say(proto, t, b"EHLO c.test\r\n")
    assert say(proto, t, b"MAIL FROM:<a@y.test>\r\n")[0].startswith(b"451 4.3.0")


def test_async_and_deferred_hooks():
    d = defer.Deferred()

    async def on_mail(ctx, session, envelope, address):
        return await d

    proto, t, _ = server([Hook("a:on_mail", "mail", on_mail)])
    say(proto, t, b"EHLO c.test\r\n")
    assert say(proto, t, b"MAIL FROM:<a@y.test>\r\nRCPT TO:<b@x.test>\r\n") == []  # waits, in order
    t.clear()
    d.callback(reject("no mail today", 550, "5.7.1"))
    assert [l for l in t.value().split(b"\r\n") if l] == [b"550 5.7.1 no mail today", b"503 5.5.1 Need MAIL before RCPT"]


def test_data_hook_adds_a_header_that_reaches_the_stored_message():
    def on_data(ctx, session, envelope, message):
        assert message.get("Subject") == "hi"
        message.add_header("X-Spam-Score", "1.5")

    proto, t, inner = server([Hook("s:on_data", "data", on_data)])
    transaction(proto, t)
    say(proto, t, b"DATA\r\n")
    assert say(proto, t, b"Subject: hi\r\n\r\nbody\r\n.\r\n") == [b"250 2.0.0 stored"]
    assert inner.stored == [b"X-Spam-Score: 1.5\r\nSubject: hi\r\n\r\nbody\r\n"]


def test_data_accept_still_stores_the_message():
    proto, t, inner = server([Hook("s:on_data", "data", lambda *a: accept())])
    transaction(proto, t)
    say(proto, t, b"DATA\r\n")
    say(proto, t, b"Subject: x\r\n\r\nbody\r\n.\r\n")
    assert len(inner.stored) == 1


def test_headers_cannot_be_injected():
    view = MessageView(b"Subject: x\r\n\r\nb\r\n")
    with pytest.raises(ValueError):
        view.add_header("X-Evil", "a\r\nBcc: victim@x.test")


def test_verdict_helpers_check_their_codes():
    with pytest.raises(ValueError):
        reject(code=451)
    with pytest.raises(ValueError):
        tempfail(code=550)


def test_load_file_finds_every_on_function(tmp_path):
    f = tmp_path / "mine.py"
    f.write_text("def on_rcpt(ctx, s, e, a):\n    return None\n\ndef helper():\n    pass\n\ndef on_data(ctx, s, e, m):\n    pass\n")
    assert sorted(h.event for h in load_file(f)) == ["data", "rcpt"]
