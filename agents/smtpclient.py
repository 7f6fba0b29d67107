# -*- test-case-name: tests.test_smtpclient,tests.test_connection_cache -*-
"""Hand messages to the next hop over SMTP or LMTP.

Every hop in the lab that passes mail on uses this module: the MUA submits
to the MSA (RFC 6409, with STARTTLS or implicit TLS and AUTH), the MSA and
MTAs relay over SMTP (RFC 5321, opportunistic STARTTLS), and the MTA hands
mail to the MDA over LMTP (RFC 2033).

There are three levels:

* :func:`send` delivers one message on a connection of its own: connect,
  greeting, EHLO, STARTTLS, EHLO again, AUTH, one transaction, QUIT.
* :func:`open_session` does everything up to the transaction and gives back
  a :class:`ClientSession`, which can then carry many transactions (MAIL,
  RCPT..., DATA) one after the other. RFC 5321 3.3 allows this: once the
  reply to the end of the data (or to RSET) is in, the client may start
  the next MAIL on the same connection. The setup -- a TCP handshake, two
  EHLOs and, above all, a TLS handshake -- is paid once, not per message.
* :class:`ConnectionCache` keeps idle sessions per destination and hands
  them out again, as Postfix does with its ``scache`` service.

The protocol class builds on Twisted's :class:`twisted.mail.smtp.ESMTPClient`,
which already parses replies (multi-line, RFC 5321 4.2.1), reads EHLO
capabilities, runs the SASL exchange and starts TLS. It overrides the steps
where Twisted is wrong or silent:

* the message body is dot-stuffed as a whole, not per 16 KiB chunk;
* bytes the server sends after its ``220`` to STARTTLS are discarded;
* every failure, including a TLS handshake that fails under an endpoint,
  errbacks the result at once, and every wait has a timeout;
* LMTP (``LHLO``, one reply per recipient after the data);
* per-recipient results, enhanced status codes (RFC 3463), ``SIZE``,
  ``BODY=8BITMIME``, ``SMTPUTF8`` and the null sender ``<>``;
* command pipelining (RFC 2920) when the server offers it;
* several transactions per connection, with RSET after a failed one;
* credentials are only ever sent over TLS, and never reach the trace.
"""

from __future__ import annotations

import enum
import re
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import defer
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory
from twisted.mail import smtp
from twisted.mail.interfaces import IClientAuthentication
from twisted.python.failure import Failure
from zope.interface import implementer

from agents.tls import client_context, session_resumed
from agents.trace import NULL_TRACER, Tracer, now_us
from agents.net import no_delay

TLS_MODES = ("starttls", "implicit", "opportunistic", "none")



@dataclass(frozen=True)
class RecipientResult:
    """The verdict for one recipient: its RCPT reply if refused, else the
    reply to the message data (SMTP: the one reply; LMTP: its own reply)."""

    address: str
    code: int
    status: str  # RFC 3463 enhanced status code, e.g. "5.1.1"
    text: str

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300

    @property
    def permanent(self) -> bool:
        """5xx: retrying cannot help, the sender gets a bounce (RFC 5321 4.2.1)."""
        return 500 <= self.code < 600


@dataclass
class SendResult:
    """What happened to one message. ``timings`` holds microsecond wall-clock
    stamps so a notebook can line this hop up with the trace of the next
    one: ``start`` (the transaction was asked for; for :func:`send`, before
    connecting), ``connected`` and ``tls`` (when the connection that carried
    it was made and secured -- earlier than ``start`` when it was reused),
    ``ready`` (its setup -- EHLO, STARTTLS, AUTH -- was over) and ``done``. ``conn`` is the connection's id in the trace; ``count``
    says which transaction on that connection this was (1: the first)."""

    recipients: list[RecipientResult]
    greeting: str = ""  # the server's 220 text, e.g. "mx.b.test ESMTP"
    tls: bool = False
    extensions: dict[str, str] = field(default_factory=dict)
    timings: dict[str, int] = field(default_factory=dict)
    conn: str = ""
    count: int = 1

    @property
    def server(self) -> str:
        """The name the server gives itself: the first word of its greeting."""
        return self.greeting.split(None, 1)[0] if self.greeting.strip() else ""

    @property
    def accepted(self) -> list[RecipientResult]:
        return [r for r in self.recipients if r.ok]

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.recipients)


class SMTPDeliveryError(Exception):
    """The whole transaction failed: no recipient got the message.

    ``code`` is the server's reply code. For failures found on our side
    (network, TLS, timeout, policy) there is no reply, so -- as Postfix does
    in its bounces -- we pick a code and status that say the same thing:
    4xx for "try again later", 5xx for "give up". ``stage`` names the command
    that failed. ``recipients`` is filled when every RCPT was refused, so a
    caller can still bounce some and retry others.
    """

    def __init__(
        self,
        code: int,
        status: str,
        text: str,
        permanent: bool | None = None,
        *,
        stage: str = "",
        recipients: list[RecipientResult] | None = None,
    ):
        if permanent is None:
            permanent = 500 <= code < 600
        super().__init__(code, status, text, permanent)
        self.code, self.status, self.text, self.permanent = code, status, text, permanent
        self.stage = stage
        self.recipients = recipients or []

    def __str__(self) -> str:
        where = f"{self.stage}: " if self.stage else ""
        return f"{where}{self.code} {self.status} {self.text}"


# --- Wire encoding ------------------------------------------------------------

_LINE_BREAK = re.compile(rb"\r\n|\r|\n")
_ENHANCED_STATUS = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?:[ \t]+|$)")


def normalize_line_breaks(content: bytes) -> bytes:
    """Make every line end in CRLF, the only line ending SMTP knows.

    RFC 5321 2.3.8 forbids a bare CR or bare LF on the wire. We treat each as
    a line break rather than refusing the message: an MTA must pass on mail
    from sloppy senders, and once all three forms are one, no stray CR or LF
    is left from which a receiver could assemble its own idea of the
    end-of-data marker (the 2023 "SMTP smuggling" attacks). A final CRLF is
    added if the content does not end with one.
    """
    crlf = content.count(b"\r\n")
    if content.count(b"\n") == crlf and content.count(b"\r") == crlf:
        text = content  # already canonical (the usual case): no regex pass
    else:
        text = _LINE_BREAK.sub(b"\r\n", content)
    if text and not text.endswith(b"\r\n"):
        text += b"\r\n"
    return text


def encode_data(content: bytes) -> bytes:
    """The bytes we send after ``354``: normalised, dot-stuffed, terminated.

    Dot-stuffing (RFC 5321 4.5.2): a line that starts with "." gets one more
    "." so that no line of the message can read as the end-of-data line
    ".". It is done over the whole message at once. Twisted does it per 16 KiB
    chunk, so a "." line starting exactly at a chunk boundary is missed (the
    server ends the message there and runs the rest as commands), and a "."
    on the first line is never stuffed. The result always ends CRLF "." CRLF.
    """
    return _dot_stuff(normalize_line_breaks(content))


def _dot_stuff(text: bytes) -> bytes:
    """Dot-stuff and terminate text whose lines already end in CRLF."""
    if text.startswith(b"."):
        text = b"." + text
    return text.replace(b"\r\n.", b"\r\n..") + b".\r\n"


def parse_status(code: int, text: str) -> tuple[str, str]:
    """Split an RFC 3463 enhanced status code off a reply's text.

    ``"5.1.1 No such user"`` gives ``("5.1.1", "No such user")``. Its class
    digit must match the reply code's (2, 4 or 5); otherwise the text is
    left alone. Servers without ENHANCEDSTATUSCODES send none,
    so we supply ``"X.0.0"`` from the reply code, as Postfix does, and
    callers always have a status for a bounce (RFC 3464).
    """
    status = ""
    lines = []
    for line in text.split("\n"):
        m = _ENHANCED_STATUS.match(line)
        if m and m.group(1) == str(code)[:1]:
            status = status or ".".join(m.groups())
            line = line[m.end() :]
        lines.append(line)
    return status or f"{code // 100}.0.0", "\n".join(lines)


def _envelope_address(address: str) -> bytes:
    """An address as it goes between ``<`` and ``>``; "" is the null sender.

    CR, LF and NUL would let an address end our command line and start
    another (command injection), and ``<``/``>`` would break the path syntax.
    """
    if re.search(r"[\r\n\x00<>]", address):
        raise ValueError(f"unsafe character in envelope address {address!r}")
    return address.encode("utf-8")



# --- Checked, encoded arguments -----------------------------------------------------


@dataclass(frozen=True)
class _SessionOptions:
    """How to open and set up one connection, checked before we connect."""

    helo: bytes
    tls: str
    tls_context: object | None
    username: bytes | None
    password: bytes | None
    lmtp: bool
    timeout: float


@dataclass(frozen=True)
class _Message:
    """One transaction's envelope and content, checked and encoded."""

    mail_from: bytes
    rcpt_tos: tuple[str, ...]
    content: bytes  # every line ending in CRLF: what BDAT sends as it is
    size: int  # RFC 1870: octets with CRLFs, without stuffing or final dot
    eight_bit: bool
    smtputf8: bool  # a non-ASCII address needs SMTPUTF8 (RFC 6531 3.4)

    @property
    def payload(self) -> bytes:
        """What follows 354: the content dot-stuffed and terminated (see encode_data)."""
        return _dot_stuff(self.content)


def _check_connection_arguments(tls, ca_cert, username, password) -> None:
    if tls not in TLS_MODES:
        raise ValueError(f"tls must be one of {TLS_MODES}, not {tls!r}")
    if (username is None) != (password is None):
        raise ValueError("give both username and password, or neither")
    if username is not None and tls == "none":
        raise ValueError("credentials need TLS; tls='none' would send them in clear")
    if tls != "none" and ca_cert is None:
        raise ValueError("ca_cert is needed: TLS peers are verified against the lab CA")


def _session_options(
    host, *, helo, tls, tls_hostname, ca_cert, username, password, lmtp, timeout
) -> _SessionOptions:
    _check_connection_arguments(tls, ca_cert, username, password)
    tls_context = None
    if tls != "none":
        tls_context = client_context(Path(ca_cert), tls_hostname or host)
    return _SessionOptions(
        helo=helo.encode("ascii"),
        tls=tls,
        tls_context=tls_context,
        username=username.encode("utf-8") if username is not None else None,
        password=password.encode("utf-8") if password is not None else None,
        lmtp=lmtp,
        timeout=timeout,
    )


def _check_envelope(mail_from: str, rcpt_tos, content) -> None:
    if not isinstance(content, bytes):
        raise TypeError("content must be bytes")
    if not rcpt_tos:
        raise ValueError("at least one recipient is needed")
    for address in [mail_from, *rcpt_tos]:
        _envelope_address(address)


def _message(mail_from: str, rcpt_tos, content: bytes) -> _Message:
    _check_envelope(mail_from, rcpt_tos, content)
    normalized = normalize_line_breaks(content)
    return _Message(
        mail_from=_envelope_address(mail_from),
        rcpt_tos=tuple(rcpt_tos),
        content=normalized,
        size=len(normalized),
        eight_bit=not normalized.isascii(),
        smtputf8=not all(a.isascii() for a in [mail_from, *rcpt_tos]),
    )


# --- The protocol ---------------------------------------------------------------


@implementer(IClientAuthentication)
class PlainAuthenticator:
    """SASL PLAIN (RFC 4616): ``authzid NUL authcid NUL password``.

    Twisted's own PLAIN sends the user name as authorization identity too and
    retries without it on failure; we send an empty authzid, once.
    """

    def __init__(self, user: bytes):
        self.user = user

    def getName(self) -> bytes:
        return b"PLAIN"

    def challengeResponse(self, secret: bytes, chal) -> bytes:
        return b"\0" + self.user + b"\0" + secret


class Phase(enum.Enum):
    """Where a connection is in its life."""

    OPENING = "opening"  # greeting, EHLO, STARTTLS, AUTH
    IDLE = "idle"  # ready for MAIL; no command outstanding
    TRANSACTION = "transaction"  # MAIL ... end of data
    CLOSING = "closing"  # QUIT sent, or the connection is being dropped
    CLOSED = "closed"  # the connection is gone


@dataclass
class _Command:
    """A command whose reply we wait for, and what to do with that reply.

    ``line`` is None for the replies to the message data: nothing more is
    sent for them, but they are waited for like any other.
    """

    verb: str
    line: bytes | None
    on_reply: Callable[[int, bytes], None]
    data: bytes = b""  # octets sent right after the line (a BDAT chunk)


@dataclass
class _Transaction:
    """The state of the one mail transaction in progress on a connection."""

    message: _Message
    tracer: Tracer
    result: defer.Deferred
    number: int  # 1 for the connection's first transaction, 2 for the next...
    started: int
    replies: list[RecipientResult] = field(default_factory=list)  # one per rcpt, in order
    accepted: list[int] = field(default_factory=list)  # indexes into replies, RCPT accepted
    awaiting_lmtp: list[int] | None = None  # accepted, still without a verdict (once they are due)
    refusal: SMTPDeliveryError | None = None  # MAIL was refused
    data_sent: bool = False


@implementer(IHandshakeListener)
class SessionProtocol(smtp.ESMTPClient):
    """One SMTP or LMTP connection, from greeting to QUIT.

    Twisted drives the setup as a state machine: each command we send
    sets ``_expected`` (the good reply codes), ``_okresponse`` and
    ``_failresponse`` (what to call next). The methods named ``smtpState_*``,
    ``esmtpState_*``, ``tryTLS`` and ``authenticate`` are Twisted's states,
    overridden; ``_on_*`` are ours. Twisted's setup ends in
    ``smtpState_from``, where it would send MAIL; we stop there instead and
    fire ``opened``: the connection is :attr:`Phase.IDLE`, and each call of
    :meth:`start_transaction` runs one mail transaction on it.

    Transactions keep a queue of :class:`_Command` whose replies are due.
    Without PIPELINING we send one command and wait for its reply before
    the next (RFC 5321 lock step); with it, MAIL and every RCPT go out in
    one write and the replies come back in the same order (RFC 2920 3.1).

    Trace events about the connection go to the session's tracer; the lines
    and events of a transaction go to the tracer given for that transaction,
    so they carry its queue id and Message-ID.
    """

    #: Twisted's in-memory session log would keep AUTH secrets; we trace instead.
    debug = False

    def __init__(
        self,
        options: _SessionOptions,
        opened: defer.Deferred,
        clock,
        tracer: Tracer = NULL_TRACER,
        started: int | None = None,
    ):
        starttls_context = options.tls_context if options.tls != "implicit" else None
        super().__init__(options.password, starttls_context, options.helo)
        self.options, self.opened, self.clock, self.tracer = options, opened, clock, tracer
        self.timeout = options.timeout
        self.requireAuthentication = options.username is not None
        if options.username is not None:
            self.registerAuthenticator(PlainAuthenticator(options.username))
            self.registerAuthenticator(smtp.LOGINAuthenticator(options.username))
        self.conn_id = tracer.new_connection_id()
        self.peer: str | None = None
        self.greeting = ""
        self.extensions: dict[bytes, bytes] = {}
        self.timings = {"start": started or now_us()}
        self.phase = Phase.OPENING
        self.stage = "connect"  # the command whose reply we wait for
        self.sasl_active = False
        self.transactions = 0  # how many were started on this connection
        self.needs_reset = False  # send RSET before the next MAIL
        self.tx: _Transaction | None = None
        self.unsent: deque[_Command] = deque()  # lock step: still to send
        self.awaiting: deque[_Command] = deque()  # sent, reply not yet read
        self.then: Callable[[], None] | None = None  # when both queues are empty
        self._closed_waiters: list[defer.Deferred] = []

    # Plumbing: time, tracing, state.

    def callLater(self, period, func):
        """TimeoutMixin's clock: the reactor we were given (a Clock in tests)."""
        return self.clock.callLater(period, func)

    @property
    def usable(self) -> bool:
        """Ready for MAIL now, or once the transaction in progress ends."""
        return self.connected and self.phase in (Phase.IDLE, Phase.TRANSACTION)

    @property
    def pipelining(self) -> bool:
        """The server said PIPELINING in its EHLO reply (RFC 2920): it reads
        commands as a stream, so we may send several before the replies."""
        return b"PIPELINING" in self.extensions

    @property
    def chunking(self) -> bool:
        """The server said CHUNKING (RFC 3030) and PIPELINING: the message can go
        as ``BDAT <size> LAST`` in the same write as MAIL and RCPT."""
        return b"CHUNKING" in self.extensions and self.pipelining

    def _line_tracer(self) -> Tracer:
        return self.tx.tracer if self.tx is not None else self.tracer

    def sendLine(self, line: bytes) -> None:
        if self.sasl_active and not line.upper().startswith(b"AUTH "):
            shown = b"***"  # a SASL response (AUTH LOGIN user name, password)
        else:
            shown = line  # Tracer.line masks the argument of "AUTH PLAIN ..."
            self.stage = line.split(b" ", 1)[0].decode("ascii", "replace").upper()
        self._line_tracer().line(self.conn_id, "C", shown, peer=self.peer)
        super().sendLine(line)

    def lineReceived(self, line: bytes):
        tracer = self._line_tracer()
        tracer.line(self.conn_id, "S", line, peer=self.peer)
        if line[:3].isdigit() and line[3:4] != b"-":
            tracer.event("relay.reply", conn=self.conn_id, code=int(line[:3]))
        return super().lineReceived(line)

    def _reply(self, code: int, resp: bytes) -> tuple[str, str]:
        return parse_status(code, resp.decode("utf-8", "replace"))

    def _listen(self, handler: Callable[[int, bytes], None]) -> None:
        """Send every reply, whatever its code, to ``handler``."""
        self._expected = range(0, 1000)
        self._okresponse = self._failresponse = handler

    def _close_now(self, polite: bool) -> None:
        """End the connection: QUIT if the server is still in step with us
        (RFC 5321 4.1.1.10), else just drop it."""
        self.phase = Phase.CLOSING
        self.sasl_active = False  # so our QUIT is traced as it is
        if self.transport is None or not self.connected:
            return
        if polite:
            self.setTimeout(self.timeout)  # a server that never answers QUIT is dropped
            self._disconnectFromServer()
        else:
            self.transport.abortConnection()

    def _fail_session(self, error: SMTPDeliveryError, polite: bool = True) -> None:
        """The connection cannot go on: fail what waits on it and close it.

        What waits is either ``opened`` (the setup failed) or the
        transaction in progress. ``polite``: see :meth:`_close_now`.
        """
        if self.phase in (Phase.CLOSING, Phase.CLOSED):
            if not polite and self.connected:
                self.transport.abortConnection()
            return
        tx, self.tx = self.tx, None
        if tx is not None:
            waiting, tracer = tx.result, tx.tracer
        elif self.phase is Phase.OPENING:
            waiting, tracer = self.opened, self.tracer
            self.timings["done"] = now_us()
        else:  # idle: nobody is waiting, but the connection is finished
            self.tracer.event("relay.lost", conn=self.conn_id, reason=str(error))
            return self._close_now(polite)
        tracer.event("relay.done", conn=self.conn_id, error=str(error), permanent=error.permanent)
        self._close_now(polite)
        if not waiting.called:
            waiting.errback(Failure(error))

    def _refused(self, stage: str):
        """A ``_failresponse`` that turns the server's reply into a failure."""

        def fail(code: int, resp: bytes) -> None:
            status, text = self._reply(code, resp)
            self._fail_session(SMTPDeliveryError(code, status, text, stage=stage))

        return fail

    # Connection, greeting, EHLO/LHLO.

    def connectionMade(self) -> None:
        no_delay(self.transport)  # see agents.net
        peer, local = self.transport.getPeer(), self.transport.getHost()
        self.peer = getattr(peer, "host", None)
        self.timings["connected"] = now_us()
        self.tracer.event(
            "relay.connected",
            conn=self.conn_id,
            peer=self.peer,
            port=getattr(peer, "port", None),
            local=getattr(local, "host", None),
        )
        super().connectionMade()  # arms the idle timeout, waits for 220
        # Under implicit TLS the transport is a TLS wrapper that does not
        # declare ISSLTransport, so Twisted's own check would miss it.
        self._tlsMode = self.options.tls == "implicit"
        if self._tlsMode:
            self.tracer.event("tls.start", conn=self.conn_id, mode="implicit")
        self.stage = "greeting"
        self._okresponse = self._on_greeting
        self._failresponse = self._refused("greeting")  # 554: RFC 5321 3.1

    def _on_greeting(self, code: int, resp: bytes) -> None:
        self.greeting = resp.decode("utf-8", "replace").split("\n", 1)[0]
        self.esmtpState_ehlo(code, resp)

    def esmtpState_ehlo(self, code: int, resp: bytes) -> None:
        """Say EHLO -- or LHLO in LMTP, which has no HELO fallback (RFC 2033 4.1).

        Falling back to HELO (RFC 5321 3.2) means no extensions, so it is only
        allowed when we need neither STARTTLS nor AUTH.
        """
        self._expected = smtp.SUCCESS
        self._okresponse = self.esmtpState_serverConfig
        verb = b"LHLO" if self.options.lmtp else b"EHLO"
        tls_needed = self.options.tls == "starttls" and not self._tlsMode
        if self.options.lmtp or self.secret is not None or tls_needed:
            self._failresponse = self._refused(verb.decode())
        else:
            self._failresponse = self.smtpState_helo
        self.sendLine(verb + b" " + self.identity)

    def smtpState_helo(self, code: int, resp: bytes) -> None:
        # Twisted leaves _failresponse pointing here, so a refused HELO
        # would be answered with HELO again, for ever.
        self.extensions = {}
        self._expected = smtp.SUCCESS
        self._okresponse = self.smtpState_from
        self._failresponse = self._refused("HELO")
        self.sendLine(b"HELO " + self.identity)

    def esmtpState_serverConfig(self, code: int, resp: bytes) -> None:
        """Read the EHLO reply: the first line is the server's name, each
        further line one extension keyword with parameters. Keywords are
        case-insensitive (RFC 5321 2.4); Twisted compares them as sent."""
        self.extensions = {}
        for line in resp.split(b"\n")[1:]:
            keyword, _, params = line.strip().partition(b" ")
            if keyword:
                self.extensions[keyword.upper()] = params.strip()
        self.tracer.event(
            "relay.ehlo",
            conn=self.conn_id,
            extensions=[k.decode("ascii", "replace") for k in self.extensions],
        )
        self.tryTLS(code, resp, self.extensions)

    # STARTTLS (RFC 3207).

    def tryTLS(self, code: int, resp: bytes, items: dict) -> None:
        mode = self.options.tls
        if self._tlsMode or mode == "none":
            return self.authenticate(code, resp, items)
        if b"STARTTLS" in items:
            self._expected = [220]
            self._okresponse = self.esmtpState_starttls
            self._failresponse = self._on_starttls_refused
            return self.sendLine(b"STARTTLS")
        if mode == "starttls":
            # Postfix says the same and defers (a later try may find TLS).
            return self._fail_session(
                SMTPDeliveryError(
                    421, "4.7.4", "TLS is required, but was not offered by host", stage="EHLO"
                )
            )
        self.tracer.event("tls.skipped", conn=self.conn_id, reason="STARTTLS not offered")
        self.authenticate(code, resp, items)

    def _on_starttls_refused(self, code: int, resp: bytes) -> None:
        if self.options.tls == "starttls" or code == 421:
            return self._refused("STARTTLS")(code, resp)
        # Opportunistic: after a refusal the session goes on as before
        # (RFC 3207 4), in clear.
        self.tracer.event("tls.skipped", conn=self.conn_id, reason=f"STARTTLS refused ({code})")
        self.authenticate(code, resp, self.extensions)

    def esmtpState_starttls(self, code: int, resp: bytes) -> None:
        """The server said 220: start TLS, then EHLO again (RFC 3207 4.2).

        Any bytes that came after the 220 were sent before encryption, where
        anyone on the path could have added them. Read later as replies to
        our next commands, they would let an attacker answer for the server
        (response injection, the client side of CVE-2011-0411). So they are
        thrown away unread, and so is all we learnt from the first EHLO.
        """
        injected = self.clearLineBuffer()
        if injected:
            self.tracer.event("tls.discarded", conn=self.conn_id, octets=len(injected))
        self.tracer.event("tls.start", conn=self.conn_id, mode="starttls")
        self.extensions = {}
        try:
            self.transport.startTLS(self.context)
        except Exception as e:
            return self._fail_session(
                SMTPDeliveryError(421, "4.7.5", f"cannot start TLS: {e}", stage="STARTTLS"),
                polite=False,
            )
        self._tlsMode = True
        self.esmtpState_ehlo(code, resp)

    def handshakeCompleted(self) -> None:
        """Called by Twisted's TLS layer once the peer is verified."""
        self.timings["tls"] = now_us()
        handle = _tls_handle(self.transport)
        self.tracer.event("tls.done", conn=self.conn_id,
                          version=handle.get_protocol_version_name() if handle else None,
                          resumed=session_resumed(handle) if handle else None)

    # AUTH (RFC 4954).

    def authenticate(self, code: int, resp: bytes, items: dict) -> None:
        """Log in if we have credentials -- but only under TLS: PLAIN and
        LOGIN carry the password as base64, which hides nothing (RFC 4616,
        Security Considerations)."""
        if self.secret is None:
            return self.smtpState_from(code, resp)
        if not self._tlsMode:
            return self._fail_session(
                SMTPDeliveryError(
                    538, "5.7.11", "refusing to send credentials without TLS", stage="AUTH"
                )
            )
        self.sasl_active = True
        super().authenticate(code, resp, items)

    def esmtpAUTHRequired(self, code=-1, resp=None) -> None:
        self._fail_session(
            SMTPDeliveryError(
                530, "5.7.0", "server offers no AUTH mechanism we use (PLAIN, LOGIN)", stage="AUTH"
            )
        )

    def esmtpAUTHDeclined(self, code=-1, resp=None) -> None:
        self._refused("AUTH")(code, resp or b"")

    # Twisted resends PLAIN with other credentials on failure; we do not.
    _esmtpState_plainAuth = esmtpAUTHServerError = esmtpAUTHDeclined

    def esmtpAUTHMalformedChallenge(self, code=-1, resp=None) -> None:
        self._fail_session(
            SMTPDeliveryError(421, "4.7.0", "server sent a malformed AUTH challenge", stage="AUTH")
        )

    # Ready: the end of the setup.

    def smtpState_from(self, code: int, resp: bytes) -> None:
        """Twisted's setup is over (after EHLO or HELO, STARTTLS, AUTH):
        the connection is ready for MAIL. We wait for a transaction."""
        self.sasl_active = False
        self.timings["ready"] = now_us()
        remember = getattr(self.options.tls_context, "remember", None)
        if self._tlsMode and remember is not None:
            # The server has answered EHLO over TLS: the session is good to
            # offer again next time (agents.tls; RFC 8446 2.2).
            handle = _tls_handle(self.transport)
            if handle is not None:
                remember(handle)
        self.tracer.event(
            "relay.ready",
            conn=self.conn_id,
            tls=self._tlsMode,
            pipelining=self.pipelining,
            setup_ms=round((self.timings["ready"] - self.timings["start"]) / 1000, 3),
        )
        self._go_idle()
        if not self.opened.called:
            self.opened.callback(self)

    def _go_idle(self) -> None:
        """No command outstanding. The idle timer is off: how long an idle
        connection is kept is the owner's choice (ConnectionCache.max_idle)."""
        self.phase = Phase.IDLE
        self.stage = "MAIL"
        self.setTimeout(None)
        self._listen(self._on_unsolicited)

    def _on_unsolicited(self, code: int, resp: bytes) -> None:
        """A reply while we sent nothing. Usually ``421`` from a server that
        closes idle connections or shuts down (RFC 5321 3.8); in any case the
        connection is out of step and is closed."""
        _, text = self._reply(code, resp)
        self.tracer.event("relay.lost", conn=self.conn_id, reason=f"unsolicited {code} {text}")
        self._close_now(polite=False)

    # The mail transaction: MAIL, RCPT..., DATA (RFC 5321 3.3).

    def start_transaction(
        self, message: _Message, tracer: Tracer, started: int | None = None
    ) -> defer.Deferred:
        """Run one transaction; fires with a :class:`SendResult`.

        Fails with :class:`SMTPDeliveryError` when no recipient got the
        message. Only one transaction at a time: :class:`ClientSession`
        queues callers. Cancelling the result drops the connection.
        """
        if self.phase is not Phase.IDLE:
            raise RuntimeError(f"a transaction needs an idle connection, this one is {self.phase.value}")
        self.transactions += 1
        result = defer.Deferred(canceller=lambda _: self.abort())
        self.tx = _Transaction(message, tracer, result, self.transactions, started or now_us())
        self.phase = Phase.TRANSACTION
        self.setTimeout(self.timeout)
        tracer.event(
            "relay.transaction", conn=self.conn_id, number=self.transactions,
            rcpts=len(message.rcpt_tos), octets=message.size, pipelining=self.pipelining,
            chunking=self.chunking,
        )
        try:
            params = self._mail_parameters(message)
        except SMTPDeliveryError as error:
            # Found before anything was sent: the server's state is unchanged.
            self._fail_transaction(error, reset=False)
            return result
        commands = []
        if self.needs_reset:
            commands.append(_Command("RSET", b"RSET", self._on_rset_reply))
        commands.append(
            _Command("MAIL", b"MAIL FROM:<" + message.mail_from + b">" + params, self._on_mail_reply)
        )
        for index, address in enumerate(message.rcpt_tos):
            line = b"RCPT TO:<" + _envelope_address(address) + b">"
            commands.append(_Command("RCPT", line, partial(self._on_rcpt_reply, index, address)))
        if self.chunking:
            # RFC 3030: the message rides with the envelope. Were MAIL or every
            # RCPT refused, the server still reads the chunk (and refuses it),
            # so we stay in step; the price is octets sent for nothing.
            commands.append(_Command("BDAT", b"BDAT %d LAST" % len(message.content),
                                     self._on_bdat_reply, data=message.content))
            self._run(commands, then=self._after_chunked_message, pipeline=True)
        else:
            self._run(commands, then=self._after_envelope, pipeline=self.pipelining)
        return result

    def _mail_parameters(self, message: _Message) -> bytes:
        ext, params = self.extensions, []
        if b"SIZE" in ext:  # RFC 1870: let the server refuse before the upload
            limit = ext[b"SIZE"]
            if limit.isdigit() and 0 < int(limit) < message.size:
                raise SMTPDeliveryError(
                    552, "5.3.4", f"message is {message.size} octets, server takes {int(limit)}",
                    stage="MAIL",
                )
            params.append(b"SIZE=%d" % message.size)
        if message.eight_bit:
            if b"8BITMIME" in ext:  # RFC 6152
                params.append(b"BODY=8BITMIME")
            else:
                # RFC 6152 3 wants a 7-bit conversion here; like Postfix
                # without MIME conversion, we send the bytes as they are.
                self.tx.tracer.event("relay.8bit_unannounced", conn=self.conn_id)
        if message.smtputf8:
            if b"SMTPUTF8" not in ext:
                raise SMTPDeliveryError(
                    553, "5.6.7", "non-ASCII address, but server lacks SMTPUTF8", stage="MAIL"
                )
            params.append(b"SMTPUTF8")  # RFC 6531 3.4
        return b"".join(b" " + p for p in params)

    def _run(self, commands: list[_Command], then: Callable[[], None], pipeline: bool) -> None:
        """Send ``commands`` and read their replies in order, then call ``then``.

        ``pipeline``: all of them in one write (RFC 2920 3.1 lets RSET, MAIL
        and RCPT stand anywhere in a group); otherwise one at a time, each
        after the reply to the one before.
        """
        self.unsent = deque(commands)
        self.awaiting = deque()
        self.then = then
        self._listen(self._on_reply)
        if pipeline:
            self._write(list(self.unsent))
            self.unsent.clear()
        else:
            self._write([self.unsent.popleft()])

    def _write(self, commands: list[_Command]) -> None:
        """Trace each command line and send them all in one write (a BDAT with its chunk)."""
        tracer = self._line_tracer()
        for command in commands:
            tracer.line(self.conn_id, "C", command.line, peer=self.peer)
            if command.data:
                self.tx.data_sent = True
                tracer.event("relay.data", conn=self.conn_id, octets=len(command.data), chunking=True)
        self.awaiting.extend(commands)
        self.stage = self.awaiting[0].verb
        self.transport.write(b"".join(command.line + b"\r\n" + command.data for command in commands))

    def _on_reply(self, code: int, resp: bytes) -> None:
        """The next reply belongs to the oldest command still waiting."""
        if not self.awaiting:
            return self._fail_session(
                SMTPDeliveryError(421, "4.5.0", f"reply {code} to no command", stage=self.stage),
                polite=False,
            )
        command = self.awaiting.popleft()
        command.on_reply(code, resp)
        if self.phase is not Phase.TRANSACTION or self.tx is None:
            return  # the handler ended the transaction (or the connection)
        if self.awaiting:
            self.stage = self.awaiting[0].verb
        elif self.unsent:
            self._write([self.unsent.popleft()])
        elif self.then is not None:
            then, self.then = self.then, None
            then()

    def _on_rset_reply(self, code: int, resp: bytes) -> None:
        if 200 <= code < 300:
            self.needs_reset = False
            return
        # We no longer know what state the server is in: start afresh elsewhere.
        status, text = self._reply(code, resp)
        self._fail_session(
            SMTPDeliveryError(
                421, "4.4.2", f"server refused RSET: {code} {status} {text}", stage="RSET"
            )
        )

    def _on_mail_reply(self, code: int, resp: bytes) -> None:
        if 200 <= code < 300:
            return
        status, text = self._reply(code, resp)
        error = SMTPDeliveryError(code, status, text, stage="MAIL")
        if code == 421:  # the server is closing the session (RFC 5321 3.8)
            return self._fail_session(error)
        # The connection is still good; this message is not. With PIPELINING
        # the RCPT replies are on their way (RFC 2920 says each command gets
        # one, here most likely "503 need MAIL"): read them, then fail.
        self.tx.refusal = error
        self.unsent.clear()

    def _on_rcpt_reply(self, index: int, address: str, code: int, resp: bytes) -> None:
        """Record the verdict; a refused recipient does not end the transaction."""
        if code == 421:  # the server is closing, whatever else happened
            return self._refused("RCPT")(code, resp)
        if self.tx.refusal is not None:
            return  # MAIL was refused: this reply says nothing about the recipient
        self.tx.replies.append(RecipientResult(address, code, *self._reply(code, resp)))
        if 200 <= code < 300:
            self.tx.accepted.append(index)

    def _after_envelope(self) -> None:
        """Every reply to MAIL and RCPT is in: DATA, or fail the transaction.

        We send DATA only now, not in the pipelined group: had every RCPT
        been refused, a server might still answer DATA with 354, and we
        would have to send an empty message to get back in step
        (RFC 2920 3.1). One round trip is the price of never doing that.
        """
        tx = self.tx
        if tx.refusal is not None:
            return self._fail_transaction(tx.refusal)
        if not tx.accepted:
            return self._fail_transaction(_no_recipient_error(tx.replies))
        self._run(
            [_Command("DATA", b"DATA", self._on_data_command_reply)],
            then=self._finish_transaction, pipeline=False,
        )

    def _on_data_command_reply(self, code: int, resp: bytes) -> None:
        """354: send the message in one write, already dot-stuffed and
        terminated by encode_data(), then wait for the verdict: one reply in
        SMTP, one per accepted recipient in LMTP (RFC 2033 4.2). Anything
        else refuses the message for every accepted recipient."""
        tx = self.tx
        if code != 354:
            self._settle_accepted(code, resp)
            # The transaction is still open on the server: RSET before the next.
            return self._finish_transaction(reset=True, closing=code == 421)
        payload = tx.message.payload  # dot-stuffed on each access: once here
        self.transport.write(payload)
        tx.data_sent = True
        self.stage = "end of data"
        tx.tracer.event("relay.data", conn=self.conn_id, octets=len(payload))
        self.resetTimeout()
        if self.options.lmtp:
            tx.awaiting_lmtp = list(tx.accepted)
            verdicts = [
                _Command("end of data", None, partial(self._on_lmtp_reply, index))
                for index in tx.accepted
            ]
        else:
            verdicts = [_Command("end of data", None, self._on_data_reply)]
        self.awaiting.extend(verdicts)

    def _on_bdat_reply(self, code: int, resp: bytes) -> None:
        """The reply to BDAT LAST is the verdict on the message (RFC 3030 2):
        one reply in SMTP, one per accepted recipient in LMTP (RFC 2033 4.2),
        the first of which is this one."""
        tx = self.tx
        if tx.refusal is not None or not tx.accepted:
            if code == 421:  # the server is closing (RFC 5321 3.8)
                return self._refused("BDAT")(code, resp)
            return  # the chunk was refused with the envelope: _after_chunked_message says why
        self.stage = "end of data"
        if not self.options.lmtp:
            return self._on_data_reply(code, resp)
        first, *rest = tx.accepted
        tx.awaiting_lmtp = list(tx.accepted)
        self._on_lmtp_reply(first, code, resp)
        self.awaiting.extend(_Command("end of data", None, partial(self._on_lmtp_reply, index))
                             for index in rest)

    def _after_chunked_message(self) -> None:
        """Every reply is in: the envelope's and the message's."""
        tx = self.tx
        if tx.refusal is not None:
            return self._fail_transaction(tx.refusal)
        if not tx.accepted:
            return self._fail_transaction(_no_recipient_error(tx.replies))
        self._finish_transaction()

    def _settle_accepted(self, code: int, resp: bytes) -> None:
        status, text = self._reply(code, resp)
        for index in self.tx.accepted:
            address = self.tx.replies[index].address
            self.tx.replies[index] = RecipientResult(address, code, status, text)

    def _on_data_reply(self, code: int, resp: bytes) -> None:
        """SMTP: one reply speaks for every accepted recipient."""
        self._settle_accepted(code, resp)
        if code == 421:
            self._finish_transaction(closing=True)

    def _on_lmtp_reply(self, index: int, code: int, resp: bytes) -> None:
        """LMTP: each reply belongs to the next accepted recipient, in RCPT
        order (RFC 2033 4.2) -- one may be stored, another over quota."""
        tx = self.tx
        tx.awaiting_lmtp.remove(index)
        address = tx.replies[index].address
        tx.replies[index] = RecipientResult(address, code, *self._reply(code, resp))

    # Ending a transaction.

    def _end_transaction(self, reset: bool) -> _Transaction:
        tx, self.tx = self.tx, None
        self.unsent.clear()
        self.awaiting.clear()
        self.then = None
        self.needs_reset = self.needs_reset or reset
        if self.phase is Phase.TRANSACTION:
            self._go_idle()
        return tx

    def _finish_transaction(self, reset: bool = False, closing: bool = False) -> None:
        """Every accepted recipient has its verdict: report them.

        ``closing``: the last reply was 421, so the server is closing the
        connection (RFC 5321 3.8); we QUIT rather than keep it.
        """
        tx = self._end_transaction(reset)
        result = SendResult(
            recipients=list(tx.replies),
            greeting=self.greeting,
            tls=self._tlsMode,
            extensions={
                k.decode("ascii", "replace"): v.decode("ascii", "replace")
                for k, v in self.extensions.items()
            },
            timings={**self.timings, "start": tx.started, "done": now_us()},
            conn=self.conn_id,
            count=tx.number,
        )
        tx.tracer.event(
            "relay.done",
            conn=self.conn_id,
            codes={r.address: r.code for r in result.recipients},
            tls=result.tls,
        )
        if closing:
            self._close_now(polite=True)
        if not tx.result.called:
            tx.result.callback(result)

    def _fail_transaction(self, error: SMTPDeliveryError, reset: bool = True) -> None:
        """This message failed, but the connection is in step and stays usable.

        ``reset``: the server may hold part of a transaction (a MAIL, some
        RCPTs), so the next transaction begins with RSET (RFC 5321
        4.1.1.5). We send it lazily, in front of the next MAIL: it can then
        share its write under PIPELINING, and a connection that is closed
        instead needs none -- QUIT ends any transaction.
        """
        tx = self._end_transaction(reset)
        tx.tracer.event(
            "relay.done", conn=self.conn_id, error=str(error), permanent=error.permanent
        )
        if not tx.result.called:
            tx.result.errback(Failure(error))

    # Closing.

    def quit(self) -> defer.Deferred:
        """Say QUIT and close once the server answers (RFC 5321 4.1.1.10).

        Fires (with None) when the connection is gone. Only an idle
        connection is quit; one in any other phase is left to finish.
        """
        closed = self.when_closed()
        if self.phase is Phase.IDLE:
            self._close_now(polite=True)
        return closed

    def abort(self) -> None:
        """Drop the connection now, whatever is in progress."""
        if self.phase is not Phase.CLOSED:
            self.phase = Phase.CLOSING
        if self.transport is not None and self.connected:
            self.transport.abortConnection()

    def when_closed(self) -> defer.Deferred:
        """A Deferred that fires (with None) once the connection is gone.
        Cancelling it drops the connection."""
        if self.phase is Phase.CLOSED:
            return defer.succeed(None)
        d = defer.Deferred(canceller=lambda _: self.abort())
        self._closed_waiters.append(d)
        return d

    # Failures with no reply: timeout, lost connection, garbage.

    def timeoutConnection(self) -> None:
        """The server stayed silent for ``timeout`` seconds. RFC 5321
        4.5.3.2 suggests minutes per command on the Internet; the lab is
        local, so the caller picks."""
        if self.phase in (Phase.CLOSING, Phase.CLOSED):  # our QUIT went unanswered
            self.transport.abortConnection()
            return
        self._fail_session(
            SMTPDeliveryError(
                421, "4.4.2", f"no reply within {self.timeout}s (waiting for {self.stage})",
                stage=self.stage,
            ),
            polite=False,
        )

    def connectionLost(self, reason=None) -> None:
        """The connection is gone: settle whatever waited on it.

        During the setup, ``opened`` fails; during a transaction, the
        transaction fails (4.4.2) -- unless it is LMTP and some recipients
        already have their verdict; while idle, there is only a trace event.
        """
        self.connected = False
        super().connectionLost(reason)  # stops the idle timer
        was, self.phase = self.phase, Phase.CLOSED
        tx = self.tx
        if tx is not None and not tx.result.called:
            if (self.options.lmtp and tx.data_sent and tx.awaiting_lmtp is not None
                    and len(tx.awaiting_lmtp) < len(tx.accepted)):
                # Some LMTP verdicts are in: those recipients are settled, so
                # report them and mark only the silent ones for retry.
                for index in tx.awaiting_lmtp:
                    address = tx.replies[index].address
                    tx.replies[index] = RecipientResult(
                        address, 421, "4.4.2", "connection lost before this recipient's reply"
                    )
                self._finish_transaction()
            else:
                self._fail_transaction(self._connection_lost_error(reason))
        elif was is Phase.OPENING and not self.opened.called:
            error = self._connection_lost_error(reason)
            self.timings["done"] = now_us()
            self.tracer.event(
                "relay.done", conn=self.conn_id, error=str(error), permanent=error.permanent
            )
            self.opened.errback(Failure(error))
        elif was is Phase.IDLE:
            why = reason.getErrorMessage() if reason is not None else "unknown"
            self.tracer.event("relay.lost", conn=self.conn_id, reason=why)
        self.tx = None
        waiters, self._closed_waiters = self._closed_waiters, []
        for d in waiters:
            if not d.called:
                d.callback(None)

    def _connection_lost_error(self, reason: Failure | None) -> SMTPDeliveryError:
        why = reason.getErrorMessage() if reason is not None else "unknown"
        # SSL.Error: the chain does not lead to the lab CA (or the handshake
        # broke); VerificationError: the certificate names another host.
        if reason is not None and reason.check(SSL.Error, VerificationError):
            return SMTPDeliveryError(421, "4.7.5", f"TLS handshake failed: {why}", stage="TLS")
        if self.tx is not None and self.tx.data_sent:
            # RFC 1047: the server may have the message; a retry may duplicate it.
            why = f"{why} (after the message was sent; a retry may duplicate it)"
        return SMTPDeliveryError(
            421, "4.4.2", f"connection lost waiting for {self.stage}: {why}", stage=self.stage
        )

    def sendError(self, exc) -> None:
        """Twisted reports its own errors here (e.g. a reply that does not
        start with three digits). The stream can no longer be trusted."""
        code = getattr(exc, "code", -1)
        if not 400 <= code < 600:
            code = 421
        resp = getattr(exc, "resp", b"") or b""
        text = resp.decode("utf-8", "replace") if isinstance(resp, bytes) else str(resp)
        self._fail_session(
            SMTPDeliveryError(code, f"{code // 100}.5.0", text, stage=self.stage), polite=False
        )


def _no_recipient_error(replies: list[RecipientResult]) -> SMTPDeliveryError:
    """Every RCPT was refused. Report a temporary failure if any refusal
    was temporary, so that recipient is retried; ``recipients`` has each."""
    first = next((r for r in replies if not r.permanent), replies[0])
    return SMTPDeliveryError(
        first.code, first.status, f"no recipient accepted: {first.text}",
        stage="RCPT", recipients=list(replies),
    )


def _tls_handle(transport):
    """The OpenSSL connection, from whichever object holds it (None if none does)."""
    for candidate in (transport, getattr(transport, "protocol", None)):
        try:
            handle = candidate.getHandle()
        except Exception:
            continue
        if hasattr(handle, "get_protocol_version_name"):
            return handle
    return None


class _SessionFactory(Factory):
    def __init__(self, options, opened, reactor, tracer, started):
        self.options, self.opened, self.reactor = options, opened, reactor
        self.tracer, self.started = tracer, started
        self.client: SessionProtocol | None = None

    def buildProtocol(self, addr):
        self.client = SessionProtocol(
            self.options, self.opened, self.reactor, self.tracer, self.started
        )
        self.client.factory = self
        return self.client


# --- Sessions: one connection, many transactions ------------------------------------


class ClientSession:
    """An SMTP or LMTP connection that is set up and ready for mail.

    Made by :func:`open_session`. Each :meth:`send` runs one transaction;
    the connection stays open between them, so only the first message pays
    for the TCP and TLS handshakes, the EHLOs and AUTH.

    Transactions on one session are serialized: SMTP has one transaction
    at a time per connection (RFC 5321 3.3), so a :meth:`send` made while
    another is running waits in a queue (first come, first served) and
    starts when the one before has its last reply.

    After a failed transaction the session is still usable if the server is
    still in step with us -- MAIL refused, every RCPT refused, DATA refused,
    the message too big for the announced SIZE: the next transaction then
    starts with RSET (RFC 5321 4.1.1.5). A lost connection, a timeout, a
    ``421`` (the server is closing, RFC 5321 3.8) or a reply we cannot
    place make it unusable for good: :attr:`usable` turns False and
    later sends fail with 4.4.2, to be retried on a new connection.
    """

    def __init__(self, protocol: SessionProtocol):
        self._protocol = protocol
        self._turns = defer.DeferredLock()  # one transaction at a time
        self._closing = False

    def __repr__(self) -> str:
        state = "usable" if self.usable else "unusable"
        return f"<ClientSession {self.conn} {state}, {self.transactions} transactions>"

    @property
    def conn(self) -> str:
        """The connection id that the trace events of this session carry."""
        return self._protocol.conn_id

    @property
    def usable(self) -> bool:
        """True while :meth:`send` can still succeed on this connection."""
        return self._protocol.usable and not self._closing

    @property
    def busy(self) -> bool:
        """A transaction is running (and maybe more are queued)."""
        return self._turns.locked

    @property
    def transactions(self) -> int:
        """How many transactions this connection has started so far."""
        return self._protocol.transactions

    @property
    def greeting(self) -> str:
        return self._protocol.greeting

    @property
    def tls(self) -> bool:
        return bool(self._protocol._tlsMode)

    @property
    def extensions(self) -> dict[str, str]:
        return {
            k.decode("ascii", "replace"): v.decode("ascii", "replace")
            for k, v in self._protocol.extensions.items()
        }

    def send(
        self, mail_from: str, rcpt_tos: list[str], content: bytes, tracer: Tracer | None = None
    ) -> defer.Deferred:
        """Run one mail transaction; fires with a :class:`SendResult`.

        The results and errors are those of :func:`send`. ``tracer`` gets
        the transaction's lines and events (bind a queue id or Message-ID to
        it); the session's own tracer keeps the connection's events.
        Arguments are checked at once (``ValueError``, ``TypeError``).
        """
        return self._submit(_message(mail_from, rcpt_tos, content), tracer, None)

    def _submit(self, message: _Message, tracer: Tracer | None, started: int | None):
        if self._closing:
            return defer.fail(
                SMTPDeliveryError(421, "4.4.2", f"session {self.conn} is closed", stage="MAIL")
            )
        return self._turns.run(self._transact, message, tracer or self._protocol.tracer, started)

    def _transact(self, message: _Message, tracer: Tracer, started: int | None):
        if not self._protocol.usable:
            error = SMTPDeliveryError(
                421, "4.4.2", f"connection {self.conn} was lost or closed", stage="MAIL"
            )
            return defer.fail(error)
        return self._protocol.start_transaction(message, tracer, started)

    def close(self) -> defer.Deferred:
        """QUIT and close; fires (with None, never an error) once the
        connection is gone. Transactions already queued run first; sends
        made after this fail. Cancelling the result drops the connection."""
        if not self._closing:
            self._closing = True
            self._turns.run(self._protocol.quit).addErrback(lambda _: None)
        return self._protocol.when_closed()

    def abort(self) -> None:
        """Drop the connection now; a transaction in progress fails (4.4.2)."""
        self._closing = True
        self._protocol.abort()


def _open(reactor, host, port, options, bind_address, tracer, started) -> defer.Deferred:
    """Connect and set up; fires with a ready :class:`ClientSession`."""
    tracer.event(
        "relay.connect", host=host, port=port, tls=options.tls, lmtp=options.lmtp,
        bind=bind_address,
    )
    cancelled = False

    def cancel(_: defer.Deferred) -> None:
        nonlocal cancelled
        cancelled = True
        if not connecting.called:
            connecting.cancel()
        elif factory.client is not None:
            factory.client.abort()

    opened = defer.Deferred(canceller=cancel)
    factory = _SessionFactory(options, opened, reactor, tracer, started)
    endpoint_class = TCP6ClientEndpoint if ":" in host else TCP4ClientEndpoint
    bind = (bind_address, 0) if bind_address else None
    endpoint = endpoint_class(reactor, host, port, timeout=options.timeout, bindAddress=bind)
    if options.tls == "implicit":
        endpoint = wrapClientTLS(options.tls_context, endpoint)

    # The endpoint's own timeout covers the TCP connect; this watchdog also
    # covers name resolution, so the result can never hang here.
    connecting = endpoint.connect(factory)
    watchdog = (
        reactor.callLater(options.timeout, connecting.cancel) if not connecting.called else None
    )

    def connected(client):
        if watchdog is not None and watchdog.active():
            watchdog.cancel()

    def not_connected(reason: Failure) -> None:
        timed_out = watchdog is not None and not watchdog.active() and not cancelled
        if watchdog is not None and watchdog.active():
            watchdog.cancel()
        if cancelled or opened.called:
            return
        if timed_out:
            why = f"no connection within {options.timeout}s"
        elif reason.check(ConnectionRefusedError):
            why = "connection refused"
        else:
            why = reason.getErrorMessage()
        error = SMTPDeliveryError(
            421, "4.4.1", f"cannot connect to {host}:{port}: {why}", stage="connect"
        )
        tracer.event("relay.done", host=host, port=port, error=str(error), permanent=False)
        opened.errback(Failure(error))

    connecting.addCallbacks(connected, not_connected)
    return opened.addCallback(ClientSession)


def open_session(
    reactor,
    host: str,
    port: int,
    *,
    helo: str,
    tls: str = "starttls",
    tls_hostname: str | None = None,
    ca_cert: Path | str | None = None,
    username: str | None = None,
    password: str | None = None,
    lmtp: bool = False,
    bind_address: str | None = None,
    timeout: float = 30,
    tracer: Tracer = NULL_TRACER,
) -> defer.Deferred:
    """Connect to ``host:port`` and set the connection up for mail.

    Reads the greeting, says EHLO (LHLO for LMTP), runs STARTTLS and EHLO
    again, and logs in, as ``tls``, ``username`` and ``password`` ask (see
    :func:`send`). Fires with an idle :class:`ClientSession`, or fails with
    :class:`SMTPDeliveryError` (``stage`` says which step). ``tracer`` gets
    the connection's events; each transaction may bring its own.
    Cancelling the result drops the connection.
    """
    options = _session_options(
        host, helo=helo, tls=tls, tls_hostname=tls_hostname, ca_cert=ca_cert,
        username=username, password=password, lmtp=lmtp, timeout=timeout,
    )
    return _open(reactor, host, port, options, bind_address, tracer, now_us())


# --- The one-message entry point ---------------------------------------------------------


def send(
    reactor,
    host: str,
    port: int,
    *,
    helo: str,
    mail_from: str,
    rcpt_tos: list[str],
    content: bytes,
    tls: str = "starttls",
    tls_hostname: str | None = None,
    ca_cert: Path | str | None = None,
    username: str | None = None,
    password: str | None = None,
    lmtp: bool = False,
    bind_address: str | None = None,
    timeout: float = 30,
    tracer: Tracer = NULL_TRACER,
) -> defer.Deferred:
    """Deliver ``content`` to ``rcpt_tos`` through the server at ``host:port``.

    Fires with a :class:`SendResult` once every recipient has a verdict
    (some may be refused), or fails with :class:`SMTPDeliveryError` when no
    recipient got the message. It always fires within about ``timeout``
    seconds of the last sign of life from the server; cancelling it drops
    the connection.

    ``tls``: ``"starttls"`` (required, RFC 3207), ``"implicit"`` (TLS from
    the first byte, RFC 8314 3.3, port 465), ``"opportunistic"`` (STARTTLS
    when offered, else clear) or ``"none"``. Whenever TLS is used, the server
    must prove it is ``tls_hostname`` (default ``host``) with a certificate
    from the lab CA ``ca_cert``; a failed check or handshake is a failure
    (4.7.5), never a reason to carry on in clear. ``bind_address`` is our
    side's address, which the next hop sees as the client IP (SPF).
    ``mail_from=""`` sends the null sender ``<>`` used by bounces (RFC 5321
    4.5.5). Credentials are sent only under TLS.

    The trace gets every command and reply line (``C`` is us, ``S`` the
    server; SASL secrets as ``***``) and ``relay.*``/``tls.*`` events; the
    message body is not traced, only its size (``relay.data``).

    This is :func:`open_session`, one :meth:`ClientSession.send` and
    :meth:`ClientSession.close` on a connection of its own. To send several
    messages to one place, keep a session (or a :class:`ConnectionCache`).
    """
    options = _session_options(
        host, helo=helo, tls=tls, tls_hostname=tls_hostname, ca_cert=ca_cert,
        username=username, password=password, lmtp=lmtp, timeout=timeout,
    )
    message = _message(mail_from, rcpt_tos, content)
    started = now_us()
    opening = _open(reactor, host, port, options, bind_address, tracer, started)
    session: ClientSession | None = None

    def cancel(_: defer.Deferred) -> None:
        if session is None:
            opening.cancel()
        else:
            session.abort()

    result = defer.Deferred(canceller=cancel)

    def opened(s: ClientSession) -> defer.Deferred:
        nonlocal session
        session = s

        def close(outcome):
            s.close()  # QUIT now; the caller need not wait for the 221
            return outcome

        return s._submit(message, tracer, started).addBoth(close)

    def settle(outcome) -> None:
        if not result.called:
            if isinstance(outcome, Failure):
                result.errback(outcome)
            else:
                result.callback(outcome)

    opening.addCallback(opened).addBoth(settle)
    return result


# --- Reusing connections between messages -------------------------------------------


@dataclass(frozen=True)
class Destination:
    """What makes two connections interchangeable: a session is reused only
    for the same server, reached and set up the same way. ``helo`` and
    ``ca_cert`` are part of it too (the server judged our EHLO name; TLS was
    verified against that CA). The password is left out, so no secret is
    kept in a key or shown in a repr."""

    host: str
    port: int
    tls: str
    tls_hostname: str
    username: str | None
    lmtp: bool
    bind_address: str | None
    helo: str
    ca_cert: str | None


@dataclass(eq=False)
class _Pooled:
    """A session the cache owns, with the cache's bookkeeping for it."""

    session: ClientSession
    count: int = 0  # transactions given to it
    idle_timer: object | None = None
    retire: str | None = None  # close it when its transaction ends, for this reason
    retired: list[defer.Deferred] = field(default_factory=list)


@dataclass(eq=False)
class _Pool:
    """The sessions of one :class:`Destination`."""

    open_args: dict
    size: int = 0  # open or being opened; never above max_per_destination
    idle: list[_Pooled] = field(default_factory=list)  # most recently used last
    busy: list[_Pooled] = field(default_factory=list)
    waiters: deque[tuple[defer.Deferred, Tracer | None]] = field(default_factory=deque)


class ConnectionCache:
    """Keep connections open between messages and reuse them, as Postfix's
    ``scache`` does for its SMTP client.

    :meth:`send` takes the options of :func:`send`. It runs the transaction
    on an idle session to the same :class:`Destination` if there is one
    (``relay.reuse``); otherwise it opens one (``relay.cache.open``) unless
    ``max_per_destination`` are already open, in which case it waits for
    one of them to finish its transaction. After the transaction the
    session goes back to the pool. A session is closed (QUIT, and
    ``relay.cache.close`` with the reason) when it has been idle for
    ``max_idle`` seconds (``"idle"``), has carried ``max_messages``
    transactions (``"max_messages"``: a long-lived connection should not
    outlive a server's or our own reload for ever), or is no longer usable
    (``"dead"``: lost, timed out, 421).

    Why short idle times: RFC 5321 4.5.3.2.7 gives the *server* 5 minutes
    of patience for our next command, but an idle connection still holds a
    process or a slot on the server, so a client should keep one only as
    long as more mail is likely (Postfix: ``smtp_connection_cache_time_limit
    = 2s``). Most reuse happens in bursts -- a queue flush, a list post.

    The idle pool is used most-recently-first: in a lull the sessions at the
    bottom go unused and time out, so the cache shrinks to what the traffic
    needs. ``session_factory`` (default :func:`open_session`) is there for
    tests; ``reactor`` gives the clock for idle timers.
    """

    def __init__(
        self,
        reactor,
        *,
        max_idle: float = 5.0,
        max_per_destination: int = 10,
        max_messages: int = 100,
        tracer: Tracer = NULL_TRACER,
        session_factory: Callable[..., defer.Deferred] = open_session,
    ):
        if max_per_destination < 1 or max_messages < 1:
            raise ValueError("max_per_destination and max_messages must be at least 1")
        self.reactor = reactor
        self.max_idle = max_idle
        self.max_per_destination = max_per_destination
        self.max_messages = max_messages
        self.tracer = tracer
        self.session_factory = session_factory
        self._pools: dict[Destination, _Pool] = {}

    def send(
        self,
        host: str,
        port: int,
        *,
        helo: str,
        mail_from: str,
        rcpt_tos: list[str],
        content: bytes,
        tls: str = "starttls",
        tls_hostname: str | None = None,
        ca_cert: Path | str | None = None,
        username: str | None = None,
        password: str | None = None,
        lmtp: bool = False,
        bind_address: str | None = None,
        timeout: float = 30,
        tracer: Tracer | None = None,
    ) -> defer.Deferred:
        """Deliver one message like :func:`send`, on a cached connection.

        ``tracer`` is for this transaction's events (bind the queue id and
        Message-ID to it); connection events go to the cache's tracer.
        """
        _check_connection_arguments(tls, ca_cert, username, password)
        _check_envelope(mail_from, rcpt_tos, content)
        destination = Destination(
            host, port, tls, tls_hostname or host, username, lmtp, bind_address, helo,
            str(ca_cert) if ca_cert is not None else None,
        )
        open_args = dict(
            host=host, port=port, helo=helo, tls=tls, tls_hostname=tls_hostname,
            ca_cert=ca_cert, username=username, password=password, lmtp=lmtp,
            bind_address=bind_address, timeout=timeout,
        )
        pool = self._pools.get(destination)
        if pool is None:
            pool = self._pools[destination] = _Pool(open_args)
        pool.open_args = open_args  # the latest timeout and password win
        return self._send(pool, mail_from, rcpt_tos, content, tracer)

    @defer.inlineCallbacks
    def _send(self, pool: _Pool, mail_from, rcpt_tos, content, tracer):
        entry, reused = yield self._acquire(pool, tracer)
        entry.count += 1
        pool.busy.append(entry)
        if reused:
            (tracer or self.tracer).event(
                "relay.reuse", conn=entry.session.conn, count=entry.count
            )
        try:
            result = yield entry.session.send(mail_from, rcpt_tos, content, tracer=tracer)
        finally:
            pool.busy.remove(entry)
            self._release(pool, entry)
        return result

    def _acquire(self, pool: _Pool, tracer: Tracer | None) -> defer.Deferred:
        """A session for one transaction: ``(entry, reused)``."""
        while pool.idle:
            entry = pool.idle.pop()
            entry.idle_timer.cancel()
            if entry.session.usable:
                return defer.succeed((entry, True))
            self._discard(pool, entry, "dead")  # the server closed it while idle
        if pool.size < self.max_per_destination:
            return self._open(pool, tracer)
        # Every session is busy: wait for one (see _release and _wake).
        waiter = defer.Deferred(canceller=lambda d: pool.waiters.remove((d, tracer)))
        pool.waiters.append((waiter, tracer))
        return waiter

    def _open(self, pool: _Pool, tracer: Tracer | None) -> defer.Deferred:
        """Open a session in a free slot, for the message traced by ``tracer``.

        ``relay.cache.open`` goes to that message's tracer, so the trace says
        which message paid for the setup; the session's own events (connect,
        TLS, ...) go to the cache's tracer, as they outlive the message.
        """
        pool.size += 1
        args = dict(pool.open_args)
        host, port = args.pop("host"), args.pop("port")
        d = self.session_factory(self.reactor, host, port, tracer=self.tracer, **args)

        def opened(session):
            (tracer or self.tracer).event(
                "relay.cache.open", conn=session.conn, host=host, port=port, open=pool.size
            )
            return _Pooled(session), False

        def failed(reason):
            pool.size -= 1
            self._wake(pool)  # a waiter may have better luck, or fail on its own
            return reason

        return d.addCallbacks(opened, failed)

    def _release(self, pool: _Pool, entry: _Pooled) -> None:
        """The transaction on ``entry`` is over: pass it on, pool it, or close it."""
        if entry.retire is not None:
            self._discard(pool, entry, entry.retire)
        elif not entry.session.usable:
            self._discard(pool, entry, "dead")
        elif entry.count >= self.max_messages:
            self._discard(pool, entry, "max_messages")
        elif pool.waiters:
            waiter, _ = pool.waiters.popleft()
            waiter.callback((entry, True))
        else:
            pool.idle.append(entry)
            entry.idle_timer = self.reactor.callLater(self.max_idle, self._expire, pool, entry)

    def _expire(self, pool: _Pool, entry: _Pooled) -> None:
        pool.idle.remove(entry)
        self._discard(pool, entry, "idle")

    def _discard(self, pool: _Pool, entry: _Pooled, reason: str) -> defer.Deferred:
        """Close a session the pool no longer holds; fires once it is closed."""
        pool.size -= 1
        self.tracer.event(
            "relay.cache.close", conn=entry.session.conn, reason=reason, count=entry.count
        )
        closed = entry.session.close()
        closed.addErrback(lambda _: None)
        for waiting in entry.retired:  # close_all() waits for this one
            closed.addBoth(lambda _, d=waiting: d.callback(None))
        self._wake(pool)
        return closed

    def _wake(self, pool: _Pool) -> None:
        """A slot is free: the longest waiter opens a new session in it."""
        if pool.waiters and pool.size < self.max_per_destination:
            waiter, tracer = pool.waiters.popleft()
            self._open(pool, tracer).chainDeferred(waiter)

    def close_all(self) -> defer.Deferred:
        """Close every session: the idle ones now, the busy ones when their
        transaction ends. Fires (with None) once all are closed."""
        closing = []
        for pool in self._pools.values():
            while pool.idle:
                entry = pool.idle.pop()
                entry.idle_timer.cancel()
                closing.append(self._discard(pool, entry, "shutdown"))
            for entry in pool.busy:
                entry.retire = "shutdown"
                done = defer.Deferred()
                entry.retired.append(done)
                closing.append(done)
        return defer.gatherResults(closing, consumeErrors=True).addCallback(lambda _: None)

    def stats(self) -> dict[Destination, dict[str, int]]:
        """Sessions per destination: open, idle, busy, waiting senders."""
        return {
            destination: {
                "open": pool.size, "idle": len(pool.idle), "busy": len(pool.busy),
                "waiting": len(pool.waiters),
            }
            for destination, pool in self._pools.items()
        }
