"""A spam score, deliberately wrong (instructors only).

Mistake: one symbol that is really just "has a link or a price", worth the
whole threshold. It catches spam, and newsletters, invoices and shipping
notices with it: a filter users stop trusting.
"""

import re

from agents.hooks import CONTINUE


async def on_data(ctx, session, envelope, message):
    text = message.get("Subject", "") + message.body.decode("utf-8", "replace")
    found = {}
    if re.search(r"https?://|\$\d", text):
        found["SUSPICIOUS"] = 10.0
    score = sum(found.values())
    message.add_header("X-Spam-Score", f"{score:.1f}")
    message.add_header("X-Spam-Symbols", ", ".join(found) or "none")
    message.add_header("X-Spam-Flag", "YES" if score >= ctx.settings.get("spam_threshold", 5.0) else "NO")
    return CONTINUE
