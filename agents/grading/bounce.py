"""Checker for coursework/bounce: read a DSN, remember the bad address, refuse it next time.

The DSNs here are made by the lab's own bounce writer (:mod:`agents.dsn`),
the same bytes a student sees in the Maildir after a failed delivery. The
two hooks run in different agents (``on_data`` at the MDA that receives the
bounce, ``on_rcpt`` at the MSA), that is different processes: what one
learns must go through ``ctx.data_dir``, and the checks give each hook a
fresh ``ctx.state`` to make sure it does.
"""

from __future__ import annotations

from types import SimpleNamespace

from ..dsn import make_dsn
from .core import (Exercise, Failed, World, crlf, envelope, expect_continue, expect_reject, message, session)

EXERCISE = Exercise(
    "bounce", "Parse a bounce (DSN) to mark an address undeliverable",
    agents=("mda.sender.test", "msa.sender.test"),
)

ALICE = "alice@sender.test"
ORIGINAL = crlf("From: <alice@sender.test>\nTo: <nobody@recipient.test>\nSubject: hello\n"
                "Message-ID: <orig@sender.test>\n\nhi\n")


def _outcome(address, code, status, text):
    return SimpleNamespace(address=address, code=code, status=status, text=text)


def dsn(*failed, action: str = "failed") -> bytes:
    """A bounce as mta.sender.test writes it, for ``failed`` = (address, code, status) triples."""
    outcomes = [_outcome(a, c, s, "Recipient address rejected") for a, c, s in failed]
    return make_dsn("mx.sender.test", "sender.test", ALICE, "Q123", outcomes, ORIGINAL,
                    arrival=1_700_000_000.0, action=action, retry_until=1_700_090_000.0 if action == "delayed" else None)


def _deliver(student, world, content: bytes, mail_from: str = ""):
    """on_data at mda.sender.test, as the bounce is delivered to alice."""
    view = message(content)
    s = session(peer="127.0.1.1", helo="mx.sender.test")
    e = envelope(mail_from=mail_from, rcpts=(ALICE,), content=view.content)
    return student.hook("data", world.ctx("mda", "sender.test"), s, e, view, session=s, envelope=e)


def _rcpt(student, data_dir, address):
    """on_rcpt at msa.sender.test: another process (a fresh ctx.state), the same data_dir."""
    world = World(data_dir=data_dir)
    s = session(peer="192.0.2.44", user=ALICE, tls=True)
    e = envelope(mail_from=ALICE, rcpts=())
    return student.hook("rcpt", world.ctx("msa", "sender.test"), s, e, address, session=s, envelope=e)


def _parsed(student, content: bytes):
    result = student.call("parse_dsn", content)
    try:
        return sorted((str(a), str(s)) for a, s in result)
    except (TypeError, ValueError):
        raise Failed(f"parse_dsn() should return a list of (address, status) pairs, got {result!r}") from None


@EXERCISE.unit("parse_dsn() finds each failed recipient and its status",
               "Parse with the email package: the report is multipart/report; report-type=delivery-status, "
               "its message/delivery-status part has one block per recipient (RFC 3464 2.1); take "
               "Final-Recipient (after 'rfc822;') and Status of the blocks with Action: failed.")
def parse_failed(student):
    got = _parsed(student, dsn(("nobody@recipient.test", 550, "5.1.1"), ("gone@other.test", 550, "5.1.2")))
    want = [("gone@other.test", "5.1.2"), ("nobody@recipient.test", "5.1.1")]
    if got != want:
        raise Failed(f"expected {want}, got {got}")


@EXERCISE.unit("parse_dsn() returns addresses in lower case, with or without a space after 'rfc822;'",
               "RFC 3464 2.3.2: 'Final-Recipient: rfc822;Bob@Example.NET' is the same as with a space; "
               "strip it, and lower-case the address for comparisons.")
def parse_spacing_and_case(student):
    content = dsn(("Bob@Example.NET", 550, "5.1.1")).replace(b"rfc822; Bob@Example.NET", b"rfc822;Bob@Example.NET")
    got = _parsed(student, content)
    if got != [("bob@example.net", "5.1.1")]:
        raise Failed(f"expected [('bob@example.net', '5.1.1')], got {got}")


@EXERCISE.unit("parse_dsn() ignores delay warnings and ordinary mail",
               "Action: delayed (RFC 3464 2.3.3) means 'still trying': nothing failed yet. A message "
               "that is not a multipart/report delivery-status has no failures at all.")
def parse_ignores_others(student):
    delayed = _parsed(student, dsn(("slow@recipient.test", 451, "4.4.1"), action="delayed"))
    if delayed:
        raise Failed(f"a delay warning: expected [], got {delayed}")
    plain = _parsed(student, crlf("From: <x@example.net>\nSubject: Final-Recipient: rfc822; a@b.test\n\n"
                                  "Final-Recipient: rfc822; a@b.test\nAction: failed\nStatus: 5.1.1\n"))
    if plain:
        raise Failed(f"an ordinary message that quotes DSN fields: expected [], got {plain}")


@EXERCISE.unit("a bounce for a bad address makes on_rcpt refuse it with 550 5.1.1",
               "on_data (at the MDA) writes the address to ctx.data_dir / 'undeliverable.txt'; on_rcpt "
               "(at the MSA, another process) reads it and returns reject(..., 550, '5.1.1').")
def marks_and_refuses(student):
    world = World()
    expect_continue(_deliver(student, world, dsn(("nobody@recipient.test", 550, "5.1.1"))),
                    "on_data for the bounce (it must still be delivered to alice)")
    expect_reject(_rcpt(student, world.data_dir, "nobody@recipient.test"),
                  "RCPT nobody@recipient.test after its bounce", 550, "5.1.1")
    expect_reject(_rcpt(student, world.data_dir, "NoBody@Recipient.Test"),
                  "RCPT NoBody@Recipient.Test (same address, other case)", 550, "5.1.1")
    expect_continue(_rcpt(student, world.data_dir, "bob@recipient.test"), "RCPT bob@recipient.test")


@EXERCISE.unit("the list is kept in ctx.data_dir / 'undeliverable.txt', one address per line",
               "The MDA and the MSA are different processes: ctx.state is not shared between them, "
               "the directory ctx.data_dir is.")
def list_file(student):
    world = World()
    _deliver(student, world, dsn(("nobody@recipient.test", 550, "5.1.1")))
    path = world.data_dir / "undeliverable.txt"
    if not path.exists() or "nobody@recipient.test" not in path.read_text().split():
        raise Failed(f"{path.name} in ctx.data_dir does not list nobody@recipient.test")
    (world.data_dir / "undeliverable.txt").write_text("listed@example.net\n")
    expect_reject(_rcpt(student, world.data_dir, "listed@example.net"),
                  "RCPT of an address written in undeliverable.txt by someone else", 550, "5.1.1")


@EXERCISE.unit("only address failures (5.1.x) mark an address",
               "RFC 3463 3.2: X.1.Y statuses are about the address. A policy refusal (5.7.1) or a "
               "message that expired in the queue (5.4.7) says nothing about the address.")
def only_address_failures(student):
    world = World()
    _deliver(student, world, dsn(("strict@recipient.test", 550, "5.7.1"), ("late@recipient.test", 550, "5.4.7"),
                                 ("nobody@recipient.test", 550, "5.1.1")))
    expect_reject(_rcpt(student, world.data_dir, "nobody@recipient.test"), "RCPT nobody@recipient.test (5.1.1)")
    for address in ("strict@recipient.test", "late@recipient.test"):
        expect_continue(_rcpt(student, world.data_dir, address), f"RCPT {address} after a non-address failure")


@EXERCISE.unit("only a bounce from the null sender <> is believed",
               "A DSN comes from the null sender (RFC 5321 4.5.5, RFC 3464 2). Anyone can mail a "
               "look-alike bounce from a normal address to get an address blocked: check envelope.mail_from.")
def forged_bounce(student):
    real = World()
    _deliver(student, real, dsn(("victim@recipient.test", 550, "5.1.1")))
    expect_reject(_rcpt(student, real.data_dir, "victim@recipient.test"), "RCPT victim@recipient.test after a real bounce")
    world = World()
    _deliver(student, world, dsn(("victim@recipient.test", 550, "5.1.1")), mail_from="prankster@example.net")
    expect_continue(_rcpt(student, world.data_dir, "victim@recipient.test"),
                    "RCPT victim@recipient.test after a 'bounce' from prankster@example.net")


# -- live --------------------------------------------------------------------------

def _is_dsn_for(address: str):
    return lambda raw: b"multipart/report" in raw and address.encode() in raw


@EXERCISE.live("in the lab, a real bounce marks the address and the MSA then refuses it",
               "Load your file at mda.sender.test and msa.sender.test: alice writes to "
               "nobody@recipient.test, the bounce comes back, the next RCPT for it gets 550 5.1.1.")
def live_bounce_then_refuse(lab, student):
    since = lab.since()
    first = lab.submit(ALICE, ["nobody@recipient.test"],
                       lab.compose(ALICE, "nobody@recipient.test", "hello?", "Anyone there?\n",
                                   lab.message_id("sender.test")))
    if not first.accepted:
        raise Failed(f"the MSA should accept the first message (it cannot know yet): {first}")
    if lab.wait_for(ALICE, _is_dsn_for("nobody@recipient.test")) is None:
        raise Failed("no bounce for nobody@recipient.test reached alice's INBOX within 20 s")
    with lab.submission(ALICE) as s:
        again = s.send(ALICE, ["nobody@recipient.test", "bob@recipient.test"],
                       lab.compose(ALICE, "bob@recipient.test", "again", "Hi\n", lab.message_id("sender.test")))
    refused, accepted = again.reply("RCPT", 0), again.reply("RCPT", 1)
    if refused is None or refused[0] != 550 or not refused[1].startswith("5.1.1"):
        raise Failed(f"RCPT nobody@recipient.test after the bounce got {refused}, expected 550 5.1.1")
    if accepted is None or accepted[0] != 250:
        raise Failed(f"RCPT bob@recipient.test should still be accepted, got {accepted}")
    if not lab.events(since, agent="msa.sender.test", event="hook.verdict", hook_event="rcpt", verdict="reject"):
        raise Failed("the refusal did not come from your hook (no reject verdict in the MSA's trace)")
