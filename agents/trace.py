"""Trace events: what each agent did, when, as JSON Lines under the lab home.

Every agent owns one :class:`Tracer`. An *event* is one step a learner should
see (``connection.accepted``, ``smtp.mail``, ``spooled``, ``dns.answer``...);
a *transcript line* is one protocol line sent (``S:``) or received (``C:``).
Both go to ``HOME/trace/<agent>.jsonl``, one JSON object per line, with a
wall-clock timestamp in microseconds (from :func:`time.time_ns`), so events
from different processes on the same machine can be joined per message.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Iterator

_conn_ids = itertools.count(1)

#: Secrets never reach the trace: AUTH arguments and responses, LOGIN/PASS.
_SECRET_PATTERNS = [
    re.compile(rb"^(AUTH\s+\S+)\s+\S.*$", re.I),  # AUTH PLAIN <initial-response>
    re.compile(rb"^(\S+\s+LOGIN\s+\S+)\s+.*$", re.I),  # IMAP: tag LOGIN user pass
    re.compile(rb"^(PASS)\s+.*$", re.I),  # POP3
]


def now_us() -> int:
    """Wall-clock time in microseconds since the epoch."""
    return time.time_ns() // 1000


def mask_secret(line: bytes) -> bytes:
    """Replace credentials in a protocol line with ``***``."""
    for pat in _SECRET_PATTERNS:
        m = pat.match(line)
        if m:
            return m.group(1) + b" ***"
    return line


class Tracer:
    """Writes one agent's events. Cheap: one buffered write per event."""

    def __init__(self, path: Path | None, agent: str, role: str, domain: str | None):
        self.agent, self.role, self.domain = agent, role, domain
        self.enabled = path is not None
        self._file = None
        self._bound: dict[str, Any] = {}
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Line buffering: each event reaches the file when it is written,
            # so a reader (a notebook, `mailpipe trace`) sees it at once.
            self._file = open(path, "a", buffering=1, encoding="utf-8")

    def bind(self, **fields: Any) -> "Tracer":
        """A tracer that adds ``fields`` (a queue id, a Message-ID) to every event.

        The relay client gets one, so its connection events join the message
        they carried.
        """
        bound = Tracer.__new__(Tracer)
        bound.__dict__.update(self.__dict__)
        bound._bound = {**self._bound, **{k: v for k, v in fields.items() if v is not None}}
        return bound

    def new_connection_id(self) -> str:
        return f"{self.agent}/{os.getpid()}/{next(_conn_ids)}"

    def event(self, name: str, **fields: Any) -> None:
        if not self._file:
            return
        record = {
            "ts": now_us(),
            "agent": self.agent,
            "role": self.role,
            "domain": self.domain,
            "event": name,
        }
        if self._bound:
            record.update(self._bound)
        record.update({k: v for k, v in fields.items() if v is not None})
        self._file.write(json.dumps(record, default=str) + "\n")

    def line(self, conn: str, direction: str, data: bytes, peer: str | None = None) -> None:
        """Record one protocol line; ``direction`` is ``"C"`` or ``"S"``."""
        if not self._file:
            return
        text = mask_secret(data).decode("utf-8", "replace")
        self.event("line", conn=conn, dir=direction, line=text, peer=peer)

    def close(self) -> None:
        if self._file:
            self._file.close()
            self._file = None


NULL_TRACER = Tracer(None, "-", "-", None)


def read_events(trace_dir: Path) -> Iterator[dict]:
    """Every event of a lab home's trace directory, in file order per agent."""
    for path in sorted(Path(trace_dir).glob("*.jsonl")):
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut short by a crash
