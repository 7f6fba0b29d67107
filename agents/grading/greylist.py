"""Checker for coursework/greylist: greylisting at the MTA's RCPT (RFC 6647).

Greylisting works because a real MTA queues and retries a 4xx (RFC 5321
4.5.4.1) while much spamware never comes back. The unit checks walk one
triplet through its life on the fake clock; the live checks watch the
sending MTA's queue be deferred once, retry, and deliver.
"""

from __future__ import annotations

from .core import (Exercise, Failed, World, envelope, expect_continue, expect_tempfail, session)

DELAY, EXPIRY = 300, 4 * 3600

EXERCISE = Exercise(
    "greylist", "Greylisting: 4xx first, accepted after the retry window",
    # Every MX of the domain greylists: with the backup MX left open, the
    # sender's MTA would simply try mx2 after the 451 and get in there.
    agents=("mta.recipient.test", "mta2.recipient.test"),
    settings={"greylist_delay": 0.5, "greylist_expiry": 60},
)

CLIENT = "198.51.100.25"


def _rcpt(student, world, peer=CLIENT, sender="news@example.net", rcpt="bob@recipient.test", user=None):
    s = session(peer=peer, user=user)
    e = envelope(mail_from=sender, rcpts=())
    return student.hook("rcpt", world.ctx(), s, e, rcpt, session=s, envelope=e)


def _world():
    return World(settings={"greylist_delay": DELAY, "greylist_expiry": EXPIRY})


@EXERCISE.unit("a new (client, sender, recipient) triplet gets a temporary failure",
               "Return tempfail(...), a 4xx: the sender's queue will retry it (RFC 5321 4.5.4.1); "
               "a reject() (5xx) would bounce the mail for good.")
def first_attempt_is_tempfailed(student):
    verdict = _rcpt(student, _world())
    expect_tempfail(verdict, "first RCPT of a new triplet")
    if verdict.code not in (450, 451):
        raise Failed(f"use 450 or 451 (RFC 5321 4.2.2), got {verdict.code}")


@EXERCISE.unit("a retry before the delay is still greylisted",
               "Keep the time you first saw the triplet (ctx.clock()) in ctx.state; "
               "a retry sooner than ctx.settings['greylist_delay'] seconds gets another 4xx.")
def early_retry_is_tempfailed(student):
    world = _world()
    _rcpt(student, world)
    world.advance(DELAY / 2)
    expect_tempfail(_rcpt(student, world), f"retry after {DELAY / 2:g} s (delay {DELAY} s)")


@EXERCISE.unit("a retry after the delay is let through with CONTINUE",
               "After the delay, return CONTINUE (not accept(): that would skip the MTA's own "
               "checks, e.g. 'no such user'). Measure time with ctx.clock(), never time.time().")
def retry_after_delay_passes(student):
    world = _world()
    expect_tempfail(_rcpt(student, world), "first RCPT")
    world.advance(DELAY + 1)
    expect_continue(_rcpt(student, world), f"retry after {DELAY + 1} s (delay {DELAY} s)")


@EXERCISE.unit("the delay comes from ctx.settings['greylist_delay']",
               "Read the delay with ctx.settings.get('greylist_delay', 300): the lab sets it to "
               "a fraction of a second so that you can watch it work.")
def delay_from_settings(student):
    world = World(settings={"greylist_delay": 10, "greylist_expiry": EXPIRY})
    expect_tempfail(_rcpt(student, world), "first RCPT with greylist_delay = 10")
    world.advance(5)
    expect_tempfail(_rcpt(student, world), "retry after 5 s with greylist_delay = 10")
    world.advance(6)
    expect_continue(_rcpt(student, world), "retry after 11 s with greylist_delay = 10")


@EXERCISE.unit("the key includes the recipient: another recipient is greylisted on its own",
               "The triplet is (client network, envelope sender, recipient): a sender that passed "
               "for bob has not passed for carol.")
def key_has_recipient(student):
    world = _world()
    _rcpt(student, world)
    world.advance(DELAY + 1)
    _rcpt(student, world)  # bob passes
    expect_tempfail(_rcpt(student, world, rcpt="carol@recipient.test"), "first RCPT for another recipient")


@EXERCISE.unit("the key includes the sender",
               "Another envelope sender from the same client is a new triplet.")
def key_has_sender(student):
    world = _world()
    _rcpt(student, world)
    world.advance(DELAY + 1)
    _rcpt(student, world)
    expect_tempfail(_rcpt(student, world, sender="other@example.net"), "first RCPT from another sender")


@EXERCISE.unit("a retry from another address of the same /24 counts as the same client",
               "Big providers retry from another server of the same pool: key on the client's /24 "
               "network (ipaddress.ip_network(f'{ip}/24', strict=False)), not its exact address.")
def same_network_counts(student):
    world = _world()
    _rcpt(student, world, peer="198.51.100.25")
    world.advance(DELAY + 1)
    expect_continue(_rcpt(student, world, peer="198.51.100.77"), "retry from 198.51.100.77 after .25 was seen")
    expect_tempfail(_rcpt(student, world, peer="203.0.113.25", rcpt="dave@recipient.test"),
                    "first RCPT from another network")


@EXERCISE.unit("once passed, the triplet is not delayed again",
               "Remember triplets that passed: greylist each correspondent once, not every message.")
def passed_is_remembered(student):
    world = _world()
    expect_tempfail(_rcpt(student, world), "first RCPT")
    world.advance(DELAY + 1)
    expect_continue(_rcpt(student, world), "retry after the delay")
    world.advance(EXPIRY * 2)
    expect_continue(_rcpt(student, world), "a later message of a triplet that passed")


@EXERCISE.unit("a retry that comes too late starts over",
               "A triplet seen but not retried within ctx.settings['greylist_expiry'] seconds is "
               "forgotten: the late retry is a new first attempt (4xx again).")
def late_retry_starts_over(student):
    world = _world()
    _rcpt(student, world)
    world.advance(EXPIRY + DELAY)
    expect_tempfail(_rcpt(student, world), f"retry after {EXPIRY + DELAY} s (expiry {EXPIRY} s)")
    world.advance(DELAY + 1)
    expect_continue(_rcpt(student, world), "the retry after that one")


@EXERCISE.unit("authenticated users are never greylisted",
               "If session.user is set the client logged in: it is one of ours, let it through.")
def authenticated_pass(student):
    expect_tempfail(_rcpt(student, _world()), "first RCPT of a stranger")
    expect_continue(_rcpt(student, _world(), user="alice@sender.test"), "RCPT in an authenticated session")


@EXERCISE.unit("state lives in ctx.state, not in module globals",
               "Each agent process has its own ctx.state; a module-level dict would be shared by "
               "every test and every agent that loads your file.")
def state_in_ctx(student):
    _rcpt(student, _world())
    expect_tempfail(_rcpt(student, _world()), "first RCPT in a fresh agent (new ctx.state)")


# -- live --------------------------------------------------------------------------

@EXERCISE.live("the receiving MTA greylists a new sender and the sending MTA retries",
               "Your file runs at both MXes of recipient.test; the trace should show your hook's "
               "tempfail and a 'deferred' event at mta.sender.test, then the delivery.")
def live_deferred_then_delivered(lab, student):
    since = lab.since()
    mid = lab.message_id("sender.test")
    sent = lab.submit("alice@sender.test", ["bob@recipient.test"],
                      lab.compose("alice@sender.test", "bob@recipient.test", "greylist me", "Hello\n", mid))
    if not sent.accepted:
        raise Failed(f"the MSA did not accept the message: {sent}")
    if lab.wait_for("bob@recipient.test", mid) is None:
        raise Failed("the message did not arrive in bob's INBOX within 20 s")
    greylisted = lab.events(since, agent="mta.recipient.test", event="hook.verdict", hook_event="rcpt",
                            verdict="tempfail")
    deferred = lab.events(since, agent="mta.sender.test", event="deferred", message_id=mid)
    if not greylisted or not deferred:
        raise Failed("the message arrived without being greylisted first "
                     f"({len(greylisted)} tempfail verdicts, {len(deferred)} deferrals)")


@EXERCISE.live("the next message of the same triplet goes straight through",
               "After a triplet passed, remember it: the second message must not be deferred.")
def live_second_message_not_delayed(lab, student):
    mid = lab.message_id("sender.test")
    since = lab.since()
    sent = lab.submit("alice@sender.test", ["bob@recipient.test"],
                      lab.compose("alice@sender.test", "bob@recipient.test", "again", "Hello again\n", mid))
    if not sent.accepted or lab.wait_for("bob@recipient.test", mid) is None:
        raise Failed(f"the second message did not arrive ({sent})")
    if lab.events(since, agent="mta.sender.test", event="deferred", message_id=mid):
        raise Failed("the second message was deferred again")
