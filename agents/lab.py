"""The lab from Python: start the agents as processes, ask about them, stop them.

This is the API the ``mailpipe`` command, the tests and the notebooks share::

    from agents.lab import Lab
    lab = Lab(home="/tmp/mylab").up()
    lab.send("alice@sender.test", "bob@recipient.test", "Hi", "Hello Bob")
    lab.fetch("bob@recipient.test")
    lab.down()

Every agent runs in its own OS process (``python -m agents <role>``), exactly
as on a network of real hosts. The lab never runs a Twisted reactor in the
calling process, so it is safe inside a Jupyter kernel: MUA actions run as
short-lived ``python -m agents mua ...`` processes too.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from .config import LabConfig
from .exchangers import extra_hosts
from .home import LabHome
from .pki import ensure_ca, ensure_host_cert
from .senderauth import prepare as sender_auth_prepare
from .users import UserDB


class LabError(RuntimeError):
    """Something about the lab is wrong; the message says what to do."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped) still answers kill(0); check /proc.
    # While the other threads of a killed process are still exiting, the
    # main thread is already a zombie: count the process as alive until the
    # last thread is gone, because until then it may still hold its sockets.
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().split(") ", 1)[1][:1] != "Z":
                return True
        return len(os.listdir(f"/proc/{pid}/task")) > 1
    except (OSError, IndexError):
        return os.path.exists(f"/proc/{pid}")


def tcp_port_free(address: str, port: int) -> bool:
    """Could a new agent listen here now? (Twisted listens with SO_REUSEADDR.)"""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((address, port))
        except OSError:
            return False
    return True


class Waiter:
    """A MUA process waiting for one message (see :meth:`Lab.start_waiting`)."""

    def __init__(self, proc: subprocess.Popen, timeout: float):
        self.proc, self.timeout = proc, timeout

    def result(self) -> dict:
        try:
            out, err = self.proc.communicate(timeout=self.timeout + 30)
        finally:
            self.proc.kill()
        if self.proc.returncode != 0:
            raise LabError(f"mua wait failed: {err.strip().splitlines()[-1:] or ['?']}")
        return json.loads(out.strip().splitlines()[-1])["message"]


class Lab:
    """One lab: a home directory and the config it runs.

    The config is, in this order: the ``config`` argument, ``$MAILPIPE_CONFIG``,
    the config a lab already started in this home, or the packaged default.
    """

    def __init__(self, home: str | os.PathLike | None = None, config: str | os.PathLike | LabConfig | None = None):
        self.home = LabHome.at(home)
        if isinstance(config, LabConfig):
            self.config = config
        elif config is not None:
            self.config = LabConfig.load(config)
        elif os.environ.get("MAILPIPE_CONFIG"):
            self.config = LabConfig.load(os.environ["MAILPIPE_CONFIG"])
        elif self.home.config_file.exists():
            self.config = LabConfig.load(self.home.config_file)
        else:
            self.config = LabConfig.load(None)
        self._children: dict[str, subprocess.Popen] = {}

    # -- preparing the home ------------------------------------------------

    def prepare(self) -> None:
        """Create what the agents need: config copy, CA and certificates, DKIM keys, users, Maildirs."""
        self.home.make_dirs()
        self.home.config_file.write_text(self.config.to_toml())
        ensure_ca(self.home.pki)
        for d in self.config.domains:
            hosts = [d.host(r) for r in ("mta", "msa", "mda", "lmtp")] + extra_hosts(d)  # + mx2.D
            ensure_host_cert(self.home.pki, d.name, hosts, d.address)
        sender_auth_prepare(self.home.root, self.config)  # DKIM keys under HOME/dkim, DMARC settings checked
        db = UserDB(self.home.users_file)
        for user in self.config.users:
            db.ensure(user.address, user.password)

    # -- processes ---------------------------------------------------------

    def pid(self, name: str) -> int | None:
        try:
            return int(self.home.pid_file(name).read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def is_running(self, name: str) -> bool:
        pid = self.pid(name)
        return pid is not None and _alive(pid)

    def start_agent(self, name: str, timeout: float = 20.0) -> int:
        """Start one agent process and wait until it listens; returns its pid."""
        spec = self.config.agent(name)
        if self.is_running(name):
            return self.pid(name)
        self.home.pid_file(name).unlink(missing_ok=True)
        log = open(self.home.log_file(name), "ab")
        cmd = [sys.executable, "-m", "agents", spec.role, "--home", str(self.home.root), "--name", name]
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C in a notebook must not kill the lab
            env=self._agent_env(),
        )
        log.close()
        self._children[name] = proc
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.pid(name) == proc.pid:
                return proc.pid
            if proc.poll() is not None:
                raise LabError(f"{name} did not start: {self._last_log_line(name)}")
            time.sleep(0.02)
        proc.kill()
        raise LabError(f"{name} did not become ready in {timeout:.0f} s; see {self.home.log_file(name)}")

    def _agent_env(self) -> dict:
        env = dict(os.environ)
        # Agents import this very package, wherever it is (installed or a checkout).
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def _last_log_line(self, name: str) -> str:
        try:
            lines = [l for l in self.home.log_file(name).read_text(errors="replace").splitlines() if l.strip()]
        except FileNotFoundError:
            return "no log"
        return lines[-1] if lines else "no output"

    def up(self, timeout: float = 30.0) -> "Lab":
        """Start every agent (DNS first), each ready before the next starts."""
        self.prepare()
        started = []
        try:
            for spec in self.config.agents():
                self.start_agent(spec.name, timeout=timeout)
                started.append(spec.name)
        except Exception:
            self.down()
            raise
        return self

    def stop_agent(self, name: str, sig: int = signal.SIGTERM, timeout: float = 10.0) -> bool:
        """Stop one agent (SIGTERM: clean; SIGKILL: a crash). True if it was running."""
        pid = self.pid(name)
        proc = self._children.pop(name, None)
        if pid is None or not _alive(pid):
            if proc:
                proc.poll()
            self.home.pid_file(name).unlink(missing_ok=True)
            return False
        os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while _alive(pid) and time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                break
            time.sleep(0.02)
        if _alive(pid) and (proc is None or proc.poll() is None):
            os.kill(pid, signal.SIGKILL)
            if proc is not None:
                proc.wait(5)
        if proc is not None:
            proc.poll()
        self.home.pid_file(name).unlink(missing_ok=True)
        self._wait_ports_released(name, deadline=time.monotonic() + 5)
        return True

    def _wait_ports_released(self, name: str, deadline: float) -> None:
        """Return once the agent's TCP ports can be bound again (a restart may follow)."""
        spec = self.config.agent(name)
        ports = [p for svc, p in spec.ports.items() if svc != "dns"]
        while time.monotonic() < deadline:
            if all(tcp_port_free(spec.address, p) for p in ports):
                return
            time.sleep(0.02)

    def kill_agent(self, name: str) -> bool:
        """``kill -9`` one agent, as a crash would."""
        return self.stop_agent(name, signal.SIGKILL)

    def down(self) -> None:
        """Stop every agent, in reverse start order."""
        for spec in reversed(self.config.agents()):
            self.stop_agent(spec.name)

    def __enter__(self) -> "Lab":
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()

    # -- questions ---------------------------------------------------------

    def status(self) -> dict:
        """The lab as ``mailpipe status --json`` prints it."""
        agents = []
        for spec in self.config.agents():
            pid = self.pid(spec.name)
            agents.append({
                "name": spec.name,
                "role": spec.role,
                "domain": spec.domain,
                "pid": pid,
                "alive": pid is not None and _alive(pid),
                "endpoints": spec.endpoints(),
            })
        return {"home": str(self.home.root), "ca_cert": str(self.home.ca_cert), "agents": agents}

    def endpoint(self, domain: str, service: str) -> tuple[str, int]:
        d = self.config.domain(domain)
        return d.address, self.config.ports[service]

    # -- the MUA, as a process ---------------------------------------------

    def mua(self, *args: str, timeout: float = 60.0) -> dict:
        """Run one MUA command (``python -m agents mua ...``) and return its JSON answer."""
        cmd = [sys.executable, "-m", "agents", "mua", "--home", str(self.home.root), *args, "--json"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=self._agent_env())
        out = proc.stdout.strip().splitlines()
        if proc.returncode != 0 or not out:
            raise LabError(f"mua {args[0]} failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:] or ['?']}")
        return json.loads(out[-1])

    def send(self, sender: str, to: str | list[str], subject: str = "Hello", body: str = "Hello!\n", **options) -> dict:
        """Compose and submit a message as ``sender`` (a lab user); returns the MUA's report.

        ``options`` are the MUA's ``send`` flags, e.g. ``header_from="..."``, or
        ``direct_mx=True`` (or a domain) with ``source_address=...`` to skip the
        MSA and talk to an MX directly, as forged mail does (:mod:`agents.directmx`).
        """
        args = ["send", "--from", sender, "--subject", subject, "--body", body]
        for rcpt in [to] if isinstance(to, str) else to:
            args += ["--to", rcpt]
        for key, value in options.items():
            flag = "--" + key.replace("_", "-")
            if value is True:
                args.append(flag)
            elif value not in (None, False):
                args += [flag, str(value)]
        return self.mua(*args)

    def fetch(self, user: str, folder: str = "INBOX", **options) -> list[dict]:
        """Every message in ``user``'s folder, read over IMAP."""
        args = ["fetch", user, "--folder", folder]
        for key, value in options.items():
            args += ["--" + key.replace("_", "-"), str(value)]
        return self.mua(*args)["messages"]

    def wait_for(self, user: str, message_id: str, timeout: float = 20.0, folder: str = "INBOX") -> dict:
        """Wait (over IMAP) until ``message_id`` is in ``user``'s folder; returns it."""
        return self.mua("wait", user, "--message-id", message_id, "--folder", folder,
                        "--timeout", str(timeout), timeout=timeout + 30)["message"]

    def start_waiting(self, user: str, message_id: str, timeout: float = 20.0, folder: str = "INBOX"):
        """Start a MUA that waits in IMAP IDLE for ``message_id``; returns a :class:`Waiter`.

        Start it *before* sending, and the last hop measures how fast IDLE
        tells the reader, not how fast a new process starts.
        """
        cmd = [sys.executable, "-m", "agents", "mua", "--home", str(self.home.root), "wait", user,
               "--message-id", message_id, "--folder", folder, "--timeout", str(timeout), "--json"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=self._agent_env())
        line = proc.stderr.readline()  # "waiting for ... in IDLE", or an error
        if "waiting" not in line:
            proc.kill()
            raise LabError(f"mua wait failed: {line.strip() or proc.stderr.read().strip()}")
        return Waiter(proc, timeout)

    def trace(self):
        """All trace events of this lab (see :mod:`agents.trace`)."""
        from .trace import read_events

        return list(read_events(self.home.trace_dir))

    # -- queues and faults, through each agent's control socket --------------

    @property
    def control(self):
        """Every agent's queue, faults and counters (:class:`agents.control.LabControl`)."""
        from .control import LabControl

        return LabControl(self.home, self.config)

    def queue(self, agent: str | None = None) -> list[dict]:
        """The messages waiting in ``agent``'s queue (default: every MSA and MTA)."""
        return self.control.queue(agent)

    def fault(self, agent: str, kind: str, **options) -> dict:
        """Make ``agent`` misbehave: ``lab.fault("mta.recipient.test", "reply", stage="rcpt", code=451)``.

        Kinds and options are in :mod:`agents.faults`; returns the fault as set.
        """
        return self.control.fault(agent, kind, **options)

    def clear_faults(self, agent: str | None = None) -> int:
        """Remove ``agent``'s faults (default: every agent's); returns how many."""
        return self.control.clear_faults(agent)
