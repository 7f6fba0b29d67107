"""Every hop of one message, traced and timed: the agents' trace files, joined.

Each agent writes its own trace (:mod:`agents.trace`); no agent sees the whole
journey. This module puts it back together, the way a postmaster follows one
message through the logs of several machines:

* A **server** that takes responsibility for the message records it with the
  message's ``Message-ID`` and the id of the connection it came in on:
  ``spooled`` (MSA, MTA) or ``stored`` (MDA), each with ``conn``. So that
  connection's TLS handshake, AUTH, DATA and transcript belong to this hop.
* The **client** that sent it is found by the server's last reply, which names
  the receiver's queue id (``250 2.0.0 Ok: queued as 6616505E...``; LMTP says
  ``delivered as``). The client traced that reply on its *own* connection, so
  the client and server ends of a hop join exactly, even when many messages
  are in flight at once.
* **DNS** lookups name no message. They belong to the agent that made them, in
  the window between taking the message from its queue and connecting on.

The result is a :class:`Journey`: one :class:`Hop` per agent pair, each with
the :class:`Span` s a learner should see (queue wait, DNS, TCP connect, TLS,
AUTH, the SMTP session, DATA, the fsync that comes before every ``250``).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .trace import read_events

#: The events that mark an agent taking responsibility for a message.
ARRIVALS = ("submit.start", "spooled", "stored", "fetched")

#: The reply that hands a message over names the receiver's queue id.
_HANDOFF = re.compile(r"\b(?:queued|delivered) as (\S+)")

#: After its hop, a connection's transcript only matters until it is closed.
_CLOSING = re.compile(r"^(?:QUIT|\S+ LOGOUT)\b", re.I)


@dataclass
class Span:
    """One timed step: from ``start_us`` to ``end_us`` (wall clock, µs)."""

    name: str  # what a learner reads: "queue wait", "DNS MX recipient.test"
    kind: str  # its colour in a plot: "queue", "dns", "tls", "smtp", ...
    agent: str  # the agent whose clock measured it
    start_us: int
    end_us: int
    conn: str | None = None

    @property
    def ms(self) -> float:
        return (self.end_us - self.start_us) / 1000


@dataclass
class Hop:
    """One agent handing the message to the next, arrival to arrival."""

    sender: str  # the agent that had the message
    receiver: str  # the agent that took it
    via: str  # "SMTP submission", "LMTP", "IMAP" ...
    start_us: int  # the sender's arrival event
    end_us: int  # the receiver's arrival event
    client_conn: str | None = None  # the connection id on the client's side
    server_conn: str | None = None  # ... and on the server's side
    spans: list[Span] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.sender} -> {self.receiver}"

    @property
    def ms(self) -> float:
        return (self.end_us - self.start_us) / 1000

    @property
    def client(self) -> str:
        """The agent that opened the connection: the reader pulls over IMAP."""
        return self.receiver if self.via == "IMAP" else self.sender

    @property
    def server(self) -> str:
        return self.sender if self.via == "IMAP" else self.receiver


@dataclass
class Journey:
    """One message's hops, and every trace event joined to it."""

    message_id: str
    hops: list[Hop]
    events: list[dict]

    @property
    def start_us(self) -> int:
        return min((h.start_us for h in self.hops), default=0)

    @property
    def end_us(self) -> int:
        """The last moment anything happened: spans may outlast their hop."""
        ends = [h.end_us for h in self.hops] + [s.end_us for h in self.hops for s in h.spans]
        return max(ends, default=0)

    @property
    def ms(self) -> float:
        return (self.end_us - self.start_us) / 1000

    def rows(self) -> list[tuple[str, str, int, int]]:
        """``(label, kind, start_us, end_us)``: each hop, then its spans in time order.

        Both waterfalls (text and plot) draw exactly these rows.
        """
        out = []
        for hop in self.hops:
            out.append((f"{hop.label} ({hop.via})", "hop", hop.start_us, hop.end_us))
            for span in sorted(hop.spans, key=lambda s: (s.start_us, s.end_us)):
                out.append(("  " + span.name, span.kind, span.start_us, span.end_us))
        return out

    def to_dict(self) -> dict:
        return {
            "message_id": self.message_id,
            "ms": self.ms,
            "hops": [{**asdict(h), "label": h.label, "ms": h.ms,
                      "spans": [{**asdict(s), "ms": s.ms} for s in h.spans]} for h in self.hops],
            "events": self.events,
        }


# -- loading -------------------------------------------------------------


def load_events(home_or_trace_dir: str | Path) -> list[dict]:
    """Every event of a lab, from its home or its ``trace/`` directory, in time order."""
    path = Path(home_or_trace_dir)
    if (path / "trace").is_dir():
        path = path / "trace"
    return sorted(read_events(path), key=lambda e: e["ts"])


def normalize_message_id(message_id: str) -> str:
    """``abc@x`` and ``<abc@x>`` name the same message; the trace has the brackets."""
    message_id = message_id.strip()
    return message_id if message_id.startswith("<") else f"<{message_id}>"


def transcript(events: Iterable[dict], conn: str) -> list[tuple[int, str, str]]:
    """One connection's protocol lines: ``(ts, "C" or "S", line)`` in time order."""
    return sorted((e["ts"], e["dir"], e["line"]) for e in events
                  if e.get("event") == "line" and e.get("conn") == conn)


def hop_transcript(events: Iterable[dict], hop: Hop) -> list[tuple[int, str, str]]:
    """The lines of ``hop``'s server connection that carried this message.

    From the hop's start until the connection is closed: on a connection that
    stays open for more mail, the next command after the hop (say ``MAIL
    FROM`` for the next message) ends it; ``QUIT``/``LOGOUT`` and replies do not.
    A reader waiting in IMAP IDLE was told of the message before the MDA's
    ``stored`` event was written: its transcript starts at the command in
    progress when the message arrived (``IDLE``).
    """
    if hop.server_conn is None:
        return []
    lines = transcript(events, hop.server_conn)
    start = hop.start_us
    if hop.via == "IMAP":
        start = max((ts for ts, d, _ in lines if d == "C" and ts < hop.start_us), default=start)
    out = []
    for ts, direction, line in lines:
        if ts < start:
            continue
        if ts > hop.end_us and direction == "C" and not _CLOSING.match(line):
            break
        out.append((ts, direction, line))
    return out


# -- joining ---------------------------------------------------------------


class _Index:
    """The trace, indexed by connection, by agent, and by handed-over queue id."""

    def __init__(self, events: list[dict]):
        self.by_conn: dict[str, list[dict]] = defaultdict(list)
        self.by_agent: dict[str, list[dict]] = defaultdict(list)
        self.handoffs: dict[str, list[dict]] = defaultdict(list)
        for e in events:
            self.by_agent[e["agent"]].append(e)
            if e.get("conn"):
                self.by_conn[e["conn"]].append(e)
            if e["event"] == "line" and e.get("dir") == "S":
                m = _HANDOFF.search(e["line"])
                if m:
                    self.handoffs[m.group(1)].append(e)

    def on_conn(self, conn: str | None, name: str, after: int = 0, before: float = float("inf")) -> list[dict]:
        return [e for e in self.by_conn.get(conn, ()) if e["event"] == name and after <= e["ts"] <= before]

    def of_agent(self, agent: str, names: tuple[str, ...], after: int = 0,
                 before: float = float("inf")) -> list[dict]:
        return [e for e in self.by_agent.get(agent, ()) if e["event"] in names and after <= e["ts"] <= before]


def _arrivals(events: list[dict], message_id: str) -> list[dict]:
    """Each agent's first arrival event for the message (a retry or a re-read is not a hop)."""
    seen, out = set(), []
    for e in events:
        if e.get("message_id") != message_id or e["event"] not in ARRIVALS:
            continue
        key = (e["agent"], e["event"])
        if key not in seen:
            seen.add(key)
            out.append(e)
    return out


def _via(a: dict, b: dict) -> str:
    if b["event"] == "fetched":
        return "IMAP"
    if b["event"] == "stored":
        return "LMTP"
    if a["role"] == "mua":
        return "SMTP submission"
    if a["role"] == "msa":
        return "SMTP"
    return "SMTP relay by MX"


def _upstream(index: _Index, arrivals: list[dict], b: dict) -> tuple[dict | None, str | None]:
    """The arrival that ``b`` came from, and the client's connection id if known."""
    earlier = [a for a in arrivals if a["ts"] <= b["ts"] and a is not b]
    if b["event"] == "fetched":  # the reader fetched it from the mailbox it was stored in
        stored = [a for a in earlier if a["event"] == "stored"]
        return (stored[-1] if stored else None), None
    for line in index.handoffs.get(b.get("queue_id"), ()):
        if line["agent"] != b["agent"]:  # the client's copy of the server's reply
            sender = [a for a in earlier if a["agent"] == line["agent"]]
            if sender:
                return sender[-1], line["conn"]
    # An older trace, without the reply text: the previous arrival, and that
    # agent's last connection before b.
    if not earlier:
        return None, None
    a = earlier[-1]
    connected = [e for e in index.of_agent(a["agent"], ("relay.connected",), a["ts"], b["ts"])
                 if e.get("queue_id") == a.get("queue_id")]
    return a, (connected[-1]["conn"] if connected else None)


def _dns_spans(index: _Index, agent: str, start: int, end: int, *, queue_id: str | None = None,
               conn: str | None = None, untagged: bool = True, prefix: str = "") -> list[Span]:
    """The DNS lookups ``agent`` made between ``start`` and ``end`` for this work.

    A lookup tagged with the queue id or connection it was made for
    (:func:`agents.trace.working_for`) counts only for that one: with ten
    messages in flight, their lookups interleave in time. An untagged one
    (from an older trace, or the MUA's own) counts by time alone, unless
    ``untagged`` is false.
    """

    def ours(e: dict) -> bool:
        if e.get("queue_id") is None and e.get("conn") is None:
            return untagged
        return ((queue_id is not None and e.get("queue_id") == queue_id)
                or (conn is not None and e.get("conn") == conn))

    spans, used = [], set()
    queries = [q for q in index.of_agent(agent, ("dns.query",), start, end) if ours(q)]
    for answer in index.of_agent(agent, ("dns.answer", "dns.error"), start, end):
        if not ours(answer):
            continue
        what = f"{prefix}DNS {answer.get('qtype')} {answer.get('qname')}"
        if answer.get("cached"):
            spans.append(Span(what + " (cached)", "dns", agent, answer["ts"], answer["ts"]))
            continue
        asked = [q for q in queries if id(q) not in used and q["ts"] <= answer["ts"]
                 and (q.get("qtype"), q.get("qname")) == (answer.get("qtype"), answer.get("qname"))]
        if not asked:
            continue
        used.add(id(asked[-1]))
        if answer["event"] == "dns.error":
            what += f" (failed: {answer.get('reason')})"
        spans.append(Span(what, "dns", agent, asked[-1]["ts"], answer["ts"]))
    return spans


def _pair(index: _Index, conn: str | None, start: str, end: str, name: str, kind: str,
          agent: str, after: int = 0) -> list[Span]:
    """The span from the last ``start`` event on ``conn`` to the ``end`` event after it."""
    starts = index.on_conn(conn, start, after)
    if not starts:
        return []
    ends = index.on_conn(conn, end, starts[-1]["ts"])
    if not ends:
        return []
    return [Span(name, kind, agent, starts[-1]["ts"], ends[0]["ts"], conn)]


def _queue_spans(index: _Index, a: dict, before: int) -> tuple[list[Span], int]:
    """Time spent in ``a``'s queue; and when the attempt that delivered began.

    ``spooled -> dequeued`` is the first wait; after a failed attempt
    (``deferred``) each ``deferred -> dequeued`` is a retry wait.
    """
    agent, qid = a["agent"], a.get("queue_id")
    spans, waiting_since, name, last_attempt = [], a["ts"], "queue wait", a["ts"]
    for e in index.of_agent(agent, ("dequeued", "deferred"), a["ts"], before):
        if e.get("queue_id") != qid:
            continue
        if e["event"] == "dequeued":
            last_attempt = e["ts"]
            if waiting_since is not None:
                spans.append(Span(name, "queue", agent, waiting_since, e["ts"]))
                waiting_since = None
        else:
            waiting_since, name = e["ts"], "retry wait"
    return spans, last_attempt


def _relay_spans(index: _Index, a: dict, b: dict, client_conn: str | None,
                 server_conn: str | None) -> list[Span]:
    """The spans of an SMTP or LMTP hop, on both ends of its connection."""
    agent, spans = a["agent"], []
    window_start = a["ts"]
    if a["event"] == "spooled":
        queued, window_start = _queue_spans(index, a, b["ts"])
        spans += queued
    connected = index.on_conn(client_conn, "relay.connected")
    connected = connected[0] if connected else None
    handoff = [e for e in index.by_conn.get(client_conn, ())
               if e["event"] == "line" and e["dir"] == "S" and _HANDOFF.search(e["line"])
               and _HANDOFF.search(e["line"]).group(1) == b.get("queue_id")]
    protocol = "LMTP" if b["event"] == "stored" else "SMTP"
    session = f"{protocol} session (client)"
    if connected is not None and connected["ts"] >= window_start:
        # A connection opened for this message. (A connection cache opens it
        # before it knows which message it will carry: then relay.connect
        # names no queue id, only the host it dials.)
        connects = [e for e in index.of_agent(agent, ("relay.connect",), window_start, connected["ts"])
                    if e.get("queue_id") in (None, a.get("queue_id"))
                    and connected.get("peer") in (None, e.get("host"))]
        dns_until = connects[-1]["ts"] if connects else connected["ts"]
        if connects:
            spans.append(Span("TCP connect", "connect", agent, connects[-1]["ts"], connected["ts"], client_conn))
        session_start = connected["ts"]
    else:
        # A connection opened earlier for other mail (a batch, or a cached
        # connection): no connect, no TLS; the transaction starts at MAIL FROM.
        session = f"{protocol} transaction on a reused connection (client)"
        dns_until = handoff[0]["ts"] if handoff else b["ts"]
        mails = [e for e in index.by_conn.get(client_conn, ())
                 if e["event"] == "line" and e["dir"] == "C" and e["line"].upper().startswith("MAIL FROM")
                 and e["ts"] <= dns_until]
        session_start = mails[-1]["ts"] if mails else None
    spans += _dns_spans(index, agent, window_start, dns_until, queue_id=a.get("queue_id"))
    spans += _pair(index, client_conn, "tls.start", "tls.done", "TLS handshake (client)", "tls", agent)
    if session_start is not None and handoff:
        done = index.on_conn(client_conn, "relay.done", handoff[0]["ts"])
        spans.append(Span(session, "smtp", agent, session_start,
                          done[0]["ts"] if done else handoff[0]["ts"], client_conn))

    server = b["agent"]
    spans += _pair(index, server_conn, "tls.start", "tls.done", "TLS handshake (server)", "tls", server)
    auth_lines = [e for e in index.by_conn.get(server_conn, ())
                  if e["event"] == "line" and e["dir"] == "C" and e["line"].upper().startswith("AUTH")]
    if auth_lines:
        results = index.on_conn(server_conn, "auth.result", auth_lines[-1]["ts"])
        if results:
            spans.append(Span("AUTH (password check)", "auth", server, auth_lines[-1]["ts"],
                              results[0]["ts"], server_conn))
    # The receiver's own lookups for this transaction: SPF, DKIM and DMARC
    # ask the DNS while the client waits for the reply to MAIL or to the dot.
    mails = index.on_conn(server_conn, "smtp.mail", before=b["ts"])
    if mails and server_conn is not None:
        spans += _dns_spans(index, server, mails[-1]["ts"], b["ts"], conn=server_conn, untagged=False,
                            prefix="receiver's ")
    data_starts = index.on_conn(server_conn, "smtp.data.start", before=b["ts"])
    if data_starts:
        data_ends = index.on_conn(server_conn, "smtp.data.end", data_starts[-1]["ts"], b["ts"])
        if data_ends:
            received = data_ends[0]["ts"]
            spans.append(Span("DATA received (server)", "data", server, data_starts[-1]["ts"],
                              received, server_conn))
            # A receiving MTA checks the sender (SPF, DKIM, DMARC) before it spools.
            verdicts = index.on_conn(server_conn, "senderauth.verdict", received, b["ts"])
            if verdicts:
                spans.append(Span("sender checks: SPF, DKIM, DMARC", "checks", server, received,
                                  verdicts[0]["ts"], server_conn))
                received = verdicts[0]["ts"]
            write = "Maildir write + fsync" if b["event"] == "stored" else "spool write + fsync"
            spans.append(Span(write, "fsync", server, received, b["ts"], server_conn))
    # A span that began before the message reached the sender belongs to
    # earlier mail on the same connection.
    return [s for s in spans if s.start_us >= a["ts"]]


def _imap_spans(index: _Index, a: dict, b: dict, server_conn: str | None) -> list[Span]:
    """The last hop: the message waits in the mailbox until the reader fetches it."""
    fetches = index.on_conn(server_conn, "imap.fetch", a["ts"], b["ts"])
    if not fetches:
        return [Span("until the reader has it", "wait", a["agent"], a["ts"], b["ts"])]
    first = fetches[0]
    accepted = index.on_conn(server_conn, "connection.accepted", a["ts"])
    if accepted:  # the reader came to look after the message arrived
        spans = [Span("in the mailbox until the reader connects", "wait", a["agent"], a["ts"],
                      accepted[0]["ts"])]
    else:  # the reader was already there, in IDLE: told at once, it asks
        spans = [Span("in the mailbox until the reader asks (IDLE)", "wait", a["agent"], a["ts"],
                      first["ts"])]
    spans += _dns_spans(index, b["agent"], a["ts"], first["ts"])
    if accepted:
        logins = index.on_conn(server_conn, "imap.login", accepted[0]["ts"])
        if logins:
            spans.append(Span("IMAP connect + login", "imap", a["agent"], accepted[0]["ts"],
                              logins[0]["ts"], server_conn))
        # The IMAP server traces no TLS events; its transcript shows STARTTLS.
        lines = [e for e in index.by_conn.get(server_conn, ()) if e["event"] == "line"]
        for i, e in enumerate(lines):
            if e["dir"] == "S" and "begin tls" in e["line"].lower() and i + 1 < len(lines):
                spans.append(Span("TLS (STARTTLS to next command)", "tls", a["agent"], e["ts"],
                                  lines[i + 1]["ts"], server_conn))
                break
    spans.append(Span("IMAP fetch", "imap", a["agent"], first["ts"], b["ts"], server_conn))
    return [s for s in spans if s.start_us >= a["ts"]]


def journey(events: Iterable[dict], message_id: str) -> Journey:
    """Join every agent's events into the hops of one message (``<>`` optional)."""
    message_id = normalize_message_id(message_id)
    events = sorted(events, key=lambda e: e["ts"])
    index = _Index(events)
    arrivals = _arrivals(events, message_id)
    hops = []
    for b in arrivals:
        a, client_conn = _upstream(index, arrivals, b)
        if a is None:
            continue  # the first arrival: where the journey starts
        if b["event"] == "fetched":
            fetch = [e for e in index.of_agent(a["agent"], ("imap.fetch",), a["ts"], b["ts"])
                     if e.get("message_id") == message_id]
            server_conn = fetch[0]["conn"] if fetch else None
            spans = _imap_spans(index, a, b, server_conn)
        else:
            server_conn = b.get("conn")
            if server_conn is None:  # a trace from before `spooled` carried its conn
                own = [e for e in index.handoffs.get(b.get("queue_id"), ()) if e["agent"] == b["agent"]]
                server_conn = own[0]["conn"] if own else None
            spans = _relay_spans(index, a, b, client_conn, server_conn)
        hops.append(Hop(a["agent"], b["agent"], _via(a, b), a["ts"], b["ts"],
                        client_conn, server_conn, spans))
    hops.sort(key=lambda h: (h.start_us, h.end_us))
    return Journey(message_id, hops, _joined_events(events, message_id, hops))


def _joined_events(events: list[dict], message_id: str, hops: list[Hop]) -> list[dict]:
    """The message's own events, its DNS lookups, and its hops' connection events.

    A connection may carry other mail too (a cached relay connection): only
    its events while it carried this message, and none that name another.
    """
    windows = defaultdict(list)  # conn -> [(from, to)]
    for hop in hops:
        lines = hop_transcript(events, hop)
        end = max([hop.end_us, *(s.end_us for s in hop.spans), *(ts for ts, *_ in lines[-1:])])
        for conn in (hop.client_conn, hop.server_conn):
            if conn:
                windows[conn].append((hop.start_us, end))
    lookups = {(s.agent, s.start_us) for h in hops for s in h.spans if s.kind == "dns"}
    lookups |= {(s.agent, s.end_us) for h in hops for s in h.spans if s.kind == "dns"}
    joined = []
    for e in events:
        if e.get("message_id") not in (None, message_id):
            continue
        if (e.get("message_id") == message_id
                or any(start <= e["ts"] <= end for start, end in windows.get(e.get("conn"), ()))
                or (e["event"].startswith("dns.") and (e["agent"], e["ts"]) in lookups)):
            joined.append(e)
    return joined


# -- showing ---------------------------------------------------------------


def text_waterfall(journey: Journey, width: int = 40) -> str:
    """The journey as text: one row per hop and step, start and duration in ms, a bar.

    Bars share one time scale, so a long bar *is* a slow step: compare the
    queue waits and fsyncs with the TLS handshakes.
    """
    if not journey.hops:
        return f"(no hops found in the trace for {journey.message_id})"
    rows = journey.rows()
    t0, total = journey.start_us, max(journey.end_us - journey.start_us, 1)
    name_width = max(len(label) for label, *_ in rows)
    lines = [f"message {journey.message_id}: {len(journey.hops)} hops, {journey.ms:.1f} ms end to end",
             f"{'hop / step':<{name_width}} {'at ms':>9} {'took ms':>9}"]
    for label, _kind, start, end in rows:
        column = round((start - t0) / total * width)
        length = max(1, round((end - start) / total * width))
        bar = " " * min(column, width - 1) + "█" * min(length, width - min(column, width - 1))
        lines.append(f"{label:<{name_width}} {(start - t0) / 1000:>9.1f} {(end - start) / 1000:>9.1f}  {bar}")
    return "\n".join(lines)
