"""A steady stream of submissions that remembers which ones got their ``250``.

The crash test and notebook 05 need load while they ``kill -9`` agents, and
a precise record of what the first hop *acknowledged*: RFC 5321 6.1 promises
those messages, and only those, will arrive (or bounce). So this sender:

* keeps ``--concurrency`` authenticated submission sessions open to the MSA
  (as :mod:`agents.bench` does), paced to ``--rate`` messages per second;
* prints one JSON line per message the moment its fate is known:
  ``{"message_id": ..., "ok": true, "code": 250}`` for an acknowledged one,
  ``"ok": false`` with the error otherwise (a refused or cut connection:
  the client must assume the server does *not* have it);
* never resubmits a message, so every copy that arrives was sent once;
* when the MSA goes away, reconnects every 0.2 s until it is back.

It runs as its own process (``python -m agents.loadgen --home HOME ...``),
never inside a notebook kernel; :func:`start_load` starts it from Python.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field

from twisted.internet import defer, task


@dataclass
class LoadResult:
    """What the load generator saw: acknowledged ids, and the rest with their errors."""

    acknowledged: list[str] = field(default_factory=list)
    refused: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def sent(self) -> int:
        return len(self.acknowledged) + len(self.refused)


def parse_output(text: str) -> LoadResult:
    result = LoadResult()
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if "summary" in entry:
            result.seconds = entry["summary"]["seconds"]
        elif entry.get("ok"):
            result.acknowledged.append(entry["message_id"])
        elif "message_id" in entry:
            result.refused.append(entry)
    return result


class Load:
    """A running load generator process (see :func:`start_load`)."""

    def __init__(self, proc: subprocess.Popen, timeout: float):
        self.proc, self.timeout = proc, timeout

    def running(self) -> bool:
        return self.proc.poll() is None

    def result(self) -> LoadResult:
        """Wait for the load to finish; the acknowledged and the refused messages."""
        try:
            out, err = self.proc.communicate(timeout=self.timeout + 30)
        finally:
            self.proc.kill()
        if self.proc.returncode != 0:
            raise RuntimeError(f"load generator failed: {err.strip().splitlines()[-1:]}")
        return parse_output(out)


def start_load(lab, messages: int = 100, concurrency: int = 4, rate: float = 20.0,
               sender: str = "alice@sender.test", rcpt: str = "bob@recipient.test",
               timeout: float = 90.0, tag: str | None = None) -> Load:
    """Start submitting ``messages`` from ``sender`` to ``rcpt`` in the background."""
    cmd = [sys.executable, "-m", "agents.loadgen", "--home", str(lab.home.root),
           "--from", sender, "--to", rcpt, "--messages", str(messages),
           "--concurrency", str(concurrency), "--rate", str(rate), "--timeout", str(timeout)]
    if tag:
        cmd += ["--tag", tag]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=lab._agent_env())
    return Load(proc, timeout)


@defer.inlineCallbacks
def run_load(reactor, mua, rcpt: str, ids: list[str], concurrency: int, rate: float,
             deadline: float, emit):
    """Submit every id once over ``concurrency`` sessions; ``emit`` each outcome."""
    from .mua import compose

    todo = list(reversed(ids))
    interval = concurrency / rate if rate > 0 else 0.0

    @defer.inlineCallbacks
    def submitter():
        session = None
        while todo and time.monotonic() < deadline:
            if session is None or not session.usable:
                try:
                    session = yield mua.submission_session()
                except Exception:  # the MSA is down (or restarting): wait, try again
                    session = None
                    yield task.deferLater(reactor, 0.2, lambda: None)
                    continue
            mid = todo.pop()
            began = time.monotonic()
            content = compose(mua.user, [rcpt], f"load {mid}", "a message under load\n",
                              extra_headers={"Message-ID": mid})
            try:
                result = yield session.send(mua.user, [rcpt], content)
                code = result.recipients[0].code
                emit({"message_id": mid, "ok": 200 <= code < 300, "code": code,
                      "text": result.recipients[0].text})
            except Exception as e:  # cut or refused: not acknowledged
                emit({"message_id": mid, "ok": False, "error": str(e)})
                session.abort()
                session = None
            wait = interval - (time.monotonic() - began)
            if wait > 0:
                yield task.deferLater(reactor, wait, lambda: None)
        if session is not None and session.usable:
            yield session.close()

    yield defer.gatherResults([submitter() for _ in range(concurrency)], consumeErrors=True)


def main(argv=None) -> int:
    from .config import LabConfig
    from .home import LabHome
    from .mua import MUA, run_reactor

    parser = argparse.ArgumentParser(prog="python -m agents.loadgen")
    parser.add_argument("--home", default=None)
    parser.add_argument("--from", dest="sender", default="alice@sender.test")
    parser.add_argument("--to", dest="rcpt", default="bob@recipient.test")
    parser.add_argument("--messages", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--rate", type=float, default=20.0, help="messages per second in all (0: no limit)")
    parser.add_argument("--timeout", type=float, default=90.0)
    parser.add_argument("--tag", default=None, help="goes into every Message-ID")
    args = parser.parse_args(argv)
    home = LabHome.at(args.home)
    config = LabConfig.load(home.config_file)
    tag = args.tag or uuid.uuid4().hex[:8]
    domain = args.sender.rpartition("@")[2]
    ids = [f"<load-{tag}-{i}@{domain}>" for i in range(args.messages)]
    started = time.monotonic()

    def emit(entry: dict) -> None:
        print(json.dumps(entry), flush=True)

    outcome = run_reactor(lambda reactor: run_load(
        reactor, MUA(reactor, home, config, args.sender), args.rcpt, ids, args.concurrency,
        args.rate, started + args.timeout, emit))
    if isinstance(outcome, BaseException):
        print(f"loadgen: {outcome}", file=sys.stderr)
        return 1
    emit({"summary": {"seconds": round(time.monotonic() - started, 3), "messages": len(ids)}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
