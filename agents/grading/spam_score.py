"""Checker for coursework/spam_score: symbols, a score header, and a labelled corpus.

The student's ``on_data`` runs over every message of two small corpora, the
one shipped with the exercise (``coursework/spam_score/corpus``, to work
with) and a held-out one (``agents/grading/data/spam_heldout``, which the
rules were not tuned on). A message counts as flagged when the hook added
``X-Spam-Flag: YES``. Precision (of the flagged, how many are spam) and
recall (of the spam, how many are flagged) must both reach the thresholds:
a filter that flags everything has perfect recall and is useless.
"""

from __future__ import annotations

import re
from pathlib import Path

from . import COURSEWORK
from .core import Exercise, Failed, FakeResolver, World, crlf, envelope, expect_continue, message, session

MIN_PRECISION, MIN_RECALL = 0.9, 0.8
TRAINING = COURSEWORK / "spam_score" / "corpus"
HELD_OUT = Path(__file__).resolve().parent / "data" / "spam_heldout"
LISTED_IP = "192.0.2.99"

EXERCISE = Exercise(
    "spam_score", "A symbol-based spam score header",
    agents=("mta.recipient.test",),
    settings={"spam_threshold": 5.0, "dnsbl_zone": "dnsbl.test"},
)


def corpus(root: Path) -> list[tuple[str, bool, bytes]]:
    """``(file name, is_spam, message)`` for every ``ham/*.eml`` and ``spam/*.eml``."""
    if not root.is_dir():
        raise Failed(f"the corpus is missing: {root}")
    return [(f"{label}/{p.name}", label == "spam", crlf(p.read_bytes()))
            for label in ("ham", "spam") for p in sorted((root / label).glob("*.eml"))]


def score(student, content: bytes, world: World | None = None, peer: str = "192.0.2.10"):
    """Run the student's on_data on one message: ``(verdict, {added header: value})``."""
    world = world or World(settings={"spam_threshold": 5.0})
    view = message(content)
    s = session(peer=peer)
    e = envelope(mail_from=view.get("Return-Path", "sender@example.net"), content=content)
    verdict = student.hook("data", world.ctx(), s, e, view, session=s, envelope=e)
    return verdict, {name.lower(): value for name, value in view.added}


def _fields(added: dict, what: str) -> tuple[float, set[str], bool]:
    """The three fields, checked for form: score, symbols, flagged."""
    missing = [h for h in ("x-spam-score", "x-spam-symbols", "x-spam-flag") if h not in added]
    if missing:
        raise Failed(f"{what}: no {', '.join(missing)} header added (use message.add_header)")
    if not re.fullmatch(r"-?\d+(\.\d+)?", added["x-spam-score"].strip()):
        raise Failed(f"{what}: X-Spam-Score should be a number like 6.5, got {added['x-spam-score']!r}")
    flag = added["x-spam-flag"].strip().upper()
    if flag not in ("YES", "NO"):
        raise Failed(f"{what}: X-Spam-Flag should be YES or NO, got {added['x-spam-flag']!r}")
    symbols = {s.strip() for s in added["x-spam-symbols"].split(",")} - {"", "none"}
    return float(added["x-spam-score"]), symbols, flag == "YES"


def evaluate(student, root: Path) -> tuple[float, float, list[str]]:
    """Precision, recall and the misclassified files of one corpus."""
    flagged_spam = flagged_ham = missed = 0
    wrong = []
    for name, is_spam, content in corpus(root):
        _verdict, added = score(student, content)
        _score, _symbols, flagged = _fields(added, name)
        if flagged and is_spam:
            flagged_spam += 1
        elif flagged:
            flagged_ham += 1
            wrong.append(f"{name} (ham, flagged)")
        elif is_spam:
            missed += 1
            wrong.append(f"{name} (spam, missed)")
    precision = flagged_spam / (flagged_spam + flagged_ham) if flagged_spam + flagged_ham else 0.0
    recall = flagged_spam / (flagged_spam + missed) if flagged_spam + missed else 0.0
    return precision, recall, wrong


def _corpus_check(student, root: Path, which: str) -> str:
    precision, recall, wrong = evaluate(student, root)
    summary = f"{which}: precision {precision:.2f}, recall {recall:.2f}"
    if precision < MIN_PRECISION or recall < MIN_RECALL:
        raise Failed(f"{summary} (need {MIN_PRECISION} and {MIN_RECALL}); wrong: {', '.join(wrong) or '-'}")
    return summary + (f"; wrong: {', '.join(wrong)}" if wrong else "")


def _ham() -> bytes:
    return corpus(TRAINING)[0][2]


@EXERCISE.unit("adds X-Spam-Score, X-Spam-Symbols and X-Spam-Flag",
               "message.add_header('X-Spam-Score', f'{score:.1f}'), then X-Spam-Symbols (the names, "
               "comma-separated, or 'none') and X-Spam-Flag (YES or NO).")
def adds_headers(student):
    _verdict, added = score(student, _ham())
    _fields(added, "a ham message")


@EXERCISE.unit("marks but never refuses: on_data returns CONTINUE",
               "A spam filter that rejects loses every false positive for good; add the headers and "
               "let the reader's filter (or the Junk folder) decide.")
def never_refuses(student):
    for name, is_spam, content in corpus(TRAINING):
        if is_spam:
            verdict, added = score(student, content)
            expect_continue(verdict, name)
            _fields(added, name)  # and it was marked


@EXERCISE.unit("X-Spam-Flag is YES exactly when the score reaches ctx.settings['spam_threshold']",
               "Compare the score with ctx.settings.get('spam_threshold', 5.0).")
def flag_follows_threshold(student):
    for name, _is_spam, content in corpus(TRAINING):
        value, _symbols, flagged = _fields(score(student, content)[1], name)
        if flagged != (value >= 5.0):
            raise Failed(f"{name}: score {value} with threshold 5.0 but X-Spam-Flag {'YES' if flagged else 'NO'}")
    spam = next(c for _n, s, c in corpus(TRAINING) if s)
    _value, _symbols, flagged = _fields(score(student, spam, World(settings={"spam_threshold": 1000}))[1],
                                        "spam with spam_threshold = 1000")
    if flagged:
        raise Failed("with spam_threshold = 1000 nothing should be flagged")


@EXERCISE.unit(f"precision >= {MIN_PRECISION} and recall >= {MIN_RECALL} on the exercise corpus",
               "Look at the messages your rules get wrong (listed below) and add or reweigh symbols; "
               "a rule that fires on ham costs precision.")
def training_corpus(student):
    return _corpus_check(student, TRAINING, "exercise corpus")


@EXERCISE.unit(f"precision >= {MIN_PRECISION} and recall >= {MIN_RECALL} on held-out messages",
               "Rules tuned to the exact words of the exercise corpus do not generalise: match kinds "
               "of things (money talk, urgency, links to bare IP addresses...), not single messages.")
def held_out_corpus(student):
    return _corpus_check(student, HELD_OUT, "held-out corpus")


@EXERCISE.unit("a client listed in the DNS blocklist gets the symbol RCVD_IN_DNSBL",
               "RFC 5782 2.1: look up the A record of the client's reversed octets under the zone "
               "(1.2.0.192.dnsbl.test for 192.0.2.1) with `await ctx.resolver.lookup_a(name)`; "
               "any 127.0.0.x answer means listed. Zone: ctx.settings.get('dnsbl_zone', 'dnsbl.test').")
def dnsbl_listed(student):
    zone = "bl.example"
    name = ".".join(reversed(LISTED_IP.split("."))) + "." + zone
    resolver = FakeResolver(a={name: ["127.0.0.2"]})
    world = World(settings={"spam_threshold": 5.0, "dnsbl_zone": zone}, resolver=resolver)
    clean, _s, _f = _fields(score(student, _ham(), world, peer="192.0.2.10")[1], "an unlisted client")
    listed, symbols, _f = _fields(score(student, _ham(), world, peer=LISTED_IP)[1], "a listed client")
    if ("A", name) not in resolver.asked:
        raise Failed(f"the hook did not ask for the A record of {name} (it asked {resolver.asked or 'nothing'})")
    if "RCVD_IN_DNSBL" not in symbols or listed <= clean:
        raise Failed(f"listed client: symbols {sorted(symbols)}, score {listed} (unlisted: {clean})")


@EXERCISE.unit("an unlisted client, or a blocklist that does not answer, adds no RCVD_IN_DNSBL",
               "A blocklist that times out lists nobody: catch the lookup's failure and go on "
               "(a hook that raises makes the agent answer 451).")
def dnsbl_not_listed_or_failing(student):
    name = ".".join(reversed(LISTED_IP.split("."))) + ".dnsbl.test"
    for what, resolver in (("an unlisted client", FakeResolver()),
                           ("a blocklist that times out", FakeResolver(fail=[name]))):
        world = World(settings={"spam_threshold": 5.0}, resolver=resolver)
        verdict, added = score(student, _ham(), world, peer=LISTED_IP)
        expect_continue(verdict, what)
        _value, symbols, _flag = _fields(added, what)
        if "RCVD_IN_DNSBL" in symbols:
            raise Failed(f"{what}: RCVD_IN_DNSBL should not be there")


# -- live --------------------------------------------------------------------------

def _send_corpus_message(lab, path: Path) -> str:
    content = crlf(path.read_bytes())
    view = message(content)
    old = view.get("Message-ID")
    mid = lab.message_id(old.strip("<>").rpartition("@")[2] if old else "example.net")
    content = content.replace(old.encode(), mid.encode(), 1) if old else f"Message-ID: {mid}\r\n".encode() + content
    sender = re.search(r"[\w.+-]+@[\w.-]+", view.get("From")).group(0)
    with lab.mx_session("recipient.test") as s:
        sent = s.send(sender, ["bob@recipient.test"], content)
    if not sent.accepted:
        raise Failed(f"mx.recipient.test did not accept {path.name}: {sent}")
    return mid


def _arrives_flagged(lab, kind: str, name: str, want: str) -> None:
    """Send a held-out message through the lab; Bob's copy must say X-Spam-Flag: ``want``."""
    from .live import header

    mid = _send_corpus_message(lab, HELD_OUT / kind / name)
    raw = lab.wait_for("bob@recipient.test", mid)
    if raw is None:
        raise Failed(f"the {kind} message did not arrive in bob's INBOX within 20 s")
    if (header(raw, "X-Spam-Flag") or "").upper() != want:
        raise Failed(f"X-Spam-Flag is {header(raw, 'X-Spam-Flag')!r}, score {header(raw, 'X-Spam-Score')!r}")


@EXERCISE.live("in the lab, spam reaches the mailbox with X-Spam-Flag: YES",
               "Load your file at mta.recipient.test; the headers your hook adds are on top of the "
               "message in bob's INBOX.")
def live_spam_flagged(lab, student):
    _arrives_flagged(lab, "spam", "spam01.eml", "YES")


@EXERCISE.live("in the lab, ham reaches the mailbox with X-Spam-Flag: NO",
               "A normal message must be marked NO, not left unmarked or flagged.")
def live_ham_not_flagged(lab, student):
    _arrives_flagged(lab, "ham", "ham01.eml", "NO")
