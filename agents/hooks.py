"""Hooks: where coursework plugs into the live pipeline.

A *hook* is a small function a student writes, called by an agent at one
moment of a message's life (the idea comes from Haraka and aiosmtpd). It sees
what the agent sees at that moment and answers with a :class:`Verdict`:

* ``CONTINUE`` (or ``None``): no opinion, let the next hook and the agent's own
  policy decide;
* ``accept()``: say yes now, skipping the agent's own checks for this step;
* ``reject(text)``: a permanent no (5xx), e.g. ``550 5.7.1``;
* ``tempfail(text)``: "try again later" (4xx), e.g. greylisting's ``451 4.7.1``.

The framework, not the hook, turns the verdict into protocol: a hook cannot
break the SMTP state machine, and a hook that raises is contained (the
message gets ``451 4.3.0``, the error is logged with the hook's name, and the
agent keeps running).

The events, and where they fire (see ``docs/hooks.md`` for each in detail):

=================  ======================  ==========================================
event              agents                  arguments after ``ctx``
=================  ======================  ==========================================
connect            MSA, MTA, MDA (LMTP)    session
helo               MSA, MTA, MDA (LMTP)    session, hostname
auth               MSA                     session, user  (after a successful AUTH)
mail               MSA, MTA, MDA (LMTP)    session, envelope, address
rcpt               MSA, MTA, MDA (LMTP)    session, envelope, address
data               MSA, MTA, MDA (LMTP)    session, envelope, message (can add headers)
queued             MSA, MTA                item  (spooled; verdict ignored)
before_relay       MSA, MTA                item, route  (can change route.hosts)
delivery_result    MSA, MTA                item, outcomes  (verdict ignored)
stored             MDA                     user, folder, message_id
fetched            MDA (IMAP, POP3)        user, uid, message_id
=================  ======================  ==========================================

A hook may be a plain function, return a Deferred, or be ``async def``.
``ctx.clock()`` and ``ctx.resolver`` are injected, so a hook's tests can run
on a fake clock and fake DNS and get the same answer every time.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from twisted.internet import defer
from twisted.python.failure import Failure

from .smtpserver import Reply, SMTPHandler
from .trace import NULL_TRACER

EVENTS = (
    "connect", "helo", "auth", "mail", "rcpt", "data",
    "queued", "before_relay", "delivery_result", "stored", "fetched",
)

#: Events whose verdict the framework ignores: they report, they do not decide.
OBSERVE_ONLY = {"queued", "delivery_result", "stored", "fetched"}


# -- verdicts ----------------------------------------------------------------

@dataclass(frozen=True)
class Verdict:
    kind: str  # "continue" | "accept" | "reject" | "tempfail"
    code: int = 0
    status: str = ""
    text: str = ""

    def reply(self) -> Reply | None:
        """The SMTP reply this verdict stands for (None: no opinion)."""
        if self.kind == "continue":
            return None
        if self.kind == "accept":
            return Reply(self.code or 250, self.status or "2.0.0", self.text or "OK")
        return Reply(self.code, self.status, self.text)


CONTINUE = Verdict("continue")


def accept(text: str = "OK", code: int = 250, status: str = "2.0.0") -> Verdict:
    return Verdict("accept", code, status, text)


def reject(text: str = "Rejected by policy", code: int = 550, status: str = "5.7.1") -> Verdict:
    """A permanent refusal (RFC 5321 4.2.1: 5yz, do not retry)."""
    if not 500 <= code < 600:
        raise ValueError("reject() takes a 5xx code; use tempfail() for 4xx")
    return Verdict("reject", code, status, text)


def tempfail(text: str = "Try again later", code: int = 451, status: str = "4.7.1") -> Verdict:
    """A temporary refusal (RFC 5321 4.2.1: 4yz, the client will retry)."""
    if not 400 <= code < 500:
        raise ValueError("tempfail() takes a 4xx code; use reject() for 5xx")
    return Verdict("tempfail", code, status, text)


HOOK_FAILED = Verdict("tempfail", 451, "4.3.0", "Requested action aborted: local error in processing")


# -- what a hook sees --------------------------------------------------------

@dataclass
class Route:
    """Where the queue is about to send a message (``before_relay``)."""

    domain: str
    recipients: list[str]
    #: ``[(preference, host)]`` to try in order; a hook may reorder or replace it.
    hosts: list[tuple[int, str]] = field(default_factory=list)


class MessageView:
    """The message at DATA: header fields to read, and new ones to add on top."""

    def __init__(self, content: bytes):
        from .headers import header_fields, split_message

        self.content = content
        self.headers: list[tuple[str, str]] = header_fields(content)
        self.body: bytes = split_message(content)[1]
        self.added: list[tuple[str, str]] = []

    def get(self, name: str, default: str | None = None) -> str | None:
        for n, v in self.headers:
            if n.lower() == name.lower():
                return v
        return default

    def get_all(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n.lower() == name.lower()]

    def add_header(self, name: str, value: str) -> None:
        """Add a field at the top. CR and LF are refused: no header injection."""
        if any(c in name + value for c in "\r\n") or ":" in name or not name:
            raise ValueError("a header name or value may not contain CR, LF (or ':' in the name)")
        self.added.append((name, value))

    def final_content(self) -> bytes:
        top = b"".join(f"{n}: {v}\r\n".encode("utf-8") for n, v in self.added)
        return top + self.content


@dataclass
class HookContext:
    """Passed to every hook: who is calling, the injected clock and resolver, notes."""

    agent: str
    role: str
    domain: str | None
    clock: Callable[[], float] = time.time
    resolver: Any = None
    #: Per-connection scratch space (``session.notes`` for SMTP events).
    notes: dict = field(default_factory=dict)
    #: Per-transaction scratch space, cleared for each new MAIL.
    transaction: dict = field(default_factory=dict)
    #: Shared by all calls of all hooks in this agent (e.g. a greylist table).
    state: dict = field(default_factory=dict)
    tracer: Any = NULL_TRACER

    def log(self, message: str, **fields) -> None:
        """A trace event ``hook.log`` (visible in ``mailpipe trace`` and notebooks)."""
        self.tracer.event("hook.log", text=message, **fields)


# -- loading hooks -------------------------------------------------------------

@dataclass
class Hook:
    name: str  # e.g. "coursework.greylist:on_rcpt"
    event: str
    function: Callable


def event_of(function_name: str) -> str | None:
    """``on_rcpt`` -> ``rcpt``; ``hook_rcpt`` works too (Haraka's spelling)."""
    for prefix in ("on_", "hook_", "handle_"):
        if function_name.startswith(prefix):
            event = function_name[len(prefix):].lower()
            return event if event in EVENTS else None
    return None


def load_hook(spec: str) -> list[Hook]:
    """Load ``"package.module:function"`` (one hook) or ``"package.module"`` (all ``on_*``)."""
    module_name, _, function_name = spec.partition(":")
    module = importlib.import_module(module_name)
    return _hooks_of(module, module_name, function_name or None)


def load_file(path: Path) -> list[Hook]:
    """Every ``on_<event>`` function of one Python file (a student's own file)."""
    path = Path(path)
    name = f"mailpipe_hooks_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return _hooks_of(module, str(path), None)


def _hooks_of(module, label: str, only: str | None) -> list[Hook]:
    hooks = []
    for attr, value in vars(module).items():
        if only is not None and attr != only:
            continue
        event = event_of(attr)
        if callable(value) and event is not None and not attr.startswith("_"):
            hooks.append(Hook(f"{label}:{attr}", event, value))
    if only is not None and not hooks:
        raise ImportError(f"{label}:{only} is not a hook (name it on_<event>, event one of {', '.join(EVENTS)})")
    return hooks


def hooks_for(config, spec) -> list[Hook]:
    """The hooks the lab config enables for one agent.

    ``[hooks]`` maps an agent name (``"mta.recipient.test"``), a role
    (``"mta"``) or ``"all"`` to a list of dotted paths or ``.py`` files or
    directories::

        [hooks]
        mta = ["coursework.greylist:on_rcpt"]
        "msa.sender.test" = ["~/my-hooks/"]
    """
    table = config.section("hooks")
    entries: list[str] = []
    for key in ("all", spec.role, spec.name):
        value = table.get(key, [])
        entries += [value] if isinstance(value, str) else list(value)
    hooks: list[Hook] = []
    for entry in entries:
        path = Path(entry).expanduser()
        if entry.endswith(".py") or path.is_dir():
            files = sorted(path.glob("*.py")) if path.is_dir() else [path]
            for f in files:
                hooks += load_file(f)
        else:
            hooks += load_hook(entry)
    return hooks


# -- running hooks ---------------------------------------------------------------

class HookRunner:
    """Calls the hooks of one event in order; the first verdict that is not CONTINUE wins."""

    def __init__(self, hooks: list[Hook], ctx: HookContext):
        self.ctx = ctx
        self.by_event: dict[str, list[Hook]] = {}
        for hook in hooks:
            self.by_event.setdefault(hook.event, []).append(hook)

    def active(self, event: str) -> bool:
        return bool(self.by_event.get(event))

    @defer.inlineCallbacks
    def run(self, event: str, *args, notes: dict | None = None, transaction: dict | None = None):
        """Run ``event``'s hooks; fires with a :class:`Verdict` (never fails)."""
        ctx = self.ctx
        if notes is not None:
            ctx.notes = notes
        if transaction is not None:
            ctx.transaction = transaction
        for hook in self.by_event.get(event, ()):
            started = time.perf_counter()
            try:
                result = hook.function(ctx, *args)
                if inspect.isawaitable(result):
                    result = defer.ensureDeferred(_await(result))
                result = yield defer.maybeDeferred(lambda r=result: r)
            except Exception:
                failure = Failure()
                ctx.tracer.event("hook.error", hook=hook.name, hook_event=event,
                                 error=f"{failure.type.__name__}: {failure.getErrorMessage()}")
                if event in OBSERVE_ONLY:
                    continue
                return HOOK_FAILED
            verdict = CONTINUE if result is None else result
            if not isinstance(verdict, Verdict):
                ctx.tracer.event("hook.error", hook=hook.name, hook_event=event,
                                 error=f"returned {type(result).__name__}, not a Verdict")
                if event in OBSERVE_ONLY:
                    continue
                return HOOK_FAILED
            ctx.tracer.event("hook.verdict", hook=hook.name, hook_event=event, verdict=verdict.kind,
                             code=verdict.code or None, ms=round((time.perf_counter() - started) * 1000, 3))
            if event in OBSERVE_ONLY:
                continue
            if verdict.kind != "continue":
                return verdict
        return CONTINUE


async def _await(awaitable):
    return await awaitable


class HookedHandler(SMTPHandler):
    """Runs the hooks of each SMTP step before the agent's own policy (``inner``).

    ``CONTINUE`` falls through to the agent's policy; any other verdict is the
    answer. The ``data`` hooks see a :class:`MessageView`, and the fields they
    add are put on top of the message before the agent's policy stores it.
    """

    def __init__(self, inner: SMTPHandler, runner: HookRunner):
        self.inner, self.runner = inner, runner

    def __getattr__(self, name):  # anything else the agent's handler offers
        return getattr(self.inner, name)

    def _then(self, event: str, session, args: tuple, fallback: Callable, transaction=None):
        if not self.runner.active(event):
            return fallback()
        d = self.runner.run(event, *args, notes=session.notes, transaction=transaction)
        return d.addCallback(lambda v: v.reply() if v.kind != "continue" else fallback())

    @staticmethod
    def _tx(envelope) -> dict:
        if not hasattr(envelope, "_hook_notes"):
            envelope._hook_notes = {}
        return envelope._hook_notes

    def handle_CONNECT(self, session):
        return self._then("connect", session, (session,), lambda: self.inner.handle_CONNECT(session))

    def handle_EHLO(self, session, hostname):
        return self._then("helo", session, (session, hostname), lambda: self.inner.handle_EHLO(session, hostname))

    def handle_MAIL(self, session, envelope, address, options):
        return self._then("mail", session, (session, envelope, address),
                          lambda: self.inner.handle_MAIL(session, envelope, address, options), self._tx(envelope))

    def handle_RCPT(self, session, envelope, address, options):
        return self._then("rcpt", session, (session, envelope, address),
                          lambda: self.inner.handle_RCPT(session, envelope, address, options), self._tx(envelope))

    def handle_DATA(self, session, envelope):
        if not self.runner.active("data"):
            return self.inner.handle_DATA(session, envelope)
        view = MessageView(envelope.content)
        d = self.runner.run("data", session, envelope, view, notes=session.notes, transaction=self._tx(envelope))

        def decide(verdict: Verdict):
            if verdict.kind in ("reject", "tempfail"):
                reply = verdict.reply()
                # LMTP wants one reply per recipient (RFC 2033 4.2).
                return [reply] * len(envelope.rcpt_tos) if getattr(self.inner, "lmtp", False) else reply
            envelope.content = view.final_content()
            return self.inner.handle_DATA(session, envelope)

        return d.addCallback(decide)
