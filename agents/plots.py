"""Pictures of the trace: where a message spends its time, and what was said.

Plain matplotlib, so a notebook can restyle every picture. Each function
draws into ``ax`` when given one (to combine pictures in one figure) and
returns the Axes it drew into (:func:`plot_bench` returns its Figure), so
tests and notebooks can look at the bars and arrows it drew.

* :func:`plot_waterfall` — one message's hops and their steps on one time axis.
* :func:`plot_sequence` — an SMTP conversation, line by line, as a sequence diagram.
* :func:`plot_hop_latencies`, :func:`plot_throughput`, :func:`plot_bench` —
  many messages at once (``mailpipe bench``).
"""

from __future__ import annotations

import math

import matplotlib
import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch

from .traceview import Journey, hop_transcript, journey, transcript

#: One colour per kind of step, the same in every picture.
KIND_COLOURS = {
    "hop": "#1f4e79",
    "queue": "#f0a202",
    "wait": "#c8c8c8",
    "dns": "#7b4f9d",
    "connect": "#8fb8de",
    "tls": "#2e8b57",
    "auth": "#c0392b",
    "smtp": "#4a90d9",
    "data": "#17becf",
    "checks": "#bcbd22",
    "fsync": "#8c564b",
    "imap": "#e377c2",
}

#: The legend's words for each kind.
KIND_LABELS = {
    "hop": "hop (arrival to arrival)",
    "queue": "queue wait",
    "wait": "waiting in the mailbox",
    "dns": "DNS lookup",
    "connect": "TCP connect",
    "tls": "TLS handshake",
    "auth": "AUTH (password check)",
    "smtp": "SMTP/LMTP session (client)",
    "data": "DATA (server)",
    "checks": "sender checks: SPF, DKIM, DMARC",
    "fsync": "write + fsync before 250",
    "imap": "IMAP",
}

# Matplotlib 3.10 renamed boxplot's ``vert=False`` to ``orientation="horizontal"``.
_HORIZONTAL = ({"orientation": "horizontal"} if tuple(map(int, matplotlib.__version__.split(".")[:2])) >= (3, 10)
               else {"vert": False})

CLIENT_COLOUR, SERVER_COLOUR = "#1f4e79", "#2e8b57"


def _axes(ax, figsize):
    if ax is None:
        _fig, ax = plt.subplots(figsize=figsize)
    return ax


def plot_waterfall(journey: Journey, ax=None):
    """Horizontal bars, one row per hop and step, on one time axis (ms).

    Each kind of step has its own colour (see :data:`KIND_COLOURS`), drawn as
    one bar container labelled with the kind, so the legend explains them.
    """
    rows = journey.rows()
    ax = _axes(ax, (11, 0.28 * len(rows) + 1.5))
    t0 = journey.start_us
    # A step of 0 ms (a cached DNS answer) still gets a sliver, to be seen.
    sliver = max(journey.ms, 1.0) * 0.003
    by_kind: dict[str, list[tuple[int, float, float]]] = {}
    for y, (_label, kind, start, end) in enumerate(rows):
        by_kind.setdefault(kind, []).append((y, (start - t0) / 1000, max((end - start) / 1000, sliver)))
    for kind, bars in by_kind.items():
        ax.barh([y for y, _, _ in bars], [w for _, _, w in bars], left=[x for _, x, _ in bars],
                height=0.9 if kind == "hop" else 0.6, color=KIND_COLOURS.get(kind, "#999999"),
                alpha=0.35 if kind == "hop" else 1.0, label=KIND_LABELS.get(kind, kind))
    ax.set_yticks(range(len(rows)), [label for label, *_ in rows], fontsize=8)
    ax.invert_yaxis()  # the first hop on top, time flowing down
    for y, (label, kind, start, end) in enumerate(rows):
        if kind == "hop":
            ax.text((end - t0) / 1000, y, f" {(end - start) / 1000:.1f} ms", va="center", fontsize=8)
    ax.set_xlabel("ms since the message left the sender's mail client")
    ax.set_title(f"The journey of {journey.message_id}: {journey.ms:.1f} ms end to end")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    return ax


def _sequence_lines(events: list[dict], conn_or_message: str):
    """``(participants, [(ts, from, to, direction, line)], [(index, hop title)], t0_us)``."""
    events = list(events)
    on_conn = [e for e in events if e.get("conn") == conn_or_message]
    if on_conn:
        agent = on_conn[0]["agent"]
        peer = next((e.get("peer") for e in on_conn if e.get("peer")), None) or "peer"
        is_client = any(e["event"].startswith("relay.") for e in on_conn) or on_conn[0]["role"] == "mua"
        client, server = (agent, peer) if is_client else (f"client {peer}", agent)
        lines = [(ts, *((client, server) if d == "C" else (server, client)), d, line)
                 for ts, d, line in transcript(events, conn_or_message)]
        return [client, server], lines, [], (lines[0][0] if lines else 0)
    trip = journey(events, conn_or_message)
    participants, lines, sections = [], [], []
    for hop in trip.hops:
        for name in (hop.sender, hop.receiver):
            if name not in participants:
                participants.append(name)
        sections.append((len(lines), f"{hop.label}: {hop.via}, {hop.ms:.1f} ms"))
        for ts, d, line in hop_transcript(events, hop):
            ends = (hop.client, hop.server) if d == "C" else (hop.server, hop.client)
            lines.append((ts, *ends, d, line))
    return participants, lines, sections, trip.start_us


def plot_sequence(events, conn_or_message: str, ax=None, max_chars: int = 70):
    """A sequence diagram of real protocol lines: one arrow per line.

    ``conn_or_message`` is a connection id (two lifelines: client and server)
    or a Message-ID (one lifeline per agent, every hop's conversation in
    turn). Arrows are evenly spaced to stay readable; the left margin gives
    each line's real time, in ms since the first. Commands (``C:``) and
    replies (``S:``) have their own colours.
    """
    participants, lines, sections, t0 = _sequence_lines(events, conn_or_message)
    ax = _axes(ax, (max(8.0, 2.6 * len(participants) + 6), 0.24 * len(lines) + 2.0))
    x = {name: i * 2.0 for i, name in enumerate(participants)}
    bottom = -len(lines) - 0.5
    for name, xi in x.items():
        ax.plot([xi, xi], [0.6, bottom], color="#999999", lw=1, zorder=1)
        ax.text(xi, 0.9, name, ha="center", va="bottom", fontsize=9, weight="bold",
                bbox=dict(boxstyle="round", fc="#eeeeee", ec="#555555"))
    for i, (ts, start, end, direction, line) in enumerate(lines):
        y = -i
        colour = CLIENT_COLOUR if direction == "C" else SERVER_COLOUR
        ax.add_patch(FancyArrowPatch((x[start], y), (x[end], y), arrowstyle="-|>", mutation_scale=9,
                                     color=colour, lw=0.9, shrinkA=0, shrinkB=0, zorder=2))
        text = line if len(line) <= max_chars else line[:max_chars - 1] + "…"
        ax.text((x[start] + x[end]) / 2, y + 0.12, text, ha="center", va="bottom", fontsize=6.5,
                family="monospace", color=colour, zorder=3,
                bbox=dict(fc="white", ec="none", alpha=0.8, pad=0.3))
    for i, title in sections:
        ax.axhline(-i + 0.5, color="#cccccc", lw=0.8, ls=":", zorder=0)
        ax.text(max(x.values()) + 0.3, -i + 0.3, title, ha="left", va="top", fontsize=7.5,
                style="italic", color="#555555")
    ax.set_yticks([-i for i in range(len(lines))], [f"{(ts - t0) / 1000:.1f}" for ts, *_ in lines], fontsize=6.5)
    ax.set_ylabel("ms since the first line" if not sections else "ms since the message left the sender")
    ax.set_xticks([])
    ax.set_xlim(-1.2, max(x.values(), default=0) + (3.8 if sections else 1.2))
    ax.set_ylim(bottom, 1.6)
    for side in ("top", "right", "bottom"):
        ax.spines[side].set_visible(False)
    return ax


def plot_hop_latencies(results_by_hop: dict[str, list[float]], ax=None):
    """One box per hop (ms): the median, the spread, and the slow outliers."""
    ax = _axes(ax, (9, 0.6 * len(results_by_hop) + 1.5))
    names = list(results_by_hop)
    ax.boxplot([results_by_hop[n] for n in names], widths=0.6, **_HORIZONTAL)
    ax.set_yticks(range(1, len(names) + 1), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ms per hop")
    ax.set_title("How long each hop takes")
    ax.grid(axis="x", alpha=0.3)
    return ax


def _nice_bucket(seconds: float, buckets: int = 30) -> float:
    """A round bucket width (0.1, 0.2, 0.5, 1, 2, 5 ... s) giving about ``buckets`` bars."""
    raw = max(seconds / buckets, 0.01)
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw)


def plot_throughput(samples, ax=None, bucket_s: float | None = None):
    """Messages delivered per time bucket; ``samples`` are ``(start_us, visible_us)``."""
    ax = _axes(ax, (9, 3.5))
    visible = sorted(v for _, v in samples)
    if not visible:
        ax.text(0.5, 0.5, "no message was delivered", ha="center", transform=ax.transAxes)
        return ax
    t0 = min(s for s, _ in samples)
    span_s = (visible[-1] - t0) / 1e6
    bucket_s = bucket_s or _nice_bucket(span_s)
    counts: dict[int, int] = {}
    for v in visible:
        k = int((v - t0) / 1e6 // bucket_s)
        counts[k] = counts.get(k, 0) + 1
    ks = range(max(counts) + 1)
    ax.bar([k * bucket_s for k in ks], [counts.get(k, 0) for k in ks], width=bucket_s,
           align="edge", color=KIND_COLOURS["smtp"], edgecolor="white")
    ax.set_xlabel("s since the first submission")
    ax.set_ylabel(f"delivered per {bucket_s:g} s")
    ax.set_title("Throughput: messages visible to the reader")
    ax.grid(axis="y", alpha=0.3)
    return ax


def plot_bench(result):
    """The benchmark in one figure: latency histogram and CDF, throughput, hop medians.

    ``result`` is an :class:`agents.bench.BenchResult`.
    """
    fig, ((hist, cdf), (rate, hops)) = plt.subplots(2, 2, figsize=(13, 8))
    latencies = sorted((v - s) / 1000 for s, v in result.samples)
    if latencies:
        hist.hist(latencies, bins=min(40, max(5, len(latencies) // 5)), color=KIND_COLOURS["smtp"])
        for name in ("p50", "p90", "p99"):
            value = result.latency_ms.get(name)
            if value is not None and not math.isnan(value):
                hist.axvline(value, color="#c0392b", ls="--", lw=1)
                hist.text(value, hist.get_ylim()[1] * 0.95, f" {name}", color="#c0392b", fontsize=8, va="top")
        cdf.plot(latencies, [(i + 1) / len(latencies) for i in range(len(latencies))],
                 drawstyle="steps-post", color=KIND_COLOURS["hop"])
    hist.set_xlabel("end-to-end latency (ms)")
    hist.set_ylabel("messages")
    hist.set_title(f"Latency, {result.delivered}/{result.messages} delivered")
    cdf.set_xlabel("end-to-end latency (ms)")
    cdf.set_ylabel("fraction of messages")
    cdf.set_ylim(0, 1.02)
    cdf.grid(alpha=0.3)
    cdf.set_title("Latency CDF: how many arrived within x ms")
    plot_throughput(result.samples, ax=rate)
    rate.set_title(f"Throughput ({result.throughput:.1f} msg/s overall)")
    names = list(result.hop_p50_ms)
    hops.barh(range(len(names)), [result.hop_p50_ms[n] for n in names], color=KIND_COLOURS["hop"])
    hops.set_yticks(range(len(names)), names, fontsize=8)
    hops.invert_yaxis()
    hops.set_xlabel("median ms")
    hops.set_title("Per hop, p50")
    fig.suptitle(f"mailpipe bench: {result.messages} messages, {result.concurrency} concurrent "
                 f"submitters, {result.size} bytes each")
    fig.tight_layout()
    return fig
