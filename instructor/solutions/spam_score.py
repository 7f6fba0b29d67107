"""A symbol-based spam score: reference solution (instructors only)."""

import re

from agents.hooks import CONTINUE


def _any(*patterns):
    return re.compile("|".join(patterns), re.I)


#: name -> (weight, where to look, pattern). Each rule is one "symbol", as in SpamAssassin or rspamd.
RULES = {
    "MONEY": (2.0, "text", _any(r"\$\s?\d{1,3}(,\d{3}){2,}", r"\bmillions?\b", r"\blottery\b", r"\bprize\b",
                                r"\binheritance\b", r"\bbeneficiary\b", r"\bbitcoin\b", r"\bwire transfer\b")),
    "URGENT": (1.5, "text", _any(r"\burgent\b", r"\bact now\b", r"\bimmediately\b", r"within 24 hours",
                                 r"final notice", r"expires? today", r"limited time")),
    "PHISH": (2.5, "text", _any(r"verify your (account|identity|password)", r"confirm your (account|password|details)",
                                r"account (has been )?(suspended|locked)", r"login details", r"update your payment")),
    "CLICK_HERE": (1.0, "text", _any(r"click here", r"click the link below", r"click below")),
    "LINK_TO_IP": (2.0, "body", _any(r"https?://\d{1,3}(\.\d{1,3}){3}")),
    "PILLS": (3.0, "text", _any(r"\bviagra\b", r"\bcialis\b", r"\bpharmacy\b", r"\bpills\b", r"weight loss")),
}


def _domain(value):
    match = re.search(r"@([\w.-]+)", value or "")
    return match.group(1).lower() if match else None


def symbols(message) -> dict[str, float]:
    """Every symbol that matches this message, with its weight."""
    subject = message.get("Subject", "")
    body = message.body.decode("utf-8", "replace")
    text = subject + "\n" + body
    found = {name: weight for name, (weight, where, pattern) in RULES.items()
             if pattern.search(text if where == "text" else body)}
    letters = [c for c in subject if c.isalpha()]
    if len(letters) >= 6 and all(c.isupper() for c in letters):
        found["SUBJ_ALL_CAPS"] = 2.0
    if text.count("!") >= 3:
        found["EXCLAMATIONS"] = 1.0
    reply_to = message.get("Reply-To")
    if reply_to and _domain(reply_to) != _domain(message.get("From")):
        found["REPLYTO_DIFFERS"] = 1.5
    if message.get("Message-ID") is None:
        found["MISSING_MESSAGE_ID"] = 1.0
    if message.get("Date") is None:
        found["MISSING_DATE"] = 0.5
    if (message.get("Content-Type") or "").lower().startswith("text/html"):
        found["HTML_ONLY"] = 1.0
    return found


async def dnsbl_listed(ctx, ip: str) -> bool:
    """Is ``ip`` on the blocklist? RFC 5782 2.1: ask for the A record of the
    reversed octets under the list's zone; any 127.0.0.x answer means listed."""
    zone = ctx.settings.get("dnsbl_zone", "dnsbl.test")
    name = ".".join(reversed(ip.split("."))) + "." + zone
    try:
        answers = await ctx.resolver.lookup_a(name)
    except Exception:  # a blocklist that does not answer lists nobody
        return False
    return any(a.startswith("127.") for a in answers)


async def on_data(ctx, session, envelope, message):
    found = symbols(message)
    if session.peer and await dnsbl_listed(ctx, session.peer):
        found["RCVD_IN_DNSBL"] = 3.0
    score = sum(found.values())
    threshold = ctx.settings.get("spam_threshold", 5.0)
    message.add_header("X-Spam-Score", f"{score:.1f}")
    message.add_header("X-Spam-Symbols", ", ".join(sorted(found)) or "none")
    message.add_header("X-Spam-Flag", "YES" if score >= threshold else "NO")
    return CONTINUE  # mark, never refuse: the reader's filter decides
