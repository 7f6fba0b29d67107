"""Per-sender rate limiting, deliberately wrong (instructors only).

Mistakes: a fixed window (the counter resets every ``rate_window`` seconds,
so a sender can send twice the limit across a boundary), and refused
attempts are counted too, so a client that keeps retrying never gets through.
"""

from agents.hooks import CONTINUE, tempfail


def on_mail(ctx, session, envelope, address):
    if address == "":
        return CONTINUE
    limit = ctx.settings.get("rate_limit", 10)
    window = ctx.settings.get("rate_window", 60)
    key = (session.user or address).lower()
    slot = int(ctx.clock() // window)
    counts = ctx.state.setdefault("rate", {})
    count = counts.get((key, slot), 0) + 1
    counts[(key, slot)] = count
    if count > limit:
        return tempfail("Too many messages, try again later", 450, "4.7.1")
    return CONTINUE
