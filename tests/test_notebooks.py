"""Every course notebook runs, top to bottom, against a fresh lab of its own.

Each notebook starts its lab with ``Lab().up()`` and stops it with
``lab.down()``; the lab home and config come from ``$MAILPIPE_HOME`` and
``$MAILPIPE_CONFIG``, which the kernel inherits from this process. So each run
gets a temporary home and a lab moved to its own ``127.N.x.y`` addresses, and
never touches a lab a student left running on the default addresses.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for `support`, whatever the rootdir

from agents.config import LabConfig  # noqa: E402
from agents.lab import Lab  # noqa: E402
from support import assert_no_agents_left, free_subnet  # noqa: E402

NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))


def test_there_are_notebooks():
    assert NOTEBOOKS, f"no notebooks in {NOTEBOOKS_DIR}"


@pytest.mark.timeout(900)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    home = tmp_path / "lab"
    config_file = tmp_path / "lab.toml"
    config_file.write_text(LabConfig.load(None).relocated(free_subnet()).to_toml())
    monkeypatch.setenv("MAILPIPE_HOME", str(home))
    monkeypatch.setenv("MAILPIPE_CONFIG", str(config_file))

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb, timeout=120, kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS_DIR)}},
    )
    lab = Lab(home=home, config=config_file)
    try:
        client.execute()
    finally:
        lab.down()  # whatever the notebook did, no agent survives the test
    assert_no_agents_left(lab)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_committed_with_outputs(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert any(c.get("outputs") for c in code), f"{path.name} has no outputs: run it and save it"
    errors = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"{path.name} was saved with an error output: {errors[0].get('ename')}"
