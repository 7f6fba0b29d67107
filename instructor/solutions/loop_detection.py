"""Loop detection: reference solution (instructors only)."""

from agents.hooks import CONTINUE, reject


def hop_count(message):
    """How many ``Received:`` fields the header section has (any case: RFC 5322 1.2.2)."""
    return len(message.get_all("Received"))


def delivered_to(message):
    """The addresses in ``Delivered-To:`` fields, lower-case."""
    return {value.strip().strip("<>").lower() for value in message.get_all("Delivered-To")}


def on_data(ctx, session, envelope, message):
    max_hops = ctx.settings.get("max_hops", 100)
    hops = hop_count(message)
    if hops >= max_hops:
        return reject(f"Too many hops ({hops}): mail loop?", 554, "5.4.6")
    looping = delivered_to(message) & {r.lower() for r in envelope.rcpt_tos}
    if looping:
        return reject(f"Mail forwarding loop for {sorted(looping)[0]}", 554, "5.4.6")
    return CONTINUE
