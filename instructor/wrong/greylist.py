"""Greylisting, deliberately wrong (instructors only): the checker must catch it.

Mistakes: the key forgets the recipient (one retry whitelists a sender for
every address), and a first sighting is never forgotten, so a retry days
later still passes.
"""

from agents.hooks import CONTINUE, tempfail


def on_rcpt(ctx, session, envelope, address):
    if session.user:
        return CONTINUE
    delay = ctx.settings.get("greylist_delay", 300)
    seen = ctx.state.setdefault("greylist", {})
    key = (session.peer, envelope.mail_from)
    first = seen.setdefault(key, ctx.clock())
    if ctx.clock() - first < delay:
        return tempfail("Greylisted, try again later", 451, "4.7.1")
    return CONTINUE
