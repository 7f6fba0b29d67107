"""Checker for coursework/footer: a footer added at the MSA, with DKIM still passing.

DKIM signs the body (RFC 6376 3.7), so any change after signing breaks the
signature. In the lab the MTA signs what it relays (agents.senderauth), after
the MSA's hooks: a footer added at the MSA is signed with the rest. The live
check proves it at the other end, in the receiver's Authentication-Results.
"""

from __future__ import annotations

from .core import Exercise, Failed, World, envelope, expect_continue, message, session

FOOTER = "Sent from the mailpipe lab"

EXERCISE = Exercise(
    "footer", "A footer added at the MSA, without breaking DKIM",
    agents=("msa.sender.test",),
    settings={"footer": "Sent through the grading lab"},
)

PLAIN = ("From: <alice@sender.test>\nTo: <bob@recipient.test>\nSubject: hi\nMessage-ID: <f@sender.test>\n"
         "MIME-Version: 1.0\nContent-Type: text/plain; charset=us-ascii\nContent-Transfer-Encoding: 7bit\n\n"
         "Hello Bob,\nsee you tomorrow.\n")


def _run(student, text: str, settings: dict | None = None):
    """``(verdict, original content, final content)`` after the student's on_data."""
    world = World(settings={"footer": FOOTER} if settings is None else settings)
    view = message(text)
    s = session(user="alice@sender.test", tls=True)
    e = envelope(mail_from="alice@sender.test", content=view.content)
    verdict = student.hook("data", world.ctx("msa", "sender.test"), s, e, view, session=s, envelope=e)
    return verdict, view.content, view.final_content()


def _block(text: str = FOOTER) -> bytes:
    return b"-- \r\n" + text.encode() + b"\r\n"


def _with_footer(student, text: str, what: str, settings=None, footer: str = FOOTER) -> bytes:
    verdict, before, after = _run(student, text, settings)
    expect_continue(verdict, what)
    if after != before + _block(footer):
        raise Failed(f"{what}: expected the message unchanged, then '-- \\r\\n{footer}\\r\\n' at the end; "
                     f"the end is {after[-60:]!r}")
    return after


def _unchanged(student, text: str, what: str) -> None:
    verdict, before, after = _run(student, text)
    expect_continue(verdict, what)
    if after != before:
        raise Failed(f"{what}: must be left exactly as it is; the end became {after[-60:]!r}")


@EXERCISE.unit("a text/plain message ends with '-- ' and the footer; nothing else changes",
               "message.set_body(message.body + b'-- \\r\\n' + footer + b'\\r\\n'): the separator is "
               "dash dash space on a line of its own (RFC 3676 4.3), so mail readers can grey it out.")
def plain_gets_footer(student):
    _with_footer(student, PLAIN, "a text/plain 7bit message")


@EXERCISE.unit("the footer text comes from ctx.settings['footer']",
               "ctx.settings.get('footer', 'Sent from the mailpipe lab').")
def footer_from_settings(student):
    _with_footer(student, PLAIN, "with footer = 'Hello from IT'", {"footer": "Hello from IT"}, "Hello from IT")


@EXERCISE.unit("no Content-Type means text/plain: it gets the footer",
               "RFC 2045 5.2: a message without Content-Type is text/plain; charset=us-ascii.")
def default_type(student):
    _with_footer(student, "From: <alice@sender.test>\nSubject: x\n\nplain old mail\n", "a message without MIME headers")


@EXERCISE.unit("a body without a final line break gets one before the separator",
               "If message.body does not end with CRLF, add one first, or '-- ' ends up on the "
               "last line of the text.")
def no_final_newline(student):
    _verdict, _before, after = _run(student, PLAIN.rstrip("\n"))
    if not after.endswith(b"tomorrow.\r\n" + _block()):
        raise Failed(f"the end is {after[-60:]!r}")


@EXERCISE.unit("base64 and quoted-printable bodies are left alone",
               "Appending plain text to an encoded body corrupts it (the reader decodes your footer "
               "as base64). Only 7bit/8bit (or no Content-Transfer-Encoding) take a footer as is.")
def encoded_left_alone(student):
    _with_footer(student, PLAIN, "a text/plain 7bit message")
    b64 = PLAIN.replace("7bit", "base64").replace("Hello Bob,\nsee you tomorrow.\n", "SGVsbG8gQm9iLA0K\n")
    _unchanged(student, b64, "a base64 text/plain message")
    qp = PLAIN.replace("7bit", "quoted-printable")
    _unchanged(student, qp, "a quoted-printable message")


@EXERCISE.unit("multipart and HTML messages are left alone",
               "A footer after the last MIME boundary is invisible, and text/html needs HTML: only "
               "text/plain gets it here (a real footer tool edits inside the MIME parts).")
def other_types_left_alone(student):
    multipart = ("From: <alice@sender.test>\nSubject: x\nMIME-Version: 1.0\n"
                 "Content-Type: multipart/mixed; boundary=\"b1\"\n\n--b1\nContent-Type: text/plain\n\nhi\n--b1--\n")
    _with_footer(student, PLAIN, "a text/plain 7bit message")
    _unchanged(student, multipart, "a multipart/mixed message")
    _unchanged(student, PLAIN.replace("text/plain", "text/html"), "a text/html message")


@EXERCISE.unit("a message that already ends with the footer does not get a second one",
               "A message can pass the MSA twice (a resend); check message.body.endswith(...) first.")
def not_twice(student):
    once = _with_footer(student, PLAIN, "a text/plain 7bit message")
    _verdict, again_before, again = _run(student, once.decode())
    if again != again_before:
        raise Failed("the footer was added a second time")


# -- live --------------------------------------------------------------------------

@EXERCISE.live("in the lab, the message arrives with the footer and dkim=pass",
               "Load your file at msa.sender.test. The MTA signs after the MSA's hooks, so the "
               "signature covers the footer; if dkim=fail, something changed the message after signing.")
def live_footer_and_dkim(lab, student):
    from .live import body_of, header

    mid = lab.message_id("sender.test")
    sent = lab.submit("alice@sender.test", ["bob@recipient.test"],
                      lab.compose("alice@sender.test", "bob@recipient.test", "with a footer", "Hello Bob\n", mid))
    if not sent.accepted:
        raise Failed(f"the MSA refused the message: {sent}")
    raw = lab.wait_for("bob@recipient.test", mid)
    if raw is None:
        raise Failed("the message did not arrive in bob's INBOX within 20 s")
    footer = EXERCISE.settings["footer"]
    if not body_of(raw).endswith(_block(footer)):
        raise Failed(f"no footer at the end of the delivered body: {body_of(raw)[-80:]!r}")
    results = header(raw, "Authentication-Results") or ""
    if "dkim=pass" not in results or "header.d=sender.test" not in results:
        raise Failed(f"Authentication-Results: {results or '(none)'}")
