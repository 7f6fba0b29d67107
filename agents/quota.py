"""Mailbox quotas: how much mail one user may keep.

A full mailbox is a *per-recipient* problem: with LMTP (RFC 2033 4.2) the MDA
answers each recipient separately after the data, so one user over quota
gets ``452 4.2.2`` (RFC 3463: mailbox full, temporary) while the others get
their copy. The sending MTA keeps the message queued for that one
recipient, retries, and bounces it if the mailbox is still full when the
queue lifetime ends.

Configured in the lab config (sizes in bytes, 0 = no limit)::

    [quota]
    default = 0
    "carol@recipient.test" = 100000
"""

from __future__ import annotations

import os
from pathlib import Path

from .maildir import split_filename


class Quotas:
    def __init__(self, config):
        table = config.section("quota")
        self.default = int(table.get("default", 0))
        self.limits = {k.lower(): int(v) for k, v in table.items() if "@" in k}

    def limit(self, address: str) -> int:
        """The user's quota in bytes; 0 means no limit."""
        return self.limits.get(address.lower(), self.default)


def usage(user_dir: Path) -> int:
    """Bytes of mail a user keeps, in every folder (blocking: it lists directories).

    Maildir++ puts the size in each file name (``,S=<size>``), so no file
    needs to be opened or even stat'ed, as Dovecot's quota does.
    """
    total = 0
    for folder, _dirs, _files in os.walk(user_dir):
        if os.path.basename(folder) not in ("new", "cur"):
            continue
        with os.scandir(folder) as entries:
            for entry in entries:
                key = split_filename(entry.name)[0]
                size = key.rpartition(",S=")[2]
                total += int(size) if size.isdigit() else entry.stat().st_size
    return total
