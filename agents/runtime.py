"""What every agent process does around its own job: start, listen, stop.

``python -m agents <role> --home HOME --name NAME`` runs one agent. It reads
the lab config the lab wrote to ``HOME/config.toml``, asks its role module to
build its listeners, and only when every listener is bound writes its pid file
(``HOME/run/NAME.pid``): that file is how ``mailpipe up`` knows the agent is
ready. SIGTERM stops it cleanly; SIGKILL is what the crash tests use.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
from dataclasses import dataclass

from twisted.internet import error as net_error
from twisted.logger import globalLogBeginner, textFileLogObserver

from .config import AgentSpec, ConfigError, LabConfig
from .durable import DiskThread
from .home import LabHome
from .trace import Tracer

#: Exit code when the agent cannot start (a port in use, a missing file).
EXIT_CANNOT_START = 3


class CannotStart(Exception):
    """A one-line reason why the agent could not start, and what to do."""


@dataclass
class AgentContext:
    """Everything an agent's ``build`` function gets from the lab."""

    reactor: object
    home: LabHome
    config: LabConfig
    spec: AgentSpec
    tracer: Tracer
    #: This agent's coursework hooks (an agents.hooks.HookRunner), set by install_hooks.
    hooks: object = None
    #: The one thread that does this agent's disk work (agents.durable.DiskThread).
    disk: DiskThread | None = None

    @property
    def domain(self):
        return self.config.domain(self.spec.domain) if self.spec.domain else None

    def listen_tcp(self, service: str, factory):
        port = self.spec.ports[service]
        try:
            return self.reactor.listenTCP(port, factory, interface=self.spec.address)
        except net_error.CannotListenError as e:
            raise CannotStart(_explain_bind_error(service, self.spec.address, port, e)) from None


    def listen_ssl(self, service: str, factory, context):
        """Listen with TLS from the first byte (RFC 8314 implicit TLS)."""
        port = self.spec.ports[service]
        try:
            return self.reactor.listenSSL(port, factory, context, interface=self.spec.address)
        except net_error.CannotListenError as e:
            raise CannotStart(_explain_bind_error(service, self.spec.address, port, e)) from None

    def server_tls(self):
        """This domain's server TLS options (its certificate from the lab CA)."""
        from .tls import server_context

        return server_context(self.home.domain_cert(self.spec.domain))

    def resolver(self):
        from .resolver import LabResolver

        return LabResolver(self.config.dns_server, reactor=self.reactor, tracer=self.tracer)


def _explain_bind_error(service, address, port, e) -> str:
    reason = getattr(e.socketError, "errno", None)
    if reason == errno.EADDRINUSE:
        return (f"{service}: {address}:{port} is already in use; is another lab running? "
                "Stop it with 'mailpipe down', or give this lab other ports with --config")
    if reason == errno.EADDRNOTAVAIL:
        return f"{service}: cannot bind {address}; the lab needs the loopback range 127.0.0.0/8"
    return f"{service}: cannot listen on {address}:{port}: {e.socketError}"


def run(role: str, home_dir: str, name: str) -> int:
    from twisted.internet import reactor

    home = LabHome.at(home_dir)
    try:
        config = LabConfig.load(home.config_file)
        spec = config.agent(name)
    except (ConfigError, KeyError) as e:
        print(f"mailpipe {name}: {e}", file=sys.stderr)
        return EXIT_CANNOT_START
    if spec.role != role:
        print(f"mailpipe {name}: is a {spec.role}, not a {role}", file=sys.stderr)
        return EXIT_CANNOT_START

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)], redirectStandardIO=False)
    tracer = Tracer(home.trace_file(name) if config.trace else None, name, role, spec.domain,
                    scheduler=reactor.callLater)
    disk = DiskThread(reactor, name=f"{name} disk")
    # On SIGTERM the spool writes already asked for still finish.
    reactor.addSystemEventTrigger("before", "shutdown", disk.stop)
    ctx = AgentContext(reactor, home, config, spec, tracer, disk=disk)

    from . import ROLE_MODULES

    module = __import__(f"agents.{ROLE_MODULES[role]}", fromlist=["build"])
    try:
        module.build(ctx)
    except CannotStart as e:
        print(f"mailpipe {name}: {e}", file=sys.stderr)
        return EXIT_CANNOT_START

    pid_file = home.pid_file(name)

    def ready():
        pid_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = pid_file.with_suffix(".tmp")
        tmp.write_text(f"{os.getpid()}\n")
        os.replace(tmp, pid_file)
        tracer.event("agent.ready", pid=os.getpid(), endpoints=spec.endpoints())
        print(f"{name} ready: {spec.endpoints()}", flush=True)

    reactor.callWhenRunning(ready)
    signal.signal(signal.SIGTERM, lambda *a: reactor.callFromThread(reactor.stop))
    signal.signal(signal.SIGINT, lambda *a: reactor.callFromThread(reactor.stop))
    reactor.run(installSignalHandlers=False)
    tracer.event("agent.stopped", pid=os.getpid())
    tracer.close()
    try:
        if pid_file.read_text().strip() == str(os.getpid()):
            pid_file.unlink()
    except FileNotFoundError:
        pass
    return 0
