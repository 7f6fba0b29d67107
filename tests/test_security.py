"""Abuse controls without sockets: the throttle, the rate limiter, routing tricks, the monitor.

Time is a ``task.Clock``: a test advances it by hand and checks that no reply
comes before its delay and that it comes right after. The real-socket tests
against a running lab are in ``tests/test_security_live.py``.
"""

from __future__ import annotations

import json

import pytest
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address

from agents.config import LabConfig
from agents.guards import RelayGuard, SubmissionGuard
from agents.imap import make_imap_factory
from agents.maildir import MailStore
from agents.monitor import counts_over_time, format_summary, pick_bucket, security_events, summarise
from agents.pop3 import make_pop3_factory
from agents.security import (
    EVENTS,
    LoginBlocked,
    LoginThrottle,
    RateLimiter,
    SecuritySettings,
    SecuritySettingsError,
    ThrottledPortal,
    routing_trick,
)
from agents.smtpserver import ServerPolicy, Session
from test_smtpserver import (
    FakeTLSTransport,
    RecordingTracer,
    auth_portal,
    codes,
    connect,
    ehlo,
    plain,
    replies,
    talk,
)

# ---------------------------------------------------------------------------
# LoginThrottle


def throttle(clock, **kw) -> LoginThrottle:
    kw = {"base_delay": 0.5, "max_delay": 4.0, "max_failures": 6, "window": 600.0, **kw}
    return LoginThrottle(clock, **kw)


def test_delay_doubles_from_the_base_up_to_the_cap():
    t = throttle(task.Clock())
    assert [t.delay(n) for n in range(0, 8)] == [0.0, 0.5, 1.0, 2.0, 4.0, 4.0, 4.0, 4.0]
    assert t.delay(10_000) == 4.0  # no overflow however long the attack


def test_failures_block_after_the_limit_and_age_out_of_the_window():
    clock = task.Clock()
    t = throttle(clock, max_failures=3, window=100)
    verdicts = []
    for _ in range(3):
        assert t.begin("192.0.2.1")
        verdicts.append(t.end("192.0.2.1", ok=False))
        clock.advance(10)
    assert [(v.failures, v.delay, v.blocked) for v in verdicts] == [(1, 0.5, False), (2, 1.0, False), (3, 2.0, True)]
    assert t.is_blocked("192.0.2.1") and not t.begin("192.0.2.1")
    assert not t.is_blocked("192.0.2.2"), "another address is not affected"
    clock.advance(71)  # now 101 s after the first failure: it is forgotten
    assert t.failures("192.0.2.1") == 2 and not t.is_blocked("192.0.2.1")


def test_success_is_not_counted_and_does_not_reset_the_failures():
    t = throttle(task.Clock())
    t.begin("c")
    t.end("c", ok=False)
    t.begin("c")
    assert t.end("c", ok=True) is None
    assert t.failures("c") == 1  # an attacker with one account cannot wipe the record
    t.begin("c")
    assert t.end("c", ok=None) is None  # a broken backend is not the client's guess
    assert t.failures("c") == 1


def test_logins_in_flight_are_bounded_and_count_once_the_client_has_failed():
    """Fifty parallel guesses cannot all slip in before the first failure is recorded."""
    t = throttle(task.Clock(), max_failures=3)
    t.max_concurrent = 10
    started = [t.begin("c") for _ in range(50)]
    assert started.count(True) == 10
    for _ in range(3):
        t.end("c", ok=False)
    assert t.is_blocked("c")
    # After a failure, logins in progress count: one failure + two in flight = 3.
    t2 = throttle(task.Clock(), max_failures=3)
    t2.begin("d")
    t2.end("d", ok=False)
    assert [t2.begin("d") for _ in range(5)].count(True) == 2


def test_a_client_with_many_connections_and_the_right_password_is_not_held_up():
    t = throttle(task.Clock(), max_failures=3)
    assert all(t.begin("mua") for _ in range(10))
    for _ in range(10):
        assert t.end("mua", ok=True) is None
    assert not t.is_blocked("mua")


def test_idle_clients_are_forgotten_so_memory_stays_bounded(monkeypatch):
    clock = task.Clock()
    t = throttle(clock, window=10)
    monkeypatch.setattr(LoginThrottle, "MAX_CLIENTS", 5)
    for i in range(5):
        t.begin(f"c{i}")
        t.end(f"c{i}", ok=False)
    clock.advance(11)
    t.begin("new")
    assert set(t._clients) == {"new"}


# ---------------------------------------------------------------------------
# ThrottledPortal


def checker_portal():
    from twisted.cred.portal import IRealm, Portal
    from zope.interface import Interface, implementer

    class IThing(Interface):
        pass

    @implementer(IRealm)
    class Realm:
        def requestAvatar(self, avatar_id, mind, *interfaces):
            return IThing, avatar_id, lambda: None

    checker = InMemoryUsernamePasswordDatabaseDontUse(alice=b"right")
    return Portal(Realm(), [checker]), IThing


def results(d):
    box = []
    d.addBoth(box.append)
    return box


def test_throttled_portal_delays_only_failures_then_blocks():
    clock = task.Clock()
    real, iface = checker_portal()
    tracer = RecordingTracer()
    blocked_calls = []
    t = throttle(clock, max_failures=2)
    portal = ThrottledPortal(real, t, "192.0.2.9", protocol="imap", tracer=tracer, conn="c1",
                             on_blocked=lambda: blocked_calls.append(1))  # fmt: skip

    good = results(portal.login(UsernamePassword(b"alice", b"right"), None, iface))
    assert good and good[0][1] == b"alice", "a correct password is answered at once"

    first = results(portal.login(UsernamePassword(b"alice", b"wrong"), None, iface))
    assert first == []
    clock.advance(0.49)
    assert first == []
    clock.advance(0.01)
    assert first[0].check(UnauthorizedLogin) and not first[0].check(LoginBlocked)

    second = results(portal.login(UsernamePassword(b"alice", b"wrong"), None, iface))
    clock.advance(1.0)
    assert second[0].check(LoginBlocked) and blocked_calls == [1]

    again = results(portal.login(UsernamePassword(b"alice", b"right"), None, iface))
    assert again[0].check(LoginBlocked), "blocked: not even the right password is checked"
    names = [n for n, _ in tracer.events]
    assert names == ["security.login_failed", "security.login_failed", "security.login_blocked"]
    assert tracer.first("security.login_failed") == {
        "conn": "c1", "peer": "192.0.2.9", "protocol": "imap", "user": "alice",
        "failures": 1, "delay": 0.5, "blocked": False,
    }  # fmt: skip


# ---------------------------------------------------------------------------
# SMTP AUTH with the throttle (protocol level)


def throttled_smtp(clock, t, tracer=None):
    policy = ServerPolicy(hostname="smtp.lab.test", tls_context=object(), require_auth=True, login_throttle=t)
    transport = FakeTLSTransport()
    proto, tr, _ = connect(policy, portal=auth_portal(), tracer=tracer, transport=transport, clock=clock)
    talk(proto, tr, b"EHLO client.test\r\nSTARTTLS\r\n")
    ehlo(proto, tr)
    return proto, tr


def test_smtp_failed_auth_is_answered_later_and_the_session_waits():
    clock = task.Clock()
    proto, tr = throttled_smtp(clock, throttle(clock))
    # The NOOP pipelined behind the AUTH must not be answered before it.
    assert talk(proto, tr, b"AUTH PLAIN " + plain(b"alice@lab.test", b"nope") + b"\r\nNOOP\r\n") == []
    clock.advance(0.5)
    assert codes(replies(tr)) == [535, 250]


def test_smtp_421_4_7_0_and_disconnect_after_the_limit_and_on_reconnect():
    clock = task.Clock()
    t = throttle(clock, max_failures=3)
    tracer = RecordingTracer()
    proto, tr = throttled_smtp(clock, t, tracer)
    for delay in (0.5, 1.0):
        talk(proto, tr, b"AUTH PLAIN " + plain(b"alice@lab.test", b"nope") + b"\r\n")
        clock.advance(delay)
        assert codes(replies(tr)) == [535]
    talk(proto, tr, b"AUTH PLAIN " + plain(b"alice@lab.test", b"nope") + b"\r\n")
    clock.advance(2.0)
    assert replies(tr) == [b"421 4.7.0 Too many failed authentication attempts, closing connection"]
    assert tr.disconnecting

    # A new connection from the same address: refused at once, even with the right password.
    proto, tr = throttled_smtp(clock, t)
    assert codes(talk(proto, tr, b"AUTH PLAIN " + plain(b"alice@lab.test", b"s3cret") + b"\r\n")) == [421]
    assert tr.disconnecting
    assert [n for n, _ in tracer.events if n.startswith("security.")] == ["security.login_failed"] * 3


def test_smtp_successful_auth_is_never_delayed():
    clock = task.Clock()
    t = throttle(clock)
    proto, tr = throttled_smtp(clock, t)
    talk(proto, tr, b"AUTH PLAIN " + plain(b"alice@lab.test", b"nope") + b"\r\n")
    clock.advance(0.5)
    talk(proto, tr, b"")
    # After a failure, the right password still gets its answer with no clock advance.
    assert codes(talk(proto, tr, b"AUTH PLAIN " + plain(b"alice@lab.test", b"s3cret") + b"\r\n")) == [235]


def test_smtp_cleartext_auth_and_starttls_injection_are_security_events():
    tracer = RecordingTracer()
    proto, tr, _ = connect(ServerPolicy(hostname="smtp.lab.test", tls_context=object()),
                           portal=auth_portal(), tracer=tracer, transport=FakeTLSTransport())  # fmt: skip
    ehlo(proto, tr)
    assert codes(talk(proto, tr, b"AUTH PLAIN " + plain(b"alice@lab.test", b"s3cret") + b"\r\n")) == [538]
    talk(proto, tr, b"STARTTLS\r\nMAIL FROM:<evil@x.test>\r\n")
    assert tracer.first("security.cleartext_auth")["peer"] == "192.0.2.7"
    assert tracer.first("security.starttls_injection")["discarded"] == len(b"MAIL FROM:<evil@x.test>\r\n")


def test_smtp_tls_that_never_completes_is_a_security_event():
    tracer = RecordingTracer()
    proto, tr, _ = connect(ServerPolicy(hostname="smtp.lab.test", tls_context=object()),
                           tracer=tracer, transport=FakeTLSTransport())  # fmt: skip
    talk(proto, tr, b"EHLO c.test\r\nSTARTTLS\r\n")
    proto.connectionLost(Exception("handshake failure"))
    assert tracer.first("security.tls_failed")["reason"] == "Exception: handshake failure"
    # ...but not when the handshake did complete.
    tracer = RecordingTracer()
    proto, tr, _ = connect(ServerPolicy(hostname="smtp.lab.test", tls_context=object()),
                           tracer=tracer, transport=FakeTLSTransport())  # fmt: skip
    talk(proto, tr, b"EHLO c.test\r\nSTARTTLS\r\n")
    proto.handshakeCompleted()
    proto.connectionLost(Exception("bye"))
    assert "security.tls_failed" not in tracer.names()


# ---------------------------------------------------------------------------
# IMAP and POP3 with the throttle (protocol level)


def mail_server(factory_maker, tmp_path, clock, t, tracer=None):
    from fakes import FakeTLSTransport as ImapTransport

    store = MailStore(tmp_path / "mail", run_in_thread=lambda f, *a, **kw: defer.maybeDeferred(f, *a, **kw))
    checker = InMemoryUsernamePasswordDatabaseDontUse()
    checker.addUser(b"bob@lab.test", b"right")
    kwargs = {"tracer": tracer} if tracer else {}
    server = factory_maker(store, checker, object(), throttle=t, **kwargs).buildProtocol(None)
    server.callLater = clock.callLater
    transport = ImapTransport(peerAddress=IPv4Address("TCP", "198.51.100.4", 5000))
    server.makeConnection(transport)
    transport.clear()

    def send(data: bytes) -> bytes:
        server.dataReceived(data)
        out = transport.value()
        transport.clear()
        return out

    return server, transport, send


def test_imap_failed_logins_are_delayed_then_bye_and_hang_up(tmp_path):
    clock = task.Clock()
    t = throttle(clock, max_failures=2)
    tracer = RecordingTracer()
    _server, transport, send = mail_server(make_imap_factory, tmp_path, clock, t, tracer)
    send(b"s STARTTLS\r\n")
    assert send(b"a LOGIN bob@lab.test wrong\r\n") == b""
    clock.advance(0.5)
    assert send(b"") == b"a NO LOGIN failed\r\n"
    send(b"b LOGIN bob@lab.test wrong\r\n")
    clock.advance(1.0)
    assert send(b"") == b"* BYE Too many failed logins, closing connection\r\nb NO LOGIN failed\r\n"
    assert transport.disconnecting
    assert tracer.first("security.login_failed")["protocol"] == "imap"


def test_imap_authenticate_is_throttled_too_and_success_is_immediate(tmp_path):
    import base64

    clock = task.Clock()
    t = throttle(clock)
    _server, _transport, send = mail_server(make_imap_factory, tmp_path, clock, t)
    send(b"s STARTTLS\r\n")
    assert send(b"a AUTHENTICATE PLAIN\r\n").startswith(b"+")
    assert send(base64.b64encode(b"\0bob@lab.test\0wrong") + b"\r\n") == b""
    clock.advance(0.5)
    assert send(b"").startswith(b"a NO Authentication failed")
    assert send(b"b LOGIN bob@lab.test right\r\n").endswith(b"b OK LOGIN succeeded\r\n")


def test_imap_login_before_starttls_is_a_cleartext_auth_event(tmp_path):
    tracer = RecordingTracer()
    _server, _transport, send = mail_server(make_imap_factory, tmp_path, task.Clock(), None, tracer)
    assert send(b"a LOGIN bob@lab.test right\r\n") == b"a BAD LOGIN is disabled before STARTTLS\r\n"
    assert tracer.first("security.cleartext_auth")["user"] == "bob@lab.test"


def test_pop3_failed_pass_is_delayed_then_err_and_hang_up(tmp_path):
    clock = task.Clock()
    t = throttle(clock, max_failures=2)
    _server, transport, send = mail_server(make_pop3_factory, tmp_path, clock, t)
    send(b"STLS\r\n")
    assert send(b"USER bob@lab.test\r\nPASS wrong\r\n") == b"+OK USER accepted, send PASS\r\n"
    clock.advance(0.5)
    assert send(b"") == b"-ERR [AUTH] Authentication failed\r\n"
    send(b"USER bob@lab.test\r\nPASS wrong\r\n")
    clock.advance(1.0)
    assert send(b"") == b"-ERR [AUTH] Too many failed logins, closing connection\r\n"
    assert transport.disconnecting


def test_pop3_user_before_stls_is_a_cleartext_auth_event(tmp_path):
    tracer = RecordingTracer()
    _server, _transport, send = mail_server(make_pop3_factory, tmp_path, task.Clock(), None, tracer)
    assert send(b"USER bob@lab.test\r\n").startswith(b"-ERR [AUTH] Plaintext")
    assert tracer.first("security.cleartext_auth") == {
        "conn": tracer.first("security.cleartext_auth")["conn"], "peer": "198.51.100.4",
        "protocol": "pop3", "command": "USER",
    }  # fmt: skip


def test_one_throttle_is_shared_by_every_listener_of_an_agent():
    class Ctx:
        config = LabConfig.load(None)
        reactor = task.Clock()

    from agents.security import login_throttle

    ctx = Ctx()
    assert login_throttle(ctx) is login_throttle(ctx)
    assert login_throttle(ctx).max_failures == SecuritySettings().login_max_failures


# ---------------------------------------------------------------------------
# Settings


def test_settings_defaults_match_default_lab_toml():
    assert SecuritySettings.from_config(LabConfig.load(None)) == SecuritySettings()


@pytest.mark.parametrize(
    "table, problem",
    [({"login_delay": "fast"}, "login_delay"), ({"enforce_sender": 1}, "enforce_sender"),
     ({"login_max_failures": 2.5}, "login_max_failures"), ({"rate_window": -1}, "rate_window"),
     ({"no_such_knob": 1}, "unknown"), ({"login_max_failures": 0}, "at least 1")],
)  # fmt: skip
def test_bad_settings_are_refused_with_the_key_named(table, problem):
    with pytest.raises(SecuritySettingsError, match=problem):
        SecuritySettings.from_config(LabConfig.from_dict({"security": table}))


def test_settings_accept_ints_for_floats():
    s = SecuritySettings.from_config(LabConfig.from_dict({"security": {"login_delay": 1, "enforce_sender": False}}))
    assert s.login_delay == 1.0 and isinstance(s.login_delay, float) and s.enforce_sender is False


# ---------------------------------------------------------------------------
# Rate limits and sender ownership (MSA)


def test_rate_limiter_is_a_sliding_window():
    clock = task.Clock()
    r = RateLimiter(3, 60, clock)
    for _ in range(3):  # at t = 0, 10, 20
        assert r.hit("u")
        clock.advance(10)
    assert not r.hit("u") and r.count("u") == 3
    clock.advance(29)  # t = 59
    assert not r.hit("u")
    assert r.retry_after("u") == pytest.approx(1.0)
    clock.advance(1)  # t = 60: the first message has left the window, only it
    assert r.hit("u") and not r.hit("u")
    assert r.hit("other")
    assert RateLimiter(0, 60, clock).hit("u"), "0 means no limit"


def session(user="alice@lab.test", peer="192.0.2.5"):
    return Session(conn_id="c", peer=peer, helo="h", esmtp=True, tls=True, user=user)


def test_submission_guard_per_user_limit_across_client_addresses():
    clock = task.Clock()
    tracer = RecordingTracer()
    guard = SubmissionGuard(SecuritySettings(max_messages_per_user=2, max_messages_per_client=100), clock, tracer)
    assert guard.check_mail(session(peer="192.0.2.1"), "alice@lab.test") is None
    assert guard.check_mail(session(peer="192.0.2.2"), "alice@lab.test") is None
    refused = guard.check_mail(session(peer="192.0.2.3"), "alice@lab.test")
    assert (refused.code, refused.status) == (450, "4.7.1") and "user" in refused.text
    assert guard.check_mail(session(user="bob@lab.test", peer="192.0.2.3"), "bob@lab.test") is None
    assert tracer.first("security.rate_limited")["scope"] == "user"
    clock.advance(60)
    assert guard.check_mail(session(peer="192.0.2.3"), "alice@lab.test") is None


def test_submission_guard_per_client_limit_across_users():
    guard = SubmissionGuard(SecuritySettings(max_messages_per_user=100, max_messages_per_client=2), task.Clock())
    assert guard.check_mail(session("a@lab.test"), "a@lab.test") is None
    assert guard.check_mail(session("b@lab.test"), "b@lab.test") is None
    refused = guard.check_mail(session("c@lab.test"), "c@lab.test")
    assert (refused.code, refused.status) == (450, "4.7.1") and "client" in refused.text
    # A refused message is not counted against the user, who may send from elsewhere.
    assert guard.check_mail(session("c@lab.test", peer="192.0.2.99"), "c@lab.test") is None


@pytest.mark.parametrize("enforce", [True, False])
def test_sender_ownership_enforced_or_only_recorded(enforce):
    tracer = RecordingTracer()
    guard = SubmissionGuard(SecuritySettings(enforce_sender=enforce), task.Clock(), tracer)
    s = session()
    envelope = guard.check_mail(s, "ceo@lab.test")
    header = guard.check_from(s, "The CEO <ceo@lab.test>")
    assert guard.check_from(s, "Alice <ALICE@lab.test>") is None
    if enforce:
        assert (envelope.code, envelope.status) == (550, "5.7.1")
        assert (header.code, header.status) == (550, "5.7.1")
    else:
        assert envelope is None and header is None
    spoofs = [f for n, f in tracer.events if n == "security.sender_spoof"]
    assert [(f["where"], f["claimed"], f["enforced"]) for f in spoofs] == [
        ("envelope", "ceo@lab.test", enforce), ("header", "The CEO <ceo@lab.test>", enforce)]  # fmt: skip


def test_from_naming_the_user_and_someone_else_is_a_spoof():
    guard = SubmissionGuard(SecuritySettings(), task.Clock())
    refused = guard.check_from(session(), "alice@lab.test, ceo@lab.test")
    assert (refused.code, refused.status) == (550, "5.7.1")


# ---------------------------------------------------------------------------
# Routing tricks (MTA)


@pytest.mark.parametrize(
    "path, trick",
    [
        ("user%elsewhere.test@recipient.test", "percent hack"),
        ('"user%elsewhere.test"@recipient.test', "percent hack"),
        ('"user@elsewhere.test"@recipient.test', "routing characters in a quoted local part"),
        ('"user@elsewhere.test"', "routing characters in a quoted local part"),
        ('"a\\"@b"@c.test', "routing characters in a quoted local part"),
        ('"@recipient.test:user"@elsewhere.test', "routing characters in a quoted local part"),
        ("@recipient.test:user@elsewhere.test", "source route"),
        ("@a.test,@b.test:user@elsewhere.test", "source route"),
        ("elsewhere.test!user@recipient.test", "bang path"),
        ("elsewhere.test!user", "bang path"),
        ("user@elsewhere.test@recipient.test", "more than one @"),
        ("user@@recipient.test", "more than one @"),
        ("bob@recipient.test.", "absolute domain (trailing dot)"),
        ("bob@recipient.test", None),
        ("Bob.Smith+tag@Recipient.TEST", None),
        ('"john doe"@recipient.test', None),
        ("user@[192.0.2.1]", None),  # not a trick: a foreign "domain", refused as relaying
        ("postmaster", None),
        ("user@", None),  # malformed, but no routing: a syntax error (501)
    ],
)
def test_routing_trick(path, trick):
    assert routing_trick(path) == trick
    assert routing_trick(path.encode()) == trick


def test_source_route_in_rcpt_is_550_5_7_1_not_a_syntax_error():
    """RFC 5321 4.1.2 allows the A-d-l syntax; 4.1.1.3 lets a server refuse the relaying."""
    tracer = RecordingTracer()
    proto, t, handler = connect(tracer=tracer)
    ehlo(proto, t)
    talk(proto, t, b"MAIL FROM:<a@b.test>\r\n")
    (line,) = talk(proto, t, b"RCPT TO:<@a.test,@b.test:c@d.test>\r\n")
    assert line == b"550 5.7.1 Sender-specified routing is not accepted (source route)"
    (line,) = talk(proto, t, b"RCPT TO:<c@d.test@e.test>\r\n")
    assert line.startswith(b"550 5.7.1 ")
    assert not handler.called("RCPT"), "refused before any handler sees it"
    assert tracer.first("security.relay_denied")["reason"] == "source route"


def test_relay_guard_replies_and_events():
    tracer = RecordingTracer()
    guard = RelayGuard(tracer)
    s = session(user=None, peer="203.0.113.5")
    refused = guard.check(s, "user%elsewhere.test@recipient.test")
    assert (refused.code, refused.status) == (550, "5.7.1")
    assert guard.check(s, "bob@recipient.test") is None
    denied = guard.deny(s, "user@elsewhere.test")
    assert (denied.code, denied.status, denied.text) == (554, "5.7.1", "<user@elsewhere.test>: Relay access denied")
    assert [f["reason"] for n, f in tracer.events] == ["percent hack", "foreign domain"]


# ---------------------------------------------------------------------------
# The monitor


def write_trace(tmp_path, events):
    trace = tmp_path / "trace"
    trace.mkdir()
    by_agent: dict[str, list] = {}
    for e in events:
        by_agent.setdefault(e["agent"], []).append(e)
    for agent, evs in by_agent.items():
        with open(trace / f"{agent}.jsonl", "w") as f:
            for e in evs:
                f.write(json.dumps(e) + "\n")
            f.write('{"broken json\n')  # a line cut short by a crash is skipped
    return trace


def ev(ts, agent, name, peer, **fields):
    return {"ts": int(ts * 1e6), "agent": agent, "role": agent.split(".")[0], "domain": "x", "event": name,
            "peer": peer, **fields}  # fmt: skip


SAMPLE = [
    ev(1000, "msa.sender.test", "security.login_failed", "10.0.0.1", user="alice@sender.test"),
    ev(1001, "msa.sender.test", "security.login_failed", "10.0.0.1", user="alice@sender.test"),
    ev(1002, "mda.recipient.test", "security.login_failed", "10.0.0.1", user="bob@recipient.test"),
    ev(1003, "msa.sender.test", "security.login_blocked", "10.0.0.1", user="alice@sender.test"),
    ev(1030, "mta.recipient.test", "security.relay_denied", "10.0.0.2", rcpt="x@elsewhere.test"),
    ev(1031, "mta.recipient.test", "line", "10.0.0.2", line="RCPT TO:<security.relay_denied@x>"),
    ev(1040, "msa.sender.test", "spooled", "10.0.0.3"),
]


def test_security_events_reads_every_agent_in_time_order_and_only_security(tmp_path):
    trace = write_trace(tmp_path, SAMPLE)
    events = security_events(trace)
    assert [e["ts"] // 10**6 for e in events] == [1000, 1001, 1002, 1003, 1030]
    assert [e["ts"] // 10**6 for e in security_events(trace, since=15, now=1040)] == [1030]


def test_summary_per_agent_per_client_top_offenders_and_over_time(tmp_path):
    summary = summarise(security_events(write_trace(tmp_path, SAMPLE)), bucket=10)
    assert summary["events"] == 5
    assert summary["by_event"] == {"security.login_failed": 3, "security.login_blocked": 1, "security.relay_denied": 1}
    assert summary["by_agent"]["msa.sender.test"] == {"security.login_failed": 2, "security.login_blocked": 1}
    top = summary["top_offenders"][0]
    assert (top["client"], top["events"]) == ("10.0.0.1", 4)
    assert top["agents"] == ["mda.recipient.test", "msa.sender.test"]
    assert top["targets"] == ["alice@sender.test", "bob@recipient.test"]
    over = summary["over_time"]
    assert over["times"] == [1000, 1010, 1020, 1030]
    assert over["series"]["security.login_failed"] == [3, 0, 0, 0]
    assert over["series"]["security.relay_denied"] == [0, 0, 0, 1]
    text = format_summary(summary)
    assert "10.0.0.1" in text and "login_failed" in text and EVENTS["security.relay_denied"] in text
    json.dumps(summary)  # --json must be able to print it


def test_counts_over_time_and_bucket_choice():
    assert pick_bucket(10) == 1 and pick_bucket(600) == 30 and pick_bucket(10**7) == 86400
    assert counts_over_time([])["times"] == []
    series = counts_over_time([ev(5.5, "a", "x", "p"), ev(7.2, "a", "x", "p")], bucket=1)
    assert series["times"] == [5, 6, 7] and series["series"] == {"x": [1, 0, 1]}


def test_monitor_command_text_and_json(tmp_path, capsys):
    from agents.cli import main

    write_trace(tmp_path, SAMPLE)
    assert main(["--home", str(tmp_path), "monitor"]) == 0
    assert "top offenders" in capsys.readouterr().out
    assert main(["--home", str(tmp_path), "monitor", "--json", "--top", "1"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [o["client"] for o in summary["top_offenders"]] == ["10.0.0.1"]
    assert main(["--home", str(tmp_path / "nowhere"), "monitor"]) == 1


# ---------------------------------------------------------------------------
# Composing (MUA): encoded newlines never become header fields (CVE-2024-6923 class)


@pytest.mark.parametrize(
    "field, value",
    [("subject", "=?utf-8?q?hi=0D=0ABcc:_victim@z.test?="),
     ("subject", "=?utf-8?b?aGkNCkJjYzogdmljdGltQHoudGVzdA==?="),
     ("subject", "hi\r\nBcc: victim@z.test"),
     ("from_header", "=?utf-8?q?Al=0D=0ABcc:_victim@z.test?= <a@x.test>"),
     ("from_header", '"Al\\r\\nBcc: victim@z.test" <a@x.test>')],
)  # fmt: skip
def test_composed_message_never_gains_a_header_from_encoded_newlines(field, value):
    from email import message_from_bytes

    from agents.mua import ComposeError, compose

    kwargs = {"subject": "hello", "from_header": None, field: value}
    try:
        data = compose("a@x.test", ["b@y.test"], kwargs["subject"], "body\n", from_header=kwargs["from_header"])
    except ComposeError:
        return  # refused outright: fine
    names = {k.lower() for k in message_from_bytes(data).keys()}
    assert "bcc" not in names, data
    assert names <= {"from", "to", "subject", "content-type", "content-transfer-encoding", "mime-version"}
