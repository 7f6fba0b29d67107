"""The spool: where an agent keeps a message between "250 OK" and delivery.

RFC 5321 6.1 makes accepting a message a promise: from the moment the server
answers 250 to DATA it is responsible for the message, across crashes. So a
message is written to the spool, durably (see :mod:`agents.durable`), before
the 250 goes out, and removed only once every recipient is done.

On disk, ``HOME/spool/<agent>/``::

    tmp/                 half-written files (never read; cleared at start)
    queue/<qid>.msg      one JSON line (the envelope), then the raw message
    queue/<qid>.state    what has happened since: recipients done, attempts

A ``.msg`` file is complete or absent, because it only appears by rename.
A ``.msg`` whose first line does not parse is moved to ``corrupt/`` with a
trace event, never silently dropped.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .durable import write_durably

_sequence = itertools.count()


def new_queue_id() -> str:
    """A short unique id, like Postfix's: time, process and a counter, in hex."""
    return f"{time.time_ns() // 1000:X}{os.getpid() % 0xFFFF:04X}{next(_sequence) % 0xFFFF:04X}"


@dataclass
class QueuedMessage:
    """One spooled message: its envelope and what is left to do."""

    queue_id: str
    mail_from: str
    recipients: list[str]
    message_id: str | None = None
    received_at: float = field(default_factory=time.time)
    #: recipients still waiting for delivery (the rest are done or bounced)
    pending: list[str] = field(default_factory=list)
    attempts: int = 0
    next_attempt: float = 0.0
    last_error: str | None = None
    held: bool = False

    def envelope_json(self) -> bytes:
        head = {
            "queue_id": self.queue_id,
            "mail_from": self.mail_from,
            "recipients": self.recipients,
            "message_id": self.message_id,
            "received_at": self.received_at,
        }
        return json.dumps(head).encode() + b"\n"


class CorruptSpoolFile(Exception):
    pass


class Spool:
    """A directory of queued messages. Every method blocks: call from a thread."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.tmp = self.root / "tmp"
        self.queue = self.root / "queue"
        self.corrupt = self.root / "corrupt"
        for d in (self.tmp, self.queue, self.corrupt):
            d.mkdir(parents=True, exist_ok=True)

    def _msg(self, qid: str) -> Path:
        return self.queue / f"{qid}.msg"

    def _state(self, qid: str) -> Path:
        return self.queue / f"{qid}.state"

    def store(self, item: QueuedMessage, content: bytes) -> None:
        """Write the message durably. Only after this returns may we say 250."""
        item.pending = list(item.recipients)
        write_durably(self.tmp / item.queue_id, self._msg(item.queue_id), item.envelope_json() + content)

    def save_state(self, item: QueuedMessage) -> None:
        state = {k: v for k, v in asdict(item).items() if k in ("pending", "attempts", "next_attempt", "last_error", "held")}
        tmp = self.tmp / f"{item.queue_id}.state.{next(_sequence)}"
        write_durably(tmp, self._state(item.queue_id), json.dumps(state).encode())

    def content(self, qid: str) -> bytes:
        with open(self._msg(qid), "rb") as f:
            f.readline()
            return f.read()

    def remove(self, qid: str) -> None:
        """Forget a finished message. A crash before this only causes a duplicate."""
        for path in (self._state(qid), self._msg(qid)):
            try:
                path.unlink()
            except FileNotFoundError:
                pass

    def load(self, qid: str) -> QueuedMessage:
        try:
            with open(self._msg(qid), "rb") as f:
                head = json.loads(f.readline())
            item = QueuedMessage(**head)
        except (ValueError, TypeError) as e:
            raise CorruptSpoolFile(f"{qid}: {e}") from None
        item.pending = list(item.recipients)
        try:
            state = json.loads(self._state(qid).read_bytes())
            for k, v in state.items():
                setattr(item, k, v)
        except FileNotFoundError:
            pass
        except ValueError:
            pass  # a torn state file: start over, at worst a duplicate delivery
        return item

    def recover(self) -> tuple[list[QueuedMessage], list[str]]:
        """Everything left in the spool: ``(messages, ids moved to corrupt/)``."""
        for leftover in self.tmp.iterdir():
            leftover.unlink()  # never acknowledged: the client got no 250
        items, corrupt = [], []
        for path in sorted(self.queue.glob("*.msg")):
            qid = path.stem
            try:
                items.append(self.load(qid))
            except CorruptSpoolFile:
                os.replace(path, self.corrupt / path.name)
                corrupt.append(qid)
        return items, corrupt
