"""The crash test: kill -9 every hop under load, and nothing acknowledged is lost.

A load generator (agents.loadgen, the project's own sender: Postfix's
smtp-source would need a system Postfix) submits a steady stream from Alice
to Bob and records each message that got its 250 from the MSA. Meanwhile
every agent on the path is killed with SIGKILL at a random moment and
started again: the MSA, the sender's MTA, the recipient's MTA (mail then
goes to the backup MX), the backup MX itself, and Bob's MDA.

RFC 5321 6.1: every acknowledged message must end up in Bob's Maildir (or
bounce back to Alice). Duplicates are allowed (at-least-once delivery) and
are counted and printed, never hidden.
"""

from __future__ import annotations

import random
import time
from dataclasses import replace

import pytest

from agents.audit import wait_for_audit
from agents.loadgen import start_load
from support import assert_no_agents_left, make_lab

VICTIMS = ["msa.sender.test", "mta.sender.test", "mta.recipient.test", "mta2.recipient.test",
           "mda.recipient.test"]


@pytest.mark.timeout(120)
def test_kill_9_each_hop_under_load_loses_nothing(tmp_path_factory, capsys):
    lab = make_lab(tmp_path_factory)
    lab = type(lab)(home=lab.home.root, config=replace(lab.config, retry_min=0.5, retry_max=2.0))
    seed = random.randrange(1_000_000)
    rng = random.Random(seed)
    started = time.monotonic()
    lab.up()
    try:
        load = start_load(lab, messages=300, concurrency=4, rate=30, timeout=60)
        kills = []
        for victim in VICTIMS:
            time.sleep(rng.uniform(0.3, 1.8))
            lab.kill_agent(victim)
            kills.append(f"{time.monotonic() - started:5.1f}s {victim}")
            time.sleep(rng.uniform(0.1, 0.8))  # down for a moment: the others queue and retry
            lab.start_agent(victim)
        result = load.result()
        unacknowledged = [r["message_id"] for r in result.refused]
        audit = wait_for_audit(lab, result.acknowledged, unacknowledged=unacknowledged, timeout=45)
        duplicate_events = sum(1 for e in lab.trace() if e["event"] == "duplicate")
        with capsys.disabled():
            print(f"\ncrash test (seed {seed}): killed " + ", ".join(kills))
            print(f"crash test: sent {result.sent} in {result.seconds:.1f} s, {len(result.acknowledged)} "
                  f"acknowledged, {len(result.refused)} not; " + audit.summary()
                  + f"; MDA counted {duplicate_events} duplicate(s); {time.monotonic() - started:.1f} s in all")
        assert len(result.acknowledged) > 200, "the load generator could hardly submit anything"
        assert not audit.lost, f"LOST after a crash (seed {seed}): {sorted(audit.lost)[:5]}"
        assert audit.duplicates >= 0 and duplicate_events <= audit.duplicates + audit.unacknowledged_delivered
    finally:
        lab.down()
        assert_no_agents_left(lab)
