"""Every hop traced and timed: joining the agents' traces, and drawing them.

The first tests use hand-made events, so each rule of the join is pinned
exactly; the rest run a real message through the session's lab.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from matplotlib.patches import FancyArrowPatch  # noqa: E402

from agents import cli  # noqa: E402
from agents.bench import BenchResult  # noqa: E402
from agents.plots import (  # noqa: E402
    KIND_LABELS, plot_bench, plot_hop_latencies, plot_sequence, plot_throughput, plot_waterfall,
)
from agents.traceview import (  # noqa: E402
    hop_transcript, journey, load_events, normalize_message_id, text_waterfall, transcript,
)

REPO = Path(__file__).resolve().parents[1]
MID = "<m1@sender.test>"
MSA, MTA, MDA = "msa.sender.test", "mta.sender.test", "mda.sender.test"


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def ev(at_ms: float, agent: str, event: str, **fields) -> dict:
    """One trace event at ``at_ms`` milliseconds, as an agent would write it."""
    role = agent.split(".")[0]
    return {"ts": 1_700_000_000_000_000 + round(at_ms * 1000), "agent": agent, "role": role,
            "domain": "sender.test", "event": event, **fields}


def line(at_ms: float, agent: str, conn: str, direction: str, text: str, **fields) -> dict:
    return ev(at_ms, agent, "line", conn=conn, dir=direction, line=text, **fields)


def hand_made_trace() -> list[dict]:
    """A message MUA -> MSA -> MTA -> MDA (LMTP) -> MUA (IMAP), plus another message's noise."""
    relay = {"queue_id": "Q1", "message_id": MID}  # what Tracer.bind adds to the MSA's client
    lmtp = {"queue_id": "Q2", "message_id": MID}
    events = [
        ev(0, "mua", "submit.start", message_id=MID),
        ev(0.1, "mua", "dns.query", qtype="A", qname="smtp.sender.test"),
        ev(1.1, "mua", "dns.answer", qtype="A", qname="smtp.sender.test", ms=1.0),
        ev(2, "mua", "relay.connect", host="127.1.1.1"),
        ev(3, "mua", "relay.connected", conn="mua/1/1"),
        ev(3.1, MSA, "connection.accepted", conn="msa/1/1"),
        ev(4, MSA, "tls.start", conn="msa/1/1"),
        ev(4.2, "mua", "tls.start", conn="mua/1/1"),
        ev(5.8, "mua", "tls.done", conn="mua/1/1"),
        ev(6, MSA, "tls.done", conn="msa/1/1"),
        line(7, MSA, "msa/1/1", "C", "AUTH PLAIN ***"),
        ev(9, MSA, "auth.result", conn="msa/1/1", ok=True),
        line(10, MSA, "msa/1/1", "C", "MAIL FROM:<alice@sender.test>"),
        line(10.1, MSA, "msa/1/1", "S", "250 2.1.0 Sender OK"),
        ev(11, MSA, "smtp.data.start", conn="msa/1/1"),
        ev(12, MSA, "smtp.data.end", conn="msa/1/1"),
        ev(14, MSA, "spooled", queue_id="Q1", message_id=MID, conn="msa/1/1"),
        line(14.1, MSA, "msa/1/1", "S", "250 2.0.0 Ok: queued as Q1"),
        line(14.3, "mua", "mua/1/1", "S", "250 2.0.0 Ok: queued as Q1"),
        ev(14.4, "mua", "relay.done", conn="mua/1/1"),
        line(14.5, MSA, "msa/1/1", "C", "QUIT"),
        line(14.6, MSA, "msa/1/1", "S", "221 2.0.0 Bye"),
        ev(15, MSA, "dequeued", queue_id="Q1", message_id=MID),
        ev(15.1, MSA, "dns.query", qtype="A", qname="mx.sender.test"),
        ev(15.6, MSA, "dns.answer", qtype="A", qname="mx.sender.test", ms=0.5),
        ev(15.8, MSA, "dns.answer", qtype="MX", qname="sender.test", cached=True, ms=0.0),
        ev(16, MSA, "relay.connect", **relay),
        ev(17, MSA, "relay.connected", conn="msa/1/2", **relay),
        ev(17.1, MTA, "connection.accepted", conn="mta/1/1"),
        ev(18, MTA, "smtp.data.start", conn="mta/1/1"),
        ev(19, MTA, "smtp.data.end", conn="mta/1/1"),
        ev(21, MTA, "spooled", queue_id="Q2", message_id=MID, conn="mta/1/1"),
        line(21.1, MTA, "mta/1/1", "S", "250 2.0.0 Ok: queued as Q2"),
        line(21.3, MSA, "msa/1/2", "S", "250 2.0.0 Ok: queued as Q2", **relay),
        ev(21.4, MSA, "relay.done", conn="msa/1/2", **relay),
        ev(22, MTA, "dequeued", queue_id="Q2", message_id=MID),
        ev(23, MTA, "relay.connect", **lmtp),
        ev(24, MTA, "relay.connected", conn="mta/1/2", **lmtp),
        ev(24.1, MDA, "connection.accepted", conn="mda/1/1"),
        ev(25, MDA, "smtp.data.start", conn="mda/1/1"),
        ev(26, MDA, "smtp.data.end", conn="mda/1/1"),
        ev(28, MDA, "stored", queue_id="Q3", message_id=MID, conn="mda/1/1"),
        line(28.1, MDA, "mda/1/1", "S", "250 2.0.0 <bob@sender.test> delivered as Q3"),
        line(28.3, MTA, "mta/1/2", "S", "250 2.0.0 <bob@sender.test> delivered as Q3", **lmtp),
        ev(28.4, MTA, "relay.done", conn="mta/1/2", **lmtp),
        ev(30, MSA, "spooled", queue_id="Q9", message_id="<other@sender.test>", conn="msa/1/3"),
        line(40, MSA, "msa/1/1", "C", "MAIL FROM:<alice@sender.test>"),  # the next message
        ev(50, MDA, "connection.accepted", conn="mda/1/2", protocol="imap"),
        ev(51, MDA, "imap.login", conn="mda/1/2", ok=True),
        ev(52, MDA, "imap.fetch", conn="mda/1/2", message_id=MID),
        ev(55, "mua", "fetched", message_id=MID),
        ev(60, "mua", "fetched", message_id=MID),  # read again later: not another hop
    ]
    return sorted(events, key=lambda e: e["ts"])


def spans_of(hop) -> dict[str, tuple[float, float]]:
    """``{span name: (start ms, took ms)}``, start relative to the hand-made trace's zero."""
    zero = 1_700_000_000_000_000
    return {s.name: ((s.start_us - zero) / 1000, round(s.ms, 3)) for s in hop.spans}


# -- the join, on hand-made events ----------------------------------------------


def test_journey_joins_hops_in_order_with_their_connections():
    trip = journey(hand_made_trace(), MID)
    assert [(h.sender, h.receiver, h.via) for h in trip.hops] == [
        ("mua", MSA, "SMTP submission"), (MSA, MTA, "SMTP"), (MTA, MDA, "LMTP"), (MDA, "mua", "IMAP"),
    ]
    assert [(h.client_conn, h.server_conn) for h in trip.hops] == [
        ("mua/1/1", "msa/1/1"), ("msa/1/2", "mta/1/1"), ("mta/1/2", "mda/1/1"), (None, "mda/1/2"),
    ]
    assert [h.ms for h in trip.hops] == pytest.approx([14, 7, 7, 27])
    assert trip.ms == pytest.approx(55)
    # The other message's events are not part of this one's journey.
    assert all(e.get("message_id") in (None, MID) for e in trip.events)
    assert not any(e.get("conn") == "msa/1/3" for e in trip.events)


def test_submission_hop_spans_both_ends_of_the_connection():
    spans = spans_of(journey(hand_made_trace(), MID).hops[0])
    assert spans == {
        "DNS A smtp.sender.test": (0.1, 1.0),
        "TCP connect": (2, 1),
        "TLS handshake (client)": (4.2, 1.6),
        "TLS handshake (server)": (4, 2),
        "AUTH (password check)": (7, 2),
        "SMTP session (client)": (3, 11.4),
        "DATA received (server)": (11, 1),
        "spool write + fsync": (12, 2),
    }


def test_relay_hops_have_queue_wait_dns_and_the_fsync_before_250():
    hops = journey(hand_made_trace(), MID).hops
    relay, lmtp, imap = spans_of(hops[1]), spans_of(hops[2]), spans_of(hops[3])
    assert relay["queue wait"] == (14, 1)
    assert relay["DNS A mx.sender.test"] == (15.1, 0.5)
    assert relay["DNS MX sender.test (cached)"] == (15.8, 0)
    assert relay["SMTP session (client)"] == (17, 4.4)
    assert relay["spool write + fsync"] == (19, 2)
    assert lmtp["LMTP session (client)"] == (24, 4.4)
    assert lmtp["Maildir write + fsync"] == (26, 2)
    assert imap == {
        "in the mailbox until the reader connects": (28, 22),
        "IMAP connect + login": (50, 1),
        "IMAP fetch": (52, 3),
    }


def test_message_id_with_or_without_brackets():
    assert normalize_message_id("m1@sender.test") == MID == normalize_message_id(" <m1@sender.test> ")
    assert len(journey(hand_made_trace(), "m1@sender.test").hops) == 4


def test_a_trace_without_conn_or_reply_text_still_joins_by_time():
    """Traces written before ``spooled`` carried ``conn``: hops still come out in order."""
    old = []
    for e in hand_made_trace():
        e = {k: v for k, v in e.items() if not (k == "conn" and e["event"] in ("spooled", "stored"))}
        if e["event"] == "line":
            e["line"] = e["line"].replace("queued as", "ok").replace("delivered as", "ok")
        old.append(e)
    trip = journey(old, MID)
    assert [h.label for h in trip.hops] == [f"mua -> {MSA}", f"{MSA} -> {MTA}", f"{MTA} -> {MDA}",
                                            f"{MDA} -> mua"]
    assert trip.hops[1].client_conn == "msa/1/2"


def test_a_session_reused_for_many_messages_times_only_this_transaction():
    """A batch sender opened (and did TLS on) its connection before this message existed."""
    events = [
        ev(-50, "mua", "relay.connected", conn="mua/1/1"),
        ev(-45, "mua", "tls.start", conn="mua/1/1"),
        ev(-40, "mua", "tls.done", conn="mua/1/1"),
        ev(0, "mua", "submit.start", message_id=MID),
        line(1, "mua", "mua/1/1", "C", "MAIL FROM:<alice@sender.test>"),
        ev(5, MSA, "spooled", queue_id="Q1", message_id=MID, conn="msa/1/1"),
        line(5.1, MSA, "msa/1/1", "S", "250 2.0.0 Ok: queued as Q1"),
        line(5.2, "mua", "mua/1/1", "S", "250 2.0.0 Ok: queued as Q1"),
        ev(5.3, "mua", "relay.done", conn="mua/1/1"),
    ]
    assert spans_of(journey(events, MID).hops[0]) == {
        "SMTP transaction on a reused connection (client)": (1, 4.3)}


def test_a_cached_connection_opened_before_its_message_is_known():
    """A connection cache dials first (relay.connect without queue id), then binds."""
    events = [e for e in hand_made_trace() if not (e["agent"] == MSA and e["event"] == "relay.connect")]
    events.append(ev(16, MSA, "relay.connect", host="127.1.1.1"))
    for e in events:
        if e["event"] == "relay.connected" and e["agent"] == MSA:
            e.pop("queue_id"), e.pop("message_id")
            e["peer"] = "127.1.1.1"
    assert spans_of(journey(events, MID).hops[1])["TCP connect"] == (16, 1)


def test_dns_lookups_join_the_message_they_were_made_for():
    """Ten messages in flight interleave their lookups: the tags, not the clock, decide.

    The sending MSA tags a lookup with the queue id of the attempt
    (``working_for(queue_id=...)``), the receiving MTA with the connection
    whose policy check asked (``working_for(conn=...)``).
    """
    events = hand_made_trace()
    for e in events:
        if e["event"].startswith("dns.") and e["agent"] == MSA:
            e["queue_id"] = "Q1"
    events += [
        # Another message's relay lookups, in the middle of this one's window.
        ev(15.2, MSA, "dns.query", qtype="A", qname="mx.other.test", queue_id="Q7"),
        ev(15.3, MSA, "dns.answer", qtype="A", qname="mx.other.test", queue_id="Q7", ms=0.1),
        ev(15.9, MSA, "dns.answer", qtype="MX", qname="other.test", queue_id="Q7", cached=True, ms=0.0),
        # The receiver's SPF lookup for this transaction, and one for a session next door.
        ev(17.5, MTA, "smtp.mail", conn="mta/1/1"),
        ev(17.6, MTA, "dns.query", qtype="TXT", qname="sender.test", conn="mta/1/1"),
        ev(17.9, MTA, "dns.answer", qtype="TXT", qname="sender.test", conn="mta/1/1", ms=0.3),
        ev(18.2, MTA, "dns.answer", qtype="TXT", qname="other.test", conn="mta/1/9", cached=True, ms=0.0),
        ev(18.3, MTA, "dns.answer", qtype="TXT", qname="untagged.test", cached=True, ms=0.0),
        # Its verdict, after DATA ended at 19: the checks are their own step before the spool write.
        ev(20.2, MTA, "senderauth.verdict", conn="mta/1/1", dmarc="pass"),
    ]
    events.sort(key=lambda e: e["ts"])
    trip = journey(events, MID)
    relay = spans_of(trip.hops[1])
    dns = sorted(name for name in relay if "DNS" in name)
    assert dns == ["DNS A mx.sender.test", "DNS MX sender.test (cached)",
                   "receiver's DNS TXT sender.test"]
    assert relay["receiver's DNS TXT sender.test"] == (17.6, 0.3)
    assert relay["sender checks: SPF, DKIM, DMARC"] == (19, 1.2)
    assert relay["spool write + fsync"] == (20.2, 0.8)
    # The joined events hold this message's lookups and none of the others'.
    names = {e.get("qname") for e in trip.events if e["event"].startswith("dns.")}
    assert "other.test" not in names and "mx.other.test" not in names
    assert {"mx.sender.test", "sender.test"} <= names


def test_transcripts():
    events = hand_made_trace()
    lines = transcript(events, "msa/1/1")
    assert [(d, text) for _, d, text in lines][:2] == [("C", "AUTH PLAIN ***"), ("C", "MAIL FROM:<alice@sender.test>")]
    assert [ts for ts, *_ in lines] == sorted(ts for ts, *_ in lines)
    first = journey(events, MID).hops[0]
    # The reply and QUIT after the hop belong to it; the next message's MAIL FROM does not.
    assert [text for *_, text in hop_transcript(events, first)] == [
        "AUTH PLAIN ***", "MAIL FROM:<alice@sender.test>", "250 2.1.0 Sender OK",
        "250 2.0.0 Ok: queued as Q1", "QUIT", "221 2.0.0 Bye"]


def test_text_waterfall_has_a_row_per_hop_and_step_on_one_scale():
    trip = journey(hand_made_trace(), MID)
    text = text_waterfall(trip, width=55)
    header, rows = text.splitlines()[1], text.splitlines()[2:]
    bars_from = header.index("took ms") + len("took ms") + 2
    assert len(rows) == len(trip.hops) + sum(len(h.spans) for h in trip.hops)
    assert rows[0].startswith(f"mua -> {MSA} (SMTP submission)")
    assert all("█" in r for r in rows)
    # 55 columns for 55 ms: the IMAP hop starts at 28 ms and is 27 columns long.
    imap = next(r for r in rows if r.startswith(f"{MDA} -> mua"))
    bar = imap[bars_from:]
    assert bar.index("█") == 28 and bar.count("█") == 27
    assert "no hops" in text_waterfall(journey(hand_made_trace(), "<unknown@x>"))


# -- pictures, from hand-made events -------------------------------------------


def test_plot_waterfall_bars_by_kind():
    trip = journey(hand_made_trace(), MID)
    ax = plot_waterfall(trip)
    bars = {c.get_label(): len(c) for c in ax.containers}
    assert bars[KIND_LABELS["hop"]] == 4
    assert bars[KIND_LABELS["dns"]] == 3
    assert bars[KIND_LABELS["tls"]] == 2
    assert bars[KIND_LABELS["queue"]] == 2
    assert sum(bars.values()) == len(trip.rows()) == len(ax.get_yticklabels())
    assert {t.get_text() for t in ax.get_legend().get_texts()} == set(bars)


def test_plot_sequence_one_arrow_per_line():
    events = hand_made_trace()
    ax = plot_sequence(events, "msa/1/1")
    arrows = [p for p in ax.patches if isinstance(p, FancyArrowPatch)]
    assert len(arrows) == len(transcript(events, "msa/1/1")) == len(ax.get_yticks())
    ax = plot_sequence(events, MID)
    trip = journey(events, MID)
    arrows = [p for p in ax.patches if isinstance(p, FancyArrowPatch)]
    assert len(arrows) == sum(len(hop_transcript(events, h)) for h in trip.hops)


def test_plot_hop_latencies_throughput_and_bench():
    ax = plot_hop_latencies({"mua -> msa": [70, 72, 90], "msa -> mta": [15, 17, 30, 18]})
    assert [t.get_text() for t in ax.get_yticklabels()] == ["mua -> msa", "msa -> mta"]

    t0 = 1_700_000_000_000_000
    samples = [(t0 + i * 100_000, t0 + i * 100_000 + 200_000) for i in range(50)]  # 10 msg/s
    ax = plot_throughput(samples, bucket_s=1.0)
    assert sum(p.get_height() for p in ax.patches) == 50

    result = BenchResult(messages=50, concurrency=5, size=2048, delivered=50, seconds=5.1,
                         throughput=9.8, latency_ms={"p50": 200.0, "p90": 200.0, "p99": 200.0, "max": 200.0},
                         hop_p50_ms={"mua -> msa": 70.0, "msa -> mta": 17.0}, samples=samples)
    fig = plot_bench(result)
    assert len(fig.axes) == 4
    assert len(fig.axes[3].patches) == 2  # one bar per hop


# -- a real message through the session's lab ------------------------------------

HOPS = [("mua", "msa.sender.test"), ("msa.sender.test", "mta.sender.test"),
        ("mta.sender.test", "mta.recipient.test"), ("mta.recipient.test", "mda.recipient.test"),
        ("mda.recipient.test", "mua")]


@pytest.fixture(scope="module")
def traced(lab):
    """Two messages Alice -> Bob, delivered and read; their ids and the whole trace."""
    ids = []
    for n in range(2):
        sent = lab.send("alice@sender.test", "bob@recipient.test", f"traced {n}", "every hop\n")
        lab.wait_for("bob@recipient.test", sent["message_id"])
        ids.append(sent["message_id"])
    time.sleep(0.3)  # the agents' last lines (QUIT, relay.done) reach their files
    return lab, ids, load_events(lab.home.root)


def test_real_journey_has_every_hop_in_order(traced):
    _lab, ids, events = traced
    trips = [journey(events, mid) for mid in ids]
    for trip in trips:
        assert [(h.sender, h.receiver) for h in trip.hops] == HOPS
        for hop in trip.hops[:4]:  # SMTP and LMTP: both ends of the connection are known
            assert hop.client_conn and hop.server_conn
            assert any(e["event"] == "relay.connected" for e in events if e.get("conn") == hop.client_conn)
            server = [e["event"] for e in events if e.get("conn") == hop.server_conn]
            assert {"connection.accepted", "smtp.data.end", "line"} <= set(server)
        for hop in trip.hops[:3]:
            # STARTTLS on every SMTP hop, seen from both ends; unless the
            # relay reused a connection that did its TLS for earlier mail.
            names = [s.name for s in hop.spans]
            reused = any("reused connection" in n for n in names)
            assert reused or names.count("TLS handshake (client)") == names.count("TLS handshake (server)") == 1
        assert "TLS handshake (client)" in [s.name for s in trip.hops[0].spans]  # a new MUA each time
        assert trip.hops[-1].server_conn  # the IMAP session that fetched it
    # One journey per message: each message came in on its own submission
    # connection; relay connections may be shared (a connection cache), but
    # each hop's transcript holds exactly one transaction: this message's.
    assert trips[0].hops[0].server_conn != trips[1].hops[0].server_conn
    for trip in trips:
        for hop in trip.hops[:4]:
            commands = [text for _, d, text in hop_transcript(events, hop) if d == "C"]
            assert sum(c.upper().startswith("MAIL FROM") for c in commands) == 1, commands
        assert all(e.get("message_id") in (None, trip.message_id) for e in trip.events)
    arrivals = [e for e in events if e["event"] in ("spooled", "stored") and e.get("message_id") in ids]
    assert arrivals and all(e.get("conn") for e in arrivals)


def test_every_hop_sends_its_message_with_bdat(traced):
    """CHUNKING between every pair of agents: the submission, both relays and
    LMTP each carry the message as BDAT <size> LAST, never DATA (RFC 3030)."""
    _lab, ids, events = traced
    for mid in ids:
        trip = journey(events, mid)
        for hop in trip.hops[:4]:
            commands = [text for _, d, text in hop_transcript(events, hop) if d == "C"]
            assert any(re.fullmatch(r"BDAT \d+ LAST", c) for c in commands), (hop.label, commands)
            assert "DATA" not in commands, (hop.label, commands)


def test_real_dns_lookups_are_tagged_with_their_message_or_session(traced):
    """The relay's MX and A lookups name their queue id; the receiver's SPF, DKIM
    and DMARC lookups name the session whose check asked (agents.trace.working_for)."""
    _lab, ids, events = traced
    for mid in ids:
        trip = journey(events, mid)
        relay = trip.hops[2]  # mta.sender.test -> mta.recipient.test, by MX
        spooled = next(e for e in events if e["event"] == "spooled" and e.get("message_id") == mid
                       and e["agent"] == relay.sender)
        own = [e for e in events if e["agent"] == relay.sender and e["event"] == "dns.answer"
               and e.get("queue_id") == spooled["queue_id"]]
        assert {"MX", "A"} <= {e["qtype"] for e in own}
        receiver = [e for e in events if e["agent"] == relay.receiver and e["event"] == "dns.answer"
                    and e.get("conn") == relay.server_conn]
        assert "TXT" in {e["qtype"] for e in receiver}  # SPF and DMARC at least
        names = [s.name for s in relay.spans]
        assert any(n.startswith("DNS MX recipient.test") for n in names), names
        assert any(n.startswith("receiver's DNS TXT") for n in names), names
        assert names.index("sender checks: SPF, DKIM, DMARC") < names.index("spool write + fsync")


def test_real_waterfall_and_sequence_pictures(traced):
    _lab, ids, events = traced
    trip = journey(events, ids[0])
    bars = {c.get_label(): len(c) for c in plot_waterfall(trip).containers}
    assert bars[KIND_LABELS["hop"]] == len(HOPS)
    assert bars[KIND_LABELS["dns"]] >= 2  # at least the two MUAs' lookups (relays may cache)
    assert bars[KIND_LABELS["tls"]] >= 2  # at least submission, client and server side
    assert bars[KIND_LABELS["auth"]] == 1
    conn = trip.hops[2].client_conn  # the relay between the two domains
    ax = plot_sequence(events, conn)
    arrows = [p for p in ax.patches if isinstance(p, FancyArrowPatch)]
    assert len(arrows) == len(transcript(events, conn)) > 20
    texts = {t.get_text() for t in ax.texts}
    assert "STARTTLS" in texts and any(t.startswith("250 2.0.0 Ok: queued as") for t in texts)


def test_secrets_never_reach_the_trace(traced):
    lab, _ids, events = traced
    secrets = [b"alice-secret", b"bob-secret",
               base64.b64encode(b"\0alice@sender.test\0alice-secret"),
               base64.b64encode(b"alice-secret"), base64.b64encode(b"bob-secret")]
    files = list(lab.home.trace_dir.glob("*.jsonl"))
    assert files
    for path in files:
        data = path.read_bytes()
        for secret in secrets:
            assert secret not in data, f"{secret!r} in {path.name}"
    lines = [e["line"] for e in events if e["event"] == "line"]
    assert "AUTH PLAIN ***" in lines  # masked, not missing
    assert any(l.endswith('LOGIN "bob@recipient.test" ***') for l in lines)


def test_mailpipe_trace_prints_a_row_per_hop(traced, capsys):
    lab, ids, _events = traced
    assert cli.main(["--home", str(lab.home.root), "trace", ids[0].strip("<>")]) == 0
    out = capsys.readouterr().out
    for sender, receiver in HOPS:
        assert sum(1 for row in out.splitlines() if row.startswith(f"{sender} -> {receiver} (")) == 1
    assert cli.main(["--home", str(lab.home.root), "trace", ids[0], "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [(h["sender"], h["receiver"]) for h in data["hops"]] == HOPS
    assert all(e.get("message_id") in (None, ids[0]) for e in data["events"])
    assert cli.main(["--home", str(lab.home.root), "trace", "<nobody@nowhere>"]) == 1


def test_make_sequence_draws_from_a_lab_home(traced, tmp_path):
    lab, ids, _events = traced
    subprocess.run([sys.executable, "diagrams/make_sequence.py", "--home", str(lab.home.root),
                    "--message-id", ids[1], "--out", str(tmp_path)],
                   cwd=REPO, check=True, capture_output=True, timeout=120)
    svg = (tmp_path / "journey-sequence.svg").read_text(encoding="utf-8")
    assert "STARTTLS" in svg and "AUTH PLAIN ***" in svg and svg.count("RCPT TO:") == 4  # 4 hops
    assert (tmp_path / "journey-sequence.png").read_bytes().startswith(b"\x89PNG")
    md = (tmp_path / "journey-sequence.md").read_text(encoding="utf-8")
    assert "```mermaid\nsequenceDiagram" in md
    assert md.count("Note over") == len(HOPS)
    assert ids[1] in md and "alice-secret" not in md
