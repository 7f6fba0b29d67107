"""Bounces, deliberately wrong (instructors only).

Mistakes: believes any message that contains "Final-Recipient:", whoever
sent it (anyone can get an address blocked with a forged bounce), and marks
every failure, even a policy refusal (5.7.1) or a time-out (5.4.7) that
says nothing about the address.
"""

import re

from agents.hooks import CONTINUE, reject


def parse_dsn(content):
    return [(m.decode().lower(), "5.0.0") for m in re.findall(rb"Final-Recipient: rfc822; ?(\S+)", content, re.I)]


def on_data(ctx, session, envelope, message):
    for recipient, _status in parse_dsn(message.content):
        with open(ctx.data_dir / "undeliverable.txt", "a") as f:
            f.write(recipient + "\n")
    return CONTINUE


def on_rcpt(ctx, session, envelope, address):
    try:
        known = (ctx.data_dir / "undeliverable.txt").read_text().split()
    except FileNotFoundError:
        known = []
    if address.lower() in known:
        return reject("undeliverable", 550, "5.1.1")
    return CONTINUE
