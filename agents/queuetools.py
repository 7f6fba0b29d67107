"""``mailpipe queue`` and ``mailpipe fault``: look into queues and break hops on purpose.

    mailpipe queue [list]                 every MSA and MTA queue (like Postfix's mailq)
    mailpipe queue show ID                one message: envelope, state, headers
    mailpipe queue flush [ID]             retry now instead of at the next retry time
    mailpipe queue hold ID | release ID   park a message, and let it go again
    mailpipe queue delete ID              remove it, without delivery and without bounce
    mailpipe queue stats                  each agent's counters (delivered, deferred, duplicates...)
    mailpipe fault set AGENT KIND [--stage S] [--code N] [--probability P] [--delay SEC] [--seed N]
    mailpipe fault list | clear [AGENT]

``--agent NAME`` limits a queue command to one agent, ``--json`` prints JSON.
Each command is one call to an agent's control socket (:mod:`agents.control`)
over a plain blocking socket: no reactor runs in this process.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from .faults import KINDS, STAGES


def _control(args):
    from .cli import _lab

    return _lab(args).control


def _when(ts: float) -> str:
    return time.strftime("%a %b %d %H:%M:%S", time.localtime(ts)) if ts else "-"


def format_queue(messages: list[dict], agents: list[str]) -> str:
    """A ``mailq``-like listing: one block per message, ``!`` marks a held one."""
    lines = []
    now = time.time()
    for agent in agents:
        mine = [m for m in messages if m["agent"] == agent]
        live = all(m["live"] for m in mine)
        note = "" if live else "  (not running: read from its spool on disk)"
        count = f"{len(mine)} message{'s' if len(mine) != 1 else ''}" if mine else "queue empty"
        lines.append(f"== {agent}: {count}{note}")
        for m in mine:
            mark = "!" if m["held"] else ("*" if m["active"] else " ")
            retry = (f"next try in {max(0.0, m['next_attempt'] - now):.1f} s"
                     if m["next_attempt"] and not m["held"] else ("held" if m["held"] else "trying now"))
            lines.append(f"{m['queue_id'] + mark:<22} {m['size'] or 0:>7}  {_when(m['received_at'])}  "
                         f"{m['mail_from'] or '<>'}")
            lines.append(f"{'':<22} tries {m['attempts']}, {retry}")
            if m["last_error"]:
                lines.append(f"{'':<22} ({m['last_error']})")
            for rcpt in m["pending"]:
                lines.append(f"{'':<40} {rcpt}")
    return "\n".join(lines)


def cmd_queue(args) -> int:
    control = _control(args)
    action = args.action
    if action in ("show", "delete", "hold", "release") and not args.queue_id:
        print(f"mailpipe queue {action}: give a queue id", file=sys.stderr)
        return 2
    if action == "list":
        messages = control.queue(args.agent)
        if args.json:
            print(json.dumps(messages, indent=1))
        else:
            agents = [args.agent] if args.agent else control.queueing_agents()
            print(format_queue(messages, agents))
        return 0
    if action == "show":
        m = control.show(args.queue_id, args.agent)
        if args.json:
            print(json.dumps(m, indent=1))
        else:
            for key in ("agent", "queue_id", "message_id", "mail_from", "recipients", "pending",
                        "attempts", "last_error", "held", "warned", "size"):
                print(f"{key + ':':<12} {m[key]}")
            print(f"{'arrived:':<12} {_when(m['received_at'])}")
            print(f"{'next try:':<12} {_when(m['next_attempt'])}\n")
            print(m["headers"].rstrip())
        return 0
    if action == "flush":
        flushed = control.flush(args.agent, args.queue_id)
        print(json.dumps(flushed) if args.json else
              "\n".join(f"{agent}: {n} message(s) flushed" for agent, n in flushed.items()))
        return 0
    if action == "stats":
        names = [args.agent] if args.agent else [s.name for s in control.config.agents() if s.role != "dns"]
        out = {}
        for name in names:
            try:
                out[name] = control.stats(name)["counters"]
            except Exception as e:  # a stopped agent: say so, go on
                out[name] = {"error": str(e)}
        if args.json:
            print(json.dumps(out, indent=1))
        else:
            for name, counters in out.items():
                print(f"{name}: " + ", ".join(f"{k} {v}" for k, v in counters.items()))
        return 0
    agent = getattr(control, action)(args.queue_id, args.agent)
    print(json.dumps({"agent": agent, action: args.queue_id}) if args.json else f"{agent}: {action} {args.queue_id}")
    return 0


def cmd_fault(args) -> int:
    control = _control(args)
    if args.action == "set":
        if not args.agent or not args.kind:
            print("mailpipe fault set: give AGENT and KIND", file=sys.stderr)
            return 2
        fault = control.fault(args.agent, args.kind, stage=args.stage, code=args.code, status=args.status,
                              probability=args.probability, delay=args.delay, seed=args.seed,
                              count=args.count, after_accept=args.after_accept or None)
        print(json.dumps(fault) if args.json else f"{args.agent}: {describe(fault)}")
    elif args.action == "clear":
        cleared = control.clear_faults(args.agent)
        print(json.dumps({"cleared": cleared}) if args.json else f"{cleared} fault(s) cleared")
    else:
        faults = control.faults(args.agent)
        if args.json:
            print(json.dumps(faults, indent=1))
        else:
            print("\n".join(f"{f['agent']}: {describe(f)}" for f in faults) or "no faults set")
    return 0


def describe(f: dict) -> str:
    """One line for a fault, e.g. ``#1 reply 451 4.3.0 at rcpt, p=0.5 seed 7, fired 3/10``."""
    what = f["kind"] + (f" {f['code']} {f['status']}" if f.get("code") else "")
    what += f" {f['delay']:g}s" if f.get("delay") else ""
    what += " after accepting" if f.get("after_accept") else ""
    extra = f", p={f['probability']:g}" if f["probability"] < 1 else ""
    extra += f" seed {f['seed']}" if f.get("seed") is not None else ""
    extra += f", at most {f['count']} times" if f.get("count") else ""
    return f"#{f['id']} {what} at {f['stage']}{extra}, fired {f['fired']}/{f['seen']}"


def register(sub) -> None:
    p = sub.add_parser("queue", help="list and steer the MSA and MTA queues")
    p.add_argument("action", nargs="?", default="list",
                   choices=["list", "show", "flush", "delete", "hold", "release", "stats"])
    p.add_argument("queue_id", nargs="?")
    p.add_argument("--agent", help="one agent, e.g. mta.sender.test (default: all)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_queue)

    p = sub.add_parser("fault", help="inject faults into one agent (deterministic chaos)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="kinds: " + ", ".join(KINDS) + "; stages: " + ", ".join(STAGES))
    p.add_argument("action", choices=["set", "clear", "list"])
    p.add_argument("agent", nargs="?")
    p.add_argument("kind", nargs="?", choices=list(KINDS))
    p.add_argument("--stage", choices=list(STAGES), help="where it strikes (default per kind)")
    p.add_argument("--code", type=int, help="reply code for refuse (421/554) and reply (4xx/5xx)")
    p.add_argument("--status", help="enhanced status code, e.g. 4.2.2 (default X.3.0)")
    p.add_argument("--probability", type=float, help="chance to strike each time (default 1)")
    p.add_argument("--delay", type=float, help="seconds, for the delay kind")
    p.add_argument("--seed", type=int, help="seed of the fault's own random numbers")
    p.add_argument("--count", type=int, help="strike at most this many times")
    p.add_argument("--after-accept", action="store_true",
                   help="drop only after the agent has taken the message (makes duplicates)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_fault)
