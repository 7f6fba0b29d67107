#!/usr/bin/env python3
"""The whole pipeline, timed: issue 3's end-to-end figures, rerunnable.

For each trace setting (``--trace on``, ``off`` or ``both``) and each run, the
script starts a fresh lab in a temporary home on its own ``127.SUBNET.x.y``
addresses, with the MSA's rate limits off (:func:`agents.bench.benchmark_config`),
and measures with ``mailpipe bench``:

1. **one at a time**: ``--single`` messages, concurrency 1. These are the
   latency targets: p50 < 25 ms and p99 < 60 ms;
2. **sustained**: ``--messages`` messages from ``--concurrency`` submitters,
   each waiting until its last message is visible before it sends the next
   (closed loop). This is the throughput target: 300 msg/s with 10
   submitters. It also measures, per message, the CPU time each agent spent
   and the system calls it made (reads and writes: sockets, files, pipes),
   and each thread's CPU time and context switches, all read from ``/proc``
   before and after (:mod:`agents.usage`). On a shared VM, where speed
   drifts, the system calls are the steadier figure;
3. **capacity**: the same again with ``--open-loop``: each submitter sends as
   soon as the MSA says 250, as ``smtp-source`` does, so mail piles up in
   front of the slowest hop and the throughput is that hop's rate. Its
   latencies measure the pile, not the speed. ``--no-capacity`` skips it.

Then the lab goes down. Every message is submitted with STARTTLS+AUTH,
relayed by MX with DKIM, SPF and DMARC, delivered over LMTP into a Maildir
(fsync before every 250), and counted when Bob's IMAP IDLE session sees it.

With ``--bare`` every domain's optional features are off
(:func:`agents.bench.bare_config`): STARTTLS on the relay hops, DKIM signing,
and the SPF, DKIM and DMARC checks. With ``--trace off`` as well, what is
measured is the architecture alone, the ceiling that the features spend from.

    .venv/bin/python benchmarks/pipeline.py                      # trace on and off, 1 run each
    .venv/bin/python benchmarks/pipeline.py --runs 3 --json out.json
    .venv/bin/python benchmarks/pipeline.py --bare --trace off   # the architecture alone

Speed is measured, never asserted: the figures depend on the machine (on a
shared VM they vary by about 10 % from run to run, so use ``--runs``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from agents.bench import bare_config, benchmark_config  # noqa: E402
from agents.config import LabConfig  # noqa: E402
from agents.lab import Lab  # noqa: E402
from agents import usage  # noqa: E402

PIPELINE = ("msa.sender.test", "mta.sender.test", "mta.recipient.test", "mda.recipient.test")


def bench(lab: Lab, messages: int, concurrency: int, size: int, open_loop: bool = False) -> dict:
    """One ``mailpipe bench`` run against ``lab``; its JSON figures."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        run = subprocess.run(
            [sys.executable, "-m", "agents.cli", "--home", str(lab.home.root), "bench",
             "--messages", str(messages), "--concurrency", str(concurrency), "--size", str(size),
             "--no-progress", "--json", out.name, *(["--open-loop"] if open_loop else [])],
            capture_output=True, text=True, timeout=120 + messages,
        )
        if run.returncode not in (0, 2):  # 2: some messages were lost; the figures say which
            raise RuntimeError(f"mailpipe bench failed ({run.returncode}): {run.stderr.strip()}")
        figures = json.loads(Path(out.name).read_text())
    figures.pop("samples", None)
    return figures


def one_lab(args, trace: bool, subnet: int, homes: Path) -> dict:
    config = benchmark_config(LabConfig.load(None).relocated(subnet), trace)
    if args.bare:
        config = bare_config(config)
    home = Path(tempfile.mkdtemp(prefix="lab-", dir=homes))
    lab = Lab(home, config)
    lab.up()
    try:
        single = bench(lab, args.single, 1, args.size)
        pids = {name: lab.pid(name) for name in PIPELINE}
        before = usage.snapshot(pids)
        started = time.monotonic()
        sustained = bench(lab, args.messages, args.concurrency, args.size)
        wall = time.monotonic() - started
        costs = usage.per_message(before, usage.snapshot(pids), args.messages)
        capacity = None if args.no_capacity else bench(lab, args.messages, args.concurrency, args.size,
                                                         open_loop=True)
    finally:
        lab.down()
    return {"trace": trace, "bare": args.bare, "single": single, "sustained": sustained, "capacity": capacity,
            "cpu_ms_per_message": {c.agent: round(c.cpu_ms, 2) for c in costs},
            "syscalls_per_message": {c.agent: round(c.syscalls, 2) for c in costs},
            # thread -> [CPU ms, voluntary, involuntary context switches], per message
            "threads_per_message": {c.agent: c.threads for c in costs},
            "sustained_wall_s": round(wall, 2),
            "home": str(home) if args.keep else None}


def summary(rows: list[dict]) -> str:
    out = [f"{'trace':<9} {'1 at a time p50/p99 ms':>23} {'msg/s':>8} {'p50/p99 ms':>15} "
           f"{'agents CPU ms/msg':>18} {'open loop msg/s':>16} {'lost':>5}"]
    for r in rows:
        s, m, c = r["single"]["latency_ms"], r["sustained"], r.get("capacity")
        lost = len(r["single"]["lost"]) + len(m["lost"]) + (len(c["lost"]) if c else 0)
        out.append(
            f"{_setting(r):<9} {s['p50']:>11.1f} / {s['p99']:<9.1f} "
            f"{m['throughput']:>8.1f} {m['latency_ms']['p50']:>7.1f} / {m['latency_ms']['p99']:<6.1f} "
            f"{sum(r['cpu_ms_per_message'].values()):>18.2f} "
            f"{(format(c['throughput'], '.1f') if c else '-'):>16} {lost:>5}"
        )
    last = {row["trace"]: row for row in rows}.values()
    for title, key in (("CPU ms", "cpu_ms_per_message"), ("read and write system calls", "syscalls_per_message")):
        out.append(f"{title} per message, by agent (last run of each setting):")
        for r in last:
            parts = ", ".join(f"{_short(name)} {value}" for name, value in r[key].items())
            out.append(f"  {_setting(r)}: {parts}")
    out.append("the disk thread's CPU ms and voluntary context switches per message (last run):")
    for r in last:
        parts = ", ".join(f"{_short(name)} {threads['disk'][0]} ms / {threads['disk'][1]}"
                          for name, threads in r["threads_per_message"].items() if "disk" in threads)
        out.append(f"  {_setting(r)}: {parts}")
    return "\n".join(out)


def _setting(row: dict) -> str:
    """``on``, ``off``, ``on bare`` or ``off bare``: the trace, and whether the lab was bare."""
    return ("on" if row["trace"] else "off") + (" bare" if row.get("bare") else "")


def _short(agent: str) -> str:
    """``mta.recipient.test`` -> ``mta.recipient``."""
    return agent.rsplit(".", 1)[0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=1500, help="sustained run (default 1500)")
    p.add_argument("--concurrency", type=int, default=10, help="submitters in the sustained run")
    p.add_argument("--single", type=int, default=300, help="messages sent one at a time (default 300)")
    p.add_argument("--size", type=int, default=2048, help="body size in bytes")
    p.add_argument("--trace", choices=("on", "off", "both"), default="both")
    p.add_argument("--runs", type=int, default=1, help="fresh labs per trace setting")
    p.add_argument("--subnet", type=int, default=120, help="labs run on 127.SUBNET.x.y (and up)")
    p.add_argument("--json", metavar="FILE", help="write every run's figures")
    p.add_argument("--keep", action="store_true", help="keep each lab's home (trace, Maildirs)")
    p.add_argument("--no-capacity", action="store_true", help="skip the open-loop run")
    p.add_argument("--bare", action="store_true",
                   help="every domain without relay STARTTLS, DKIM signing and SPF/DKIM/DMARC checks")
    args = p.parse_args(argv)

    settings = {"on": [True], "off": [False], "both": [True, False]}[args.trace]
    rows, subnet = [], args.subnet
    # Every lab's home goes in one directory, deleted only after the last run:
    # deleting a lab's thousands of files between runs would slow the next lab,
    # because ext4 without a journal makes every new inode skip the ones freed
    # in the last minutes (see agents/spool.py).
    homes = Path(tempfile.mkdtemp(prefix="mailpipe-pipeline-"))
    try:
        for trace in settings:
            for run in range(args.runs):
                print(f"[pipeline] trace {'on' if trace else 'off'}{', bare' if args.bare else ''}, "
                      f"run {run + 1}: lab on 127.{subnet}.x.y",
                      file=sys.stderr, flush=True)
                rows.append(one_lab(args, trace, subnet, homes))
                subnet = subnet + 1 if subnet < 250 else args.subnet
    finally:
        if not args.keep:
            shutil.rmtree(homes, ignore_errors=True)
    print(summary(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0 if all(not r["single"]["lost"] and not r["sustained"]["lost"]
                    and not (r["capacity"] or {}).get("lost") for r in rows) else 2


if __name__ == "__main__":
    sys.exit(main())
