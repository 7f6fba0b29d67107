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

Each agent process calls :func:`install_hooks` once in its ``build``: it loads
what the ``[hooks]`` table of the lab config names for that agent and keeps
one :class:`HookRunner` on the agent's context (``ctx.hooks``). With no hook
configured, nothing is wrapped and the agent runs exactly as before.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from twisted.internet import defer
from twisted.python import log
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

    def set_body(self, body: bytes | str) -> None:
        """Replace the body (to add a footer, say). Every line end becomes CRLF:
        RFC 5322 2.3 allows CR and LF in a message only together."""
        if isinstance(body, str):
            body = body.encode("utf-8")
        lines = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        body = b"\r\n".join(lines)
        self.body = body if body.endswith(b"\r\n") or not body else body + b"\r\n"

    def final_content(self) -> bytes:
        top = b"".join(f"{n}: {v}\r\n".encode("utf-8") for n, v in self.added)
        from .headers import split_message

        head, body = split_message(self.content)
        if self.body == body:
            return top + self.content  # byte for byte what arrived, under the new fields
        self.set_body(self.body)  # CRLF line ends, even if a hook assigned .body directly
        return top + head + b"\r\n" + self.body


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
    #: Knobs from the lab config (``[hooks.settings]``), e.g. ``{"greylist_delay": 300}``.
    settings: dict = field(default_factory=dict)
    #: A directory every agent of the lab shares (``HOME/hooks``): the one place
    #: where hooks in different agent processes can leave each other notes.
    data_dir: Path | None = None

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


def load_file(path: Path, only: str | None = None) -> list[Hook]:
    """Every ``on_<event>`` function of one Python file (a student's own file),
    or only the function called ``only``."""
    path = Path(path)
    name = f"mailpipe_hooks_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return _hooks_of(module, str(path), only)


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


class HookLoadError(Exception):
    """A ``[hooks]`` entry that cannot be loaded; the message names the entry."""

    def __init__(self, entry: str, error: BaseException):
        detail = f"{type(error).__name__}: {error}"
        if isinstance(error, SyntaxError) and error.lineno:
            detail = f"SyntaxError: {error.msg} ({error.filename}, line {error.lineno})"
        super().__init__(f"cannot load hook {entry!r}: {detail}")
        self.entry, self.error = entry, error


def entries_for(config, spec) -> list[tuple[str, str]]:
    """``(key, entry)`` for every ``[hooks]`` entry that applies to one agent, in order."""
    table = config.section("hooks")
    entries: list[tuple[str, str]] = []
    for key in ("all", spec.role, spec.name):
        value = table.get(key, [])
        entries += [(key, v) for v in ([value] if isinstance(value, str) else list(value))]
    return entries


def load_entry(entry: str) -> list[Hook]:
    """The hooks one ``[hooks]`` entry names; :class:`HookLoadError` if it cannot be loaded.

    An entry is a dotted path (``"coursework.greylist.solution:on_rcpt"``, or a
    module for all its ``on_*``), a ``.py`` file (``"~/hooks/mine.py"``, or
    ``"~/hooks/mine.py:on_rcpt"`` for one function) or a directory of them.
    """
    file_part, function = entry, None
    head, colon, tail = entry.rpartition(":")
    if colon and head.endswith(".py"):
        file_part, function = head, tail
    path = Path(file_part).expanduser()
    try:
        if file_part.endswith(".py") or path.is_dir():
            if not path.exists():
                raise FileNotFoundError(f"no such file: {path}")
            files = sorted(path.glob("*.py")) if path.is_dir() else [path]
            return [h for f in files for h in load_file(f, function)]
        return load_hook(entry)
    except Exception as e:
        raise HookLoadError(entry, e) from e


def hooks_for(config, spec) -> list[Hook]:
    """The hooks the lab config enables for one agent.

    ``[hooks]`` maps an agent name (``"mta.recipient.test"``), a role
    (``"mta"``) or ``"all"`` to a list of dotted paths or ``.py`` files or
    directories; ``[hooks.settings]`` holds the knobs hooks read from
    ``ctx.settings``::

        [hooks]
        mta = ["coursework.greylist.solution:on_rcpt"]
        "msa.sender.test" = ["~/my-hooks/"]

        [hooks.settings]
        greylist_delay = 300
    """
    return [hook for _key, entry in entries_for(config, spec) for hook in load_entry(entry)]


def hook_settings(config) -> dict:
    """The ``[hooks.settings]`` table: what hooks see as ``ctx.settings``."""
    return dict(config.section("hooks").get("settings", {}))


def describe(config) -> list[dict]:
    """For ``mailpipe hooks list``: per agent, each active hook and each entry that fails to load."""
    out = []
    for spec in config.agents():
        if spec.role == "dns":
            continue
        hooks, errors = [], []
        for key, entry in entries_for(config, spec):
            try:
                hooks += [{"event": h.event, "hook": h.name, "entry": entry, "from": key}
                          for h in load_entry(entry)]
            except HookLoadError as e:
                errors.append({"entry": entry, "from": key, "error": str(e)})
        out.append({"agent": spec.name, "role": spec.role, "hooks": hooks, "errors": errors})
    return out


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
        """Run ``event``'s hooks; fires with a :class:`Verdict` (never fails).

        Each run gets its own copy of the context, with this connection's
        notes and this transaction's scratch space; ``state``, the clock and
        the resolver are shared. (One shared, mutated context would hand an
        ``async`` hook another connection's notes after an ``await``.)
        """
        ctx = replace(self.ctx, notes={} if notes is None else notes,
                      transaction={} if transaction is None else transaction)
        for hook in self.by_event.get(event, ()):
            started = time.perf_counter()
            try:
                result = hook.function(ctx, *args)
                if inspect.isawaitable(result):
                    result = defer.ensureDeferred(_await(result))
                result = yield defer.maybeDeferred(lambda r=result: r)
            except Exception:
                failure = Failure()
                last = failure.frames[-1] if failure.frames else None  # where the hook failed
                ctx.tracer.event("hook.error", hook=hook.name, hook_event=event,
                                 error=f"{failure.type.__name__}: {failure.getErrorMessage()}",
                                 where=f"{last[1]}:{last[2]}" if last else None)
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

    def notify(self, event: str, *args) -> None:
        """Run an observe-only event's hooks without waiting for them (the agent goes on)."""
        if self.active(event):
            self.run(event, *args).addErrback(log.err)


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

    def handle_AUTH(self, session, user):
        """After a successful AUTH (MSA). RFC 4954 6 has the codes: a reject is
        ``535 5.7.8``, a tempfail ``454 4.7.0``; either way the session stays
        unauthenticated."""
        agent_policy = getattr(self.inner, "handle_AUTH", None)

        def fallback():
            return agent_policy(session, user) if agent_policy is not None else None

        if not self.runner.active("auth"):
            return fallback()

        def decide(verdict: Verdict):
            if verdict.kind == "reject":
                return Reply(535, "5.7.8", verdict.text)
            if verdict.kind == "tempfail":
                return Reply(454, "4.7.0", verdict.text)
            return None if verdict.kind == "accept" else fallback()

        return self.runner.run("auth", session, user, notes=session.notes).addCallback(decide)


# -- installing hooks in an agent ---------------------------------------------------

def install_hooks(ctx) -> HookRunner | None:
    """Load this agent's hooks from the lab config; keep the runner as ``ctx.hooks``.

    Called once by each agent's ``build`` (MSA, MTA, MDA). The hooks get the
    agent's own clock (``reactor.seconds``), a resolver on the lab DNS and the
    agent's tracer. A hook file that cannot be loaded stops the agent from
    starting, with the reason: better than a lab that silently runs without it.
    """
    from .runtime import CannotStart

    try:
        hooks = hooks_for(ctx.config, ctx.spec)
    except HookLoadError as e:
        raise CannotStart(str(e)) from None
    if not hooks:
        ctx.hooks = None
        return None
    data_dir = ctx.home.root / "hooks"
    data_dir.mkdir(parents=True, exist_ok=True)
    hook_ctx = HookContext(ctx.spec.name, ctx.spec.role, ctx.spec.domain, clock=ctx.reactor.seconds,
                           resolver=ctx.resolver(), tracer=ctx.tracer,
                           settings=hook_settings(ctx.config), data_dir=data_dir)
    ctx.hooks = HookRunner(hooks, hook_ctx)
    ctx.tracer.event("hooks.loaded", hooks=[f"{h.event}: {h.name}" for h in hooks])
    return ctx.hooks


def with_hooks(handler, runner: HookRunner | None):
    """``handler`` with the SMTP/LMTP hooks in front of it, if this agent has any."""
    return handler if runner is None else HookedHandler(handler, runner)
