"""Fault injection: make one hop misbehave, on purpose and reproducibly.

A mail system is judged by what it does when things go wrong: a server that
refuses connections, answers ``451`` to every RCPT, takes ten seconds to
answer, hangs up in the middle of a transaction, or has a full disk. Waiting
for these to happen by chance is no way to learn (or test) how the queue
copes, so every agent can be told to misbehave, through its control channel
(:mod:`agents.control`)::

    mailpipe fault set mta.recipient.test reply --stage rcpt --code 451
    mailpipe fault set mda.recipient.test drop --probability 0.3 --seed 7
    mailpipe fault list
    mailpipe fault clear mta.recipient.test

or from Python: ``lab.fault("mta.recipient.test", "reply", stage="rcpt", code=451)``.

Like Mailpit's "chaos" feature, but per hop and deterministic: each fault
draws from its own ``random.Random(seed)``, so the same seed and the same
traffic misbehave the same way every run, and ``count`` stops a fault after
it has fired that many times ("fail the first two tries, then work").

The kinds (a fault applies to the server side of its agent's hop):

``refuse``     answer ``421 4.3.2`` (or ``--code 554``) instead of the
               greeting: the server is up but takes no mail (RFC 5321 3.1).
               Only new connections see it: a client that keeps a session
               open (as the MTAs do, :class:`~agents.smtpclient.ConnectionCache`)
               goes on using it; use ``reply --stage mail`` to stop those too.
``reply``      answer ``--code`` (default ``451``) at ``--stage`` (``mail``,
               ``rcpt``, ``data``...) instead of asking the agent.
``delay``      wait ``--delay`` seconds before the agent answers at
               ``--stage``; combines with the others.
``drop``       hang up without an answer at ``--stage`` (default ``data``:
               after the client sent the whole message, before the reply,
               the moment when the client cannot know if the server has it).
               With ``after_accept`` the agent takes (spools) the message
               first: the client retries, and the next hop gets a duplicate.
``disk-full``  writes to the agent's spool (or the MDA's Maildir) fail with
               ``ENOSPC``: the client must get a 4xx, never a 250 (RFC 5321 6.1).

Faults live in the agent's memory only: restarting an agent clears them.
"""

from __future__ import annotations

import errno
import itertools
import os
import random
import threading
from dataclasses import dataclass, field

from twisted.internet import defer, task

from .smtpserver import HANGUP, Reply
from .trace import NULL_TRACER

#: Where in an SMTP/LMTP session a fault can strike (the handler hooks).
STAGES = ("connect", "ehlo", "mail", "rcpt", "data")
#: Every kind, with the stage it strikes at unless told otherwise.
KINDS = {"refuse": "connect", "reply": "rcpt", "delay": "data", "drop": "data", "disk-full": "spool"}


@dataclass
class Fault:
    """One way to misbehave. Build it with keyword arguments; it checks them."""

    kind: str
    stage: str | None = None
    code: int | None = None
    status: str | None = None
    probability: float = 1.0
    delay: float = 0.0
    seed: int | None = None
    #: fire at most this many times (0: no limit)
    count: int = 0
    #: for ``drop`` at ``data``: let the agent take the message, then hang up
    after_accept: bool = False
    id: int = 0
    #: how often the fault was considered, and how often it struck
    seen: int = 0
    fired: int = 0
    _rng: random.Random = field(default=None, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; one of {', '.join(KINDS)}")
        if self.kind == "disk-full":
            self.stage = "spool"
        self.stage = self.stage or KINDS[self.kind]
        if self.kind != "disk-full" and self.stage not in STAGES:
            raise ValueError(f"unknown stage {self.stage!r}; one of {', '.join(STAGES)}")
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError("probability must be between 0 and 1")
        if self.count < 0 or self.delay < 0:
            raise ValueError("count and delay cannot be negative")
        if self.kind == "refuse":
            if self.stage != "connect":
                raise ValueError("refuse happens at connect; use 'reply' for other stages")
            self.code = self.code or 421
            if self.code not in (421, 554):  # RFC 5321 3.1: the only refusals of a session
                raise ValueError("a refused connection gets 421 (try later) or 554 (never)")
            self.status = self.status or ("4.3.2" if self.code == 421 else "5.3.2")
        elif self.kind == "reply":
            self.code = self.code or 451
            if not 400 <= self.code < 600:
                raise ValueError("an injected reply must be a failure, 4xx or 5xx")
            self.status = self.status or f"{self.code // 100}.3.0"
        elif self.code is not None or self.status is not None:
            raise ValueError(f"a {self.kind} fault takes no reply code")
        if self.kind == "delay" and self.delay <= 0:
            raise ValueError("a delay fault needs delay > 0 seconds")
        if self.after_accept and (self.kind, self.stage) != ("drop", "data"):
            raise ValueError("after_accept is for 'drop' at the data stage")
        if self.status is not None and not _valid_status(self.status, self.code):
            raise ValueError(f"status {self.status!r} must be like {self.code // 100}.x.y (RFC 3463)")
        self._rng = random.Random(self.seed)

    def roll(self) -> bool:
        """Does the fault strike this time? Deterministic for a given seed."""
        with self._lock:  # the disk-full fault is rolled in the spool's thread
            self.seen += 1
            if self.count and self.fired >= self.count:
                return False
            if self.probability < 1.0 and self._rng.random() >= self.probability:
                return False
            self.fired += 1
            return True

    @property
    def text(self) -> str:
        return f"fault injected by mailpipe ({self.kind} at {self.stage}, fault {self.id})"

    def reply(self) -> Reply:
        return Reply(self.code, self.status, self.text)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("id", "kind", "stage", "code", "status", "probability",
                                               "delay", "seed", "count", "after_accept", "seen", "fired")}


def _valid_status(status: str, code: int | None) -> bool:
    parts = status.split(".")
    return (len(parts) == 3 and all(p.isdigit() for p in parts)
            and (code is None or parts[0] == str(code // 100)))


class FaultSet:
    """The faults one agent has been told to inject, in the order they were set."""

    def __init__(self):
        self.faults: list[Fault] = []
        self._ids = itertools.count(1)

    def add(self, kind: str, **options) -> Fault:
        options = {k: v for k, v in options.items() if v is not None}
        fault = Fault(kind, id=next(self._ids), **options)
        self.faults.append(fault)
        return fault

    def clear(self) -> int:
        cleared, self.faults = len(self.faults), []
        return cleared

    def hits(self, stage: str) -> list[Fault]:
        """The faults for ``stage`` that strike now (each rolls its own dice)."""
        return [f for f in list(self.faults) if f.stage == stage and f.roll()]

    def disk_full(self) -> bool:
        return bool(self.hits("spool"))

    @property
    def fired(self) -> int:
        return sum(f.fired for f in self.faults)


def no_space(path) -> OSError:
    """The error a write to a full disk raises."""
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


class FaultyHandler:
    """An :class:`~agents.smtpserver.SMTPHandler` with faults in front of it.

    Each hook asks the fault set first; with no fault striking, the agent's
    own handler answers as usual, so with no faults set nothing changes.
    Anything else the protocol asks for goes straight to the agent's handler.
    """

    def __init__(self, inner, faults: FaultSet, reactor, tracer=NULL_TRACER):
        self.inner, self.faults, self.reactor, self.tracer = inner, faults, reactor, tracer

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def handle_CONNECT(self, session):
        return self._at("connect", session, "handle_CONNECT", session)

    def handle_EHLO(self, session, hostname):
        return self._at("ehlo", session, "handle_EHLO", session, hostname)

    def handle_MAIL(self, session, envelope, address, options):
        return self._at("mail", session, "handle_MAIL", session, envelope, address, options)

    def handle_RCPT(self, session, envelope, address, options):
        return self._at("rcpt", session, "handle_RCPT", session, envelope, address, options)

    def handle_DATA(self, session, envelope):
        return self._at("data", session, "handle_DATA", session, envelope)

    def _agent(self, hook: str, *args):
        method = getattr(self.inner, hook, None)
        return method(*args) if method is not None else None

    def _at(self, stage: str, session, hook: str, *args):
        hits = self.faults.hits(stage)
        if not hits:
            return self._agent(hook, *args)
        for f in hits:
            self.tracer.event("fault", fault=f.id, kind=f.kind, stage=stage, conn=session.conn_id,
                              code=f.code, delay=f.delay or None)
        wait = sum(f.delay for f in hits if f.kind == "delay")
        action = next((f for f in hits if f.kind != "delay"), None)
        if wait:
            return task.deferLater(self.reactor, wait, self._act, action, hook, args)
        return self._act(action, hook, args)

    def _act(self, fault: Fault | None, hook: str, args: tuple):
        if fault is None:
            return self._agent(hook, *args)
        if fault.kind in ("refuse", "reply"):
            return fault.reply()
        # drop: hang up, before or after the agent has taken the message
        if fault.after_accept:
            return defer.maybeDeferred(self._agent, hook, *args).addBoth(lambda _: HANGUP)
        return HANGUP


class FaultySpool:
    """A :class:`~agents.spool.Spool` whose ``store`` fails while a disk-full fault strikes.

    Only new messages are refused: retry state of messages already queued
    still gets written, as on a real disk where the last free blocks go to
    the small writes.
    """

    def __init__(self, spool, faults: FaultSet):
        self._spool, self._faults = spool, faults

    def __getattr__(self, name):
        return getattr(self._spool, name)

    def store(self, item, content: bytes) -> None:
        if self._faults.disk_full():
            raise no_space(self._spool.queue / f"{item.queue_id}.msg")
        return self._spool.store(item, content)
