"""The control channel: how ``mailpipe queue`` and ``mailpipe fault`` talk to a running agent.

Postfix's ``postqueue`` and ``postsuper`` talk to its queue manager through
UNIX sockets in the spool directory; mailpipe does the same. Every MSA, MTA
and MDA listens on ``HOME/run/<agent>.ctl``, a UNIX socket only its owner
may open (mode 0600: on a UNIX socket the file permissions *are* the
authentication), and answers RPCs in Twisted's AMP, the Asynchronous
Messaging Protocol.

AMP is a small RPC protocol worth reading. A message is a *box*: a list of
key/value pairs, each key and each value prefixed by its length in two
bytes, ended by an empty key::

    \\x00\\x08_command  \\x00\\x09QueueList  \\x00\\x04_ask  \\x00\\x011
    \\x00\\x05limit  \\x00\\x03100   \\x00\\x00

A request carries ``_command`` and a tag in ``_ask``; the answer carries the
same tag in ``_answer`` (or ``_error`` with ``_error_code`` and
``_error_description``), so many calls can be in flight on one connection.
Each :class:`amp.Command` below declares its typed arguments and response
(``Integer``, ``Unicode``, ``ListOf``, ``AmpList`` for a list of records),
and the errors it may raise. A value holds at most 65,535 bytes, which is why
:class:`QueueList` is paged.

The agent side is an :class:`amp.AMP` protocol on the agent's reactor. The
client side (:class:`ControlClient`) is deliberately *not* Twisted: a plain
blocking socket that writes one box and reads one box back, using the
Command classes only to encode and decode arguments. So the ``mailpipe``
command and a Jupyter kernel can call an agent without running a reactor
(a reactor cannot be restarted, and a notebook must never run one).
"""

from __future__ import annotations

import os
import socket
import struct
import time
from pathlib import Path

from twisted.internet import error as net_error
from twisted.internet import protocol
from twisted.protocols import amp

from .faults import FaultSet, FaultyHandler, FaultySpool
from .lab import LabError
from .queue import NoSuchMessage

#: Longest path a UNIX socket address can hold on Linux (sun_path is 108 bytes).
MAX_SOCKET_PATH = 107
#: Messages per QueueList page: well under AMP's 64 KiB per value.
PAGE = 100
#: Roles that keep a queue (``mailpipe queue`` asks these by default).
QUEUE_ROLES = ("msa", "mta")


def control_path(home, agent: str) -> Path:
    """Where ``agent``'s control socket lives: ``HOME/run/<agent>.ctl``."""
    return Path(home.root) / "run" / f"{agent}.ctl"


# ---------------------------------------------------------------------------
# The protocol: one Command class per RPC


class NoQueue(Exception):
    """The agent keeps no queue (an MDA delivers at once, RFC 2033)."""


_MESSAGE = [
    (b"queue_id", amp.Unicode()),
    (b"mail_from", amp.Unicode()),
    (b"recipients", amp.ListOf(amp.Unicode())),
    (b"pending", amp.ListOf(amp.Unicode())),
    (b"message_id", amp.Unicode(optional=True)),
    (b"received_at", amp.Float()),
    (b"attempts", amp.Integer()),
    (b"next_attempt", amp.Float()),
    (b"last_error", amp.Unicode(optional=True)),
    (b"held", amp.Boolean()),
    (b"warned", amp.Boolean()),
    (b"active", amp.Boolean()),
    (b"size", amp.Integer(optional=True)),
]
_MESSAGE_NAMES = [name.decode() for name, _ in _MESSAGE]

_FAULT = [
    (b"id", amp.Integer()),
    (b"kind", amp.Unicode()),
    (b"stage", amp.Unicode()),
    (b"code", amp.Integer(optional=True)),
    (b"status", amp.Unicode(optional=True)),
    (b"probability", amp.Float()),
    (b"delay", amp.Float()),
    (b"seed", amp.Integer(optional=True)),
    (b"count", amp.Integer()),
    (b"after_accept", amp.Boolean()),
    (b"seen", amp.Integer()),
    (b"fired", amp.Integer()),
]

_QUEUE_ERRORS = {NoQueue: b"NO_QUEUE", NoSuchMessage: b"NO_SUCH_MESSAGE"}


class QueueList(amp.Command):
    """One page of the queue, oldest first, and how many there are in all."""

    arguments = [(b"offset", amp.Integer()), (b"limit", amp.Integer())]
    response = [(b"total", amp.Integer()), (b"messages", amp.AmpList(_MESSAGE))]
    errors = _QUEUE_ERRORS


class QueueShow(amp.Command):
    """One message: its envelope, state and header section."""

    arguments = [(b"queue_id", amp.Unicode())]
    response = _MESSAGE + [(b"headers", amp.Unicode())]
    errors = _QUEUE_ERRORS


class QueueFlush(amp.Command):
    """Try waiting messages now (all, or one); answers how many."""

    arguments = [(b"queue_id", amp.Unicode(optional=True))]
    response = [(b"flushed", amp.Integer())]
    errors = _QUEUE_ERRORS


class QueueDelete(amp.Command):
    arguments = [(b"queue_id", amp.Unicode())]
    response = []
    errors = _QUEUE_ERRORS


class QueueHold(QueueDelete):
    pass


class QueueRelease(QueueDelete):
    pass


class FaultSetCommand(amp.Command):
    commandName = b"FaultSet"
    arguments = [
        (b"kind", amp.Unicode()),
        (b"stage", amp.Unicode(optional=True)),
        (b"code", amp.Integer(optional=True)),
        (b"status", amp.Unicode(optional=True)),
        (b"probability", amp.Float(optional=True)),
        (b"delay", amp.Float(optional=True)),
        (b"seed", amp.Integer(optional=True)),
        (b"count", amp.Integer(optional=True)),
        (b"after_accept", amp.Boolean(optional=True)),
    ]
    response = _FAULT
    errors = {ValueError: b"BAD_FAULT"}


class FaultClear(amp.Command):
    arguments = []
    response = [(b"cleared", amp.Integer())]


class FaultList(amp.Command):
    arguments = []
    response = [(b"faults", amp.AmpList(_FAULT))]


class Stats(amp.Command):
    """Who the agent is and what it has counted since it started."""

    arguments = []
    response = [
        (b"agent", amp.Unicode()),
        (b"role", amp.Unicode()),
        (b"pid", amp.Integer()),
        (b"uptime", amp.Float()),
        (b"counters", amp.AmpList([(b"name", amp.Unicode()), (b"value", amp.Integer())])),
    ]


# ---------------------------------------------------------------------------
# The agent side


class AgentControl:
    """What an agent exposes on its control socket: its queue, faults and counters.

    An agent's ``build()`` makes one, wraps its SMTP/LMTP handler with
    :meth:`wrap` (fault injection) and, for the MDA, its mail store with
    :meth:`watch_store` (duplicate counting); the socket listens at once.
    """

    def __init__(self, ctx, queue=None, listen: bool = True):
        self.ctx, self.queue = ctx, queue
        self.faults = FaultSet()
        self.started = time.time()
        self.store = None
        if queue is not None:
            queue.spool = FaultySpool(queue.spool, self.faults)
        self.port = self.listen() if listen else None

    def wrap(self, handler):
        """The agent's SMTP/LMTP handler, with this agent's faults in front."""
        return FaultyHandler(handler, self.faults, self.ctx.reactor, self.ctx.tracer)

    def watch_store(self, store):
        """The MDA's mail store, counting duplicates (see :mod:`agents.ledger`)."""
        from .ledger import DeliveryLedger, LedgerStore

        ledger = DeliveryLedger(self.ctx.home.spool(self.ctx.spec.name) / "delivered.jsonl")
        self.store = LedgerStore(store, ledger, self.ctx.tracer, self.faults)
        return self.store

    def listen(self):
        path = control_path(self.ctx.home, self.ctx.spec.name)
        if len(str(path)) > MAX_SOCKET_PATH:
            # A limit of AF_UNIX, not of mailpipe: run the lab in a shorter home.
            self.ctx.tracer.event("control.off", path=str(path),
                                  reason=f"UNIX socket path longer than {MAX_SOCKET_PATH} bytes")
            print(f"{self.ctx.spec.name}: no control socket, {path} is too long for AF_UNIX", flush=True)
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)  # left behind by a kill -9: nobody listens on it
        factory = protocol.Factory.forProtocol(lambda: ControlProtocol(self))
        try:
            port = self.ctx.reactor.listenUNIX(str(path), factory, mode=0o600)
        except net_error.CannotListenError as e:
            from .runtime import CannotStart

            raise CannotStart(f"control: cannot listen on {path}: {e.socketError}") from None
        self.ctx.tracer.event("control.listening", path=str(path))
        return port

    def counters(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        if self.queue is not None:
            counts.update(self.queue.stats)
            counts["queued"] = len(self.queue.items)
            counts["held_now"] = sum(1 for i in self.queue.items.values() if i.held)
        if self.store is not None:
            counts["stored"] = self.store.stored
            counts["duplicates"] = self.store.ledger.duplicates
        counts["faults_fired"] = self.faults.fired
        return counts

    def need_queue(self):
        if self.queue is None:
            raise NoQueue(f"{self.ctx.spec.name} keeps no queue (only the MSA and MTAs do)")
        return self.queue


class ControlProtocol(amp.AMP):
    """One control connection: each responder answers one Command."""

    def __init__(self, agent: AgentControl):
        super().__init__()
        self.agent = agent

    @QueueList.responder
    def queue_list(self, offset, limit):
        messages = self.agent.need_queue().list()
        page = messages[offset: offset + max(1, min(limit, PAGE))]
        return {"total": len(messages), "messages": [_message_fields(m) for m in page]}

    @QueueShow.responder
    def queue_show(self, queue_id):
        d = self.agent.need_queue().show(queue_id)
        return d.addCallback(lambda m: {**_message_fields(m), "headers": m["headers"][:20000]})

    @QueueFlush.responder
    def queue_flush(self, queue_id=None):
        return {"flushed": self.agent.need_queue().flush(queue_id)}

    @QueueDelete.responder
    def queue_delete(self, queue_id):
        return self.agent.need_queue().delete(queue_id).addCallback(lambda _: {})

    @QueueHold.responder
    def queue_hold(self, queue_id):
        return self.agent.need_queue().hold(queue_id).addCallback(lambda _: {})

    @QueueRelease.responder
    def queue_release(self, queue_id):
        return self.agent.need_queue().release(queue_id).addCallback(lambda _: {})

    @FaultSetCommand.responder
    def fault_set(self, kind, **options):
        fault = self.agent.faults.add(kind, **options)
        self.agent.ctx.tracer.event("fault.set", **fault.to_dict())
        return fault.to_dict()

    @FaultClear.responder
    def fault_clear(self):
        cleared = self.agent.faults.clear()
        self.agent.ctx.tracer.event("fault.cleared", count=cleared)
        return {"cleared": cleared}

    @FaultList.responder
    def fault_list(self):
        return {"faults": [f.to_dict() for f in self.agent.faults.faults]}

    @Stats.responder
    def stats(self):
        spec = self.agent.ctx.spec
        return {
            "agent": spec.name, "role": spec.role, "pid": os.getpid(),
            "uptime": time.time() - self.agent.started,
            "counters": [{"name": k, "value": int(v)} for k, v in sorted(self.agent.counters().items())],
        }


def _message_fields(m: dict) -> dict:
    return {k: m[k] for k in _MESSAGE_NAMES}


# ---------------------------------------------------------------------------
# The client side: blocking, no reactor


class ControlError(LabError):
    """An agent answered with an error (``code`` is the AMP error code)."""

    def __init__(self, agent: str, code: str, text: str):
        super().__init__(f"{agent}: {text}")
        self.agent, self.code, self.text = agent, code, text


class AgentNotRunning(ControlError):
    def __init__(self, agent: str, why: str):
        super().__init__(agent, "NOT_RUNNING",
                         f"not running ({why}); start it with 'mailpipe start {agent}'")


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("the agent closed the control connection")
        data += chunk
    return data


def read_box(sock: socket.socket) -> amp.AmpBox:
    """Read one AMP box: (2-byte length, key, 2-byte length, value)* then an empty key."""
    box = amp.AmpBox()
    while True:
        (key_length,) = struct.unpack("!H", _read_exactly(sock, 2))
        if key_length == 0:
            return box
        key = _read_exactly(sock, key_length)
        (value_length,) = struct.unpack("!H", _read_exactly(sock, 2))
        box[key] = _read_exactly(sock, value_length)


class ControlClient:
    """Call one agent's control socket, synchronously: one connection per call."""

    def __init__(self, path: Path, agent: str = "agent", timeout: float = 15.0):
        self.path, self.agent, self.timeout = Path(path), agent, timeout

    def call(self, command: type[amp.Command], **arguments) -> dict:
        request = command.makeArguments(arguments, None)
        request[b"_command"] = command.commandName
        request[b"_ask"] = b"1"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(self.timeout)
            try:
                sock.connect(str(self.path))
            except FileNotFoundError:
                raise AgentNotRunning(self.agent, f"no control socket at {self.path}") from None
            except ConnectionRefusedError:
                raise AgentNotRunning(self.agent, "nobody listens on its control socket") from None
            try:
                sock.sendall(request.serialize())
                answer = read_box(sock)
            except (ConnectionError, socket.timeout) as e:
                # Connected to a dying agent: its socket was still open for a
                # moment after kill -9 (its threads were still exiting).
                raise AgentNotRunning(self.agent, f"the control connection broke: {e}") from None
        if b"_error" in answer:
            raise ControlError(self.agent, answer.get(b"_error_code", b"?").decode(),
                               answer.get(b"_error_description", b"").decode("utf-8", "replace"))
        return command.parseResponse(answer, None)


# ---------------------------------------------------------------------------
# The lab's view: every agent by name (used by ``mailpipe`` and ``Lab``)


class LabControl:
    """Queues, faults and counters of a lab's agents, by agent name."""

    def __init__(self, home, config):
        self.home, self.config = home, config

    def client(self, agent: str) -> ControlClient:
        self.config.agent(agent)  # KeyError for an unknown name
        return ControlClient(control_path(self.home, agent), agent)

    def queueing_agents(self) -> list[str]:
        return [s.name for s in self.config.agents() if s.role in QUEUE_ROLES]

    def _agents(self, agent: str | None) -> list[str]:
        if agent is None:
            return self.queueing_agents()
        if self.config.agent(agent).role not in QUEUE_ROLES:
            raise ControlError(agent, "NO_QUEUE", f"{agent} keeps no queue (only the MSA and MTAs do)")
        return [agent]

    # -- queues ------------------------------------------------------------

    def queue(self, agent: str | None = None) -> list[dict]:
        """Every queued message of ``agent`` (default: every queueing agent).

        An agent that is not running cannot answer, but its queue is on disk:
        then the spool is read directly and the entries say ``live: False``.
        """
        out = []
        for name in self._agents(agent):
            try:
                out += [{"agent": name, "live": True, **m} for m in self._live_queue(name)]
            except AgentNotRunning:
                out += [{"agent": name, "live": False, **m} for m in self._spool_queue(name)]
        return out

    def _live_queue(self, agent: str) -> list[dict]:
        client, messages, offset = self.client(agent), [], 0
        while True:
            page = client.call(QueueList, offset=offset, limit=PAGE)
            messages += page["messages"]
            offset += PAGE
            if offset >= page["total"] or not page["messages"]:
                return messages

    def _spool_queue(self, agent: str) -> list[dict]:
        from dataclasses import asdict

        from .spool import Spool

        root = self.home.spool(agent)
        if not (root / "queue").is_dir():
            return []
        items = Spool(root).scan()
        return [{**{k: v for k, v in asdict(i).items() if k in _MESSAGE_NAMES}, "active": False}
                for i in sorted(items, key=lambda i: i.received_at)]

    def _owner(self, queue_id: str, agent: str | None) -> str:
        """The agent whose queue holds ``queue_id`` (ids are unique across the lab)."""
        if agent is not None:
            return agent
        for m in self.queue():
            if m["queue_id"] == queue_id:
                if not m["live"]:
                    raise AgentNotRunning(m["agent"], f"{queue_id} is in its spool on disk")
                return m["agent"]
        raise ControlError("lab", "NO_SUCH_MESSAGE", f"no queued message {queue_id}")

    def show(self, queue_id: str, agent: str | None = None) -> dict:
        name = self._owner(queue_id, agent)
        return {"agent": name, **self.client(name).call(QueueShow, queue_id=queue_id)}

    def flush(self, agent: str | None = None, queue_id: str | None = None) -> dict[str, int]:
        """Retry now; returns ``{agent: messages flushed}`` for the running agents."""
        if queue_id is not None:
            name = self._owner(queue_id, agent)
            return {name: self.client(name).call(QueueFlush, queue_id=queue_id)["flushed"]}
        out = {}
        for name in self._agents(agent):
            try:
                out[name] = self.client(name).call(QueueFlush)["flushed"]
            except AgentNotRunning:
                if agent is not None:
                    raise
        return out

    def _act(self, command, queue_id: str, agent: str | None) -> str:
        name = self._owner(queue_id, agent)
        self.client(name).call(command, queue_id=queue_id)
        return name

    def delete(self, queue_id: str, agent: str | None = None) -> str:
        return self._act(QueueDelete, queue_id, agent)

    def hold(self, queue_id: str, agent: str | None = None) -> str:
        return self._act(QueueHold, queue_id, agent)

    def release(self, queue_id: str, agent: str | None = None) -> str:
        return self._act(QueueRelease, queue_id, agent)

    # -- faults and counters -------------------------------------------------

    def fault(self, agent: str, kind: str, **options) -> dict:
        """Set one fault on ``agent`` (see :mod:`agents.faults`); returns it."""
        options = {k: v for k, v in options.items() if v is not None}
        return {"agent": agent, **self.client(agent).call(FaultSetCommand, kind=kind, **options)}

    def clear_faults(self, agent: str | None = None) -> int:
        """Clear ``agent``'s faults (default: every running agent's); returns how many."""
        names = [agent] if agent else [s.name for s in self.config.agents() if s.role != "dns"]
        cleared = 0
        for name in names:
            try:
                cleared += self.client(name).call(FaultClear)["cleared"]
            except AgentNotRunning:
                if agent is not None:
                    raise
        return cleared

    def faults(self, agent: str | None = None) -> list[dict]:
        names = [agent] if agent else [s.name for s in self.config.agents() if s.role != "dns"]
        out = []
        for name in names:
            try:
                out += [{"agent": name, **f} for f in self.client(name).call(FaultList)["faults"]]
            except AgentNotRunning:
                if agent is not None:
                    raise
        return out

    def stats(self, agent: str) -> dict:
        answer = self.client(agent).call(Stats)
        answer["counters"] = {c["name"]: c["value"] for c in answer["counters"]}
        return answer
