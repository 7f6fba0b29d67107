"""Loop detection at the MTA (see README.md in this directory).

Copy this file to solution.py, fill in the functions, and check it with
``mailpipe check loop_detection``. ``from agents.hooks import CONTINUE, reject``.
"""


def hop_count(message: "MessageView") -> int:
    """How many ``Received:`` fields the header section has."""


def delivered_to(message: "MessageView") -> "set[str]":
    """The addresses of the ``Delivered-To:`` fields, in lower case."""


def on_data(ctx: "HookContext", session: "Session", envelope: "Envelope", message: "MessageView") -> "Verdict | None":
    """Refuse looping mail with ``reject(..., 554, "5.4.6")``:

    * ``ctx.settings.get("max_hops", 100)`` or more ``Received:`` fields;
    * a ``Delivered-To:`` that names one of ``envelope.rcpt_tos``.

    Anything else: CONTINUE.
    """
