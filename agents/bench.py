"""``mailpipe bench``: how fast does mail move through the whole pipeline?

The benchmark plays many MUAs at once. ``--concurrency`` submitters each keep
one submission session open (STARTTLS and AUTH once, then one transaction per
message, as a real client sending a batch does) and send their share of
``--messages`` from alice@sender.test to bob@recipient.test. Meanwhile a
reader sits in IMAP IDLE as Bob and notes the moment each message becomes
visible to him. A message's *end-to-end latency* runs from the start of its
submission to that moment; *throughput* is messages over the time from the
first submission to the last arrival. The trace then says how long each hop
took (see :mod:`agents.journey`).

Two ways to load the pipeline, and what each measures:

- **closed loop** (the default): each submitter sends its next message only
  when its previous one is visible. ``--concurrency`` is the number of
  messages in flight, and with 1 the latency is that of one message through
  an idle pipeline. Little's law ties the figures together: throughput =
  messages in flight / latency, so this mode reports how fast mail moves
  *when the senders wait for it*.
- **open loop** (``--open-loop``): each submitter sends its next message as
  soon as the MSA has said 250, as ``smtp-source -s 10`` does. Mail piles up
  in front of the slowest hop, whose rate is then the throughput: the
  pipeline's *capacity*. The latencies now mostly measure that pile (they
  grow with ``--messages``), so read them as queueing, not as speed.

Speed is measured here, never asserted in tests: the numbers depend on the
machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field, replace

from twisted.internet import defer

from .config import DOMAIN_SWITCHES, LabConfig
from .home import LabHome
from .journey import hops
from .mua import MUA, compose, run_reactor
from .trace import now_us, read_events


@dataclass
class BenchResult:
    messages: int
    concurrency: int
    size: int
    delivered: int
    seconds: float
    throughput: float  # messages per second, end to end
    latency_ms: dict  # p50, p90, p99, max
    hop_p50_ms: dict = field(default_factory=dict)
    lost: list = field(default_factory=list)
    samples: list = field(default_factory=list)  # (start_us, visible_us) per message
    loop: str = "closed"  # or "open": see the module's docstring

    def table(self) -> str:
        lat = self.latency_ms
        lines = [
            f"messages        {self.delivered}/{self.messages} delivered "
            f"({self.concurrency} concurrent submitters, {self.loop} loop, {self.size} bytes each)",
            f"throughput      {self.throughput:8.1f} msg/s end to end ({self.seconds:.2f} s)",
            f"latency (ms)    p50 {lat['p50']:7.1f}   p90 {lat['p90']:7.1f}   "
            f"p99 {lat['p99']:7.1f}   max {lat['max']:7.1f}",
        ]
        if self.hop_p50_ms:
            lines.append("per hop, p50 (ms):")
            for hop, ms in self.hop_p50_ms.items():
                lines.append(f"  {hop:<44} {ms:8.2f}")
        if self.lost:
            lines.append(f"LOST: {len(self.lost)} message(s) never became visible")
        return "\n".join(lines)


def benchmark_config(config: LabConfig, trace: bool = True) -> LabConfig:
    """``config`` made fit for measuring speed: the MSA's rate limits off.

    The default lab lets a user submit 1000 messages a minute and a client
    2000 (``[security]``, agents.security); a benchmark sends more. Everything
    else (TLS, AUTH, SPF, DKIM, DMARC, fsync) stays as it is.
    """
    security = {**config.section("security"), "max_messages_per_user": 0, "max_messages_per_client": 0}
    return replace(config, trace=trace, sections={**config.sections, "security": security})


def bare_config(config: LabConfig) -> LabConfig:
    """``config`` with every domain's optional features off (:data:`agents.config.DOMAIN_SWITCHES`).

    The relay hops go in plaintext, nothing is DKIM-signed, nothing checked
    for SPF, DKIM or DMARC. What is left is the architecture itself: submission
    with STARTTLS and AUTH, four processes that each write the message durably
    before they say 250, LMTP, Maildir and IMAP. Comparing a lab so made with a
    full one shows what those features cost together.
    """
    off = dict.fromkeys(DOMAIN_SWITCHES, False)
    return replace(config, domains=tuple(replace(d, options={**d.options, **off}) for d in config.domains))


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def make_body(size: int) -> str:
    line = "The quick brown fox jumps over the lazy dog, again and again.\n"
    return (line * (size // len(line) + 1))[:max(size, 1)]


class Arrivals:
    """Bob's IMAP session in IDLE: records when each benchmark message shows up."""

    def __init__(self, client, wanted: set[str]):
        self.client = client
        self.wanted = wanted
        self.visible: dict[str, int] = {}
        self.waiters: dict[str, defer.Deferred] = {}
        self.seen_count = 0
        self.finished = False
        self.progress = None

    @defer.inlineCallbacks
    def start(self):
        info = yield self.client.select("INBOX")
        self.seen_count = info.get("EXISTS", 0)
        self.client.exists = self.seen_count

    @defer.inlineCallbacks
    def poll_new(self):
        """Fetch the Message-ID of every message the server announced since the last look.

        The count comes from the server's own ``* n EXISTS`` lines (during
        IDLE, RFC 2177), so the sequence numbers we ask for are those of our
        session's view of the mailbox (RFC 3501 7.3.1).
        """
        total = self.client.exists or 0
        if total <= self.seen_count:
            return
        now = now_us()
        data = yield self.client.fetchSpecific(
            f"{self.seen_count + 1}:{total}", headerType="HEADER.FIELDS",
            headerArgs=["MESSAGE-ID"], peek=True,
        )
        for items in data.values():
            raw = items[-1][-1] if items else b""
            text = raw if isinstance(raw, str) else raw.decode("latin-1")
            for line in text.splitlines():
                if line.lower().startswith("message-id:"):
                    mid = line.split(":", 1)[1].strip()
                    if mid in self.wanted and mid not in self.visible:
                        self.visible[mid] = now
                        if self.progress is not None:
                            self.progress.update(1)
                        waiter = self.waiters.pop(mid, None)
                        if waiter is not None:
                            waiter.callback(now)
        self.seen_count = total

    def arrival(self, message_id: str) -> defer.Deferred:
        """Fires when ``message_id`` is visible to Bob."""
        if message_id in self.visible:
            return defer.succeed(self.visible[message_id])
        return self.waiters.setdefault(message_id, defer.Deferred())

    @defer.inlineCallbacks
    def wait_all(self, deadline: float):
        while len(self.visible) < len(self.wanted) and time.monotonic() < deadline and not self.finished:
            yield self.poll_new()
            if len(self.visible) >= len(self.wanted) or self.finished:
                break
            if (self.client.exists or 0) > self.seen_count:
                continue  # news came in during the FETCH: look again before idling
            yield self.client.idle_until_news(min(1.0, max(0.05, deadline - time.monotonic())))

    def finish(self) -> None:
        """Stop waiting: every submitter is done (failed submissions never arrive)."""
        self.finished = True
        if self.client._idle is not None:
            self.client._end_idle()


def _until(reactor, deadline: float, waits: list[defer.Deferred]) -> defer.Deferred:
    """Fires when every one of ``waits`` has, or at ``deadline`` (time.monotonic) at the latest."""
    everything = defer.DeferredList(waits, consumeErrors=True)
    timer = reactor.callLater(max(0.0, deadline - time.monotonic()), everything.cancel)
    everything.addBoth(lambda _: timer.cancel() if timer.active() else None)
    return everything


@defer.inlineCallbacks
def run_bench(reactor, home: LabHome, config: LabConfig, messages: int, concurrency: int,
              size: int, timeout: float, show_progress: bool = True, open_loop: bool = False):
    sender, rcpt = "alice@sender.test", "bob@recipient.test"
    run_id = uuid.uuid4().hex[:8]
    ids = [f"<bench-{run_id}-{i}@sender.test>" for i in range(messages)]
    body = make_body(size)
    reader_mua = MUA(reactor, home, config, rcpt)
    client = yield reader_mua.imap_session()
    arrivals = Arrivals(client, set(ids))
    yield arrivals.start()
    if show_progress:
        from tqdm import tqdm

        arrivals.progress = tqdm(total=messages, unit="msg", desc="delivered", file=sys.stderr)
    # The MUA writes every message before the clock starts: composing is the
    # user's work, not the pipeline's, and would only take CPU from the agents.
    contents = {mid: compose(sender, [rcpt], f"bench {mid}", body, extra_headers={"Message-ID": mid})
                for mid in ids}
    starts: dict[str, int] = {}
    todo = list(ids)
    errors: list[str] = []
    failed: set[str] = set()

    @defer.inlineCallbacks
    def submitter():
        mua = MUA(reactor, home, config, sender)
        session = yield mua.submission_session()
        try:
            while todo and time.monotonic() < deadline:
                mid = todo.pop(0)
                starts[mid] = now_us()
                try:
                    yield session.send(sender, [rcpt], contents.pop(mid))
                except Exception as e:  # noqa: BLE001 - record and go on
                    errors.append(f"{mid}: {e}")
                    failed.add(mid)
                    continue
                if open_loop:
                    continue  # the next message goes as soon as this one is accepted
                # Closed loop: the next message goes once this one is visible.
                arrived = arrivals.arrival(mid)
                timer = reactor.callLater(max(0.0, deadline - time.monotonic()), arrived.cancel)
                try:
                    yield arrived
                except defer.CancelledError:
                    break
                finally:
                    if timer.active():
                        timer.cancel()
        finally:
            yield session.close()

    t0 = time.monotonic()
    deadline = t0 + timeout
    submitters = defer.gatherResults([submitter() for _ in range(concurrency)], consumeErrors=True)
    waiting = arrivals.wait_all(deadline)
    try:
        yield submitters
        if open_loop:  # every accepted message is on its way: wait for them all
            yield _until(reactor, deadline, [arrivals.arrival(m) for m in starts if m not in failed])
    finally:
        arrivals.finish()
    yield waiting
    if arrivals.progress is not None:
        arrivals.progress.close()
    try:
        yield client.logout()
    except Exception:
        pass
    samples = [(starts[m], arrivals.visible[m]) for m in ids if m in arrivals.visible and m in starts]
    latencies = [(v - s) / 1000 for s, v in samples]
    first = min((s for s, _ in samples), default=0)
    last = max((v for _, v in samples), default=0)
    seconds = (last - first) / 1e6 if samples else 0.0
    return BenchResult(
        messages=messages, concurrency=concurrency, size=size, delivered=len(samples),
        seconds=seconds, throughput=len(samples) / seconds if seconds else 0.0,
        latency_ms={"p50": percentile(latencies, 50), "p90": percentile(latencies, 90),
                    "p99": percentile(latencies, 99), "max": max(latencies, default=float("nan"))},
        lost=[m for m in ids if m not in arrivals.visible] + errors,
        samples=samples, loop="open" if open_loop else "closed",
    ), ids


def hop_medians(trace_dir, message_ids: list[str]) -> dict[str, float]:
    """The p50 duration of each hop over the benchmark's messages, from the trace."""
    wanted = set(message_ids)
    # Only lines that carry one of these Message-IDs matter: they share a
    # prefix ("<bench-RUNID-"), so the rest of a long-lived lab's trace is
    # skipped unparsed.
    shared = os.path.commonprefix(message_ids) or None
    events = [e for e in read_events(trace_dir, containing=shared) if e.get("message_id") in wanted]
    by_message: dict[str, list] = {}
    for e in events:
        by_message.setdefault(e["message_id"], []).append(e)
    per_hop: dict[str, list[float]] = {}
    for mid, evs in by_message.items():
        for h in hops(evs, mid):
            if h["to"] == "mua":
                continue  # the benchmark's reader does not trace its fetches
            per_hop.setdefault(f"{h['from']} -> {h['to']}", []).append(h["ms"])
    return {hop: round(statistics.median(v), 3) for hop, v in per_hop.items()}


def plot(result: BenchResult, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plots import plot_bench

    fig = plot_bench(result)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def add_arguments(parser) -> None:
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--size", type=int, default=2048, help="body size in bytes")
    parser.add_argument("--open-loop", action="store_true",
                        help="send each next message as soon as the last is accepted (capacity), "
                             "not once it is visible (latency under load)")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--json", metavar="FILE", help="write the figures as JSON ('-' for stdout)")
    parser.add_argument("--plot", metavar="FILE.png", help="draw latency and throughput plots")
    parser.add_argument("--no-progress", action="store_true")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mailpipe bench")
    parser.add_argument("--home", default=None)
    add_arguments(parser)
    return run(parser.parse_args(argv))


def run(args) -> int:
    home = LabHome.at(args.home)
    if not home.config_file.exists():
        print(f"mailpipe bench: no lab in {home.root}; start one with 'mailpipe up --detach'", file=sys.stderr)
        return 1
    config = LabConfig.load(home.config_file)
    outcome = run_reactor(lambda reactor: run_bench(
        reactor, home, config, args.messages, args.concurrency, args.size, args.timeout,
        show_progress=not args.no_progress, open_loop=args.open_loop))
    if isinstance(outcome, BaseException):
        print(f"mailpipe bench: {outcome}", file=sys.stderr)
        return 1
    result, ids = outcome
    time.sleep(0.2)  # let the agents' last trace lines reach the files
    result.hop_p50_ms = hop_medians(home.trace_dir, ids)
    if args.json:
        text = json.dumps(asdict(result), indent=1)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text)
    if args.json != "-":
        print(result.table())
    if args.plot:
        plot(result, args.plot)
    return 0 if not result.lost else 2


if __name__ == "__main__":
    sys.exit(main())
