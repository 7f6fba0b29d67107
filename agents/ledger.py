"""Counting duplicates at the last hop: at-least-once made visible.

RFC 5321 6.1 forbids losing a message once it is acknowledged, and the only
way to keep that promise across crashes is to deliver *again* when in doubt.
An MTA that crashed after the MDA stored a message, but before it removed the
message from its spool, delivers it a second time after the restart; so does
one whose connection broke after the final dot but before the reply
(RFC 1047). Duplicates are the price of never losing mail.

The MDA keeps a ledger of what it has stored: one JSON line per copy, with
the message's ``Message-ID`` and the recipient. When the same pair comes
again it still delivers (the message may really have been sent twice, and
dropping mail on a guess would break the promise), and records a
``duplicate`` trace event, so tests and notebooks can count them.

The ledger is appended without ``fsync``: a process crash (``kill -9``)
keeps what was written, only a power failure could lose the last lines, and
then a duplicate goes uncounted, never a message lost. (Real MDAs keep a
similar, bounded database: Dovecot's ``duplicate`` dict, procmail's
``formail -D`` cache.)
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

from twisted.internet import defer

from .headers import get_header
from .trace import NULL_TRACER


class DeliveryLedger:
    """Which ``(Message-ID, recipient)`` pairs were stored, and how often."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.copies: Counter = Counter()
        try:
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    try:
                        entry = json.loads(line)
                    except ValueError:
                        continue  # the last line, cut short by a crash
                    self.copies[(entry["message_id"], entry["rcpt"])] += 1
        except FileNotFoundError:
            pass
        self._file = open(self.path, "a", buffering=1, encoding="utf-8")

    @staticmethod
    def key(message_id: str, rcpt: str) -> tuple[str, str]:
        return message_id.strip(), rcpt.lower()

    def note(self, message_id: str, rcpt: str, file_name: str) -> int:
        """Record one stored copy; returns how many copies there are now."""
        key = self.key(message_id, rcpt)
        self.copies[key] += 1
        self._file.write(json.dumps({"message_id": key[0], "rcpt": key[1], "file": file_name,
                                     "ts": round(time.time(), 6)}) + "\n")
        return self.copies[key]

    @property
    def duplicates(self) -> int:
        """Extra copies: a pair stored three times counts two."""
        return sum(n - 1 for n in self.copies.values() if n > 1)

    def close(self) -> None:
        self._file.close()


class LedgerStore:
    """The MDA's :class:`~agents.maildir.MailStore`, noting every delivery in a ledger.

    ``faults`` (a :class:`~agents.faults.FaultSet`) may make deliveries fail
    as if the disk were full; everything but ``deliver`` goes to the store.
    """

    def __init__(self, store, ledger: DeliveryLedger, tracer=NULL_TRACER, faults=None):
        self._store, self.ledger, self.tracer, self.faults = store, ledger, tracer, faults
        self.stored = 0

    def __getattr__(self, name):
        return getattr(self._store, name)

    def deliver(self, address: str, content: bytes, folder: str = "INBOX"):
        if self.faults is not None and self.faults.disk_full():
            from .faults import no_space

            return defer.fail(no_space(f"maildir of {address}"))
        d = self._store.deliver(address, content, folder)
        return d.addCallback(self._stored, address, content)

    def _stored(self, file_name: str, address: str, content: bytes) -> str:
        self.stored += 1
        message_id = get_header(content, "Message-ID")
        if message_id:
            copies = self.ledger.note(message_id, address, file_name)
            if copies > 1:
                self.tracer.event("duplicate", message_id=message_id.strip(), rcpt=address,
                                  copies=copies, maildir_file=file_name)
        return file_name
