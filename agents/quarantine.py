"""How the MTA tells its MDA to file a message in a folder other than INBOX.

When DMARC says ``p=quarantine`` (RFC 7489 6.3: "treat as suspicious"), the
receiving MTA still accepts the message, but the reader should find it in
Junk, not in the INBOX. The MTA decides; the MDA stores. The decision travels
with the message as one internal header field, at the top::

    X-Mailpipe-Folder: Junk

This is how real sites do it: a filter (rspamd, SpamAssassin) adds a header
field such as ``X-Spam: Yes`` and the delivery agent's rules (Sieve
``fileinto "Junk"``) act on it. It is safe only because nobody outside can
set it: the MTA removes any ``X-Mailpipe-Folder`` a message arrives with
(:func:`remove`), the MDA takes LMTP only from its own MTA, and the MDA
removes the field again before it stores the message, so readers never see it.
"""

from __future__ import annotations

from .headers import split_message
from .maildir import INBOX, UnsafePath, check_folder_name

HEADER = b"X-Mailpipe-Folder"


def mark(content: bytes, folder: str) -> bytes:
    """Ask the MDA to store ``content`` in ``folder``."""
    return HEADER + b": " + check_folder_name(folder).encode() + b"\r\n" + content


def remove(content: bytes) -> tuple[bytes, str | None]:
    """``(content without any X-Mailpipe-Folder field, the first one's folder or None)``."""
    block, body = split_message(content)
    if HEADER.lower() not in block.lower():
        return content, None  # most messages: no such field anywhere in the header
    lines, folder, dropping, changed = [], None, False, False
    for line in block.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and dropping:
            continue
        dropping = False
        name, _, value = line.partition(b":")
        if line and name.strip().lower() == HEADER.lower():
            dropping, changed = True, True
            if folder is None:
                folder = value.strip().decode("utf-8", "replace")
            continue
        lines.append(line)
    if not changed:
        return content, None
    return b"\r\n".join(lines) + b"\r\n" + body, folder


def folder_for(content: bytes) -> tuple[str, bytes]:
    """For the MDA: ``(folder to store in, content to store)``; INBOX unless marked."""
    content, folder = remove(content)
    try:
        return (check_folder_name(folder) if folder else INBOX), content
    except UnsafePath:
        return INBOX, content
