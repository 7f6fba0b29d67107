"""A symbol-based spam score at the receiving MTA (see README.md in this directory).

Copy this file to solution.py, fill in the functions, and check it with
``mailpipe check spam_score``. ``from agents.hooks import CONTINUE``.
The messages in corpus/ham and corpus/spam are yours to test against.
"""


def symbols(message: "MessageView") -> "dict[str, float]":
    """Every symbol (rule) that matches the message, with its weight.

    For example ``{"MONEY": 2.0, "SUBJ_ALL_CAPS": 2.0}``. Look at
    ``message.get("Subject")``, ``message.get_all("Received")``, ``message.body``...
    """


async def dnsbl_listed(ctx: "HookContext", ip: str) -> bool:
    """Is ``ip`` listed in the DNS blocklist ``ctx.settings.get("dnsbl_zone", "dnsbl.test")``?

    RFC 5782 2.1: ask ``await ctx.resolver.lookup_a(name)`` for the reversed
    octets under the zone (192.0.2.1 -> "1.2.0.192.dnsbl.test"); an answer in
    127.0.0.0/8 means listed. A lookup that fails means not listed.
    """


async def on_data(ctx: "HookContext", session: "Session", envelope: "Envelope", message: "MessageView") -> "Verdict | None":
    """Score the message and add three header fields with ``message.add_header``:

    * ``X-Spam-Score``: the sum of the weights, e.g. ``6.5``;
    * ``X-Spam-Symbols``: the names, comma-separated (``none`` if none);
    * ``X-Spam-Flag``: ``YES`` if the score is at least
      ``ctx.settings.get("spam_threshold", 5.0)``, else ``NO``.

    Add ``RCVD_IN_DNSBL`` when the client (``session.peer``) is listed.
    Never refuse the message: return CONTINUE.
    """
