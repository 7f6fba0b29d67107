"""Draw one message's whole journey as a sequence diagram, from a real trace.

Usage:  python diagrams/make_sequence.py [--out DIR] [--subnet N]
        python diagrams/make_sequence.py --home LAB_HOME [--message-id ID] [--out DIR]

Without ``--home`` it starts a lab in a temporary home on 127.N.x.y (``--subnet``,
away from a lab on the default 127.0.x.y), has Bob wait in IMAP IDLE, sends
one message from Alice, waits for it, stops the lab and draws what the agents
traced. With ``--home`` it draws from that lab's trace instead (the message
given, else the last one that reached a mailbox).

Writes journey-sequence.svg and .png (matplotlib, see
:func:`agents.plots.plot_sequence`) and journey-sequence.md (the same
conversation as a Mermaid ``sequenceDiagram``), next to this script by default.
Every line and every millisecond comes from the trace: nothing is made up.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import uuid
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # so that "agents" imports from a checkout
from agents.plots import plot_sequence  # noqa: E402
from agents.traceview import Journey, hop_transcript, journey, load_events, text_waterfall  # noqa: E402

# Keep text as text in the SVG (searchable, selectable), and the file stable.
plt.rcParams["svg.fonttype"] = "none"
plt.rcParams["svg.hashsalt"] = "mailpipe"

SENDER, RECIPIENT = "alice@sender.test", "bob@recipient.test"


def send_one(home: Path, subnet: int) -> str:
    """Start a lab in ``home`` on 127.``subnet``.x.y, send one message, stop; its Message-ID."""
    from agents.config import LabConfig
    from agents.lab import Lab

    lab = Lab(home=home, config=LabConfig.load(None).relocated(subnet)).up()
    try:
        message_id = f"<journey.{uuid.uuid4().hex[:12]}@sender.test>"
        waiter = lab.start_waiting(RECIPIENT, message_id)  # Bob in IDLE, as a real reader is
        lab.send(SENDER, RECIPIENT, "The journey of one message",
                 "Hi Bob,\n\nthis message is drawn in diagrams/journey-sequence.svg.\n\nAlice\n",
                 message_id=message_id)
        waiter.result()
    finally:
        lab.down()  # stopping also flushes every agent's last trace lines
    return message_id


def last_delivered(events: list[dict]) -> str | None:
    """The Message-ID of the last message an MDA stored."""
    stored = [e["message_id"] for e in events if e["event"] == "stored" and e.get("message_id")]
    return stored[-1] if stored else None


def _mermaid_text(text: str) -> str:
    """Mermaid reads ``;`` ``#`` ``<`` ``>`` as syntax: write them as entity codes."""
    return (text.replace("#", "#35;").replace(";", "#59;")
            .replace("<", "#lt;").replace(">", "#gt;"))


def mermaid(trip: Journey, events: list[dict]) -> str:
    """A Mermaid ``sequenceDiagram``: one message per traced line, a note per hop."""
    names: list[str] = []
    for hop in trip.hops:
        names += [n for n in (hop.sender, hop.receiver) if n not in names]
    alias = {name: f"P{i}" for i, name in enumerate(names)}
    out = ["sequenceDiagram"]
    out += [f"    participant {alias[n]} as {n}" for n in names]
    for hop in trip.hops:
        left, right = sorted((alias[hop.client], alias[hop.server]), key=lambda a: int(a[1:]))
        out.append(f"    Note over {left},{right}: {_mermaid_text(hop.label)} ({hop.via}), {hop.ms:.1f} ms")
        for ts, direction, line in hop_transcript(events, hop):
            start, end = (hop.client, hop.server) if direction == "C" else (hop.server, hop.client)
            arrow = "->>" if direction == "C" else "-->>"
            at = (ts - trip.start_us) / 1000
            out.append(f"    {alias[start]}{arrow}{alias[end]}: {at:.1f} ms {_mermaid_text(line)}")
    return "\n".join(out) + "\n"


def markdown(trip: Journey, events: list[dict]) -> str:
    return (
        "# The journey of one message, line by line\n\n"
        "Drawn by `diagrams/make_sequence.py` from a real lab trace: every arrow is\n"
        "one protocol line an agent traced, with its time since Alice's client\n"
        "started (ms). Solid arrows are commands, dashed ones replies. Secrets never\n"
        "reach the trace (`AUTH PLAIN ***`). The same diagram as a picture:\n"
        "[journey-sequence.svg](journey-sequence.svg).\n\n"
        f"Message `{trip.message_id}`, {len(trip.hops)} hops, {trip.ms:.1f} ms end to end.\n\n"
        "```mermaid\n" + mermaid(trip, events) + "```\n\n"
        "Where the time went (`mailpipe trace MESSAGE_ID`):\n\n"
        "```text\n" + text_waterfall(trip) + "\n```\n"
    )


def draw(home: Path, message_id: str | None, out: Path) -> Journey:
    events = load_events(home)
    message_id = message_id or last_delivered(events)
    if message_id is None:
        raise SystemExit(f"make_sequence: no delivered message in the trace of {home}")
    trip = journey(events, message_id)
    if not trip.hops:
        raise SystemExit(f"make_sequence: no hops for {message_id} in the trace of {home}")
    out.mkdir(parents=True, exist_ok=True)
    ax = plot_sequence(events, trip.message_id)
    ax.set_title(f"The journey of one message: {len(trip.hops)} hops, {trip.ms:.1f} ms", pad=28)
    for name, dpi in (("journey-sequence.svg", None), ("journey-sequence.png", 100)):
        ax.figure.savefig(out / name, dpi=dpi, facecolor="white", bbox_inches="tight",
                          metadata={"Date": None} if name.endswith(".svg") else None)
    plt.close(ax.figure)
    (out / "journey-sequence.md").write_text(markdown(trip, events), encoding="utf-8")
    return trip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="directory to write into")
    parser.add_argument("--home", type=Path, help="draw from this lab home's trace (no lab is started)")
    parser.add_argument("--message-id", help="with --home: the message to draw (default: the last delivered)")
    parser.add_argument("--subnet", type=int, default=71, help="without --home: run the lab on 127.N.x.y")
    args = parser.parse_args(argv)
    if args.home is not None:
        trip = draw(args.home, args.message_id, args.out)
    else:
        with tempfile.TemporaryDirectory(prefix="mailpipe-journey-") as home:
            message_id = send_one(Path(home), args.subnet)
            trip = draw(Path(home), message_id, args.out)
    print(f"wrote journey-sequence.svg, .png and .md in {args.out} ({trip.message_id}, {trip.ms:.1f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
