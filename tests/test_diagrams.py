"""The architecture diagram is drawn from the lab config and shows all of it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from agents.config import LabConfig

REPO = Path(__file__).resolve().parents[1]


def test_architecture_diagram(tmp_path):
    subprocess.run(
        [sys.executable, "diagrams/make_architecture.py", "--out", str(tmp_path)],
        cwd=REPO, check=True, capture_output=True, timeout=120,
    )
    svg, png = tmp_path / "architecture.svg", tmp_path / "architecture.png"
    assert svg.stat().st_size > 10_000
    assert png.stat().st_size > 50_000
    assert png.read_bytes().startswith(b"\x89PNG")

    text = svg.read_text(encoding="utf-8")
    config = LabConfig.load(None)
    for d in config.domains:
        assert d.address in text
        roles = ("msa", "mta", "mda", "lmtp") if d.has_mailboxes else ("mta",)
        for role in roles:
            assert d.host(role) in text  # smtp.D, mx.D, imap.D, lmtp.D
    for service, port in config.ports.items():
        if service == "dns":
            assert f"{config.dns_address}:{port}" in text
        else:
            assert f"{service} {port}" in text  # e.g. "smtp 1025"
