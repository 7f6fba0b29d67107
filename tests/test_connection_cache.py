"""Tests for agents.smtpclient.ConnectionCache: which session each message gets.

The cache is tested on its own: a fake session factory stands in for
``open_session()`` (each fake session's transactions are Deferreds that
the test fires), and ``task.Clock`` stands in for the reactor, so idle
timers run when the test says. The wire side of sessions is tested in
test_smtpclient.py, and so is the cache over a real TLS connection.
"""

from __future__ import annotations

import pytest
from twisted.internet import defer, task
from twisted.python.failure import Failure

from agents.smtpclient import ConnectionCache, RecipientResult, SendResult, SMTPDeliveryError
from agents.trace import Tracer

# --- Fakes ----------------------------------------------------------------------------


class RecordingTracer(Tracer):
    """A tracer that keeps events in a list (``bind`` shares the list)."""

    def __init__(self):
        super().__init__(None, "mta", "mta", "a.test")
        self.events: list[dict] = []

    def event(self, name, **fields):
        self.events.append({"event": name, **self._bound, **fields})

    def bind(self, **fields):
        bound = super().bind(**fields)  # a plain Tracer: make it record too
        bound.__class__ = RecordingTracer
        return bound

    def named(self, name):
        return [e for e in self.events if e["event"] == name]


class FakeSession:
    """What the cache needs of a ClientSession: send, usable, close, conn."""

    def __init__(self, number: int):
        self.conn = f"conn-{number}"
        self.usable = True
        self.closed = False
        self.transactions: list[tuple[str, defer.Deferred]] = []

    def send(self, mail_from, rcpt_tos, content, tracer=None):
        assert self.usable and not self.closed, "the cache used a session it should not"
        assert not self.busy, "the cache gave a busy session a second transaction"
        d = defer.Deferred()
        self.transactions.append((rcpt_tos[0], d))
        return d

    @property
    def busy(self) -> bool:
        return any(not d.called for _, d in self.transactions)

    def finish(self) -> None:
        """The server answers the running transaction: accepted."""
        rcpt, d = next((r, d) for r, d in self.transactions if not d.called)
        d.callback(SendResult([RecipientResult(rcpt, 250, "2.0.0", "Ok")], conn=self.conn))

    def fail(self, error: Exception) -> None:
        _, d = next((r, d) for r, d in self.transactions if not d.called)
        d.errback(Failure(error))

    def close(self):
        self.closed = True
        self.usable = False
        return defer.succeed(None)


class FakeFactory:
    """Stands in for open_session(); records every call."""

    def __init__(self):
        self.sessions: list[FakeSession] = []
        self.calls: list[tuple] = []
        self.refuse = False

    def __call__(self, reactor, host, port, **options):
        self.calls.append((host, port, options))
        if self.refuse:
            return defer.fail(SMTPDeliveryError(421, "4.4.1", "connection refused", stage="connect"))
        session = FakeSession(len(self.sessions) + 1)
        self.sessions.append(session)
        return defer.succeed(session)


@pytest.fixture
def clock():
    return task.Clock()


@pytest.fixture
def factory():
    return FakeFactory()


@pytest.fixture
def tracer():
    return RecordingTracer()


def make_cache(clock, factory, tracer, **limits):
    return ConnectionCache(clock, tracer=tracer, session_factory=factory, **limits)


def send(cache, rcpt="bob@b.test", port=25, tracer=None, **options):
    """cache.send() with lab-like options; returns a list that gets the outcome."""
    outcome = []
    cache.send(
        "127.0.0.3", port, helo="mx.a.test", mail_from="alice@a.test", rcpt_tos=[rcpt],
        content=b"Subject: x\r\n\r\nx\r\n", tls="none", tracer=tracer, **options,
    ).addBoth(outcome.append)
    return outcome


# --- Reuse ---------------------------------------------------------------------------------


def test_second_message_reuses_the_idle_session(clock, factory, tracer):
    cache = make_cache(clock, factory, tracer)
    first = send(cache, "bob@b.test")
    factory.sessions[0].finish()
    assert first[0].ok
    second = send(cache, "carol@b.test", tracer=tracer.bind(queue_id="Q2"))
    assert len(factory.calls) == 1  # no new connection
    assert [r for r, _ in factory.sessions[0].transactions] == ["bob@b.test", "carol@b.test"]
    factory.sessions[0].finish()
    assert second[0].ok
    assert tracer.named("relay.reuse") == [
        {"event": "relay.reuse", "queue_id": "Q2", "conn": "conn-1", "count": 2}
    ]
    assert [e["conn"] for e in tracer.named("relay.cache.open")] == ["conn-1"]


def test_the_message_that_opened_a_connection_is_named_in_relay_cache_open(
    clock, factory, tracer
):
    cache = make_cache(clock, factory, tracer, max_per_destination=1)
    send(cache, "a@b.test", tracer=tracer.bind(queue_id="Q1"))
    send(cache, "b@b.test", tracer=tracer.bind(queue_id="Q2"))  # waits
    factory.sessions[0].usable = False
    factory.sessions[0].fail(SMTPDeliveryError(421, "4.4.2", "connection lost"))
    opens = [(e["queue_id"], e["conn"]) for e in tracer.named("relay.cache.open")]
    assert opens == [("Q1", "conn-1"), ("Q2", "conn-2")]


def test_session_options_reach_the_factory_and_the_cache_tracer_is_the_session_tracer(
    clock, factory, tracer
):
    cache = make_cache(clock, factory, tracer)
    send(cache, bind_address="127.0.0.2", timeout=7)
    host, port, options = factory.calls[0]
    assert (host, port) == ("127.0.0.3", 25)
    assert options["bind_address"] == "127.0.0.2" and options["timeout"] == 7
    assert options["tracer"] is tracer and options["helo"] == "mx.a.test"


def test_different_destinations_get_different_sessions(clock, factory, tracer):
    cache = make_cache(clock, factory, tracer)
    send(cache, port=25)
    factory.sessions[0].finish()
    send(cache, port=24, lmtp=True)  # another port and protocol: not interchangeable
    factory.sessions[1].finish()
    send(cache, port=25, bind_address="127.0.0.9")  # another client address (SPF!)
    assert len(factory.sessions) == 3
    send(cache, port=25)  # the first again
    assert len(factory.sessions) == 3 and len(factory.sessions[0].transactions) == 2


def test_a_failed_transaction_on_a_usable_session_returns_it_to_the_pool(clock, factory, tracer):
    cache = make_cache(clock, factory, tracer)
    first = send(cache)
    factory.sessions[0].fail(SMTPDeliveryError(550, "5.7.1", "Sender blocked", stage="MAIL"))
    assert first[0].check(SMTPDeliveryError) and first[0].value.code == 550
    send(cache)
    assert len(factory.sessions) == 1 and len(factory.sessions[0].transactions) == 2


# --- Limits ----------------------------------------------------------------------------------


def test_max_per_destination_makes_the_next_message_wait_for_a_session(clock, factory, tracer):
    cache = make_cache(clock, factory, tracer, max_per_destination=2)
    a, b, c = send(cache, "a@b.test"), send(cache, "b@b.test"), send(cache, "c@b.test")
    assert len(factory.sessions) == 2  # the third message waits
    assert c == []
    (key,) = cache.stats()
    assert cache.stats()[key] == {"open": 2, "idle": 0, "busy": 2, "waiting": 1}
    factory.sessions[1].finish()  # b is done: its session goes straight to c
    assert b[0].ok and len(factory.sessions) == 2
    assert factory.sessions[1].transactions[-1][0] == "c@b.test"
    assert tracer.named("relay.reuse")[0]["conn"] == "conn-2"
    factory.sessions[0].finish()
    factory.sessions[1].finish()
    assert a[0].ok and c[0].ok
    assert cache.stats()[key] == {"open": 2, "idle": 2, "busy": 0, "waiting": 0}


def test_idle_session_is_closed_after_max_idle(clock, factory, tracer):
    cache = make_cache(clock, factory, tracer, max_idle=5.0)
    send(cache)
    factory.sessions[0].finish()
    clock.advance(4.9)
    assert not factory.sessions[0].closed
    clock.advance(0.1)
    assert factory.sessions[0].closed
    assert tracer.named("relay.cache.close") == [
        {"event": "relay.cache.close", "conn": "conn-1", "reason": "idle", "count": 1}
    ]
    send(cache)
    assert len(factory.sessions) == 2  # a new connection


def test_reuse_restarts_the_idle_clock(clock, factory, tracer):
    cache = make_cache(clock, factory, tracer, max_idle=5.0)
    send(cache)
    factory.sessions[0].finish()
    clock.advance(4)
    send(cache)
    clock.advance(4)  # busy: no idle timer runs
    factory.sessions[0].finish()
    clock.advance(4)
    assert not factory.sessions[0].closed
    clock.advance(1)
    assert factory.sessions[0].closed
    assert clock.getDelayedCalls() == []


def test_session_is_closed_after_max_messages(clock, factory, tracer):
    cache = make_cache(clock, factory, tracer, max_messages=2)
    for _ in range(2):
        send(cache)
        factory.sessions[0].finish()
    assert factory.sessions[0].closed
    assert tracer.named("relay.cache.close")[0]["reason"] == "max_messages"
    send(cache)
    assert len(factory.sessions) == 2


def test_dead_session_is_not_reused(clock, factory, tracer):
    cache = make_cache(clock, factory, tracer)
    first = send(cache)
    factory.sessions[0].usable = False  # e.g. the server said 421
    factory.sessions[0].fail(SMTPDeliveryError(421, "4.3.2", "Shutting down", stage="DATA"))
    assert first[0].value.code == 421
    assert tracer.named("relay.cache.close")[0]["reason"] == "dead"
    send(cache)
    assert len(factory.sessions) == 2 and len(factory.sessions[0].transactions) == 1


def test_session_that_died_while_idle_is_skipped(clock, factory, tracer):
    cache = make_cache(clock, factory, tracer)
    send(cache)
    factory.sessions[0].finish()
    factory.sessions[0].usable = False  # the server closed it in the meantime
    send(cache)
    assert len(factory.sessions) == 2 and len(factory.sessions[0].transactions) == 1
    assert [e["reason"] for e in tracer.named("relay.cache.close")] == ["dead"]
    assert clock.getDelayedCalls() == []  # its idle timer went with it


def test_a_waiter_opens_a_new_session_when_a_busy_one_dies(clock, factory, tracer):
    cache = make_cache(clock, factory, tracer, max_per_destination=1)
    _first, second = send(cache, "a@b.test"), send(cache, "b@b.test")
    assert len(factory.sessions) == 1
    factory.sessions[0].usable = False
    factory.sessions[0].fail(SMTPDeliveryError(421, "4.4.2", "connection lost"))
    assert len(factory.sessions) == 2  # the slot was freed: the waiter got a new session
    factory.sessions[1].finish()
    assert second[0].ok


def test_connection_failure_fails_the_message_and_frees_the_slot(clock, factory, tracer):
    cache = make_cache(clock, factory, tracer, max_per_destination=1)
    factory.refuse = True
    outcome = send(cache)
    assert outcome[0].value.status == "4.4.1"
    factory.refuse = False
    send(cache)
    assert len(factory.sessions) == 1  # not blocked by the failed attempt


def test_bad_arguments_fail_before_any_connection(clock, factory, tracer):
    cache = make_cache(clock, factory, tracer)
    with pytest.raises(ValueError):
        send(cache, rcpt="b@b.test>\r\nRCPT TO:<evil@c.test")
    with pytest.raises(ValueError):
        cache.send("127.0.0.3", 25, helo="x", mail_from="", rcpt_tos=["b@b.test"],
                   content=b"", tls="starttls")  # TLS without a CA
    assert factory.calls == []


# --- Shutdown ---------------------------------------------------------------------------------


def test_close_all_closes_idle_sessions_now_and_busy_ones_after_their_message(
    clock, factory, tracer
):
    cache = make_cache(clock, factory, tracer)
    send(cache, port=25)
    factory.sessions[0].finish()  # idle
    busy = send(cache, port=26)  # busy
    done = []
    cache.close_all().addBoth(done.append)
    assert factory.sessions[0].closed and not factory.sessions[1].closed
    assert done == []
    factory.sessions[1].finish()
    assert busy[0].ok  # its message was not cut off
    assert factory.sessions[1].closed and done == [None]
    assert [e["reason"] for e in tracer.named("relay.cache.close")] == ["shutdown", "shutdown"]
    assert clock.getDelayedCalls() == []
