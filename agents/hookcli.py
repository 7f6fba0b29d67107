"""``mailpipe hooks list`` and ``mailpipe check``: coursework hooks from the command line.

    mailpipe hooks list [--json]        which hooks each agent loads, from the lab config
    mailpipe check                      the exercises
    mailpipe check EXERCISE [--path FILE_OR_DIR] [--unit-only] [--json]

``hooks list`` reads the same ``[hooks]`` table the agents read at start
(``--config``, ``$MAILPIPE_CONFIG`` or the lab's own), imports every entry the
way an agent would and shows what each one turns into, or why it cannot be
loaded. ``check`` grades a student's file (see :mod:`agents.grading`); its
exit code is 0 only when every check passed, so a shell loop can grade a class.
"""

from __future__ import annotations

import json
import sys


def cmd_hooks_list(args) -> int:
    from .cli import _lab
    from .hooks import describe, hook_settings

    config = _lab(args).config
    agents = describe(config)
    errors = [e for a in agents for e in a["errors"]]
    if args.json:
        print(json.dumps({"config": config.source, "settings": hook_settings(config), "agents": agents}, indent=1))
        return 1 if errors else 0
    print(f"lab config: {config.source}")
    active = [a for a in agents if a["hooks"] or a["errors"]]
    if not active:
        print("no hooks configured (add a [hooks] table to the lab config, see docs/hooks.md)")
    for a in active:
        print(f"\n{a['agent']}")
        for h in a["hooks"]:
            print(f"  {h['event']:<16} {h['hook']}   (from {h['from']!r})")
        for e in a["errors"]:
            print(f"  ERROR            {e['error']}")
    settings = hook_settings(config)
    if settings:
        print("\nsettings (ctx.settings): " + ", ".join(f"{k} = {v!r}" for k, v in settings.items()))
    if errors:
        print(f"\n{len(errors)} hook entr{'y' if len(errors) == 1 else 'ies'} cannot be loaded: "
              "the agents concerned will not start", file=sys.stderr)
    return 1 if errors else 0


def cmd_check(args) -> int:
    from .grading import EXERCISES, exercise, find_file, grade

    if not args.exercise:
        print("exercises (coursework/<name>/README.md):")
        for name in EXERCISES:
            print(f"  {name:<16} {exercise(name).title}")
        print("\ngrade one: mailpipe check NAME [--path FILE_OR_DIR] [--unit-only]")
        return 0
    try:
        path = find_file(args.exercise, args.path)
        report = grade(args.exercise, path, unit_only=args.unit_only)
    except (KeyError, FileNotFoundError) as e:
        print(f"mailpipe check: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    print(json.dumps(report.to_dict(), indent=1) if args.json else report.text())
    return 0 if report.passed else 1


def register(subparsers) -> None:
    p = subparsers.add_parser("hooks", help="coursework hooks: which are active on which agent")
    hooks_sub = p.add_subparsers(dest="hooks_command", required=True)
    q = hooks_sub.add_parser("list", help="the hooks each agent loads, from the lab config")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_hooks_list)

    p = subparsers.add_parser("check", help="grade a coursework exercise (unit checks, then a live lab)")
    p.add_argument("exercise", nargs="?", help="the exercise; without it, the list of exercises")
    p.add_argument("--path", help="the file to grade, or a directory with <exercise>.py, "
                                  "<exercise>/solution.py or solution.py (default: "
                                  "coursework/<exercise>/solution.py, else the starter)")
    p.add_argument("--unit-only", action="store_true", help="only the fast unit checks, no lab")
    p.add_argument("--json", action="store_true", help="the report as JSON")
    p.set_defaults(func=cmd_check)
