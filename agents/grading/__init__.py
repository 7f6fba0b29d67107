"""Grading coursework hooks: what ``mailpipe check EXERCISE`` runs.

Each exercise lives in ``coursework/<exercise>/`` (the task and a starter
file for the student) and has a checker here, ``agents/grading/<exercise>.py``,
that defines ``EXERCISE``: an :class:`~agents.grading.core.Exercise` with

* **unit checks**, fast and exact: the student's functions called directly
  with a :class:`~agents.hooks.HookContext` on a fake clock and a fake
  resolver, with realistic sessions, envelopes and messages;
* **live checks**: the student's file plugged into a lab started for the
  purpose (:class:`~agents.grading.live.LiveLab`), real messages sent, replies,
  trace events and mailboxes looked at.

Live checks run only when every unit check passed: they are slower, and a
hook that is wrong on the fake clock is wrong in the lab too. Reference
solutions are in ``instructor/solutions/``, deliberately wrong ones in
``instructor/wrong/``; the test suite grades both (and the starters).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path

#: The repository's ``coursework/`` directory (exercise texts, starters, the spam corpus).
COURSEWORK = Path(__file__).resolve().parent.parent.parent / "coursework"

#: Every exercise, in course order.
EXERCISES = ("greylist", "rate_limit", "spam_score", "loop_detection", "footer", "bounce")


def exercise(name: str):
    """The :class:`~agents.grading.core.Exercise` called ``name``."""
    if name not in EXERCISES:
        raise KeyError(f"no exercise {name!r}; there are: {', '.join(EXERCISES)}")
    return importlib.import_module(f"{__name__}.{name}").EXERCISE


def find_file(name: str, path: str | Path | None = None) -> Path:
    """The file to grade for exercise ``name``.

    ``path`` may be the file itself or a directory holding ``<name>.py``,
    ``<name>/solution.py`` or ``solution.py`` (a class's submissions, one
    directory per student). Without ``path``: the student's
    ``coursework/<name>/solution.py`` if it exists, else the starter.
    """
    if path is None:
        folder = COURSEWORK / name
        return folder / "solution.py" if (folder / "solution.py").exists() else folder / "starter.py"
    path = Path(path).expanduser()
    if path.is_dir():
        for candidate in (path / f"{name}.py", path / name / "solution.py", path / "solution.py"):
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(f"no {name}.py, {name}/solution.py or solution.py in {path}")
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    return path


@dataclass
class Report:
    exercise: str
    title: str
    path: Path
    results: list = field(default_factory=list)
    live_skipped: str = ""

    @property
    def passed(self) -> bool:
        return bool(self.results) and all(r.passed for r in self.results) and not self.live_skipped

    def to_dict(self) -> dict:
        return {"exercise": self.exercise, "path": str(self.path), "passed": self.passed,
                "live_skipped": self.live_skipped or None,
                "checks": [{"stage": r.stage, "name": r.name, "passed": r.passed, "hint": r.hint or None,
                            "detail": r.detail or None} for r in self.results]}

    def text(self) -> str:
        lines = [f"{self.exercise}: {self.title}", f"grading {self.path}", ""]
        for r in self.results:
            lines.append(f"  {r.stage:<4}  {'PASS' if r.passed else 'FAIL'}  {r.name}")
            if not r.passed:
                lines.append(f"              hint: {r.hint}")
            if r.detail:
                lines.append(f"              {'got: ' if not r.passed else ''}{r.detail}")
        if self.live_skipped:
            lines.append(f"  live  SKIP  {self.live_skipped}")
        passed = sum(r.passed for r in self.results)
        lines += ["", f"{passed} of {len(self.results)} checks passed"
                      + ("" if self.passed else " - not done yet")]
        return "\n".join(lines)


def grade(name: str, path: str | Path, *, unit_only: bool = False, lab=None) -> Report:
    """Grade one file: unit checks, then (unless ``unit_only``) live checks.

    ``lab``: a running :class:`~agents.grading.live.LiveLab` to use (the test
    suite shares one across exercises); without it a lab is started for these
    checks and stopped after them.
    """
    from .core import Result, Student

    ex = exercise(name)
    report = Report(name, ex.title, Path(path).resolve())
    try:
        student = Student(path)
    except Exception as e:
        report.results.append(Result("unit", "your file loads", False,
                                     "Run `python FILE` to see the error; keep the function names of the starter.",
                                     f"{type(e).__name__}: {e}"))
        return report
    report.results += ex.run("unit", student)
    if unit_only:
        return report
    if not all(r.passed for r in report.results):
        report.live_skipped = "live checks: fix the unit checks first"
        return report
    from ..lab import LabError
    from .core import Result as _Result
    from .live import LiveLab

    own = lab is None
    lab = lab or LiveLab().up()
    try:
        try:
            lab.use(ex.hooks_table(student.path), ex.settings)
        except LabError as e:
            report.results.append(_Result("live", "the agents start with your hooks loaded", False,
                                          "An agent could not load your file; the error is below.", str(e)))
            return report
        report.results += ex.run("live", lab, student)
    finally:
        if own:
            lab.down()
    return report
