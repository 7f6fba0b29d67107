"""A footer added at the MSA (see README.md in this directory).

Copy this file to solution.py, fill in the functions, and check it with
``mailpipe check footer``. ``from agents.hooks import CONTINUE``.
"""


def footer_block(ctx: "HookContext") -> bytes:
    """b"-- \\r\\n" + the footer text + b"\\r\\n"; the text is
    ``ctx.settings.get("footer", "Sent from the mailpipe lab")``."""


def is_plain_text(message: "MessageView") -> bool:
    """Can this message take a footer as it is?

    Only text/plain (the default when there is no Content-Type) with a
    Content-Transfer-Encoding of 7bit or 8bit (the default is 7bit).
    """


def on_data(ctx: "HookContext", session: "Session", envelope: "Envelope", message: "MessageView") -> "Verdict | None":
    """Append the footer block to a plain-text body with ``message.set_body``.

    Start it on a line of its own, leave every other message exactly as it
    is, never add it twice, and return CONTINUE.
    """
