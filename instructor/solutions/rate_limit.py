"""Per-sender rate limiting: reference solution (instructors only)."""

from collections import deque

from agents.hooks import CONTINUE, tempfail


def sender_key(session, address):
    """Who is sending: the authenticated user if there is one, else the envelope sender."""
    return (session.user or address).lower()


def on_mail(ctx, session, envelope, address):
    if address == "":  # a bounce (RFC 5321 4.5.5) must always get through
        return CONTINUE
    limit = ctx.settings.get("rate_limit", 10)
    window = ctx.settings.get("rate_window", 60)
    now = ctx.clock()
    sent = ctx.state.setdefault("rate", {}).setdefault(sender_key(session, address), deque())
    while sent and sent[0] <= now - window:  # forget what left the window
        sent.popleft()
    if len(sent) >= limit:
        retry = sent[0] + window - now
        return tempfail(f"Too many messages from {sender_key(session, address)}, "
                        f"try again in {retry:.0f} seconds", 450, "4.7.1")
    sent.append(now)
    return CONTINUE
