"""Per-sender rate limiting at the MSA (see README.md in this directory).

Copy this file to solution.py, fill in the functions, and check it with
``mailpipe check rate_limit``. ``from agents.hooks import CONTINUE, tempfail``.
"""


def sender_key(session: "Session", address: str) -> str:
    """Who is sending: ``session.user`` when the client logged in, else the
    envelope sender ``address``; in lower case."""


def on_mail(ctx: "HookContext", session: "Session", envelope: "Envelope", address: str) -> "Verdict | None":
    """At most ``ctx.settings.get("rate_limit", 10)`` messages per sender in any
    ``ctx.settings.get("rate_window", 60)`` seconds (a sliding window).

    * under the limit: record the time (``ctx.clock()``) and return CONTINUE;
    * at the limit: ``tempfail(..., 450, "4.7.1")``, and do not record it;
    * the null sender (``address == ""``, a bounce) is never limited.

    Keep the times in ``ctx.state``, per sender.
    """
