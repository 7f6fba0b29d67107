"""`mailpipe bench` end to end: a small run through every hop, figures and plots."""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_delivers_every_message_and_reports_each_hop(lab, tmp_path):
    figures, picture = tmp_path / "bench.json", tmp_path / "bench.png"
    run = subprocess.run(
        [sys.executable, "-m", "agents.cli", "--home", str(lab.home.root), "bench",
         "--messages", "40", "--concurrency", "4", "--size", "3000",
         "--json", str(figures), "--plot", str(picture)],
        capture_output=True, text=True, timeout=180,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "delivered" in run.stderr  # the tqdm progress bar
    result = json.loads(figures.read_text())
    assert result["delivered"] == result["messages"] == 40 and result["lost"] == []
    assert result["concurrency"] == 4 and result["size"] == 3000
    assert result["throughput"] > 0 and len(result["samples"]) == 40
    lat = result["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert all(start < visible for start, visible in result["samples"])
    assert set(result["hop_p50_ms"]) == {
        "msa.sender.test -> mta.sender.test",
        "mta.sender.test -> mta.recipient.test",
        "mta.recipient.test -> mda.recipient.test",
    }
    assert all(ms > 0 for ms in result["hop_p50_ms"].values())
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for word in ("throughput", "msg/s", "p50", "p99", "per hop"):
        assert word in run.stdout


def test_open_loop_sends_on_250_and_still_waits_for_every_arrival(lab, tmp_path):
    """--open-loop: submitters do not wait for delivery, yet the run ends only
    when every accepted message is visible to Bob (none counted as lost)."""
    figures = tmp_path / "open.json"
    run = subprocess.run(
        [sys.executable, "-m", "agents.cli", "--home", str(lab.home.root), "bench",
         "--messages", "30", "--concurrency", "3", "--open-loop", "--no-progress", "--json", str(figures)],
        capture_output=True, text=True, timeout=180,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(figures.read_text())
    assert result["loop"] == "open" and "open loop" in run.stdout
    assert result["delivered"] == 30 and result["lost"] == [] and len(result["samples"]) == 30
    # Sent back to back: later messages start before earlier ones are visible.
    starts = sorted(start for start, _ in result["samples"])
    first_visible = min(visible for _, visible in result["samples"])
    assert sum(start < first_visible for start in starts) > 3
