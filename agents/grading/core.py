"""What every checker is made of: exercises, checks, the student's file, a fake world.

A unit check calls the student's hook functions directly, the way an agent
would, through the same :class:`~agents.hooks.HookRunner` (so a hook that
raises or returns garbage is caught exactly as in the lab). Everything a hook
may depend on is fake and exact: the clock is a Twisted ``task.Clock`` that
only moves when the check says so, the resolver answers from a table, and
``ctx.data_dir`` is a fresh temporary directory. A hook that reads
``time.time()`` or real DNS instead of ``ctx.clock()`` and ``ctx.resolver``
fails these checks, which is the point: the injected versions are what make a
hook testable.
"""

from __future__ import annotations

import importlib.util
import itertools
import re
import sys
import tempfile
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from twisted.internet import defer, task

from ..hooks import CONTINUE, Hook, HookContext, HookRunner, MessageView, Verdict
from ..resolver import LookupFailed
from ..smtpserver import Envelope, Session

#: Where the fake clock starts: a plausible epoch time, far from "now".
START = 1_700_000_000.0


class Failed(AssertionError):
    """A check did not pass; the message says what was seen instead."""


# -- results and exercises -------------------------------------------------------

@dataclass
class Result:
    stage: str  # "unit" or "live"
    name: str
    passed: bool
    hint: str = ""
    detail: str = ""


@dataclass
class Check:
    stage: str
    name: str
    hint: str
    run: Callable


@dataclass
class Exercise:
    """One exercise: its checks, and how its hooks are plugged into a live lab.

    ``agents`` are the lab agents that load the student's whole file in the
    live checks; ``settings`` is the ``[hooks.settings]`` table they run with
    (small numbers, so that a lab on real time shows the behaviour in seconds).
    """

    name: str
    title: str
    agents: tuple[str, ...]
    settings: dict = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)

    def unit(self, name: str, hint: str):
        """Decorator: a unit check, ``f(student)``; it fails by raising :class:`Failed`."""
        return self._add("unit", name, hint)

    def live(self, name: str, hint: str):
        """Decorator: a live check, ``f(lab, student)`` (lab: :class:`agents.grading.live.LiveLab`)."""
        return self._add("live", name, hint)

    def _add(self, stage, name, hint):
        def register(function):
            self.checks.append(Check(stage, name, hint, function))
            return function
        return register

    def hooks_table(self, path: Path) -> dict:
        """The ``[hooks]`` table that loads ``path`` on this exercise's agents."""
        return {agent: [str(path)] for agent in self.agents}

    def run(self, stage: str, *args) -> list[Result]:
        results = []
        for check in (c for c in self.checks if c.stage == stage):
            try:
                info = check.run(*args)  # a check may return a line to show (precision, ...)
            except Failed as e:
                results.append(Result(stage, check.name, False, check.hint, str(e)))
            except Exception as e:  # a bug in the checker, or the lab: say so plainly
                where = traceback.extract_tb(e.__traceback__)[-1]
                results.append(Result(stage, check.name, False, check.hint,
                                      f"the check itself failed: {type(e).__name__}: {e} "
                                      f"({Path(where.filename).name}:{where.lineno})"))
            else:
                results.append(Result(stage, check.name, True, detail=info or ""))
        return results


# -- the student's file ------------------------------------------------------------

_loads = itertools.count(1)


class Student:
    """The student's hook file, loaded fresh (never a cached module of another student)."""

    def __init__(self, path: Path | str):
        self.path = Path(path).resolve()
        name = f"mailpipe_student_{next(_loads)}_{self.path.stem}"
        spec = importlib.util.spec_from_file_location(name, self.path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {self.path}")
        self.module = importlib.util.module_from_spec(spec)
        sys.modules[name] = self.module  # dataclasses and pickling look modules up by name
        spec.loader.exec_module(self.module)

    def function(self, name: str) -> Callable:
        function = getattr(self.module, name, None)
        if not callable(function):
            raise Failed(f"{self.path.name} has no function {name}()")
        return function

    def call(self, name: str, *args):
        """Call a plain helper function of the student's file; an exception fails the check."""
        function = self.function(name)
        try:
            return function(*args)
        except Exception as e:
            raise Failed(f"{name}() raised {_where(e)}") from None

    def hook(self, event: str, ctx: HookContext, *args, session: Session | None = None,
             envelope: Envelope | None = None) -> Verdict:
        """Run ``on_<event>`` as the agent would, and return its verdict.

        ``session`` gives the per-connection notes; ``envelope`` the
        per-transaction scratch space, which lives as long as the envelope.
        """
        hook = Hook(f"{self.path.name}:on_{event}", event, self.function(f"on_{event}"))
        tracer = RecordingTracer()
        transaction = None
        if envelope is not None:
            transaction = envelope.__dict__.setdefault("_hook_notes", {})
        d = HookRunner([hook], replace(ctx, tracer=tracer)).run(
            event, *args, notes=session.notes if session is not None else None, transaction=transaction)
        outcome = []
        d.addBoth(outcome.append)
        if not outcome:
            raise Failed(f"on_{event} did not finish: it waits for something other than "
                         "ctx.clock() and ctx.resolver (in the lab it would hold up the agent)")
        errors = [f for name, f in tracer.events if name == "hook.error"]
        if errors:
            where = f" at {Path(errors[0]['where']).name}" if errors[0].get("where") else ""
            raise Failed(f"on_{event} failed{where}: {errors[0]['error']} "
                         "(in the lab, the client would get 451 4.3.0)")
        return outcome[0]


def _where(error: BaseException) -> str:
    frame = traceback.extract_tb(error.__traceback__)[-1]
    return f"{type(error).__name__}: {error} ({Path(frame.filename).name}, line {frame.lineno})"


# -- a fake world ------------------------------------------------------------------

class RecordingTracer:
    """Keeps trace events in a list (``hook.error``, ``hook.log``...)."""

    def __init__(self):
        self.events: list[tuple[str, dict]] = []

    def event(self, name, **fields):
        self.events.append((name, fields))

    def bind(self, **fields):
        return self


class FakeResolver:
    """DNS from tables: ``a``, ``txt``, ``mx`` map names to answers; ``fail`` names
    raise :class:`~agents.resolver.LookupFailed` (a time-out). Every question is kept."""

    def __init__(self, a=None, txt=None, mx=None, fail=()):
        self.tables = {"A": a or {}, "TXT": txt or {}, "MX": mx or {}}
        self.fail = {n.lower() for n in fail}
        self.asked: list[tuple[str, str]] = []

    def _lookup(self, qtype, name):
        self.asked.append((qtype, name.lower()))
        if name.lower() in self.fail:
            return defer.fail(LookupFailed(name, qtype, "timeout", temporary=True))
        return defer.succeed(list(self.tables[qtype].get(name.lower(), [])))

    def lookup_a(self, name):
        return self._lookup("A", name)

    def lookup_txt(self, name):
        return self._lookup("TXT", name)

    def lookup_mx(self, name):
        return self._lookup("MX", name)


class World:
    """One agent process, faked: a clock, a resolver, settings, shared state, a data directory."""

    def __init__(self, settings: dict | None = None, resolver: FakeResolver | None = None,
                 data_dir: Path | None = None):
        self.clock = task.Clock()
        self.clock.advance(START)
        self.resolver = resolver or FakeResolver()
        self.settings = dict(settings or {})
        self.state: dict = {}
        if data_dir is None:  # removed when this World is garbage
            self._tmp = tempfile.TemporaryDirectory(prefix="mailpipe-grading-")
            data_dir = Path(self._tmp.name)
        self.data_dir = data_dir

    def ctx(self, role: str = "mta", domain: str = "recipient.test") -> HookContext:
        return HookContext(f"{role}.{domain}", role, domain, clock=self.clock.seconds,
                           resolver=self.resolver, state=self.state, settings=self.settings,
                           data_dir=self.data_dir)

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)


def session(peer: str = "192.0.2.10", user: str | None = None, helo: str = "mail.example.net",
            tls: bool = False) -> Session:
    return Session(conn_id="grader/1", peer=peer, helo=helo, esmtp=True, tls=tls, user=user)


def envelope(mail_from: str = "sender@example.net", rcpts=("bob@recipient.test",),
             content: bytes = b"") -> Envelope:
    return Envelope(mail_from=mail_from, rcpt_tos=list(rcpts), rcpt_options=[{} for _ in rcpts],
                    content=content)


def crlf(text: str | bytes) -> bytes:
    """A message as it is on the wire: CRLF line ends (RFC 5322 2.3)."""
    data = text.encode("utf-8") if isinstance(text, str) else text
    return re.sub(rb"\r?\n", b"\r\n", data)


def message(text: str | bytes) -> MessageView:
    return MessageView(crlf(text))


# -- what checks say about verdicts ----------------------------------------------------

def describe(verdict: Verdict) -> str:
    if verdict.kind == "continue":
        return "CONTINUE (no opinion)"
    return f"{verdict.kind} {verdict.code} {verdict.status} {verdict.text!r}"


def expect_continue(verdict: Verdict, what: str) -> None:
    if verdict != CONTINUE:
        raise Failed(f"{what}: expected CONTINUE, got {describe(verdict)}")


def expect_tempfail(verdict: Verdict, what: str, code: int | None = None, status: str | None = None) -> None:
    if verdict.kind != "tempfail" or (code and verdict.code != code) or (status and verdict.status != status):
        wanted = f"tempfail {code or '4xx'} {status or ''}".strip()
        raise Failed(f"{what}: expected {wanted}, got {describe(verdict)}")


def expect_reject(verdict: Verdict, what: str, code: int | None = None, status: str | None = None) -> None:
    if verdict.kind != "reject" or (code and verdict.code != code) or (status and verdict.status != status):
        wanted = f"reject {code or '5xx'} {status or ''}".strip()
        raise Failed(f"{what}: expected {wanted}, got {describe(verdict)}")
