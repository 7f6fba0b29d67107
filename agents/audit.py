"""Did the lab keep its promise? Count acknowledged messages in the mailboxes.

After a crash test, every message that got a ``250`` at the first hop must be
in the recipient's Maildir or have come back to the sender as a bounce
(RFC 5321 6.1). This module looks at the Maildirs on disk, the way an
auditor would, without asking any agent:

* ``delivered``  acknowledged messages found in the recipient's mailbox;
* ``bounced``    acknowledged messages named in a DSN in the sender's mailbox
                 (the ``text/rfc822-headers`` part carries their Message-ID);
* ``lost``       acknowledged messages in neither: must always be empty;
* ``duplicates`` extra copies in the mailbox (at-least-once delivery);
* ``unacknowledged_delivered``  messages whose client got no 250 but that
  arrived anyway: the server had them when the connection broke (RFC 1047).
"""

from __future__ import annotations

import email
import email.policy
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Audit:
    acknowledged: int
    delivered: set = field(default_factory=set)
    bounced: set = field(default_factory=set)
    lost: set = field(default_factory=set)
    duplicates: int = 0
    duplicate_ids: list = field(default_factory=list)
    unacknowledged_delivered: int = 0

    @property
    def ok(self) -> bool:
        return not self.lost

    def summary(self) -> str:
        return (f"acknowledged {self.acknowledged}: delivered {len(self.delivered)}, "
                f"bounced {len(self.bounced)}, LOST {len(self.lost)}; "
                f"duplicates {self.duplicates}; arrived without a 250: {self.unacknowledged_delivered}")


def maildir_files(home_root: Path, address: str):
    """Every message file of ``address`` (all folders, new and cur), as paths."""
    local, domain = address.lower().split("@")
    user = Path(home_root) / "maildir" / domain / local
    for folder in [user, *sorted(p for p in user.glob(".*") if p.is_dir())]:
        for sub in ("new", "cur"):
            d = folder / sub
            if d.is_dir():
                yield from sorted(d.iterdir())


def _headers(path: Path):
    try:
        with open(path, "rb") as f:
            return email.message_from_bytes(f.read(), policy=email.policy.default)
    except FileNotFoundError:  # moved from new/ to cur/ while we looked
        return None


def mailbox_ids(home_root: Path, address: str) -> Counter:
    """How many copies of each Message-ID are in ``address``'s mailbox."""
    ids: Counter = Counter()
    for path in maildir_files(home_root, address):
        msg = _headers(path)
        if msg is not None and msg["Message-ID"]:
            ids[str(msg["Message-ID"]).strip()] += 1
    return ids


def bounced_ids(home_root: Path, address: str) -> set[str]:
    """Message-IDs of the messages that bounced back to ``address`` (RFC 3464 reports)."""
    out = set()
    for path in maildir_files(home_root, address):
        msg = _headers(path)
        if msg is None or msg.get_content_type() != "multipart/report":
            continue
        for part in msg.walk():
            if part.get_content_type() in ("text/rfc822-headers", "message/rfc822"):
                original = email.message_from_bytes(part.get_payload(decode=True) or b"",
                                                    policy=email.policy.default)
                if original["Message-ID"]:
                    out.add(str(original["Message-ID"]).strip())
    return out


def audit(home_root: Path, acknowledged: list[str], rcpt: str, sender: str,
          unacknowledged: list[str] = ()) -> Audit:
    """Check every acknowledged message against the mailboxes on disk."""
    ack = set(acknowledged)
    in_box = mailbox_ids(home_root, rcpt)
    bounced = bounced_ids(home_root, sender) & ack
    delivered = {m for m in ack if in_box[m]}
    dup_ids = sorted(m for m in ack | set(unacknowledged) if in_box[m] > 1)
    return Audit(
        acknowledged=len(ack), delivered=delivered, bounced=bounced,
        lost=ack - delivered - bounced,
        duplicates=sum(in_box[m] - 1 for m in dup_ids), duplicate_ids=dup_ids,
        unacknowledged_delivered=sum(1 for m in unacknowledged if in_box[m]),
    )


def wait_for_audit(lab, acknowledged: list[str], rcpt: str = "bob@recipient.test",
                   sender: str = "alice@sender.test", unacknowledged: list[str] = (),
                   timeout: float = 60.0, flush_every: float = 2.0) -> Audit:
    """Audit until nothing acknowledged is missing, or ``timeout`` seconds pass.

    Every ``flush_every`` seconds the queues are flushed (``mailpipe queue
    flush``), so a message that waits for its next retry does not make us wait.
    """
    deadline = time.monotonic() + timeout
    next_flush = time.monotonic() + flush_every
    while True:
        result = audit(lab.home.root, acknowledged, rcpt, sender, unacknowledged)
        if result.ok or time.monotonic() > deadline:
            return result
        if time.monotonic() > next_flush:
            try:
                lab.control.flush()
            except Exception:
                pass  # an agent may be restarting; the next round flushes again
            next_flush = time.monotonic() + flush_every
        time.sleep(0.25)
