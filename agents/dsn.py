"""Bounces: delivery status notifications (RFC 3464, RFC 3462/6522).

When a message cannot be delivered, the server that holds it tells the sender
with a new message from the null sender ``<>`` (so it can never bounce in
turn, RFC 5321 4.5.5). It is a ``multipart/report`` with three parts: a note
for people, a ``message/delivery-status`` part for programs (one block per
failed recipient with ``Action``, ``Status`` and ``Diagnostic-Code``), and the
original message's header.

The same format warns the sender while a message is merely late:
``Action: delayed`` with a 4.x.x ``Status`` and ``Will-Retry-Until``
(RFC 3464 2.3.3, 2.3.8), sent at most once per message. It says "you need
not do anything yet", which is why Postfix's subject is "Delayed Mail
(still being retried)".
"""

from __future__ import annotations

from .headers import new_message_id, rfc5322_date, split_message


def make_dsn(reporting_mta: str, postmaster_domain: str, original_from: str,
             queue_id: str, failed, original: bytes, arrival: float | None = None,
             action: str = "failed", retry_until: float | None = None) -> bytes:
    """Build the report for the recipients in ``failed`` (objects with
    ``address``, ``code``, ``status`` and ``text``).

    ``action`` is ``"failed"`` (a bounce) or ``"delayed"`` (a warning; then
    ``retry_until`` says when the queue gives up, RFC 3464 2.3.8).
    """
    if action not in ("failed", "delayed"):
        raise ValueError(f"unsupported DSN action {action!r}")
    delayed = action == "delayed"
    boundary = f"=_mailpipe_dsn_{queue_id}{'_delay' if delayed else ''}"
    subject = "Delayed Mail (still being retried)" if delayed else "Undelivered Mail Returned to Sender"
    intro = (["Your message has not been delivered yet to the recipients below.",
              "The mail system will keep trying; this is a warning only, you need not resend it."]
             if delayed else ["Your message could not be delivered to one or more recipients:"])
    lines = [
        f"From: Mail Delivery System <MAILER-DAEMON@{postmaster_domain}>",
        f"To: <{original_from}>",
        f"Subject: {subject}",
        f"Date: {rfc5322_date()}",
        f"Message-ID: {new_message_id(postmaster_domain)}",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "",
        "This is a MIME-encapsulated delivery status notification.",
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=us-ascii",
        "",
        f"This is the mail system at {reporting_mta}.",
        "",
        *intro,
        "",
    ]
    for f in failed:
        lines.append(f"<{f.address}>: {f.code} {f.status} {f.text}")
    lines += [
        "",
        f"--{boundary}",
        "Content-Type: message/delivery-status",
        "",
        f"Reporting-MTA: dns; {reporting_mta}",
        f"X-Queue-ID: {queue_id}",
    ]
    if arrival is not None:
        lines.append(f"Arrival-Date: {rfc5322_date(arrival)}")
    for f in failed:
        lines += [
            "",
            f"Final-Recipient: rfc822; {f.address}",
            f"Action: {action}",
            f"Status: {f.status}",
            f"Diagnostic-Code: smtp; {f.code} {f.status} {f.text}",
        ]
        if delayed and retry_until is not None:
            lines.append(f"Will-Retry-Until: {rfc5322_date(retry_until)}")
    header_block, _ = split_message(original)
    text = "\r\n".join(lines).encode() + b"\r\n\r\n"
    text += f"--{boundary}\r\nContent-Type: text/rfc822-headers\r\n\r\n".encode()
    text += header_block + b"\r\n"
    text += f"--{boundary}--\r\n".encode()
    return text


def bounce_maker(reporting_mta: str, domain: str):
    """A ``make_bounce(item, content, failed)`` function for a DeliveryQueue."""

    def make_bounce(item, content: bytes, failed, action: str = "failed", retry_until=None) -> bytes:
        return make_dsn(reporting_mta, domain, item.mail_from, item.queue_id, failed, content,
                        arrival=item.received_at, action=action, retry_until=retry_until)

    return make_bounce
