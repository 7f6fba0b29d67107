"""Reading and adding message header fields (RFC 5322), byte-exact.

Agents never re-serialise a message they relay: they prepend trace fields
(``Received:``, ``Return-Path:``) and, at the MSA, add the fields a message
must have (``Message-ID``, ``Date``). Everything else passes through byte for
byte, which is what keeps DKIM signatures valid across hops (RFC 6376 5.4).
"""

from __future__ import annotations

import datetime
import email.utils
import functools
import re
import time
import uuid

_SAFE_TOKEN = re.compile(rb"[^\x21-\x7e]")


def header_block(content: bytes) -> bytes:
    """The header section including its final CRLF (RFC 5322 2.1), without copying the body."""
    if content.startswith(b"\r\n"):
        return b""  # an empty header section
    end = content.find(b"\r\n\r\n")
    return content if end < 0 else content[: end + 2]


def split_message(content: bytes) -> tuple[bytes, bytes]:
    """``(header block including its final CRLF, body)``; RFC 5322 2.1."""
    block = header_block(content)
    if len(block) == len(content):
        return content, b""  # no empty line: all header, no body
    return block, content[len(block) + 2 :]


def header_fields(content: bytes) -> list[tuple[str, str]]:
    """All header fields as ``(name, unfolded value)`` pairs, in order."""
    block = header_block(content)
    if len(block) > _CACHED_HEADER_LIMIT:
        return list(_parse_header_block.__wrapped__(block))
    return list(_parse_header_block(block))


#: Header blocks up to this size are remembered (a few per agent at a time).
_CACHED_HEADER_LIMIT = 64 * 1024


@functools.lru_cache(maxsize=64)
def _parse_header_block(block: bytes) -> tuple[tuple[str, str], ...]:
    # An agent reads the same message's header many times (Message-ID, From,
    # DKIM, Authentication-Results...): parse each header block once. The key
    # is the header alone, so the cache never holds a message body.
    fields: list[tuple[str, str]] = []
    for line in block.split(b"\r\n"):
        if not line:
            continue
        if line[:1] in (b" ", b"\t") and fields:
            name, value = fields[-1]
            fields[-1] = (name, value + " " + line.strip().decode("utf-8", "replace"))
        elif b":" in line:
            name, _, value = line.partition(b":")
            fields.append((name.decode("ascii", "replace").strip(), value.strip().decode("utf-8", "replace")))
    return tuple(fields)


def get_header(content: bytes, name: str) -> str | None:
    """The first field called ``name`` (case-insensitive), or ``None``."""
    lname = name.lower()
    for fname, value in header_fields(content):
        if fname.lower() == lname:
            return value
    return None


def safe_token(value: str | bytes, limit: int = 255) -> str:
    """Make a peer-supplied word (a HELO name) safe to put in a header.

    A HELO argument is attacker-controlled; copying it raw into ``Received:``
    could inject a CRLF and a header of the attacker's choosing.
    """
    if isinstance(value, str):
        value = value.encode("utf-8", "replace")
    return _SAFE_TOKEN.sub(b"?", value[:limit]).decode("ascii") or "unknown"


def rfc5322_date(when: float | None = None) -> str:
    """A date-time as RFC 5322 3.3 writes it, in UTC with a ``+0000`` zone.

    (``-0000`` would mean "zone unknown", which is not the case.)
    """
    moment = datetime.datetime.fromtimestamp(when if when is not None else time.time(), datetime.timezone.utc)
    return email.utils.format_datetime(moment)


def received_field(
    *,
    helo: str | None,
    peer_ip: str,
    by: str,
    protocol: str,
    queue_id: str,
    recipient: str | None = None,
    tls: str | None = None,
    when: float | None = None,
) -> bytes:
    """One ``Received:`` trace field (RFC 5321 4.4), folded, ending in CRLF.

    ``protocol`` is a registered "with" keyword (RFC 3848): ``ESMTP``, plus
    ``S`` when TLS was used and ``A`` when the client authenticated
    (``ESMTPSA``), or ``LMTP``.
    """
    parts = [f"Received: from {safe_token(helo or 'unknown')} ([{peer_ip}])"]
    by_clause = f"by {by} (mailpipe) with {protocol}"
    if tls:
        by_clause += f" ({tls})"
    parts.append(f"{by_clause} id {queue_id}")
    tail = f"for <{recipient}>; " if recipient else ""
    parts.append(f"{tail}{rfc5322_date(when)}")
    return ("\r\n\t".join(parts) + "\r\n").encode()


def new_message_id(domain: str) -> str:
    return f"<{uuid.uuid4().hex}@{domain}>"


def complete_for_submission(content: bytes, domain: str, when: float | None = None) -> tuple[bytes, str]:
    """Add ``Message-ID`` and ``Date`` when missing, as an MSA may (RFC 6409 8.2, 8.3).

    Returns the new content and its Message-ID.
    """
    added = b""
    message_id = get_header(content, "Message-ID")
    if message_id is None:
        message_id = new_message_id(domain)
        added += f"Message-ID: {message_id}\r\n".encode()
    if get_header(content, "Date") is None:
        added += f"Date: {rfc5322_date(when)}\r\n".encode()
    block, body = split_message(content)
    return block + added + b"\r\n" + body, message_id
