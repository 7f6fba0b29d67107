"""Greylisting at the MTA (see README.md in this directory).

Copy this file to solution.py, fill in the functions, and check it with
``mailpipe check greylist``. The verdict helpers are in agents.hooks:
``from agents.hooks import CONTINUE, tempfail``.
"""


def triplet(session: "Session", envelope: "Envelope", address: str) -> tuple:
    """The greylisting key of one RCPT: (client network, envelope sender, recipient).

    The client network is the /24 around ``session.peer`` (e.g. "198.51.100.0/24",
    see the ``ipaddress`` module); sender and recipient in lower case.
    """


def on_rcpt(ctx: "HookContext", session: "Session", envelope: "Envelope", address: str) -> "Verdict | None":
    """Greylist each new triplet.

    * an authenticated session (``session.user``) is never greylisted;
    * the first time a triplet is seen: ``tempfail(..., 451, "4.7.1")``;
    * a retry sooner than ``ctx.settings.get("greylist_delay", 300)`` seconds
      after the first sighting: another tempfail;
    * a retry after that: remember the triplet as passed, return CONTINUE
      (not accept(): the MTA's own checks must still run);
    * a triplet seen but not retried within
      ``ctx.settings.get("greylist_expiry", 4 * 3600)`` seconds is forgotten;
    * a triplet that passed is never delayed again.

    Time is ``ctx.clock()``; the tables live in ``ctx.state``.
    """
