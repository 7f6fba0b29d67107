"""Every checker against the reference solution (must pass), the starter and a deliberately
wrong solution (must fail): a checker cannot silently pass everything.

Unit-level for all three; live for the references, all in one lab (agents.grading.live).
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from agents.cli import main as mailpipe
from agents.grading import COURSEWORK, EXERCISES, exercise, find_file, grade
from agents.grading.core import Student
from agents.grading.live import LiveLab

ROOT = Path(__file__).resolve().parent.parent
SOLUTIONS, WRONG = ROOT / "instructor" / "solutions", ROOT / "instructor" / "wrong"


def failed(report) -> list[str]:
    return [r.name for r in report.results if not r.passed]


@pytest.mark.parametrize("name", EXERCISES)
def test_reference_solution_passes_every_unit_check(name):
    report = grade(name, SOLUTIONS / f"{name}.py", unit_only=True)
    assert report.passed, report.text()
    assert len(report.results) >= 5


@pytest.mark.parametrize("name", EXERCISES)
def test_starter_fails(name):
    report = grade(name, COURSEWORK / name / "starter.py", unit_only=True)
    assert not report.passed
    # A do-nothing hook may pass a check about *not* refusing, but hardly any other.
    assert len(failed(report)) >= len(report.results) - 1, report.text()


@pytest.mark.parametrize("name", EXERCISES)
def test_deliberately_wrong_solution_fails_with_hints(name):
    report = grade(name, WRONG / f"{name}.py", unit_only=True)
    assert not report.passed, f"the checker let instructor/wrong/{name}.py through"
    assert all(r.hint for r in report.results if not r.passed)
    assert "hint:" in report.text()


@pytest.mark.parametrize("name", EXERCISES)
def test_starters_are_signatures_and_docstrings_only(name):
    """The starter is the point: no code a student could submit as it is."""
    tree = ast.parse((COURSEWORK / name / "starter.py").read_text())
    assert ast.get_docstring(tree) and (COURSEWORK / name / "README.md").exists()
    functions = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    assert functions and len(functions) == len(tree.body) - 1  # the module docstring, then functions
    for f in functions:
        assert ast.get_docstring(f) and len(f.body) == 1, f"{name}: {f.name} has a body"


@pytest.fixture(scope="module")
def live_lab():
    with LiveLab() as lab:
        yield lab


@pytest.mark.parametrize("name", EXERCISES)
def test_reference_solution_passes_the_live_checks(name, live_lab):
    report = grade(name, SOLUTIONS / f"{name}.py", lab=live_lab)
    assert report.passed, report.text()
    assert any(r.stage == "live" for r in report.results)


def test_live_checks_catch_a_hook_that_does_nothing_in_the_lab(live_lab):
    """The live checks look at the lab, not only at the unit results: a file that passes
    the unit checks but whose hooks the agents never call must fail them."""
    ex = exercise("loop_detection")
    student = Student(SOLUTIONS / "loop_detection.py")
    live_lab.use({}, {})  # no hooks in the lab at all
    results = ex.run("live", live_lab, student)
    assert not all(r.passed for r in results)


def test_an_agent_that_cannot_load_the_file_is_a_failed_live_check(live_lab, tmp_path):
    # Fine in the grader, but an import that fails inside the agents (python -m agents ... --home H):
    broken = tmp_path / "loop_detection.py"
    broken.write_text((SOLUTIONS / "loop_detection.py").read_text()
                      + "\nimport sys\nif '--home' in sys.argv:\n    import no_such_module\n")
    report = grade("loop_detection", broken, lab=live_lab)
    assert not report.passed
    assert any(r.stage == "live" and "no_such_module" in r.detail for r in report.results), report.text()


def test_find_file_looks_in_a_students_directory(tmp_path):
    (tmp_path / "alice").mkdir()
    (tmp_path / "alice" / "greylist.py").write_text("")
    (tmp_path / "bob" / "footer").mkdir(parents=True)
    (tmp_path / "bob" / "footer" / "solution.py").write_text("")
    assert find_file("greylist", tmp_path / "alice") == tmp_path / "alice" / "greylist.py"
    assert find_file("footer", tmp_path / "bob") == tmp_path / "bob" / "footer" / "solution.py"
    with pytest.raises(FileNotFoundError):
        find_file("bounce", tmp_path / "alice")
    assert find_file("bounce").parent == COURSEWORK / "bounce"


def test_mailpipe_check_exit_codes_and_report(capsys, tmp_path):
    assert mailpipe(["check", "loop_detection", "--unit-only", "--path", str(SOLUTIONS)]) == 0
    assert "7 of 7 checks passed" in capsys.readouterr().out
    assert mailpipe(["check", "loop_detection", "--unit-only", "--path", str(WRONG / "loop_detection.py")]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "hint:" in out and "not done yet" in out
    assert mailpipe(["check", "spam_score", "--unit-only", "--json", "--path", str(SOLUTIONS)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] and any("precision" in (c["detail"] or "") for c in report["checks"])
    (tmp_path / "footer.py").write_text("def on_data(ctx, session, envelope, message)\n")
    assert mailpipe(["check", "footer", "--path", str(tmp_path)]) == 1
    assert "your file loads" in capsys.readouterr().out
    assert mailpipe(["check", "nonsense"]) == 2
    assert mailpipe(["check"]) == 0 and "greylist" in capsys.readouterr().out
