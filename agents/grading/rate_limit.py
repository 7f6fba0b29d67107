"""Checker for coursework/rate_limit: at most N messages per sender in a sliding window.

The unit checks send MAIL commands at exact times on the fake clock, chosen
so that a fixed window (a counter reset every ``rate_window`` seconds) fails
whatever its alignment, and so does counting the refused attempts.
"""

from __future__ import annotations

from .core import START, Exercise, Failed, World, envelope, expect_continue, expect_tempfail, session

EXERCISE = Exercise(
    "rate_limit", "Per-sender rate limiting at the MSA",
    agents=("msa.sender.test",),
    settings={"rate_limit": 2, "rate_window": 60},
)

ALICE = "alice@sender.test"


def _mail(student, world, address=ALICE, user=ALICE):
    s = session(peer="192.0.2.44", user=user, tls=True)
    e = envelope(mail_from=None, rcpts=())
    return student.hook("mail", world.ctx("msa", "sender.test"), s, e, address, session=s, envelope=e)


def _at(student, world, times, **kw):
    """MAIL at each of ``times`` (seconds after the world's start); the verdicts."""
    verdicts = []
    for t in times:
        world.advance(START + t - world.clock.seconds())
        verdicts.append(_mail(student, world, **kw))
    return verdicts


def _world(limit=3, window=60):
    return World(settings={"rate_limit": limit, "rate_window": window})


@EXERCISE.unit("messages under the limit are let through with CONTINUE",
               "Return CONTINUE (None) while the sender is under ctx.settings['rate_limit'].")
def under_limit(student):
    world = _world()
    for i, verdict in enumerate(_at(student, world, [0, 1, 2]), 1):
        expect_continue(verdict, f"message {i} of 3 (limit 3)")


@EXERCISE.unit("the message over the limit gets 450 4.7.1",
               "Over the limit, return tempfail(..., 450, '4.7.1'): a 4xx, so the client keeps the "
               "message and tries later; a 5xx would bounce it.")
def over_limit(student):
    verdict = _at(student, _world(), [0, 1, 2, 3])[-1]
    expect_tempfail(verdict, "message 4 (limit 3)", 450, "4.7.1")


@EXERCISE.unit("limit and window come from ctx.settings",
               "Read ctx.settings.get('rate_limit', 10) and ctx.settings.get('rate_window', 60).")
def from_settings(student):
    verdicts = _at(student, _world(limit=1, window=10), [0, 1, 11])
    expect_continue(verdicts[0], "first message (limit 1 per 10 s)")
    expect_tempfail(verdicts[1], "second message 1 s later (limit 1 per 10 s)")
    expect_continue(verdicts[2], "a message 11 s after the first (window 10 s)")


@EXERCISE.unit("the window slides: a slot frees exactly when its message is rate_window old",
               "Keep the time of each accepted message and count those newer than now - rate_window "
               "(a deque of timestamps). A counter reset every window lets a sender send twice the "
               "limit across the reset.")
def sliding_window(student):
    times = [0, 30, 59, 59.5, 60.5, 61]
    verdicts = _at(student, _world(), times)
    for t, verdict, wanted in zip(times, verdicts, ["ok", "ok", "ok", "refuse", "ok", "refuse"]):
        (expect_continue if wanted == "ok" else expect_tempfail)(verdict, f"MAIL at t={t} s (3 per 60 s)")


@EXERCISE.unit("refused attempts do not count",
               "Record a message only when you let it through: a client that retries while over the "
               "limit must not lock itself out for ever.")
def refused_do_not_count(student):
    world = _world()
    verdicts = _at(student, world, [0, 1, 2] + [10 + i for i in range(20)] + [60.5])
    expect_tempfail(verdicts[3], "MAIL at t=10 s (the 4th, limit 3 per 60 s)")
    expect_continue(verdicts[-1], "MAIL at t=60.5 s after 20 refused retries (3 per 60 s, the first at t=0)")


@EXERCISE.unit("each sender has a limit of its own",
               "Key the count on the sender: session.user when the client logged in, else the "
               "envelope sender.")
def per_sender(student):
    world = _world()
    expect_tempfail(_at(student, world, [0, 1, 2, 3])[-1], "alice's 4th message (limit 3)")
    expect_continue(_mail(student, world, address="carol@sender.test", user="carol@sender.test"),
                    "carol's first message while alice is at her limit")


@EXERCISE.unit("the authenticated user is the sender, whatever the case of MAIL FROM",
               "Use session.user if set, and compare addresses in lower case.")
def key_is_user_lowercase(student):
    world = _world()
    _at(student, world, [0, 1, 2])
    expect_tempfail(_mail(student, world, address="Alice@Sender.TEST"), "MAIL FROM:<Alice@Sender.TEST> as alice")
    expect_tempfail(_mail(student, world, address="ALICE@SENDER.TEST", user=None),
                    "MAIL FROM:<ALICE@SENDER.TEST> without AUTH (the envelope sender is the key)")


@EXERCISE.unit("bounces (the null sender <>) are never limited",
               "MAIL FROM:<> is a delivery status notification (RFC 5321 4.5.5): it must get through.")
def null_sender(student):
    world = _world(limit=1)
    expect_tempfail(_at(student, world, [0, 1])[-1], "alice's 2nd message (limit 1)")
    for i in range(3):
        expect_continue(_mail(student, world, address="", user=None), f"bounce {i + 1} (limit 1)")


@EXERCISE.unit("state lives in ctx.state, not in module globals",
               "A fresh agent (a new ctx.state) starts with no messages counted.")
def state_in_ctx(student):
    expect_tempfail(_at(student, _world(), [0, 1, 2, 3])[-1], "the 4th message (limit 3)")
    expect_continue(_mail(student, _world()), "first message in a fresh agent")


# -- live --------------------------------------------------------------------------

@EXERCISE.live("the MSA refuses the message over the limit with a 4xx at MAIL",
               "Load your file at msa.sender.test; with rate_limit = 2 the third MAIL of one "
               "session should get 450 4.7.1.")
def live_limit(lab, student):
    since = lab.since()
    with lab.submission(ALICE) as s:
        sent = [s.send(ALICE, ["bob@recipient.test"],
                       lab.compose(ALICE, "bob@recipient.test", f"rate {i}", "Hi\n", lab.message_id("sender.test")))
                for i in range(3)]
    if not (sent[0].accepted and sent[1].accepted):
        raise Failed(f"the first two messages should be accepted: {sent[0]} / {sent[1]}")
    code, text = sent[2].reply("MAIL")
    if not 400 <= code < 500:
        raise Failed(f"the third MAIL got {code} {text}, expected 450 4.7.1")
    if not lab.events(since, agent="msa.sender.test", event="hook.verdict", hook_event="mail", verdict="tempfail"):
        raise Failed("no tempfail verdict of your hook in the MSA's trace")


@EXERCISE.live("another user of the same MSA can still send",
               "The limit is per sender: carol is not held back by alice's messages.")
def live_other_user(lab, student):
    sent = lab.submit("carol@sender.test", ["bob@recipient.test"],
                      lab.compose("carol@sender.test", "bob@recipient.test", "from carol", "Hi\n",
                                  lab.message_id("sender.test")))
    if not sent.accepted:
        raise Failed(f"carol's message was refused: {sent}")
