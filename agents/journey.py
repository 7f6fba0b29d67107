"""A message's journey, joined from the trace events of every agent.

Each agent records, with the message's ``Message-ID``, the moment it took
responsibility for it: the MUA when it starts submitting (``submit.start``),
the MSA and MTAs when the message is safe in their spool (``spooled``), the
MDA when it is in the Maildir (``stored``), and the MUA again when it reads it
(``fetched``). Consecutive arrivals are the hops; the time between two is how
long that hop took, queueing and DNS and TLS included.
"""

from __future__ import annotations

from collections.abc import Iterable

ARRIVALS = {"submit.start", "spooled", "stored", "fetched"}


def message_events(events: Iterable[dict], message_id: str) -> list[dict]:
    """Every event that names ``message_id``, in time order."""
    return sorted((e for e in events if e.get("message_id") == message_id), key=lambda e: e["ts"])


def hops(events: Iterable[dict], message_id: str) -> list[dict]:
    """The hops of one message: ``[{"from", "to", "start_us", "end_us", "ms"}]``."""
    arrivals = []
    for e in message_events(events, message_id):
        if e["event"] not in ARRIVALS:
            continue
        if arrivals and arrivals[-1]["agent"] == e["agent"] and e["event"] != "fetched":
            continue  # the same agent again (a retry): keep its first arrival
        arrivals.append(e)
    out = []
    for a, b in zip(arrivals, arrivals[1:]):
        out.append({
            "from": a["agent"], "to": b["agent"], "via": _protocol(a, b),
            "start_us": a["ts"], "end_us": b["ts"], "ms": (b["ts"] - a["ts"]) / 1000,
        })
    return out


def _protocol(a: dict, b: dict) -> str:
    if a["role"] == "mua":
        return "SMTP submission (STARTTLS, AUTH)"
    if b["role"] == "mua":
        return "IMAP"
    if b["role"] == "mda":
        return "LMTP"
    if a["role"] == "msa":
        return "SMTP"
    return "SMTP relay by MX"


def format_hops(rows: list[dict]) -> str:
    if not rows:
        return "(no hops found in the trace)"
    lines = [f"{'hop':<44} {'via':<34} {'at ms':>8} {'took ms':>8}"]
    t0 = rows[0]["start_us"]
    for r in rows:
        lines.append(f"{r['from'] + ' -> ' + r['to']:<44} {r['via']:<34} "
                     f"{(r['start_us'] - t0) / 1000:>8.1f} {r['ms']:>8.1f}")
    total = (rows[-1]["end_us"] - t0) / 1000
    lines.append(f"{'end to end':<44} {'':<34} {'':>8} {total:>8.1f}")
    return "\n".join(lines)
