"""Shared fixtures: a real lab, on its own loopback addresses, in a temporary home."""

from __future__ import annotations

import pytest

from support import assert_no_agents_left, make_lab


@pytest.fixture(scope="session")
def lab(tmp_path_factory):
    """One running lab shared by the end-to-end and interop tests."""
    lab = make_lab(tmp_path_factory)
    lab.up()
    try:
        yield lab
    finally:
        lab.down()
        assert_no_agents_left(lab)
