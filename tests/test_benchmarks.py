"""The benchmark scripts in benchmarks/ run (their figures are not asserted: speed is
measured, never tested)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from support import free_subnet

REPO = Path(__file__).resolve().parent.parent


def test_pipeline_benchmark_runs_a_fresh_lab_and_reports(tmp_path):
    out = tmp_path / "pipeline.json"
    run = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "pipeline.py"), "--messages", "12", "--single", "4",
         "--concurrency", "3", "--trace", "on", "--subnet", str(free_subnet()), "--json", str(out)],
        capture_output=True, text=True, timeout=240,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    (row,) = json.loads(out.read_text())
    assert row["trace"] is True and row["home"] is None  # the lab's home was removed
    assert row["single"]["delivered"] == 4 and row["single"]["concurrency"] == 1
    assert row["sustained"]["delivered"] == 12 and row["sustained"]["concurrency"] == 3
    assert row["sustained"]["loop"] == "closed"
    assert row["capacity"]["delivered"] == 12 and row["capacity"]["loop"] == "open"
    assert set(row["cpu_ms_per_message"]) == {
        "msa.sender.test", "mta.sender.test", "mta.recipient.test", "mda.recipient.test"}
    assert all(ms > 0 for ms in row["cpu_ms_per_message"].values())
    assert set(row["syscalls_per_message"]) == set(row["cpu_ms_per_message"])
    assert all(n >= 1 for n in row["syscalls_per_message"].values())  # at least a read or a write each
    threads = row["threads_per_message"]
    assert set(threads) == set(row["cpu_ms_per_message"]) and all("main" in t for t in threads.values())
    assert all("disk" in threads[name] for name in threads)  # every agent of the pipeline writes to disk
    assert "msg/s" in run.stdout and "CPU ms per message" in run.stdout
    assert "system calls per message" in run.stdout


def test_pipeline_benchmark_bare_runs_a_lab_with_every_domain_switch_off(tmp_path):
    out = tmp_path / "bare.json"
    run = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "pipeline.py"), "--bare", "--trace", "off", "--no-capacity",
         "--messages", "6", "--single", "2", "--concurrency", "2", "--subnet", str(free_subnet()),
         "--json", str(out), "--keep"],
        capture_output=True, text=True, timeout=240,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    (row,) = json.loads(out.read_text())
    assert row["bare"] is True and row["trace"] is False and row["sustained"]["delivered"] == 6
    assert "off bare" in run.stdout
    home = Path(row["home"])
    try:
        inbox = home / "maildir" / "recipient.test" / "bob"
        delivered = [f.read_bytes() for sub in ("new", "cur") for f in (inbox / sub).iterdir()]
    finally:
        shutil.rmtree(home.parent)  # --keep kept every lab's home in one temporary directory
    assert len(delivered) == 8 and not any(b"DKIM-Signature:" in m or b"Authentication-Results:" in m
                                           for m in delivered)


def test_compare_postfix_benchmark_runs_the_mailpipe_side(tmp_path):
    """Without root or Postfix: the mailpipe half alone, on a small load."""
    import pytest

    if not Path("/usr/sbin/smtp-source").exists():  # where the script looks for it
        pytest.skip("smtp-source (Debian package postfix) is not installed")
    out = tmp_path / "compare.json"
    run = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "compare_postfix.py"), "--skip-postfix",
         "--messages", "30", "--sessions", "3", "--subnet", str(free_subnet()), "--json", str(out)],
        capture_output=True, text=True, timeout=240,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    figures = json.loads(out.read_text())
    assert figures["mailpipe"]["complete"] and figures["mailpipe"]["runs"][0]["imap_count"] == 30
