"""A footer added at the MSA: reference solution (instructors only)."""

from agents.hooks import CONTINUE

DEFAULT_FOOTER = "Sent from the mailpipe lab"


def footer_block(ctx) -> bytes:
    """The signature separator "-- " (RFC 3676 4.3) on its own line, then the footer."""
    return b"-- \r\n" + ctx.settings.get("footer", DEFAULT_FOOTER).encode("utf-8") + b"\r\n"


def is_plain_text(message) -> bool:
    """Only text/plain in 7bit or 8bit can take a few more lines as they are.

    No Content-Type means text/plain (RFC 2045 5.2); base64 or
    quoted-printable would need the footer encoded too, and a multipart
    message needs it inside a part: both are left alone.
    """
    content_type = (message.get("Content-Type") or "text/plain").split(";")[0].strip().lower()
    encoding = (message.get("Content-Transfer-Encoding") or "7bit").strip().lower()
    return content_type == "text/plain" and encoding in ("7bit", "8bit")


def on_data(ctx, session, envelope, message):
    if not is_plain_text(message):
        return CONTINUE
    block = footer_block(ctx)
    body = message.body
    if body.endswith(block):  # already there (a message submitted twice): once is enough
        return CONTINUE
    if body and not body.endswith(b"\r\n"):
        body += b"\r\n"
    message.set_body(body + block)
    return CONTINUE
