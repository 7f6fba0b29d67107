"""Shared fixtures: a real lab, on its own loopback addresses, in a temporary home."""

from __future__ import annotations

import pytest

from support import make_lab, running


@pytest.fixture(scope="session")
def lab(tmp_path_factory):
    """One running lab shared by the end-to-end and interop tests."""
    with running(make_lab(tmp_path_factory)) as lab:
        yield lab
