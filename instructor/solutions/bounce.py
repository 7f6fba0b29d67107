"""Bounces that mark an address undeliverable: reference solution (instructors only)."""

import email
import email.policy

from agents.hooks import CONTINUE, reject

LIST_FILE = "undeliverable.txt"


def parse_dsn(content: bytes) -> list[tuple[str, str]]:
    """``(final recipient, status)`` for each recipient a DSN says has ``Action: failed``."""
    msg = email.message_from_bytes(content, policy=email.policy.compat32)
    if msg.get_content_type() != "multipart/report" or msg.get_param("report-type") != "delivery-status":
        return []
    failed = []
    for part in msg.walk():
        if part.get_content_type() != "message/delivery-status":
            continue
        blocks = part.get_payload()  # the per-message block, then one per recipient (RFC 3464 2.1)
        for block in blocks[1:]:
            action = (block.get("Action") or "").strip().lower()
            recipient = (block.get("Final-Recipient") or "").partition(";")[2].strip().lower()
            if action == "failed" and recipient:
                failed.append((recipient, (block.get("Status") or "").strip()))
    return failed


def _path(ctx):
    return ctx.data_dir / LIST_FILE


def is_undeliverable(ctx, address: str) -> bool:
    try:
        return address.lower() in _path(ctx).read_text().split()
    except FileNotFoundError:
        return False


def mark_undeliverable(ctx, address: str) -> None:
    if not is_undeliverable(ctx, address):
        with open(_path(ctx), "a") as f:
            f.write(address.lower() + "\n")


def on_data(ctx, session, envelope, message):
    if envelope.mail_from != "":  # a real DSN comes from the null sender (RFC 5321 4.5.5)
        return CONTINUE
    for recipient, status in parse_dsn(message.content):
        if status.startswith("5.1."):  # the address itself is bad (RFC 3463 3.2)
            mark_undeliverable(ctx, recipient)
            ctx.log("marked undeliverable", address=recipient, status=status)
    return CONTINUE  # the bounce itself is still delivered to its reader


def on_rcpt(ctx, session, envelope, address):
    if is_undeliverable(ctx, address):
        return reject(f"<{address}>: known to be undeliverable (an earlier message bounced)", 550, "5.1.1")
    return CONTINUE
