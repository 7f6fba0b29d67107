"""A footer at the MSA, deliberately wrong (instructors only).

Mistakes: adds the footer to every message, base64 and multipart included
(the base64 text no longer decodes, the footer lands after the last MIME
boundary where no reader shows it), with "--" instead of the "-- " separator,
and again each time.
"""

from agents.hooks import CONTINUE


def on_data(ctx, session, envelope, message):
    footer = ctx.settings.get("footer", "Sent from the mailpipe lab")
    message.set_body(message.body + b"--\r\n" + footer.encode() + b"\r\n")
    return CONTINUE
