"""Bounces that mark an address undeliverable (see README.md in this directory).

Copy this file to solution.py, fill in the functions, and check it with
``mailpipe check bounce``. ``from agents.hooks import CONTINUE, reject``.
"""


def parse_dsn(content: bytes) -> "list[tuple[str, str]]":
    """``(final recipient, status)`` for each recipient a delivery status
    notification says has ``Action: failed``; ``[]`` for anything else.

    A DSN is ``multipart/report; report-type=delivery-status`` (RFC 3464); its
    ``message/delivery-status`` part has a block for the message, then one per
    recipient. ``Final-Recipient: rfc822; bob@example.net``: the address,
    lower case. ``Status: 5.1.1``.
    """


def is_undeliverable(ctx: "HookContext", address: str) -> bool:
    """Is ``address`` (any case) listed in ``ctx.data_dir / "undeliverable.txt"``?"""


def mark_undeliverable(ctx: "HookContext", address: str) -> None:
    """Add ``address`` (lower case) to ``ctx.data_dir / "undeliverable.txt"``,
    one address per line."""


def on_data(ctx: "HookContext", session: "Session", envelope: "Envelope", message: "MessageView") -> "Verdict | None":
    """At the MDA: if the message is a bounce (it comes from the null sender
    ``envelope.mail_from == ""``), mark every recipient that failed with a
    ``5.1.x`` status. Always return CONTINUE: the bounce is still delivered."""


def on_rcpt(ctx: "HookContext", session: "Session", envelope: "Envelope", address: str) -> "Verdict | None":
    """At the MSA: refuse a known-undeliverable address with
    ``reject(..., 550, "5.1.1")``; CONTINUE for any other."""
