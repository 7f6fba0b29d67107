"""Greylisting: reference solution (instructors only)."""

import ipaddress

from agents.hooks import CONTINUE, tempfail


def triplet(session, envelope, address):
    """The greylisting key: (client /24 network, envelope sender, recipient), lower-case."""
    network = ipaddress.ip_network(f"{session.peer}/24", strict=False)
    return (str(network), envelope.mail_from.lower(), address.lower())


def on_rcpt(ctx, session, envelope, address):
    if session.user:  # our own authenticated users are never greylisted
        return CONTINUE
    delay = ctx.settings.get("greylist_delay", 300)
    expiry = ctx.settings.get("greylist_expiry", 4 * 3600)
    now = ctx.clock()
    first_seen = ctx.state.setdefault("greylist", {})
    passed = ctx.state.setdefault("greylist_passed", set())
    key = triplet(session, envelope, address)
    if key in passed:
        return CONTINUE
    seen = first_seen.get(key)
    if seen is None or now - seen > expiry:  # new, or the retry came too late: start over
        first_seen[key] = now
        return tempfail(f"Greylisted, please try again in {delay:g} seconds", 451, "4.7.1")
    if now - seen < delay:
        return tempfail(f"Greylisted, please try again in {delay - (now - seen):.0f} seconds", 451, "4.7.1")
    passed.add(key)
    del first_seen[key]
    return CONTINUE
