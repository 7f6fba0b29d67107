"""Trace events: what each agent did, when, as JSON Lines under the lab home.

Every agent owns one :class:`Tracer`. An *event* is one step a learner should
see (``connection.accepted``, ``smtp.mail``, ``spooled``, ``dns.answer``...);
a *transcript line* is one protocol line sent (``S:``) or received (``C:``).
Both go to ``HOME/trace/<agent>.jsonl``, one JSON object per line, with a
wall-clock timestamp in microseconds (from :func:`time.time_ns`), so events
from different processes on the same machine can be joined per message.
"""

from __future__ import annotations

import contextvars
import itertools
import json
import math
import os
import re
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

_conn_ids = itertools.count(1)
#: One encoder for every event (``json.dumps`` with options builds a new one per call).
_ENCODER = json.JSONEncoder(default=str)
_quote = json.encoder.encode_basestring_ascii

#: Secrets never reach the trace: AUTH arguments and responses, LOGIN/PASS.
_SECRET_PATTERNS = [
    re.compile(rb"^(AUTH\s+\S+)\s+\S.*$", re.I),  # AUTH PLAIN <initial-response>
    re.compile(rb"^(\S+\s+LOGIN\s+\S+)\s+.*$", re.I),  # IMAP: tag LOGIN user pass
    re.compile(rb"^(PASS)\s+.*$", re.I),  # POP3
]


#: Whom the code now running works for: see :func:`working_for`.
_WORKING_FOR: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar("working_for", default={})


@contextmanager
def working_for(**fields: str | None) -> Iterator[None]:
    """Tag the events of work started in this block with ``fields``.

    A DNS lookup deep inside an SPF check cannot tell which message or
    connection it serves; its caller can. The queue runs each delivery
    attempt ``with working_for(queue_id=...)`` and the SMTP server each
    policy hook ``with working_for(conn=...)``; the resolver adds
    :func:`work_fields` to its events, so a trace reader joins every lookup
    to its own message even when ten run at once.

    How it travels: Twisted runs each ``inlineCallbacks`` generator in a copy
    of the :mod:`contextvars` context current when it was *called*, so the
    tag stays with that work across its ``yield`` s. A plain callback fired
    later by other code does not see it; its events are simply untagged.
    """
    token = _WORKING_FOR.set({**_WORKING_FOR.get(), **{k: v for k, v in fields.items() if v is not None}})
    try:
        yield
    finally:
        _WORKING_FOR.reset(token)


def work_fields() -> dict[str, str]:
    """The fields of the innermost :func:`working_for` around the running code."""
    return _WORKING_FOR.get()


def now_us() -> int:
    """Wall-clock time in microseconds since the epoch."""
    return time.time_ns() // 1000


def mask_secret(line: bytes) -> bytes:
    """Replace credentials in a protocol line with ``***``."""
    upper = line.upper()
    if b"AUTH" not in upper and b"LOGIN" not in upper and not upper.startswith(b"PASS"):
        return line  # most lines: no pattern can match
    for pat in _SECRET_PATTERNS:
        m = pat.match(line)
        if m:
            return m.group(1) + b" ***"
    return line


def _json_value(value: Any) -> str:
    """One field value as JSON, written as ``json`` would write it.

    The kinds events carry most (strings, integers, times in ms, flags, lists
    of names) are written directly; ``JSONEncoder.encode`` costs more than the
    rest of an event. Anything else (dicts, NaN, objects) goes to the encoder.
    """
    kind = type(value)
    if kind is str:
        return _quote(value)
    if kind is int:
        return str(value)
    if kind is float and math.isfinite(value):
        return repr(value)  # what json.dumps writes for a finite float
    if kind is bool:
        return "true" if value else "false"
    if kind is list and all(type(item) is str for item in value):
        return "[" + ", ".join(map(_quote, value)) + "]"
    return _ENCODER.encode(value)  # dicts, nested lists, NaN; anything else as str()


class TraceSink:
    """The file behind a tracer and its bound copies: one write per reactor turn.

    Writing each event with its own ``write(2)`` cost more than making it. With
    a *scheduler* (``reactor.callLater``), events made during one turn of the
    reactor are buffered and written together right after it, so a reader (a
    notebook, ``mailpipe trace``) still sees them within milliseconds. A crash
    (``kill -9``) loses at most that one turn's events. Without a scheduler, or
    from a thread other than the one that made the sink, each event is written
    at once.
    """

    def __init__(self, path: Path, scheduler=None):
        path.parent.mkdir(parents=True, exist_ok=True)
        # O_APPEND and one write(2) per batch: lines from several processes
        # appending to one file (the MUAs share mua.jsonl) never interleave.
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self._scheduler = scheduler
        self._thread = threading.get_ident()
        self._pending: list[str] = []

    def write(self, text: str) -> None:
        if self._scheduler is None or threading.get_ident() != self._thread:
            self._write(text)
            return
        if not self._pending:
            self._scheduler(0, self.flush)
        self._pending.append(text)

    def flush(self) -> None:
        if self._pending:
            text = "".join(self._pending)
            self._pending.clear()
            self._write(text)

    def _write(self, text: str) -> None:
        if self._fd is None:
            return
        data = text.encode("utf-8")
        while data:
            written = os.write(self._fd, data)
            data = data[written:]

    def close(self) -> None:
        if self._fd is not None:
            self.flush()
            os.close(self._fd)
            self._fd = None


class Tracer:
    """Writes one agent's events as JSON Lines, cheaply.

    The fields every event of this agent carries (agent, role, domain) are
    encoded once; an event encodes only its own fields. Pass ``scheduler``
    (``reactor.callLater``) to write each reactor turn's events together.
    """

    def __init__(self, path: Path | None, agent: str, role: str, domain: str | None,
                 scheduler=None):
        self.agent, self.role, self.domain = agent, role, domain
        self._sink = TraceSink(path, scheduler) if path is not None else None
        self._bound: dict[str, Any] = {}
        self._head = ""
        self._set_head()

    @property
    def enabled(self) -> bool:
        return self._sink is not None

    def _set_head(self) -> None:
        # '"agent": ..., "role": ..., "domain": ...' plus any bound fields,
        # ready to paste after the timestamp.
        fixed = {"agent": self.agent, "role": self.role, "domain": self.domain}
        self._head = _ENCODER.encode(fixed)[1:-1]
        self._bound_text = _ENCODER.encode(self._bound)[1:-1] if self._bound else ""

    def bind(self, **fields: Any) -> "Tracer":
        """A tracer that adds ``fields`` (a queue id, a Message-ID) to every event.

        The relay client gets one, so its connection events join the message
        they carried.
        """
        bound = Tracer.__new__(Tracer)
        bound.__dict__.update(self.__dict__)
        bound._bound = {**self._bound, **{k: v for k, v in fields.items() if v is not None}}
        bound._set_head()
        return bound

    def new_connection_id(self) -> str:
        return f"{self.agent}/{os.getpid()}/{next(_conn_ids)}"

    def event(self, name: str, **fields: Any) -> None:
        if self._sink is None:
            return
        parts = ['{"ts": ', str(now_us()), ", ", self._head, ', "event": ', _quote(name)]
        if self._bound_text:
            parts += [", ", self._bound_text]
        for key, value in fields.items():
            if value is not None:
                parts += [", ", _quote(key), ": ", _json_value(value)]
        parts.append("}\n")
        self._sink.write("".join(parts))

    def line(self, conn: str, direction: str, data: bytes, peer: str | None = None) -> None:
        """Record one protocol line; ``direction`` is ``"C"`` or ``"S"``.

        Transcript lines are most of the trace, so they are formatted by hand
        (``_quote`` is the json module's own C string encoder).
        """
        if self._sink is None:
            return
        text = mask_secret(data).decode("utf-8", "replace")
        parts = ['{"ts": ', str(now_us()), ", ", self._head, ', "event": "line"']
        if self._bound_text:
            parts += [", ", self._bound_text]
        if conn is not None:
            parts += [', "conn": ', _json_value(conn)]
        parts += [', "dir": ', _quote(direction), ', "line": ', _quote(text)]
        if peer is not None:
            parts += [', "peer": ', _json_value(peer)]
        parts.append("}\n")
        self._sink.write("".join(parts))

    def flush(self) -> None:
        if self._sink is not None:
            self._sink.flush()

    def close(self) -> None:
        if self._sink is not None:
            self._sink.close()
            self._sink = None


NULL_TRACER = Tracer(None, "-", "-", None)


def read_events(trace_dir: Path, containing: str | None = None) -> Iterator[dict]:
    """Every event of a lab home's trace directory, in file order per agent.

    With ``containing``, only the events whose JSON line contains that text:
    a lab's trace grows by some 25 KB per message, and skipping a line costs
    far less than parsing it. Pass text that the JSON writes as it is (a
    Message-ID, a queue id), since the test is on the line, not the fields.
    """
    for path in sorted(Path(trace_dir).glob("*.jsonl")):
        with open(path, encoding="utf-8") as f:
            for line in f:
                if containing is not None and containing not in line:
                    continue
                line = line.strip()
                if line:
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut short by a crash
