# -*- test-case-name: tests.test_security -*-
"""``mailpipe monitor``: who is attacking the lab, and how hard?

Every agent writes its refusals to its trace as ``security.*`` events (see
:data:`agents.security.EVENTS`): failed and blocked logins, relay attempts,
rate limits, spoofed senders, STARTTLS injection, failed TLS handshakes.
Reading the logs for exactly these is the daily routine the seed asks for
("monitor the logs for failed logins and spikes", RFC 2505 2.3-2.4). This
module does it for the lab::

    mailpipe monitor                 # a summary of everything in the trace
    mailpipe monitor --since 300     # only the last five minutes
    mailpipe monitor --json          # the same, for a program or a notebook

The summary counts events per agent and per client address, lists the top
offenders, and bins the events over time. From Python (a notebook), the
functions below return plain lists and dicts ready for matplotlib; nothing
here runs a reactor.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable

from .home import LabHome
from .security import EVENTS

#: "Nice" bucket widths for counts over time, in seconds.
_BUCKETS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 86400)


def _read(trace_dir: Path, wanted: str, keep) -> list[dict]:
    """Events whose JSON line contains ``wanted`` and that ``keep`` accepts, by time.

    The trace also holds every protocol line, so the cheap substring test
    comes before the JSON parsing.
    """
    events = []
    for path in sorted(Path(trace_dir).glob("*.jsonl")):
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if wanted not in line:
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a crash
                if keep(record):
                    events.append(record)
    events.sort(key=lambda e: e.get("ts", 0))
    return events


def _since_us(since: float | None, now: float | None) -> int:
    if since is None:
        return 0
    return int(((time.time() if now is None else now) - since) * 1e6)


def security_events(trace_dir: Path, since: float | None = None, now: float | None = None) -> list[dict]:
    """Every ``security.*`` event in a lab's trace, oldest first.

    ``since``: only those of the last ``since`` seconds (before ``now``).
    """
    start = _since_us(since, now)
    return _read(trace_dir, '"security.',
                 lambda e: str(e.get("event", "")).startswith("security.") and e.get("ts", 0) >= start)


def message_events(trace_dir: Path, since: float | None = None, now: float | None = None,
                   role: str = "msa") -> list[dict]:  # fmt: skip
    """The messages accepted (``spooled``) by every agent of ``role``: the traffic
    whose spikes a rate limit is there to cut."""
    start = _since_us(since, now)
    return _read(trace_dir, '"spooled"',
                 lambda e: e.get("event") == "spooled" and e.get("role") == role and e.get("ts", 0) >= start)


def client_of(event: dict) -> str:
    """The client address an event is about (``"-"`` when it has none)."""
    return str(event.get("peer") or "-")


def pick_bucket(span: float, bins: int = 30) -> int:
    """A round bucket width (seconds) that cuts ``span`` into about ``bins`` bins."""
    for width in _BUCKETS:
        if span / width <= bins:
            return width
    return _BUCKETS[-1]


def counts_over_time(events: Iterable[dict], bucket: float | None = None,
                     key=lambda e: e["event"]) -> dict:  # fmt: skip
    """Events per time bucket, one series per ``key`` (default: the event name).

    Returns ``{"bucket": seconds, "start": epoch seconds of the first bin,
    "times": [bin start, ...], "series": {key: [count per bin, ...]}}``,
    every series as long as ``times`` (empty bins included), ready to plot.
    """
    events = list(events)
    if not events:
        return {"bucket": bucket or 1, "start": None, "times": [], "series": {}}
    first, last = events[0]["ts"] / 1e6, events[-1]["ts"] / 1e6
    width = bucket or pick_bucket(last - first)
    start = math.floor(first / width) * width
    bins = int((last - start) // width) + 1
    series: dict[str, list[int]] = defaultdict(lambda: [0] * bins)
    for e in events:
        series[key(e)][int((e["ts"] / 1e6 - start) // width)] += 1
    times = [start + i * width for i in range(bins)]
    return {"bucket": width, "start": start, "times": times, "series": dict(series)}


def summarise(events: list[dict], top: int = 10, bucket: float | None = None) -> dict:
    """Counts per event, per agent and per client, the top offenders, and counts over time."""
    by_event = Counter(e["event"] for e in events)
    by_agent: dict[str, Counter] = defaultdict(Counter)
    by_client: dict[str, Counter] = defaultdict(Counter)
    users: dict[str, set] = defaultdict(set)
    agents: dict[str, set] = defaultdict(set)
    for e in events:
        client = client_of(e)
        by_agent[e.get("agent", "?")][e["event"]] += 1
        by_client[client][e["event"]] += 1
        agents[client].add(e.get("agent", "?"))
        for field in ("user", "claimed", "rcpt"):
            if e.get(field):
                users[client].add(str(e[field]))
    offenders = sorted(by_client, key=lambda c: (-sum(by_client[c].values()), c))[:top]
    return {
        "events": len(events),
        "first": events[0]["ts"] / 1e6 if events else None,
        "last": events[-1]["ts"] / 1e6 if events else None,
        "by_event": dict(by_event.most_common()),
        "by_agent": {a: dict(c.most_common()) for a, c in sorted(by_agent.items())},
        "by_client": {c: dict(n.most_common()) for c, n in sorted(by_client.items())},
        "top_offenders": [
            {
                "client": c,
                "events": sum(by_client[c].values()),
                "by_event": dict(by_client[c].most_common()),
                "agents": sorted(agents[c]),
                "targets": sorted(users[c])[:10],
            }
            for c in offenders
        ],
        "over_time": counts_over_time(events, bucket),
    }


def _clock(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def format_summary(summary: dict, max_rows: int = 20) -> str:
    """The summary as text tables, for the terminal."""
    if not summary["events"]:
        return "no security events in the trace"
    short = {name: name.removeprefix("security.") for name in summary["by_event"]}
    out = [f"{summary['events']} security events, {_clock(summary['first'])} .. {_clock(summary['last'])}", ""]
    width = max(len(n) for n in short.values())
    out.append("by event:")
    for name, count in summary["by_event"].items():
        out.append(f"  {short[name]:<{width}} {count:6d}   {EVENTS.get(name, '')}")
    out += ["", "by agent:"]
    for agent, counts in summary["by_agent"].items():
        out.append(f"  {agent:<24} " + ", ".join(f"{short[n]} {c}" for n, c in counts.items()))
    out += ["", "top offenders (client address):"]
    for o in summary["top_offenders"]:
        detail = ", ".join(f"{short[n]} {c}" for n, c in o["by_event"].items())
        out.append(f"  {o['client']:<16} {o['events']:6d}  {detail}  [{', '.join(o['agents'])}]")
        if o["targets"]:
            more = f" (+{len(o['targets']) - 3} more)" if len(o["targets"]) > 3 else ""
            out.append(f"  {'':<16} {'':6}  targets: {', '.join(o['targets'][:3])}{more}")
    timeline = summary["over_time"]
    names = list(summary["by_event"])
    rows = [(t, [timeline["series"][n][i] for n in names]) for i, t in enumerate(timeline["times"])]
    rows = [r for r in rows if any(r[1])][-max_rows:]
    out += ["", f"over time ({timeline['bucket']:g} s buckets; the last {len(rows)} with events):"]
    out.append("  " + f"{'from':<19} " + " ".join(f"{short[n][:14]:>14}" for n in names))
    for t, counts in rows:
        out.append("  " + f"{_clock(t):<19} " + " ".join(f"{c:>14d}" for c in counts))
    return "\n".join(out)


# ---------------------------------------------------------------------------
# The command


def cmd_monitor(args) -> int:
    home = LabHome.at(args.home)
    if not home.trace_dir.is_dir():
        print(f"mailpipe monitor: no trace in {home.root} (has the lab run there?)", file=sys.stderr)
        return 1
    summary = summarise(security_events(home.trace_dir, since=args.since), top=args.top, bucket=args.bucket)
    print(json.dumps(summary, indent=1) if args.json else format_summary(summary))
    return 0


def register(subparsers) -> None:
    """Add ``mailpipe monitor`` to the CLI (see ``COMMAND_MODULES`` in agents/cli.py)."""
    p = subparsers.add_parser("monitor", help="summarise security events: failed logins, relay attempts...",
                              description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--since", type=float, metavar="SECONDS", help="only events of the last SECONDS")
    p.add_argument("--top", type=int, default=10, help="how many offenders to list (default 10)")
    p.add_argument("--bucket", type=float, metavar="SECONDS", help="width of the time bins (default: automatic)")
    p.set_defaults(func=cmd_monitor)


__all__ = [
    "client_of",
    "counts_over_time",
    "format_summary",
    "message_events",
    "pick_bucket",
    "register",
    "security_events",
    "summarise",
]
