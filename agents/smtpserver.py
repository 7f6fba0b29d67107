# -*- test-case-name: tests.test_smtpserver -*-
"""The hardened SMTP server that every mailpipe agent speaks (RFC 5321).

The protocol class builds on :class:`twisted.mail.smtp.ESMTP` (its cred
portal, AUTH challengers, STARTTLS context, idle timeout and EHLO keyword
formatting) but replaces the parts that are known to be unsafe in Twisted
26.10 (see ``docs`` and the regression tests in ``tests/test_smtpserver.py``):

* **Framing.** ``LineOnlyReceiver`` keeps executing lines that were buffered
  behind STARTTLS or behind a command whose answer is still pending. Here
  :meth:`SMTPServer.dataReceived` keeps its own bounded buffer and takes one
  line at a time, only while no reply is outstanding (RFC 2920 3.1). The
  replies to a pipelined group leave together, and always before the server
  waits for more input (RFC 2920 3.2; see :meth:`SMTPServer._send`).
* **DATA** is read by :class:`MessageReader`, an explicit state machine that
  never leaves the message before ``<CRLF>.<CRLF>`` (RFC 5321 4.1.1.4), even
  when the message is already known to be bad. That closes the
  "over-long line drops back to command mode" desync and SMTP smuggling.
* **BDAT** (CHUNKING, RFC 3030), which Twisted lacks: :class:`ChunkReader`
  takes exactly the octets each ``BDAT <size>`` announces, also when the
  command is refused, so the session stays in step.
* **Abuse** (:mod:`agents.security`): with ``ServerPolicy.login_throttle`` a
  failed AUTH is answered ever later and, past the limit, with ``421 4.7.0``
  and a hang-up; sender-chosen routing in RCPT (``<@relay:user@elsewhere>``,
  ``user@elsewhere@relay``) is refused as policy, ``550 5.7.1``, not as a
  syntax error; refusals are recorded as ``security.*`` trace events.
* **Policy and decisions** are not in the protocol. :class:`ServerPolicy` holds
  the limits; an :class:`SMTPHandler` answers hooks (``handle_MAIL`` ...) with a
  :class:`Reply`, ``None`` (the default answer), or a Deferred of either. The
  protocol applies the verdict, so a handler cannot break the state machine.

Every reply carries an RFC 3463 enhanced status code (RFC 2034), except the
greeting and the answers to HELO/EHLO/LHLO, where RFC 2034 section 3 forbids it.
"""

from __future__ import annotations

import base64
import binascii
import enum
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from twisted.cred import error as cred_error
from twisted.cred.credentials import CramMD5Credentials
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer, protocol
from twisted.internet.interfaces import IHandshakeListener, ISSLTransport, ITLSTransport
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.mail.imap4 import PLAINCredentials
from twisted.mail.interfaces import IMessageDelivery
from twisted.python.failure import Failure
from zope.interface import implementer

from agents.security import LoginBlocked, ThrottledPortal, routing_trick, tls_failure
from agents.security import event as security_event
from agents.net import no_delay
from agents.tls import session_resumed
from agents.trace import NULL_TRACER, Tracer, working_for

_log = Logger()


# ---------------------------------------------------------------------------
# Values exchanged with handlers


@dataclass(frozen=True)
class Reply:
    """One SMTP reply: basic code (RFC 5321 4.2), enhanced status (RFC 3463), text.

    ``status`` is ``""`` only where RFC 2034 section 3 says not to send one
    (greeting, EHLO answers) or for 3xx intermediate replies (354, 334).
    A ``"\\n"`` in ``text`` makes a multi-line reply (RFC 5321 4.2.1).
    """

    code: int
    status: str
    text: str

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300

    def lines(self) -> list[bytes]:
        """The reply as wire lines without CRLF; the status repeats on every line."""
        texts = self.text.replace("\r", "").split("\n")
        prefix = f"{self.status} " if self.status else ""
        last = len(texts) - 1
        return [
            f"{self.code}{' ' if i == last else '-'}{prefix}{t}".encode("ascii", "replace")
            for i, t in enumerate(texts)
        ]


@dataclass
class Session:
    """What the server knows about one connection (lives until it closes)."""

    conn_id: str
    peer: str
    helo: str | None = None  # argument of HELO/EHLO/LHLO, None before it
    esmtp: bool = False  # True after EHLO or LHLO
    tls: bool = False  # STARTTLS done or implicit TLS
    user: str | None = None  # authenticated identity (cred avatar id)
    notes: dict = field(default_factory=dict)  # free for handlers


@dataclass
class Envelope:
    """One mail transaction (RFC 5321 3.3): reset by RSET, EHLO, STARTTLS and after DATA."""

    mail_from: str | None = None  # None before MAIL; "" for the null sender <>
    mail_options: dict[str, str | None] = field(default_factory=dict)
    rcpt_tos: list[str] = field(default_factory=list)  # accepted recipients only
    rcpt_options: list[dict[str, str | None]] = field(default_factory=list)
    content: bytes = b""  # CRLF line endings, dot-unstuffed, no final ".\r\n"


class SMTPHandler:
    """Decides what the server accepts. Subclass it; every default accepts.

    A hook returns a :class:`Reply`, ``None`` for the protocol's default
    success reply, or a Deferred firing with either. A 2xx reply accepts; any
    other code rejects. If a hook raises (or its Deferred fails) the client
    gets ``451 4.3.0`` and the session goes on.
    """

    def handle_CONNECT(self, session: Session) -> Reply | None:
        """A 4xx/5xx refuses the session (RFC 5321 3.1); ``None`` greets it."""
        return None

    def handle_EHLO(self, session: Session, hostname: str) -> Reply | None:
        """Called for HELO, EHLO and LHLO; ``session.esmtp`` tells which."""
        return None

    def handle_MAIL(self, session: Session, envelope: Envelope, address: str, options: dict):
        return None

    def handle_RCPT(self, session: Session, envelope: Envelope, address: str, options: dict):
        return None

    def handle_AUTH(self, session: Session, user: str) -> Reply | None:
        """After the password checked out: ``None`` logs the user in; a 4xx or
        5xx reply is sent instead and the session stays unauthenticated."""
        return None

    def handle_DATA(self, session: Session, envelope: Envelope):
        """Take responsibility for ``envelope.content``.

        The protocol says 250 only when this returns a 2xx :class:`Reply`, so
        a real handler answers after its copy is on stable storage (RFC 5321
        4.1.1.4, 6.1). LMTP handlers return a list, one reply per recipient.
        """
        return Reply(250, "2.0.0", "OK: message accepted")


# ---------------------------------------------------------------------------
# Policy

#: SASL mechanism name -> zero-argument factory of a Twisted IChallengeResponse.
_MECHANISMS: dict[str, Callable[[SMTPServer], Any]] = {
    "PLAIN": lambda server: PLAINCredentials(),
    "LOGIN": lambda server: smtp.LOGINCredentials(),
    "CRAM-MD5": lambda server: CramMD5Credentials(server.host),
}



@dataclass
class ServerPolicy:
    """Every limit and switch of one listener, in one place."""

    # RFC 5321 4.1.1.1, 4.3.1: the name in the greeting and the EHLO reply.
    hostname: str = "localhost"
    # RFC 1870: advertised as SIZE, checked on MAIL SIZE= and while reading.
    max_message_size: int = 10 * 1024 * 1024
    # RFC 5321 4.5.3.1.8: at least 100 must be accepted; more get 452 4.5.3.
    max_recipients: int = 100
    # RFC 3207: STARTTLS is offered when set and the transport can start TLS.
    tls_context: Any = None
    # RFC 8314 3.3: the listener is wrapped in TLS from the first byte (465).
    implicit_tls: bool = False
    # RFC 6409 4.3, RFC 4954 6: MAIL before AUTH gets 530 5.7.0.
    require_auth: bool = False
    # RFC 4954, RFC 4616: SASL mechanisms, offered only under TLS (RFC 4954 4).
    auth_mechanisms: tuple[str, ...] = ("PLAIN", "LOGIN")
    # RFC 5321 4.5.3.2.7: a server waits at least 5 minutes for a command.
    timeout: float = 300.0
    # RFC 5321 4.5.3.1.4: a command line is at most 512 octets with CRLF.
    max_command_line: int = 512
    # RFC 5321 4.5.3.1.6: a text line is at most 1000 octets with CRLF.
    max_text_line: int = 1000
    # RFC 4954 4: AUTH lines may be up to 12288 octets.
    max_auth_line: int = 12288
    # Not in any RFC: a line with no LF after this many octets is an attack
    # or a broken peer; the server says 421 4.7.0 and hangs up.
    max_line_buffer: int = 64 * 1024
    # RFC 2920 3.1 lets a client send commands without waiting; while a reply
    # is pending the server stops reading once this much input is queued.
    pipeline_high_water: int = 256 * 1024
    # agents.security.LoginThrottle: failed AUTH is answered ever later, then
    # 421 4.7.0 and a disconnect. One per agent process, shared by its listeners.
    login_throttle: Any = None
    # RFC 3030: offer CHUNKING, so a client can send BDAT <size> LAST and the
    # message in the same write as MAIL and RCPT: one round trip, not three.
    chunking: bool = True

    def __post_init__(self) -> None:
        unknown = set(self.auth_mechanisms) - set(_MECHANISMS)
        if unknown:
            raise ValueError(f"unsupported SASL mechanisms: {sorted(unknown)}")
        if self.max_message_size <= 0:  # RFC 1870 4: SIZE 0 would mean "no limit"
            raise ValueError("max_message_size must be positive")


LOCAL_ERROR = Reply(451, "4.3.0", "Requested action aborted: local error in processing")


class Hangup:
    """A hook's verdict that is no reply at all: drop the connection now.

    What a crash or a cut cable looks like to the client. Fault injection
    (:mod:`agents.faults`) returns :data:`HANGUP` from ``handle_DATA`` to
    cut a connection after the message but before the answer: the client
    cannot know whether the message was taken (RFC 1047), so it must retry,
    and the receiver may get it twice (RFC 5321 6.1 allows duplicates, never loss).
    """

    def __repr__(self) -> str:
        return "HANGUP"


HANGUP = Hangup()


# ---------------------------------------------------------------------------
# Command argument syntax (RFC 5321 4.1.2, 4.1.1.2-3)


class SyntaxProblem(ValueError):
    """An argument that does not follow RFC 5321 4.1.2; the text goes to the client."""


_ATOM = rb"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_QUOTED = rb'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"'
_LABEL = rb"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_MAILBOX = re.compile(
    rb"(?:%s(?:\.%s)*|%s)@(?:%s(?:\.%s)*|\[[\x21-\x5a\x5e-\x7e]+\])\Z"
    % (_ATOM, _ATOM, _QUOTED, _LABEL, _LABEL)
)
_PATH_ARG = rb'[ \t]*<(?P<path>(?:"(?:[^"\\]|\\.)*"|[^<>"])*)>(?:[ \t]+(?P<params>.*))?\Z'
_MAIL_ARG = re.compile(rb"FROM:" + _PATH_ARG, re.I)
_RCPT_ARG = re.compile(rb"TO:" + _PATH_ARG, re.I)
_HELO_NAME = re.compile(rb"[\x21-\x7e]{1,255}\Z")
_BDAT_ARG = re.compile(rb"(\d{1,20})(?:[ \t]+(LAST))?", re.I)
_PARAM = re.compile(rb"([A-Za-z0-9][A-Za-z0-9-]*)(?:=([\x21-\x3c\x3e-\x7e]+))?\Z")


def parse_path(path: bytes, *, null_ok: bool) -> str:
    """Check a reverse- or forward-path (without its angle brackets)."""
    if path == b"":
        if null_ok:
            return ""
        raise SyntaxProblem("Empty address not allowed here")
    if path.startswith(b"@"):
        # RFC 5321 4.1.1.3 lets servers ignore source routes; mailpipe refuses
        # them so a learner never sees a relay path it will not honour.
        raise SyntaxProblem("Source routes are not accepted")
    if not null_ok and path.lower() == b"postmaster":
        return "postmaster"  # RFC 5321 4.5.1: <Postmaster> with no domain
    if len(path) > 254 or not _MAILBOX.match(path):  # 4.5.3.1.3: 256 with <>
        raise SyntaxProblem("Bad address syntax")
    local, _, domain = path.rpartition(b"@")
    if len(local) > 64 or len(domain) > 255:  # RFC 5321 4.5.3.1.1-2
        raise SyntaxProblem("Address too long")
    return path.decode("ascii")


def parse_params(text: bytes | None) -> dict[str, str | None]:
    """``KEY[=VALUE] ...`` (RFC 5321 4.1.2 esmtp-param) as an upper-case-keyed dict."""
    params: dict[str, str | None] = {}
    for token in (text or b"").split():
        m = _PARAM.match(token)
        if not m:
            raise SyntaxProblem("Bad parameter syntax")
        key = m.group(1).decode("ascii").upper()
        if key in params:
            raise SyntaxProblem(f"Duplicate parameter {key}")
        params[key] = m.group(2).decode("ascii") if m.group(2) is not None else None
    return params


# ---------------------------------------------------------------------------
# The DATA reader


class DataState(enum.Enum):
    """Where a message stands while it is read; anything but NOMINAL rejects it."""

    NOMINAL = "nominal"
    TOO_LONG = "too_long"  # a text line over RFC 5321 4.5.3.1.6
    TOO_MUCH = "too_much"  # over the SIZE limit (RFC 1870)
    BAD_NEWLINE = "bad_newline"  # bare CR or LF (RFC 5321 2.3.8)


class _MessageBuffer:
    """What both readers share: the message so far, its size, the first fault."""

    chunks: int | None = None  # BDAT chunks read (None: the message came by DATA)

    def __init__(self, max_size: int, max_line: int):
        self.max_size, self.max_line = max_size, max_line
        self.state = DataState.NOMINAL
        self.size = 0  # octets of the message seen so far
        self._parts: list[bytes] = []

    def _fail(self, state: DataState) -> None:
        self.state = state
        self._parts = []  # keep nothing we are going to refuse

    def _line_fault(self, text: bytes) -> DataState | None:
        """What is wrong with ``text`` (whole lines) under RFC 5321's line rules,
        checked in a few C-speed passes: a bare CR or LF (2.3.8), or a line
        longer than ``max_line`` with its CRLF (4.5.3.1.6)."""
        crlf = text.count(b"\r\n")
        if text.count(b"\n") != crlf or text.count(b"\r") != crlf:
            return DataState.BAD_NEWLINE
        if text and max(map(len, text.split(b"\r\n"))) + 2 > self.max_line:
            return DataState.TOO_LONG
        return None

    def content(self) -> bytes:
        return b"".join(self._parts)

    def rejection(self) -> Reply | None:
        """The reply for a faulty message, or None if it was fine."""
        return _DATA_REJECTIONS.get(self.state)


class ChunkReader(_MessageBuffer):
    """Reads one message sent in BDAT chunks (RFC 3030 2), exactly as sent.

    No dot-stuffing and no end-of-data line: each ``BDAT <size>`` says where
    its chunk ends, so ``<CRLF>.<CRLF>`` is just text and the SMTP
    smuggling tricks have nothing to aim at. The message must still be
    text in CRLF lines of at most 1000 octets (we offer no BINARYMIME):
    the size limit is checked as chunks come, the lines once, at LAST, over
    the whole message. A message whose last line has no CRLF gets one, as
    every DATA message has one before its dot.
    """

    def __init__(self, max_size: int, max_line: int):
        super().__init__(max_size, max_line)
        self.chunks = 0

    def feed(self, data: bytes) -> None:
        """Some octets of the current chunk."""
        self.size += len(data)
        if self.state is DataState.NOMINAL:
            if self.size > self.max_size:
                self._fail(DataState.TOO_MUCH)
            else:
                self._parts.append(data)

    def finish(self) -> None:
        """BDAT LAST has been read: check the lines of the whole message."""
        if self.state is not DataState.NOMINAL:
            return
        text = self.content()
        if text and not text.endswith(b"\r\n"):
            text += b"\r\n"
        fault = self._line_fault(text)
        if fault is not None:
            self._fail(fault)
        else:
            self._parts = [text]


class MessageReader(_MessageBuffer):
    """Reads one message after 354, line by line, up to ``<CRLF>.<CRLF>``.

    Only a line that is exactly ``.\\r\\n`` and follows a CRLF ends the data
    (RFC 5321 4.1.1.4), so ``\\n.\\n``, ``\\n.\\r\\n``, ``\\r\\n.\\n`` and
    ``\\r.\\r\\n`` stay inside the message (the SMTP smuggling variants). A
    fault does not end the message early: the reader discards the rest and
    keeps reading to the real end, so the client and server stay in step and
    the answer comes once, after the dot (RFC 5321 4.2.5). The first fault
    decides the reply.
    """

    def __init__(self, max_size: int, max_line: int):
        super().__init__(max_size, max_line)  # size: octets of the unstuffed message
        self.fast = True  # feed_block may take whole runs of lines
        # The CRLF that ended the DATA command counts as the first CRLF of
        # <CRLF>.<CRLF>: "DATA\r\n.\r\n" is an empty message.
        self._after_crlf = True

    def feed(self, line: bytes) -> bool:
        """Take one line ending in LF; return True when it was the final dot."""
        crlf = line.endswith(b"\r\n")
        if crlf and self._after_crlf and line == b".\r\n":
            return True
        self._after_crlf = crlf
        text = line[:-2] if crlf else line[:-1]
        if text.startswith(b"."):
            text = text[1:]  # dot-unstuffing, RFC 5321 4.5.2
        self.size += len(text) + 2
        if self.state is DataState.NOMINAL:
            if not crlf or b"\r" in text:
                self._fail(DataState.BAD_NEWLINE)
            elif len(text) + 2 > self.max_line:  # the stuffed dot does not count
                self._fail(DataState.TOO_LONG)
            elif self.size > self.max_size:
                self._fail(DataState.TOO_MUCH)
            else:
                self._parts.append(text + b"\r\n")
        return False

    def feed_block(self, buffer) -> tuple[int, bool]:
        """The fast path: take a run of whole, ordinary lines at once.

        Returns ``(octets used, whether the final dot was among them)``. It
        does exactly what :meth:`feed` would do line by line, with a few
        C-speed passes over the block instead of a Python step per line, and
        only when nothing in the block needs a decision: every line ends in
        CRLF, none is near the length limit, the size stays under the limit.
        Otherwise it answers ``(0, False)`` and, for the rest of this message,
        leaves every line to :meth:`feed`, which finds the fault exactly.
        """
        if not self.fast or self.state is not DataState.NOMINAL or not self._after_crlf:
            return 0, False
        end = buffer.rfind(b"\n") + 1  # whole lines only
        if end == 0 or buffer.startswith(b".\r\n"):
            return 0, False  # nothing whole yet, or the final dot itself: feed() takes it
        stop = buffer.find(b"\r\n.\r\n", 0, end)
        text = bytes(buffer[: stop + 2 if stop >= 0 else end])
        unstuffed = (text[1:] if text.startswith(b".") else text).replace(b"\r\n.", b"\r\n")
        if self._line_fault(text) is not None or self.size + len(unstuffed) > self.max_size:
            self.fast = False
            return 0, False
        self.size += len(unstuffed)
        self._parts.append(unstuffed)
        return (stop + 5, True) if stop >= 0 else (end, False)


_DATA_REJECTIONS = {
    # RFC 5321 4.2.2 uses 500 for "line too long"; X.5.2 is RFC 3463's syntax
    # error (X.5.6 is taken by RFC 4954 for over-long AUTH lines).
    DataState.TOO_LONG: Reply(500, "5.5.2", "Line too long in message data (max 1000 octets)"),
    DataState.TOO_MUCH: Reply(552, "5.3.4", "Message size exceeds fixed maximum message size"),
    DataState.BAD_NEWLINE: Reply(554, "5.6.0", "Bare CR or LF not allowed in message data"),
}


# ---------------------------------------------------------------------------
# The protocol


class _Mode(enum.Enum):
    COMMAND = "command"
    AUTH = "auth"  # inside a SASL exchange (RFC 4954 4)
    DATA = "data"
    CHUNK = "chunk"  # reading the octets of a BDAT chunk (RFC 3030 2)


@implementer(IHandshakeListener)
class SMTPServer(smtp.ESMTP):
    """One SMTP connection: framing, command sequence and replies.

    Built with ``(policy, handler, portal, tracer)`` by :class:`SMTPServerFactory`.
    """

    #: The verbs this server knows; anything else gets 500 5.5.1.
    COMMANDS = frozenset(
        {"HELO", "EHLO", "MAIL", "RCPT", "DATA", "BDAT", "RSET", "NOOP", "QUIT",
         "VRFY", "EXPN", "HELP", "STARTTLS", "AUTH"}
    )  # fmt: skip
    PROTOCOL_NAME = "ESMTP"

    def __init__(self, policy: ServerPolicy, handler: SMTPHandler, portal=None,
                 tracer: Tracer = NULL_TRACER):  # fmt: skip
        challengers = {
            name.encode(): (lambda make=_MECHANISMS[name]: make(self))
            for name in policy.auth_mechanisms
        }
        super().__init__(chal=challengers, contextFactory=policy.tls_context)
        self.policy, self.handler, self.portal, self.tracer = policy, handler, portal, tracer
        self.host = policy.hostname
        self.timeout = policy.timeout
        self.session = Session(conn_id="-", peer="-")
        self.envelope = Envelope()
        self._buffer = bytearray()
        self._mode = _Mode.COMMAND
        self._reader: MessageReader | None = None
        self._chunks: ChunkReader | None = None  # this transaction's BDAT chunks so far
        self._chunk_left = 0  # octets of the current chunk still to read
        self._chunk_last = False  # the current chunk is BDAT ... LAST
        self._chunk_refusal: Reply | None = None  # the answer to a chunk we only skip
        self._waiting = False  # a reply is pending: read no further lines
        self._out: list[bytes] = []  # replies held back to go out together (_flush)
        self._holding = False  # _drain is working through pipelined input
        self._closing = False
        self._paused = False  # we paused the transport (flow control)
        self._refused = False  # handle_CONNECT refused: only QUIT (RFC 5321 3.1)
        self._rcpt_tried = False  # any RCPT in this transaction, even refused
        self._mechanism = ""
        self._handshake_done = False  # a TLS handshake completed (for security.tls_failed)

    # -- connection life ---------------------------------------------------

    def connectionMade(self) -> None:
        no_delay(self.transport)  # see agents.net: no 40 ms stalls between replies
        peer = self.transport.getPeer()
        tls = self.policy.implicit_tls or ISSLTransport.providedBy(self.transport)
        self.canStartTLS = (
            not tls and self.ctx is not None and ITLSTransport.providedBy(self.transport)
        )
        self.session = Session(
            conn_id=self.tracer.new_connection_id(),
            peer=getattr(peer, "host", str(peer)),
            tls=bool(tls),
        )
        self._event("connection.accepted", tls=self.session.tls)
        if self.policy.login_throttle is not None and self.portal is not None:
            self.portal = ThrottledPortal(self.portal, self.policy.login_throttle, self.session.peer,
                                          protocol="smtp", tracer=self.tracer, conn=self.session.conn_id)
        self.setTimeout(self.policy.timeout)
        self._when_ready(self._call_hook("handle_CONNECT", self.session), self._greet)

    def greeting(self) -> bytes:
        return self.host + b" " + self.PROTOCOL_NAME.encode() + b" mailpipe"

    def _greet(self, outcome) -> None:
        """220, or a refusal: RFC 5321 3.1 allows only 421 (close now) or 554
        (then answer 503 to everything but QUIT) instead of the greeting."""
        verdict = self._verdict(outcome, "handle_CONNECT", default=None)
        if verdict is None or verdict.ok:
            self._send(Reply(220, "", self.greeting().decode("ascii", "replace")))
        elif verdict.code // 100 == 4:  # a handler error (451) is transient too
            self._close_with(Reply(421, verdict.status, verdict.text))
        else:
            self._refused = True
            self._send(Reply(554, verdict.status, verdict.text))

    def timeoutConnection(self) -> None:
        """Idle too long (RFC 5321 4.5.3.2.7): say so, then close."""
        self._close_with(Reply(421, "4.4.2", f"{self.policy.hostname} Error: timeout exceeded"))

    def connectionLost(self, reason=protocol.connectionDone) -> None:
        self._closing = True
        self._reader = None
        if self.session.tls and not self._handshake_done:
            security_event(self.tracer, "security.tls_failed", conn=self.session.conn_id,
                           peer=self.session.peer, protocol="smtp", reason=tls_failure(reason))
        self._event("connection.closed")
        smtp.ESMTP.connectionLost(self, reason)  # cred logout, cancel the timer

    def handshakeCompleted(self) -> None:
        """IHandshakeListener: the TLS handshake finished (STARTTLS or implicit).

        The negotiated version and cipher go to ``session.notes["tls_version"]``
        and ``["tls_cipher"]`` for the Received header (RFC 8314 7.4).
        """
        self.session.tls = True
        self._handshake_done = True
        try:
            handle = self.transport.getHandle()
            self.session.notes["tls_version"] = handle.get_protocol_version_name()
            self.session.notes["tls_cipher"] = handle.get_cipher_name()
            self.session.notes["tls_resumed"] = session_resumed(handle)
        except Exception:  # not every transport exposes the OpenSSL object
            pass
        notes = self.session.notes
        self._event("tls.done", version=notes.get("tls_version"), cipher=notes.get("tls_cipher"),
                    resumed=notes.get("tls_resumed"))

    # -- framing -----------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        """Buffer input; take lines one at a time while no reply is pending."""
        if self._closing:
            return
        self.resetTimeout()
        self._buffer += data
        self._drain()

    def _drain(self) -> None:
        self._holding = True
        while not self._waiting and not self._closing:
            if self._mode is _Mode.CHUNK:
                if not self._buffer:
                    break
                self._chunk_octets()
                continue
            if self._mode is _Mode.DATA:
                used, done = self._reader.feed_block(self._buffer)
                if used:
                    del self._buffer[:used]
                    if done:
                        self._end_of_data()
                    continue
            end = self._buffer.find(b"\n")
            if end < 0:
                break
            line = bytes(self._buffer[: end + 1])
            del self._buffer[: end + 1]
            if self._mode is _Mode.DATA:
                self._data_line(line)
            elif self._mode is _Mode.AUTH:
                self._auth_line(line)
            else:
                self._command_line(line)
        if not self._waiting:  # from here on we wait for the client
            self._holding = False
            self._flush()
        self._flow_control()

    def _flow_control(self) -> None:
        """Bound memory: close on an endless line, pause a client that floods."""
        if self._closing:
            return
        partial = len(self._buffer) - (self._buffer.rfind(b"\n") + 1)
        if partial > self.policy.max_line_buffer:
            self._buffer.clear()
            self._close_with(Reply(421, "4.7.0", "Line too long, closing connection"))
        elif self._waiting and len(self._buffer) > self.policy.pipeline_high_water:
            if not self._paused:
                self._paused = True
                self.transport.pauseProducing()
        elif self._paused and not self._waiting:
            self._paused = False
            self.transport.resumeProducing()

    # -- replies and hooks -------------------------------------------------

    def sendCode(self, code: int, message: bytes = b"") -> None:
        """Twisted's reply writer, kept for compatibility: routed through :meth:`_send`."""
        self._send(Reply(code, "", message.decode("ascii", "replace")))

    def _send(self, reply: Reply, verb: str = "") -> None:
        """Answer the client; while pipelined input is being worked through,
        the answer waits in ``_out`` to go out with the ones after it.

        RFC 2920 3.2 lets a server hold the replies to a group of commands and
        send them as a unit, as long as it never waits for *input* with
        replies unsent. So :meth:`_drain` flushes whenever it runs out of
        input. While a hook is pending (a BDAT LAST waiting for its fsync)
        nothing is read, so the replies to MAIL and RCPT wait for the one to
        the message, and the client gets all three in one segment: one
        ``send`` and one wake-up for the pair of processes instead of two.
        """
        for line in reply.lines():
            self.tracer.line(self.session.conn_id, "S", line, peer=self.session.peer)
            self._out.append(line + b"\r\n")
        if not self._holding:
            self._flush()
        if reply.code >= 400:
            self._event("smtp.reject", code=reply.code, status=reply.status, command=verb or None)

    def _flush(self) -> None:
        """Write the replies held back so far, in order, in one write."""
        if self._out:
            data = b"".join(self._out)
            self._out.clear()
            self.transport.write(data)

    def _close_with(self, reply: Reply, verb: str = "") -> None:
        self._send(reply, verb)
        self._flush()
        self._closing = True
        self.transport.loseConnection()

    def _event(self, name: str, **fields: Any) -> None:
        self.tracer.event(name, conn=self.session.conn_id, peer=self.session.peer, **fields)

    def _security(self, name: str, **fields: Any) -> None:
        """A ``security.*`` event (see agents.security.EVENTS) for ``mailpipe monitor``."""
        security_event(self.tracer, name, conn=self.session.conn_id, peer=self.session.peer,
                       protocol="smtp", user=self.session.user, **fields)

    def _call_hook(self, name: str, *args: Any) -> defer.Deferred:
        hook = getattr(self.handler, name, None)
        if hook is None:
            return defer.succeed(None)
        with working_for(conn=self.session.conn_id):  # e.g. SPF's DNS lookups name this session
            return defer.maybeDeferred(hook, *args)

    def _verdict(self, outcome: Any, hook: str, default: Reply | None) -> Reply | None:
        """Turn what a hook gave into a reply; anything odd becomes 451 4.3.0."""
        if isinstance(outcome, Failure):
            _log.failure("{hook} failed", outcome, hook=hook)
            return LOCAL_ERROR
        if outcome is None:
            return default
        if isinstance(outcome, Reply) and outcome.code // 100 in (2, 4, 5):
            return outcome
        _log.error("{hook} returned {verdict!r}, not a Reply", hook=hook, verdict=outcome)
        return LOCAL_ERROR

    def _when_ready(self, d: defer.Deferred, apply: Callable[[Any], None]) -> None:
        """Apply a hook's outcome; while it is pending, read no further input.

        This is what keeps pipelined replies in command order (RFC 2920 3.1;
        Twisted issue #8126). The idle timer is off while *we* are the slow
        side and comes back when the reply has gone out.
        """
        fired_now = True
        done = False

        def ready(outcome):
            nonlocal done
            done = True
            if self._closing:
                return None
            if isinstance(outcome, Hangup):
                self._event("connection.dropped", reason="handler hung up")
                self._closing = True
                self.transport.abortConnection()
                return None
            try:
                apply(outcome)
            except Exception:
                _log.failure("applying a verdict failed")
                self._send(LOCAL_ERROR)
            if not fired_now:
                self._waiting = False
                self.setTimeout(self.policy.timeout)
                self._drain()
            return None

        d.addBoth(ready)
        fired_now = False
        if not done:
            self._waiting = True
            self.setTimeout(None)

    # -- commands ----------------------------------------------------------

    def lookupMethod(self, command: bytes):
        """Only the verbs in :attr:`COMMANDS`; never an inherited Twisted one."""
        verb = command.decode("ascii", "replace").upper()
        if verb not in self.COMMANDS:
            return None
        return super().lookupMethod(verb)

    def _command_line(self, line: bytes) -> None:
        crlf = line.endswith(b"\r\n")
        text = line[:-2] if crlf else line[:-1]
        self._trace_in(text[: self.policy.max_command_line])
        is_auth = text[:5].upper() == b"AUTH "
        limit = self.policy.max_auth_line if is_auth else self.policy.max_command_line
        if len(line) > limit:
            if is_auth:  # RFC 4954 4
                self._send(Reply(500, "5.5.6", "Authentication Exchange line is too long"))
            else:  # RFC 5321 4.5.3.1.4
                self._send(Reply(500, "5.5.2", "Line too long"))
            return
        if not crlf or b"\r" in text:  # RFC 5321 2.3.8
            self._send(Reply(500, "5.5.2", "Bare CR or LF not allowed, use CRLF"))
            return
        parts = text.strip().split(None, 1)
        if not parts:
            self._send(Reply(500, "5.5.2", "Syntax error"))
            return
        verb = parts[0].decode("ascii", "replace").upper()
        arg = parts[1] if len(parts) > 1 else b""
        if self._refused and verb != "QUIT":  # RFC 5321 3.1
            self._send(Reply(503, "5.5.1", "Service refused, only QUIT is allowed"), verb)
            return
        method = self.lookupMethod(parts[0])
        if method is None:
            self._send(self._unknown_command(verb), verb)
            return
        method(arg)

    def _unknown_command(self, verb: str) -> Reply:
        return Reply(500, "5.5.1", "Command unrecognized")

    def _trace_in(self, text: bytes) -> None:
        self.tracer.line(self.session.conn_id, "C", text, peer=self.session.peer)

    def _reset_transaction(self) -> None:
        self.envelope = Envelope()
        self._rcpt_tried = False
        self._chunks = None

    def extensions(self) -> dict[bytes, list[bytes] | None]:
        """EHLO keywords (RFC 5321 4.1.1.1), formatted by ESMTP.listExtensions."""
        ext: dict[bytes, list[bytes] | None] = {
            b"PIPELINING": None,  # RFC 2920
            b"SIZE": [str(self.policy.max_message_size).encode()],  # RFC 1870
            b"8BITMIME": None,  # RFC 6152
            b"ENHANCEDSTATUSCODES": None,  # RFC 2034
        }
        if self.policy.chunking:
            ext[b"CHUNKING"] = None  # RFC 3030
        if self.canStartTLS and not self.session.tls:
            ext[b"STARTTLS"] = None  # RFC 3207
        if self._auth_offered() and self.session.tls:
            ext[b"AUTH"] = list(self.challengers)  # RFC 4954, only under TLS
        return ext

    def _auth_offered(self) -> bool:
        return self.portal is not None and bool(self.challengers)

    def do_HELO(self, arg: bytes) -> None:
        self._hello(arg, esmtp=False, verb="HELO")

    def do_EHLO(self, arg: bytes) -> None:
        self._hello(arg, esmtp=True, verb="EHLO")

    def _hello(self, arg: bytes, esmtp: bool, verb: str) -> None:
        """HELO/EHLO/LHLO (RFC 5321 4.1.1.1). No enhanced codes here (RFC 2034 3)."""
        name = arg.strip()
        if not _HELO_NAME.match(name):  # one domain or address literal, printable ASCII
            self._send(Reply(501, "", f"Syntax: {verb} hostname"), verb)
            return
        hostname = name.decode("ascii")
        previous = (self.session.helo, self.session.esmtp)
        self.session.helo, self.session.esmtp = hostname, esmtp

        def apply(outcome):
            verdict = self._verdict(outcome, "handle_EHLO", default=None)
            if verdict is not None and not verdict.ok:
                self.session.helo, self.session.esmtp = previous
                self._send(verdict, verb)
                return
            self._reset_transaction()  # RFC 5321 4.1.4: like RSET
            self._event("smtp.ehlo", helo=hostname, esmtp=esmtp)
            text = f"{self.policy.hostname} greets {hostname}"
            if esmtp:
                text += "\n" + self.listExtensions().decode("ascii")
            self._send(Reply(250, "", text))

        self._when_ready(self._call_hook("handle_EHLO", self.session, hostname), apply)

    def do_MAIL(self, arg: bytes) -> None:
        if not self.session.helo:
            return self._send(Reply(503, "5.5.1", "Send HELO/EHLO first"), "MAIL")
        if self.envelope.mail_from is not None:
            return self._send(Reply(503, "5.5.1", "Nested MAIL command"), "MAIL")
        if self.policy.require_auth and not self.session.user:
            return self._send(Reply(530, "5.7.0", "Authentication required"), "MAIL")
        m = _MAIL_ARG.match(arg)
        try:
            if not m:
                raise SyntaxProblem("Syntax: MAIL FROM:<address> [parameters]")
            address = parse_path(m.group("path"), null_ok=True)
        except SyntaxProblem as e:
            return self._send(Reply(501, "5.1.7", str(e)), "MAIL")
        try:
            options = parse_params(m.group("params"))
        except SyntaxProblem as e:
            return self._send(Reply(501, "5.5.4", str(e)), "MAIL")
        problem = self._check_mail_options(options)
        if problem:
            return self._send(problem, "MAIL")
        self._event("smtp.mail", mail_from=address, size=options.get("SIZE"))

        def apply(outcome):
            verdict = self._verdict(outcome, "handle_MAIL", Reply(250, "2.1.0", "Sender OK"))
            if verdict.ok:
                self.envelope.mail_from, self.envelope.mail_options = address, options
            self._send(verdict, "MAIL")

        hook = self._call_hook("handle_MAIL", self.session, self.envelope, address, options)
        self._when_ready(hook, apply)

    def _check_mail_options(self, options: dict[str, str | None]) -> Reply | None:
        """SIZE (RFC 1870 6) and BODY (RFC 6152 2); nothing else is known (555)."""
        for key, value in options.items():
            if not self.session.esmtp:  # parameters need EHLO (RFC 5321 4.1.1.11)
                return Reply(555, "5.5.4", "MAIL parameters need EHLO")
            if key == "SIZE":
                if value is None or not value.isdigit() or len(value) > 20:
                    return Reply(501, "5.5.4", "Syntax: SIZE=<octets>")
                if int(value) > self.policy.max_message_size:
                    return Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
            elif key == "BODY":
                if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                    return Reply(501, "5.5.4", "Syntax: BODY=7BIT|8BITMIME")
            else:
                return Reply(555, "5.5.4", f"MAIL parameter {key} not recognized")
        return None

    def do_RCPT(self, arg: bytes) -> None:
        if self.envelope.mail_from is None:
            return self._send(Reply(503, "5.5.1", "Need MAIL before RCPT"), "RCPT")
        m = _RCPT_ARG.match(arg)
        try:
            if not m:
                raise SyntaxProblem("Syntax: RCPT TO:<address> [parameters]")
            address = parse_path(m.group("path"), null_ok=False)
        except SyntaxProblem as e:
            # Sender-chosen routing (source routes, several @, bang paths...) is
            # a relay attempt, not a typo: refuse it as policy (RFC 5321 3.6.1).
            trick = routing_trick(m.group("path")) if m else None
            if trick is not None:
                self._security("security.relay_denied", rcpt=m.group("path").decode("ascii", "replace"), reason=trick)
                return self._send(Reply(550, "5.7.1", f"Sender-specified routing is not accepted ({trick})"), "RCPT")
            return self._send(Reply(501, "5.1.3", str(e)), "RCPT")
        try:
            options = parse_params(m.group("params"))
        except SyntaxProblem as e:
            return self._send(Reply(501, "5.5.4", str(e)), "RCPT")
        if options:  # no RCPT extension (DSN etc.) is offered
            return self._send(Reply(555, "5.5.4", "RCPT parameters not recognized"), "RCPT")
        self._rcpt_tried = True
        if len(self.envelope.rcpt_tos) >= self.policy.max_recipients:
            # RFC 5321 4.5.3.1.10: 452, the client sends the rest later.
            return self._send(Reply(452, "4.5.3", "Too many recipients"), "RCPT")
        self._event("smtp.rcpt", rcpt_to=address)

        def apply(outcome):
            verdict = self._verdict(outcome, "handle_RCPT", Reply(250, "2.1.5", "Recipient OK"))
            if verdict.ok:
                self.envelope.rcpt_tos.append(address)
                self.envelope.rcpt_options.append(options)
            self._send(verdict, "RCPT")

        hook = self._call_hook("handle_RCPT", self.session, self.envelope, address, options)
        self._when_ready(hook, apply)

    def _not_ready_for_data(self) -> Reply | None:
        """Why a transaction cannot take its message yet (DATA or BDAT), if it cannot."""
        if self.envelope.mail_from is None:
            return Reply(503, "5.5.1", "Need MAIL command")
        if not self.envelope.rcpt_tos:
            if self._rcpt_tried:  # RFC 5321 3.3: 554 "no valid recipients"
                return Reply(554, "5.5.1", "No valid recipients")
            return Reply(503, "5.5.1", "Need RCPT command")
        return None

    def do_DATA(self, arg: bytes) -> None:
        if arg:
            return self._send(Reply(501, "5.5.4", "Syntax: DATA"), "DATA")
        if self._chunks is not None:  # RFC 3030 2: one or the other per message
            return self._send(Reply(503, "5.5.1", "DATA after BDAT: send the rest with BDAT"), "DATA")
        problem = self._not_ready_for_data()
        if problem is not None:
            return self._send(problem, "DATA")
        self._mode = _Mode.DATA
        self._reader = MessageReader(self.policy.max_message_size, self.policy.max_text_line)
        self._event("smtp.data.start")
        self._send(Reply(354, "", "End data with <CR><LF>.<CR><LF>"))

    def _data_line(self, line: bytes) -> None:
        if self._reader.feed(line):
            self._end_of_data()

    def _end_of_data(self) -> None:
        reader = self._reader
        self._mode, self._reader = _Mode.COMMAND, None
        self._take_message(reader)

    def do_BDAT(self, arg: bytes) -> None:
        """``BDAT <size> [LAST]`` (RFC 3030 2): exactly <size> octets of the
        message follow the command line, with no dot-stuffing.

        The octets are read even when the command is refused (no MAIL yet,
        no recipient, the message too big): only then is the next line a
        command again. The answer comes after the octets: ``250`` for a
        chunk, the verdict on the message for the LAST one (in LMTP one per
        recipient, RFC 2033 4.2).
        """
        if not self.policy.chunking:
            return self._send(self._unknown_command("BDAT"), "BDAT")
        m = _BDAT_ARG.fullmatch(arg.strip())
        if not m:
            # Without a size nobody can tell where the chunk ends: no way back
            # into step, so we hang up after saying why (as Postfix does).
            return self._close_with(Reply(501, "5.5.4", "Syntax: BDAT <size> [LAST]"), "BDAT")
        size, self._chunk_last = int(m.group(1)), m.group(2) is not None
        self._chunk_refusal = self._not_ready_for_data()
        if self._chunk_refusal is None and self._chunks is None:
            self._chunks = ChunkReader(self.policy.max_message_size, self.policy.max_text_line)
            self._event("smtp.data.start", chunking=True)
        self._chunk_left = size
        if size:
            self._mode = _Mode.CHUNK  # _drain now hands the next octets to _chunk_octets
        else:
            self._end_of_chunk()

    def _chunk_octets(self) -> None:
        """Take the octets of the current chunk that have arrived."""
        take = min(self._chunk_left, len(self._buffer))
        if self._chunk_refusal is None:
            self._chunks.feed(bytes(self._buffer[:take]))
        del self._buffer[:take]
        self._chunk_left -= take
        if not self._chunk_left:
            self._mode = _Mode.COMMAND
            self._end_of_chunk()

    def _end_of_chunk(self) -> None:
        """The chunk has been read: answer it."""
        if self._chunk_refusal is not None:
            refusal, self._chunk_refusal = self._chunk_refusal, None
            return self._send(refusal, "BDAT")
        chunks = self._chunks
        chunks.chunks += 1
        if self._chunk_last:
            self._chunks = None
            chunks.finish()
            return self._take_message(chunks)
        rejection = chunks.rejection()
        if rejection is not None:  # over the size limit: the message is refused now
            self._send(rejection, "BDAT")
            self._event("smtp.data.end", bytes=chunks.size, state=chunks.state.value, chunks=chunks.chunks)
            return self._reset_transaction()
        self._send(Reply(250, "2.0.0", f"{chunks.size} octets received"))

    def _take_message(self, reader: _MessageBuffer) -> None:
        """The whole message is in (after the dot, or BDAT LAST): refuse it or hand it on."""
        self._event("smtp.data.end", bytes=reader.size, state=reader.state.value, chunks=reader.chunks)
        envelope = self.envelope
        rejection = reader.rejection()
        if rejection is not None:
            self._send_data_replies([rejection] * self._data_reply_count(envelope))
            self._reset_transaction()
            return
        envelope.content = reader.content()

        def apply(outcome):
            self._send_data_replies(self._data_replies(outcome, envelope))
            self._reset_transaction()

        self._when_ready(self._call_hook("handle_DATA", self.session, envelope), apply)

    def _data_reply_count(self, envelope: Envelope) -> int:
        """SMTP answers a message once; LMTP once per recipient."""
        return 1

    def _data_replies(self, outcome: Any, envelope: Envelope) -> list[Reply]:
        # No default: 250 only when the handler says it has the message.
        return [self._verdict(outcome, "handle_DATA", default=LOCAL_ERROR)]

    def _send_data_replies(self, replies: list[Reply]) -> None:
        for reply in replies:
            self._send(reply, "DATA")

    def do_RSET(self, arg: bytes) -> None:
        if arg:
            return self._send(Reply(501, "5.5.4", "Syntax: RSET"), "RSET")
        self._reset_transaction()
        self._send(Reply(250, "2.0.0", "OK"))

    def do_NOOP(self, arg: bytes) -> None:
        self._send(Reply(250, "2.0.0", "OK"))  # RFC 5321 4.1.1.9: argument ignored

    def do_VRFY(self, arg: bytes) -> None:
        if not arg:
            return self._send(Reply(501, "5.5.4", "Syntax: VRFY address"), "VRFY")
        # RFC 5321 3.5.3: 252 when the server will not say who exists.
        self._send(Reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery"))

    def do_EXPN(self, arg: bytes) -> None:
        self._send(Reply(502, "5.5.1", "EXPN not implemented"), "EXPN")  # RFC 5321 3.5.2

    def do_HELP(self, arg: bytes) -> None:
        offered = set(self.COMMANDS)
        if not self.challengers or self.portal is None:
            offered.discard("AUTH")  # RFC 4954: AUTH only where it can succeed
        if not self.canStartTLS:
            offered.discard("STARTTLS")
        if not self.policy.chunking:
            offered.discard("BDAT")
        commands = " ".join(sorted(offered))
        self._send(Reply(214, "2.0.0", f"Commands: {commands}. See RFC 5321."))

    def do_QUIT(self, arg: bytes) -> None:
        self._close_with(Reply(221, "2.0.0", f"{self.policy.hostname} closing connection"))

    # -- STARTTLS (RFC 3207) -------------------------------------------------

    def ext_STARTTLS(self, arg: bytes) -> None:
        if arg:
            return self._send(Reply(501, "5.5.4", "Syntax: STARTTLS"), "STARTTLS")
        if self.session.tls:
            return self._send(Reply(503, "5.5.1", "TLS already active"), "STARTTLS")
        if not self.canStartTLS:
            return self._send(Reply(502, "5.5.1", "STARTTLS not available"), "STARTTLS")
        if self.envelope.mail_from is not None:
            return self._send(Reply(503, "5.5.1", "Mail transaction in progress"), "STARTTLS")
        # Anything the client sent after STARTTLS arrived in plaintext and
        # must never run inside the TLS session (CVE-2011-0411).
        discarded = len(self._buffer)
        self._buffer.clear()
        if discarded:
            self._security("security.starttls_injection", discarded=discarded)
        self._send(Reply(220, "2.0.0", "Ready to start TLS"))
        self._flush()  # the 220 goes in plaintext, before the handshake
        # RFC 3207 4.2: forget everything learnt from the client so far.
        self._logout()
        self.session.helo, self.session.esmtp = None, False
        self._reset_transaction()
        self.transport.startTLS(self.ctx)
        self.startedTLS = True
        self.session.tls = True
        self._event("tls.start", discarded=discarded)

    # -- AUTH (RFC 4954) ----------------------------------------------------

    def ext_AUTH(self, arg: bytes) -> None:
        if not self._auth_offered() or self.session.user:
            text = "Already authenticated" if self.session.user else "AUTH not available"
            return self._send(Reply(503, "5.5.1", text), "AUTH")
        if not self.session.tls:  # RFC 4954 4, RFC 8314
            self._security("security.cleartext_auth")
            return self._send(Reply(538, "5.7.11", "Must issue a STARTTLS command first"), "AUTH")
        if not self.session.esmtp:
            return self._send(Reply(503, "5.5.1", "Send EHLO first"), "AUTH")
        if self.envelope.mail_from is not None:
            return self._send(Reply(503, "5.5.1", "AUTH not allowed during a mail transaction"), "AUTH")
        parts = arg.split()
        if not parts or len(parts) > 2:
            return self._send(Reply(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]"), "AUTH")
        make = self.challengers.get(parts[0].upper())
        if make is None:
            return self._send(Reply(504, "5.5.4", "Unrecognized authentication type"), "AUTH")
        self._mechanism = parts[0].upper().decode("ascii")
        self.challenger = make()
        if len(parts) == 1:
            self._mode = _Mode.AUTH
            self._challenge()
            return
        self.challenger.getChallenge()  # the initial response answers it
        self._auth_response(b"" if parts[1] == b"=" else parts[1])  # "=": empty

    def _challenge(self) -> None:
        self._send(Reply(334, "", base64.b64encode(self.challenger.getChallenge()).decode()))

    def _auth_line(self, line: bytes) -> None:
        self._trace_in(b"***")  # SASL responses carry secrets
        crlf = line.endswith(b"\r\n")
        text = line[:-2] if crlf else line[:-1]
        if len(line) > self.policy.max_auth_line:
            return self._auth_abort(Reply(500, "5.5.6", "Authentication Exchange line is too long"))
        if not crlf or b"\r" in text:
            return self._auth_abort(Reply(501, "5.5.2", "Bare CR or LF not allowed"))
        if text.strip() == b"*":
            return self._auth_abort(Reply(501, "5.0.0", "Authentication cancelled"))
        self._auth_response(text.strip())

    def _auth_abort(self, reply: Reply) -> None:
        self._mode, self.challenger = _Mode.COMMAND, None
        self._event("auth.result", mechanism=self._mechanism, ok=False, code=reply.code)
        self._send(reply, "AUTH")

    def _auth_response(self, encoded: bytes) -> None:
        try:
            response = base64.b64decode(encoded, validate=True)
        except binascii.Error:
            return self._auth_abort(Reply(501, "5.5.2", "Cannot decode response"))
        try:
            self.challenger.setResponse(response)
        except Exception:  # IllegalClientResponse and friends
            return self._auth_abort(Reply(501, "5.5.2", "Malformed authentication response"))
        if self.challenger.moreChallenges():
            self._mode = _Mode.AUTH
            self._challenge()
            return
        self._mode = _Mode.COMMAND
        credentials, self.challenger = self.challenger, None
        d = self.portal.login(credentials, None, IMessageDelivery)
        d.addCallback(self._auth_policy, credentials)
        self._when_ready(d, lambda outcome: self._auth_done(outcome, credentials))

    def _auth_policy(self, outcome: Any, credentials: Any):
        """The password is right; ``handler.handle_AUTH`` may still refuse the user."""
        hook = getattr(self.handler, "handle_AUTH", None)
        if hook is None:
            return outcome

        def decided(verdict):
            reply = self._verdict(verdict, "handle_AUTH", default=None)
            if reply is None or reply.ok:
                return outcome
            outcome[2]()  # log the avatar out again
            return _AuthRefused(reply)

        return defer.maybeDeferred(hook, self.session, _auth_user(outcome, credentials)).addBoth(decided)

    def _auth_done(self, outcome: Any, credentials: Any) -> None:
        if isinstance(outcome, _AuthRefused):
            self._event("auth.result", mechanism=self._mechanism, ok=False, code=outcome.reply.code,
                        refused_by="handler")
            return self._send(outcome.reply, "AUTH")
        if isinstance(outcome, Failure):
            if outcome.check(LoginBlocked):  # agents.security: too many failures
                self._event("auth.result", mechanism=self._mechanism, ok=False, code=421)
                return self._close_with(Reply(421, "4.7.0", "Too many failed authentication attempts, closing connection"))
            if outcome.check(cred_error.UnauthorizedLogin):
                reply = Reply(535, "5.7.8", "Authentication credentials invalid")
            else:
                _log.failure("AUTH backend failed", outcome)
                reply = Reply(454, "4.7.0", "Temporary authentication failure")
            self._event("auth.result", mechanism=self._mechanism, ok=False, code=reply.code)
            return self._send(reply, "AUTH")
        _iface, _avatar, logout = outcome
        user = _auth_user(outcome, credentials)
        self.session.user, self.authenticated, self._onLogout = user, True, logout
        self._event("auth.result", mechanism=self._mechanism, ok=True, user=user)
        self._send(Reply(235, "2.7.0", "Authentication successful"))

    def _logout(self) -> None:
        if self._onLogout:
            self._onLogout()
            self._onLogout = None
        self.session.user, self.authenticated = None, False


@dataclass(frozen=True)
class _AuthRefused:
    """The password was right but ``handle_AUTH`` said no: this reply instead of 235."""

    reply: Reply


def _auth_user(outcome: Any, credentials: Any) -> str:
    """The authenticated identity of a successful cred login (the avatar's address)."""
    user = getattr(outcome[1], "user", None) or credentials.username
    return user.decode("utf-8", "replace") if isinstance(user, bytes) else user


class SMTPServerFactory(protocol.ServerFactory):
    """Builds one :class:`SMTPServer` per connection, all sharing policy and handler."""

    protocol = SMTPServer

    def __init__(self, policy: ServerPolicy, handler: SMTPHandler, portal=None,
                 tracer: Tracer = NULL_TRACER):  # fmt: skip
        self.policy, self.handler, self.portal, self.tracer = policy, handler, portal, tracer

    def buildProtocol(self, addr):
        p = self.protocol(self.policy, self.handler, self.portal, self.tracer)
        p.factory = self
        return p


# ---------------------------------------------------------------------------
# Authentication


@implementer(IMessageDelivery)
@dataclass
class AuthenticatedSender:
    """The cred avatar of an SMTP AUTH login: who is submitting.

    mailpipe decides senders and recipients in :class:`SMTPHandler` hooks, so
    the IMessageDelivery methods only keep Twisted's contract: no extra
    Received header, any sender, and no recipient through this object.
    """

    user: str

    def receivedHeader(self, helo, origin, recipients):
        return None

    def validateFrom(self, helo, origin):
        return origin

    def validateTo(self, user):
        raise smtp.SMTPBadRcpt(user)


@implementer(IRealm)
class _SenderRealm:
    def requestAvatar(self, avatarId, mind, *interfaces):
        if IMessageDelivery not in interfaces:
            raise NotImplementedError("only IMessageDelivery avatars")
        if isinstance(avatarId, bytes):
            avatarId = avatarId.decode("utf-8", "replace")
        return IMessageDelivery, AuthenticatedSender(avatarId), lambda: None


def make_auth_portal(checker) -> Portal:
    """A Portal whose avatar id (the address) becomes ``session.user`` after AUTH."""
    return Portal(_SenderRealm(), [checker])
