"""Loop detection, deliberately wrong (instructors only).

Mistakes: counts "Received:" anywhere in the message, body included (a
forwarded message or a bounce quoting headers looks like a loop), and only
in that exact spelling; compares Delivered-To case-sensitively.
"""

from agents.hooks import CONTINUE, reject


def on_data(ctx, session, envelope, message):
    max_hops = ctx.settings.get("max_hops", 100)
    if message.content.count(b"Received:") >= max_hops:
        return reject("Too many hops", 554, "5.4.6")
    for value in message.get_all("Delivered-To"):
        if value in envelope.rcpt_tos:
            return reject("Mail forwarding loop", 554, "5.4.6")
    return CONTINUE
