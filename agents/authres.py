"""The ``Authentication-Results:`` header field (RFC 8601): telling the reader what was checked.

The receiving MTA runs SPF, DKIM and DMARC; the reader's mail program (and
any filter after the MTA) learns the results from one header field::

    Authentication-Results: mx.recipient.test;
        spf=pass (127.0.1.1 is allowed by sender.test: ip4:127.0.1.1) smtp.mailfrom=alice@sender.test;
        dkim=pass header.d=sender.test header.s=lab header.a=rsa-sha256 header.b=ldv3N0il;
        dmarc=pass (p=reject dis=none) header.from=sender.test

The first word is the *authserv-id* (2.5): who vouches for these results.
Then one ``method=result`` per check, a comment in parentheses, and
``ptype.property=value`` saying what was checked (2.3, 2.7).

Anybody can write such a header field into a message. So a receiver keeps
only the ones it added itself: on the way in, the MTA removes every
``Authentication-Results:`` that claims *its* authserv-id (RFC 8601 5),
and a reader trusts only the one with its own provider's authserv-id.
"""

from __future__ import annotations

import re

from .headers import split_message

HEADER = "Authentication-Results"

_COMMENT_UNSAFE = re.compile(r"[()\\\x00-\x1f\x7f]")
_VALUE_UNSAFE = re.compile(r"[^\x21-\x7e]|[;()\\\"]")


def comment(text: str) -> str:
    """A ``(comment)`` safe to put in the header: no parentheses, no line breaks."""
    return "(" + _COMMENT_UNSAFE.sub(" ", text).strip()[:200] + ")"


def value(text: str) -> str:
    """A property value (2.2 ``pvalue``); anything odd becomes ``?``, never a new field."""
    return _VALUE_UNSAFE.sub("?", text)[:255] or "?"


def resinfo(method: str, result: str, why: str | None = None, **properties: str) -> str:
    """One ``method=result (why) ptype.property=value ...`` clause (RFC 8601 2.2).

    Keyword names use ``_`` for ``.``: ``smtp_mailfrom="a@b"`` -> ``smtp.mailfrom=a@b``.
    """
    parts = [f"{method}={result}"]
    if why:
        parts.append(comment(why))
    parts += [f"{name.replace('_', '.', 1)}={value(v)}" for name, v in properties.items() if v]
    return " ".join(parts)


def build(authserv_id: str, results: list[str]) -> bytes:
    """The whole header field, folded one result per line, ending in CRLF."""
    if not results:
        return f"{HEADER}: {authserv_id}; none\r\n".encode()  # 2.2: nothing was checked
    return (f"{HEADER}: {authserv_id};\r\n\t" + ";\r\n\t".join(results) + "\r\n").encode()


def authserv_id_of(field_value: str) -> str:
    """The authserv-id a header field claims: its first token, comments skipped (2.2)."""
    text = field_value
    while True:  # drop leading CFWS comments like "(forged) mx.example;"
        text = text.lstrip()
        if not text.startswith("("):
            break
        depth, i = 0, 0
        for i, ch in enumerate(text):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                break
        text = text[i + 1:]
    m = re.match(r'\s*"?([^\s;"()]+)', text)
    return m.group(1).lower().rstrip(".") if m else ""


def is_ours(authserv_id: str, own_ids: set[str], own_domain: str) -> bool:
    """Does this authserv-id speak for us: one of our names, or any name in our domain?

    A forger might write ``recipient.test`` instead of ``mx.recipient.test``;
    both claim to be this ADMD, so both go.
    """
    authserv_id = authserv_id.lower()
    return authserv_id in own_ids or authserv_id == own_domain or authserv_id.endswith("." + own_domain)


def strip_ours(content: bytes, own_ids: set[str], own_domain: str) -> tuple[bytes, int]:
    """Remove every ``Authentication-Results:`` claiming to be us (RFC 8601 5).

    Returns the new content and how many fields were removed. Other header
    fields, and the body, stay byte for byte as they were (DKIM needs that).
    """
    block, body = split_message(content)
    if HEADER.lower().encode() not in block.lower():
        return content, 0  # no Authentication-Results: at all, ours or anyone's
    fields: list[list[bytes]] = []  # each field: its first line, then its continuation lines
    for line in block.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1].append(line)
        elif line:
            fields.append([line])
    kept, removed = [], 0
    for lines in fields:
        name, _, first = lines[0].partition(b":")
        if name.strip().lower() == HEADER.lower().encode():
            unfolded = b" ".join([first] + lines[1:]).decode("utf-8", "replace")
            if is_ours(authserv_id_of(unfolded), own_ids, own_domain):
                removed += 1
                continue
        kept.append(lines)
    if not removed:
        return content, 0
    new_block = b"".join(line + b"\r\n" for lines in kept for line in lines)
    return new_block + b"\r\n" + body, removed


def parse(field_value: str) -> tuple[str, dict[str, str]]:
    """``(authserv-id, {method: result})`` of a header field, for readers and tests."""
    text = re.sub(r"\([^()]*\)", " ", field_value)  # comments carry no results
    authserv_id, _, rest = text.partition(";")
    results = {}
    for clause in rest.split(";"):
        m = re.match(r"\s*([a-z0-9_-]+)\s*=\s*([a-z]+)", clause, re.I)
        if m:
            results.setdefault(m.group(1).lower(), m.group(2).lower())
    return authserv_id.strip(), results
