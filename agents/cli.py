"""``mailpipe``: the lab from the command line.

    mailpipe up [--detach]        start every agent (Ctrl-C stops them)
    mailpipe status [--json]      which agents run, where they listen
    mailpipe down                 stop the lab
    mailpipe send --from A --to B --subject S --body TEXT
        [--header-from F] [--direct-mx [DOMAIN] --source-address IP]   (spoofing lesson)
    mailpipe fetch USER           list USER's inbox over IMAP
    mailpipe watch USER           print new mail as it arrives (IMAP IDLE)
    mailpipe demo                 one message end to end, with its hops
    mailpipe trace MESSAGE_ID     every hop of one message, timed (--json: the events)
    mailpipe users add|passwd|list|remove
    mailpipe kill AGENT | start AGENT
    mailpipe queue [list|show|flush|hold|release|delete|stats]   (agents.queuetools)
    mailpipe fault set AGENT KIND [...] | list | clear [AGENT]
    mailpipe hooks list [--json]  which coursework hooks each agent loads   (agents.hookcli)
    mailpipe check EXERCISE [--path FILE_OR_DIR] [--unit-only]   grade an exercise

``--home DIR`` (else ``$MAILPIPE_HOME``, else ``~/.mailpipe/lab``) chooses the
lab; ``--config FILE`` a lab config other than the default.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid

from .config import ConfigError
from .lab import Lab, LabError
from .mua import add_send_arguments


def _lab(args, config_needed: bool = False) -> Lab:
    return Lab(home=args.home, config=getattr(args, "config", None))


def cmd_up(args) -> int:
    lab = _lab(args)
    running = [a["name"] for a in lab.status()["agents"] if a["alive"]]
    if running:
        print(f"mailpipe: a lab is already running in {lab.home.root} ({', '.join(running)}); "
              "'mailpipe down' first", file=sys.stderr)
        return 1
    lab.up()
    print_status(lab.status())
    if args.detach:
        return 0
    print("\nThe lab is running. Ctrl-C stops it.")
    try:
        while True:
            time.sleep(1)
            dead = [a["name"] for a in lab.status()["agents"] if not a["alive"]]
            if dead:
                print(f"mailpipe: agent(s) stopped: {', '.join(dead)}; see {lab.home.root}/log/",
                      file=sys.stderr)
    except KeyboardInterrupt:
        print("\nstopping the lab")
    finally:
        lab.down()
    return 0


def print_status(status: dict) -> None:
    print(f"lab home: {status['home']}\nlab CA:   {status['ca_cert']}\n")
    print(f"{'agent':<22} {'pid':>7}  {'state':<7} endpoints")
    for a in status["agents"]:
        endpoints = "  ".join(f"{svc}={ep}" for svc, ep in a["endpoints"].items())
        state = "up" if a["alive"] else "down"
        print(f"{a['name']:<22} {a['pid'] or '-':>7}  {state:<7} {endpoints}")


def cmd_status(args) -> int:
    status = _lab(args).status()
    if args.json:
        print(json.dumps(status, indent=1))
    else:
        print_status(status)
    return 0


def cmd_down(args) -> int:
    lab = _lab(args)
    stopped = [a["name"] for a in lab.status()["agents"] if a["alive"]]
    lab.down()
    print(f"stopped {len(stopped)} agent(s)" if stopped else "no agent was running")
    return 0


def cmd_kill(args) -> int:
    lab = _lab(args)
    return 0 if lab.kill_agent(args.agent) else 1


def cmd_start(args) -> int:
    lab = _lab(args)
    print(f"{args.agent} started, pid {lab.start_agent(args.agent)}")
    return 0


def _mua(args, argv: list[str]) -> int:
    cmd = [sys.executable, "-m", "agents", "mua", "--home", str(_lab(args).home.root), *argv]
    return subprocess.call(cmd)


def cmd_send(args) -> int:
    # The MUA parses the very same options (agents.mua.add_send_arguments):
    # hand it the words as typed.
    return _mua(args, ["send", *args.words])


def cmd_fetch(args) -> int:
    argv = ["fetch", args.user, "--folder", args.folder] + (["--json"] if args.json else [])
    if args.password:
        argv += ["--password", args.password]
    return _mua(args, argv)


def cmd_watch(args) -> int:
    argv = ["watch", args.user, "--folder", args.folder] + (["--json"] if args.json else [])
    if args.count:
        argv += ["--count", str(args.count)]
    return _mua(args, argv)


def cmd_users(args) -> int:
    from .users import UserDB

    lab = _lab(args)
    db = UserDB(lab.home.users_file)
    if args.action == "list":
        for address in sorted(db.load()):
            print(address)
        return 0
    if not args.address:
        print("mailpipe users: give an address", file=sys.stderr)
        return 2
    if args.action == "remove":
        return 0 if db.remove(args.address) else 1
    password = args.password or getpass.getpass(f"password for {args.address}: ")
    db.set_password(args.address, password)
    return 0


def cmd_bench(args) -> int:
    from .bench import run as bench_run

    args.home = str(_lab(args).home.root)
    return bench_run(args)


def cmd_trace(args) -> int:
    """Join the lab's trace for one message and show its hops as a waterfall."""
    from .traceview import journey, load_events, text_waterfall

    lab = _lab(args)
    trip = journey(load_events(lab.home.trace_dir), args.message_id)
    if not trip.hops:
        print(f"mailpipe trace: no hops for {trip.message_id} in {lab.home.trace_dir}", file=sys.stderr)
        return 1
    print(json.dumps(trip.to_dict(), indent=1) if args.json else text_waterfall(trip))
    return 0


def cmd_demo(args) -> int:
    """Start a lab, send one message Alice -> Bob, read it back, show the hops, stop."""
    from .journey import format_hops, hops

    home = args.home or os.path.join(tempfile.gettempdir(), "mailpipe-demo")
    lab = Lab(home=home, config=args.config)
    if any(a["alive"] for a in lab.status()["agents"]):
        lab.down()
    print(f"Starting the lab in {lab.home.root} ...")
    lab.up()
    try:
        print_status(lab.status())
        message_id = f"<demo.{uuid.uuid4().hex[:12]}@sender.test>"
        print("\nBob's mail client logs in over IMAP and waits (IDLE) ...")
        waiter = lab.start_waiting("bob@recipient.test", message_id)
        print("Alice submits a message to bob@recipient.test ...")
        sent = lab.send("alice@sender.test", "bob@recipient.test", "Hello from the demo",
                        "Hi Bob,\n\nthis message went MUA -> MSA -> MTA -> MTA -> MDA.\n\nAlice\n",
                        message_id=message_id)
        r = sent["recipients"][0]
        print(f"  {r['code']} {r['status']} {r['text']}  ({sent['message_id']})")
        msg = waiter.result()
        print(f"  arrived in Bob's INBOX: {msg['subject']!r} from {msg['from']}\n")
        print("Received: header fields, newest first (each hop adds one):")
        for r in msg["received"]:
            print("  " + " ".join(r.split()))
        print("\nThe hops, from the agents' trace:")
        print(format_hops(hops(lab.trace(), sent["message_id"])))
    finally:
        print("\nStopping the lab.")
        lab.down()
    return 0


#: Modules that add their own subcommands: each has ``register(subparsers)``,
#: and each command function gets the parsed ``args`` (with ``home``, ``config``).
COMMAND_MODULES: tuple[str, ...] = ("queuetools", "monitor", "hookcli")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mailpipe", description="a mail pipeline on one laptop")
    parser.add_argument("--home", default=None, help="lab home (default $MAILPIPE_HOME or ~/.mailpipe/lab)")
    parser.add_argument("--config", default=None, help="lab config TOML (default: the packaged lab)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("up", help="start the lab")
    p.add_argument("--detach", action="store_true", help="return once every agent is ready")
    p.set_defaults(func=cmd_up)
    p = sub.add_parser("status", help="show the agents")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)
    sub.add_parser("down", help="stop the lab").set_defaults(func=cmd_down)
    p = sub.add_parser("kill", help="kill -9 one agent")
    p.add_argument("agent")
    p.set_defaults(func=cmd_kill)
    p = sub.add_parser("start", help="start one agent")
    p.add_argument("agent")
    p.set_defaults(func=cmd_start)

    p = sub.add_parser("send", help="compose and submit a message")
    add_send_arguments(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_send)
    for name, func in (("fetch", cmd_fetch), ("watch", cmd_watch)):
        p = sub.add_parser(name)
        p.add_argument("user")
        p.add_argument("--folder", default="INBOX")
        p.add_argument("--json", action="store_true")
        if name == "fetch":
            p.add_argument("--password")
        else:
            p.add_argument("--count", type=int)
        p.set_defaults(func=func)

    p = sub.add_parser("users", help="manage lab users")
    p.add_argument("action", choices=["add", "passwd", "list", "remove"])
    p.add_argument("address", nargs="?")
    p.add_argument("--password")
    p.set_defaults(func=cmd_users)
    p = sub.add_parser("demo", help="one message end to end, with its hops")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("trace", help="every hop of one message, traced and timed")
    p.add_argument("message_id", help="the Message-ID, with or without <>")
    p.add_argument("--json", action="store_true", help="the hops and every joined event, as JSON")
    p.set_defaults(func=cmd_trace)
    p = sub.add_parser("bench", help="measure throughput and latency end to end")
    from .bench import add_arguments as bench_arguments

    bench_arguments(p)
    p.set_defaults(func=cmd_bench)

    for module in COMMAND_MODULES:
        __import__(f"agents.{module}", fromlist=["register"]).register(sub)

    words = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(words)
    # The words after the subcommand, for commands that hand them on unchanged.
    args.words = words[words.index(args.command) + 1:] if args.command in words else []
    try:
        return args.func(args)
    except (LabError, ConfigError) as e:
        print(f"mailpipe: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
