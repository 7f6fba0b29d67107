"""Checker for coursework/loop_detection: count hops, spot a forwarding loop.

RFC 5321 6.3: counting ``Received:`` fields is a simple, effective loop
detector. The traps are in what to count: only header fields (a forwarded
message or a bounce quotes other headers in its body), in any case (field
names are case-insensitive, RFC 5322 1.2.2).
"""

from __future__ import annotations

from .core import Exercise, Failed, World, envelope, expect_continue, expect_reject, message, session

EXERCISE = Exercise(
    "loop_detection", "Loop detection from the Received: count",
    agents=("mta.recipient.test",),
    settings={"max_hops": 5},
)

BOB = "bob@recipient.test"


def _received(n: int, name: str = "Received") -> str:
    return "".join(f"{name}: from hop{i}.example.net by hop{i + 1}.example.net; Mon, 1 Jan 2024 10:00:{i:02d} +0000\n"
                   for i in range(n))


def _msg(hops: int, extra: str = "", body: str = "Hello\n", name: str = "Received") -> str:
    return (_received(hops, name) + extra
            + "From: <carol@example.net>\nTo: <bob@recipient.test>\nSubject: hops\n"
              "Message-ID: <loop@example.net>\n\n" + body)


def _data(student, text: str, max_hops: int | None = 10, rcpts=(BOB,)):
    world = World(settings={} if max_hops is None else {"max_hops": max_hops})
    view = message(text)
    s = session()
    e = envelope(rcpts=rcpts, content=view.content)
    return student.hook("data", world.ctx(), s, e, view, session=s, envelope=e)


@EXERCISE.unit("a message with fewer Received: fields than max_hops passes with CONTINUE",
               "Count the Received: header fields (message.get_all('Received')) and return CONTINUE "
               "while there are fewer than ctx.settings['max_hops'].")
def under_limit(student):
    expect_continue(_data(student, _msg(9)), "9 Received fields, max_hops 10")


@EXERCISE.unit("max_hops Received: fields or more: 554 5.4.6",
               "Refuse with reject(..., 554, '5.4.6'): RFC 3463's 'routing loop detected'.")
def at_limit(student):
    expect_reject(_data(student, _msg(10)), "10 Received fields, max_hops 10", 554, "5.4.6")
    expect_reject(_data(student, _msg(25)), "25 Received fields, max_hops 10", 554, "5.4.6")


@EXERCISE.unit("max_hops comes from ctx.settings, default 100",
               "ctx.settings.get('max_hops', 100): RFC 5321 6.3 asks for a large threshold, "
               "'normally at least 100'.")
def default_and_settings(student):
    expect_continue(_data(student, _msg(99), max_hops=None), "99 Received fields, no max_hops setting")
    expect_reject(_data(student, _msg(100), max_hops=None), "100 Received fields, no max_hops setting")
    expect_reject(_data(student, _msg(3), max_hops=3), "3 Received fields, max_hops 3")


@EXERCISE.unit("Received: lines in the body do not count",
               "Only the header section counts: a forwarded message or a bounce quotes the original "
               "headers in its body. message.get_all() looks at header fields only.")
def body_does_not_count(student):
    quoted = "---------- Forwarded message ----------\n" + _received(30)
    expect_reject(_data(student, _msg(30)), "30 Received fields in the header, max_hops 10")
    expect_continue(_data(student, _msg(2, body=quoted)), "2 Received fields, 30 quoted in the body")


@EXERCISE.unit("field names are case-insensitive",
               "RFC 5322 1.2.2: 'received:' and 'RECEIVED:' are the same field as 'Received:'.")
def case_insensitive(student):
    text = _received(5, "received") + _msg(5, name="RECEIVED")
    expect_reject(_data(student, text), "10 fields spelled received:/RECEIVED:, max_hops 10")


@EXERCISE.unit("a Delivered-To: naming a recipient is a forwarding loop: 554 5.4.6",
               "The final delivery adds Delivered-To: <rcpt>; a message that comes back for the same "
               "recipient is going round in circles (Postfix: 'mail forwarding loop'). Compare the "
               "addresses in lower case.")
def delivered_to_loop(student):
    expect_reject(_data(student, _msg(2, extra="Delivered-To: Bob@Recipient.TEST\n")),
                  "Delivered-To: Bob@Recipient.TEST for RCPT bob@recipient.test", 554, "5.4.6")


@EXERCISE.unit("a Delivered-To: for somebody else is not a loop",
               "Only a Delivered-To that names one of this message's recipients (envelope.rcpt_tos) "
               "is a loop.")
def delivered_to_other(student):
    expect_reject(_data(student, _msg(2, extra="Delivered-To: bob@recipient.test\n")),
                  "Delivered-To: bob@recipient.test for RCPT bob@recipient.test")
    expect_continue(_data(student, _msg(2, extra="Delivered-To: carol@example.net\n")),
                    "Delivered-To: carol@example.net for RCPT bob@recipient.test")


# -- live --------------------------------------------------------------------------

def _send(lab, hops: int, extra: str = ""):
    mid = lab.message_id("example.net")
    text = _msg(hops, extra).replace("<loop@example.net>", mid).replace("\n", "\r\n")
    with lab.mx_session("recipient.test") as s:
        return mid, s.send("carol@example.net", [BOB], text.encode())


@EXERCISE.live("in the lab, the MTA refuses a message with max_hops Received: fields",
               "Load your file at mta.recipient.test (max_hops = 5 there): DATA should end in 554 5.4.6.")
def live_too_many_hops(lab, student):
    since = lab.since()
    _mid, sent = _send(lab, 5)
    code, text = sent.reply("DATA") or (None, "no DATA reply")
    if code != 554:
        raise Failed(f"5 Received fields (max_hops 5): DATA got {code} {text}")
    if not lab.events(since, agent="mta.recipient.test", event="hook.verdict", hook_event="data", verdict="reject"):
        raise Failed("the refusal did not come from your hook (no reject verdict in the trace)")


@EXERCISE.live("in the lab, a message under the limit is delivered",
               "4 Received fields with max_hops = 5 must reach bob's INBOX.")
def live_under_limit(lab, student):
    mid, sent = _send(lab, 4)
    if not sent.accepted:
        raise Failed(f"4 Received fields (max_hops 5) were refused: {sent}")
    if lab.wait_for(BOB, mid) is None:
        raise Failed("the message did not arrive in bob's INBOX within 20 s")


@EXERCISE.live("in the lab, a Delivered-To: loop is refused",
               "A message that already says Delivered-To: bob@recipient.test must not be accepted for bob.")
def live_delivered_to(lab, student):
    _mid, sent = _send(lab, 1, "Delivered-To: bob@recipient.test\n")
    code, text = sent.reply("DATA") or (None, "no DATA reply")
    if code != 554:
        raise Failed(f"DATA got {code} {text}")
