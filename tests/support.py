"""Helpers for tests that run real labs (imported by conftest and the tests)."""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
import time

from agents.config import LabConfig
from agents.lab import Lab, tcp_port_free

_used_subnets: set[int] = set()


def free_subnet() -> int:
    """A 127.N.0.0/16 that no other lab of this test run uses.

    Each test lab lives at 127.N.x.y with the standard lab ports, so it never
    collides with a lab a student left running (127.0.x.y) or another test's.
    """
    rng = random.Random(os.getpid() ^ time.time_ns())
    while True:
        n = rng.randint(100, 250)
        if n not in _used_subnets and _looks_free(n):
            _used_subnets.add(n)
            return n


def _looks_free(n: int) -> bool:
    """Is nobody listening on this subnet's DNS and SMTP ports right now?"""
    return all(tcp_port_free(address, port)
               for address, port in ((f"127.{n}.0.1", 1053), (f"127.{n}.1.1", 1025), (f"127.{n}.2.1", 1025)))


def make_lab(tmp_path_factory, configure=None, **overrides) -> Lab:
    """A lab (not started) on a free subnet; ``configure`` may change its LabConfig."""
    config = LabConfig.load(None).relocated(free_subnet())
    if configure is not None:
        config = configure(config)
    if overrides:
        from dataclasses import replace

        config = replace(config, **overrides)
    home = tmp_path_factory.mktemp("lab")
    return Lab(home=home, config=config)



@contextlib.contextmanager
def running(lab: Lab):
    """Start ``lab``, hand it to the test, and stop it, leaving no process behind."""
    lab.up()
    try:
        yield lab
    finally:
        lab.down()
        assert_no_agents_left(lab)


def assert_no_agents_left(lab: Lab) -> None:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    left = [l for l in out.splitlines() if "-m agents" in l and str(lab.home.root) in l]
    assert not left, f"agent processes left behind: {left}"
