# -*- test-case-name: tests.test_smtpclient -*-
"""Hand one message to the next hop over SMTP or LMTP.

Every hop in the lab that passes mail on uses :func:`send`: the MUA submits
to the MSA (RFC 6409, with STARTTLS or implicit TLS and AUTH), the MSA and
MTAs relay over SMTP (RFC 5321, opportunistic STARTTLS), and the MTA hands
mail to the MDA over LMTP (RFC 2033).

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
* credentials are only ever sent over TLS, and never reach the trace.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

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

from agents.tls import client_context
from agents.trace import NULL_TRACER, Tracer, now_us

TLS_MODES = ("starttls", "implicit", "opportunistic", "none")


# --- Results and errors -----------------------------------------------------


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
    stamps (``start``, ``connected``, ``tls``, ``done``) so a notebook can
    line this hop up with the trace of the next one."""

    recipients: list[RecipientResult]
    greeting: str = ""  # the server's 220 text, e.g. "mx.b.test ESMTP"
    tls: bool = False
    extensions: dict[str, str] = field(default_factory=dict)
    timings: dict[str, int] = field(default_factory=dict)

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
    text = normalize_line_breaks(content)
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


@dataclass(frozen=True)
class _Request:
    """One delivery job, checked and encoded before we connect."""

    helo: bytes
    mail_from: bytes
    rcpt_tos: tuple[str, ...]
    payload: bytes  # what follows 354, from encode_data()
    size: int  # RFC 1870: octets with CRLFs, without stuffing or final dot
    eight_bit: bool
    smtputf8: bool  # a non-ASCII address needs SMTPUTF8 (RFC 6531 3.4)
    tls: str
    tls_context: object | None
    username: bytes | None
    password: bytes | None
    lmtp: bool
    timeout: float


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


@implementer(IHandshakeListener)
class DeliveryClient(smtp.ESMTPClient):
    """One SMTP or LMTP session that delivers one message, then QUITs.

    Twisted drives the session as a state machine: each command we send
    sets ``_expected`` (the good reply codes), ``_okresponse`` and
    ``_failresponse`` (what to call next). The methods named ``smtpState_*``,
    ``esmtpState_*``, ``tryTLS`` and ``authenticate`` are Twisted's states,
    overridden; ``_on_*`` are ours.
    """

    #: Twisted's in-memory session log would keep AUTH secrets; we trace instead.
    debug = False

    def __init__(
        self,
        request: _Request,
        result: defer.Deferred,
        clock,
        tracer: Tracer = NULL_TRACER,
        started: int | None = None,
    ):
        starttls_context = request.tls_context if request.tls != "implicit" else None
        super().__init__(request.password, starttls_context, request.helo)
        self.request, self.result, self.clock, self.tracer = request, result, clock, tracer
        self.timeout = request.timeout
        self.requireAuthentication = request.username is not None
        if request.username is not None:
            self.registerAuthenticator(PlainAuthenticator(request.username))
            self.registerAuthenticator(smtp.LOGINAuthenticator(request.username))
        self.conn_id = tracer.new_connection_id()
        self.peer: str | None = None
        self.greeting = ""
        self.extensions: dict[bytes, bytes] = {}
        self.replies: list[RecipientResult] = []  # one per rcpt_tos entry, in order
        self.accepted: list[int] = []  # indexes into replies, RCPT accepted
        self.awaiting_lmtp: list[int] = []  # accepted recipients still without a reply
        self.timings = {"start": started or now_us()}
        self.stage = "connect"  # the command whose reply we wait for
        self.data_sent = False
        self.sasl_active = False

    # Plumbing: time, tracing, settling the result.

    def callLater(self, period, func):
        """TimeoutMixin's clock: the reactor we were given (a Clock in tests)."""
        return self.clock.callLater(period, func)

    def sendLine(self, line: bytes) -> None:
        if self.sasl_active and not line.upper().startswith(b"AUTH "):
            shown = b"***"  # a SASL response (AUTH LOGIN user name, password)
        else:
            shown = line  # Tracer.line masks the argument of "AUTH PLAIN ..."
            self.stage = line.split(b" ", 1)[0].decode("ascii", "replace").upper()
        self.tracer.line(self.conn_id, "C", shown, peer=self.peer)
        super().sendLine(line)

    def lineReceived(self, line: bytes):
        self.tracer.line(self.conn_id, "S", line, peer=self.peer)
        if line[:3].isdigit() and line[3:4] != b"-":
            self.tracer.event("relay.reply", conn=self.conn_id, code=int(line[:3]))
        return super().lineReceived(line)

    def _reply(self, code: int, resp: bytes) -> tuple[str, str]:
        return parse_status(code, resp.decode("utf-8", "replace"))

    def _fail(self, error: SMTPDeliveryError, polite: bool = True) -> None:
        """End the session with a whole-transaction failure.

        ``polite``: the server is still in step with us, so say QUIT
        (RFC 5321 4.1.1.10); otherwise just drop the connection.
        """
        if self.result.called:
            return
        self.sasl_active = False  # so our QUIT is traced as it is
        self.timings["done"] = now_us()
        self.tracer.event(
            "relay.done", conn=self.conn_id, error=str(error), permanent=error.permanent
        )
        if self.transport is not None and self.connected:
            if polite:
                self._disconnectFromServer()
            else:
                self.transport.abortConnection()
        self.result.errback(Failure(error))

    def _refused(self, stage: str):
        """A ``_failresponse`` that turns the server's reply into a failure."""

        def fail(code: int, resp: bytes) -> None:
            status, text = self._reply(code, resp)
            self._fail(SMTPDeliveryError(code, status, text, stage=stage))

        return fail

    def _succeed(self) -> None:
        """Every accepted recipient has its verdict: report, then QUIT."""
        if self.result.called:
            return
        self.timings["done"] = now_us()
        result = SendResult(
            recipients=list(self.replies),
            greeting=self.greeting,
            tls=self._tlsMode,
            extensions={
                k.decode("ascii", "replace"): v.decode("ascii", "replace")
                for k, v in self.extensions.items()
            },
            timings=dict(self.timings),
        )
        self.tracer.event(
            "relay.done",
            conn=self.conn_id,
            codes={r.address: r.code for r in result.recipients},
            tls=result.tls,
        )
        if self.connected:
            self._disconnectFromServer()
        self.result.callback(result)

    # Connection, greeting, EHLO/LHLO.

    def connectionMade(self) -> None:
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
        self._tlsMode = self.request.tls == "implicit"
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
        verb = b"LHLO" if self.request.lmtp else b"EHLO"
        tls_needed = self.request.tls == "starttls" and not self._tlsMode
        if self.request.lmtp or self.secret is not None or tls_needed:
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
        mode = self.request.tls
        if self._tlsMode or mode == "none":
            return self.authenticate(code, resp, items)
        if b"STARTTLS" in items:
            self._expected = [220]
            self._okresponse = self.esmtpState_starttls
            self._failresponse = self._on_starttls_refused
            return self.sendLine(b"STARTTLS")
        if mode == "starttls":
            # Postfix says the same and defers (a later try may find TLS).
            return self._fail(
                SMTPDeliveryError(
                    421, "4.7.4", "TLS is required, but was not offered by host", stage="EHLO"
                )
            )
        self.tracer.event("tls.skipped", conn=self.conn_id, reason="STARTTLS not offered")
        self.authenticate(code, resp, items)

    def _on_starttls_refused(self, code: int, resp: bytes) -> None:
        if self.request.tls == "starttls" or code == 421:
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
            return self._fail(
                SMTPDeliveryError(421, "4.7.5", f"cannot start TLS: {e}", stage="STARTTLS"),
                polite=False,
            )
        self._tlsMode = True
        self.esmtpState_ehlo(code, resp)

    def handshakeCompleted(self) -> None:
        """Called by Twisted's TLS layer once the peer is verified."""
        self.timings["tls"] = now_us()
        self.tracer.event("tls.done", conn=self.conn_id, version=_tls_version(self.transport))

    # AUTH (RFC 4954).

    def authenticate(self, code: int, resp: bytes, items: dict) -> None:
        """Log in if we have credentials -- but only under TLS: PLAIN and
        LOGIN carry the password as base64, which hides nothing (RFC 4616,
        Security Considerations)."""
        if self.secret is None:
            return self.smtpState_from(code, resp)
        if not self._tlsMode:
            return self._fail(
                SMTPDeliveryError(
                    538, "5.7.11", "refusing to send credentials without TLS", stage="AUTH"
                )
            )
        self.sasl_active = True
        super().authenticate(code, resp, items)

    def esmtpAUTHRequired(self, code=-1, resp=None) -> None:
        self._fail(
            SMTPDeliveryError(
                530, "5.7.0", "server offers no AUTH mechanism we use (PLAIN, LOGIN)", stage="AUTH"
            )
        )

    def esmtpAUTHDeclined(self, code=-1, resp=None) -> None:
        self._refused("AUTH")(code, resp or b"")

    # Twisted resends PLAIN with other credentials on failure; we do not.
    _esmtpState_plainAuth = esmtpAUTHServerError = esmtpAUTHDeclined

    def esmtpAUTHMalformedChallenge(self, code=-1, resp=None) -> None:
        self._fail(
            SMTPDeliveryError(421, "4.7.0", "server sent a malformed AUTH challenge", stage="AUTH")
        )

    # The mail transaction: MAIL, RCPT..., DATA (RFC 5321 3.3).

    def smtpState_from(self, code: int, resp: bytes) -> None:
        """Send MAIL FROM, with the parameters the server announced."""
        self.sasl_active = False
        try:
            params = self._mail_parameters()
        except SMTPDeliveryError as error:
            return self._fail(error)
        self._expected = smtp.SUCCESS
        self._okresponse = self.smtpState_to
        self._failresponse = self._refused("MAIL")
        self.sendLine(b"MAIL FROM:<" + self.request.mail_from + b">" + params)

    def _mail_parameters(self) -> bytes:
        request, ext, params = self.request, self.extensions, []
        if b"SIZE" in ext:  # RFC 1870: let the server refuse before the upload
            limit = ext[b"SIZE"]
            if limit.isdigit() and 0 < int(limit) < request.size:
                raise SMTPDeliveryError(
                    552, "5.3.4", f"message is {request.size} octets, server takes {int(limit)}",
                    stage="MAIL",
                )
            params.append(b"SIZE=%d" % request.size)
        if request.eight_bit:
            if b"8BITMIME" in ext:  # RFC 6152
                params.append(b"BODY=8BITMIME")
            else:
                # RFC 6152 3 wants a 7-bit conversion here; like Postfix
                # without MIME conversion, we send the bytes as they are.
                self.tracer.event("relay.8bit_unannounced", conn=self.conn_id)
        if request.smtputf8:
            if b"SMTPUTF8" not in ext:
                raise SMTPDeliveryError(
                    553, "5.6.7", "non-ASCII address, but server lacks SMTPUTF8", stage="MAIL"
                )
            params.append(b"SMTPUTF8")  # RFC 6531 3.4
        return b"".join(b" " + p for p in params)

    def smtpState_to(self, code: int, resp: bytes) -> None:
        """MAIL accepted: offer the recipients one by one."""
        self.pending_rcpts = list(enumerate(self.request.rcpt_tos))
        self.replies = []
        self._expected = range(0, 1000)  # every reply is a verdict on one recipient
        self._okresponse = self._on_rcpt_reply
        self._send_rcpt()

    def _send_rcpt(self) -> None:
        self.current_rcpt = self.pending_rcpts.pop(0)
        _, address = self.current_rcpt
        self.sendLine(b"RCPT TO:<" + _envelope_address(address) + b">")

    def _on_rcpt_reply(self, code: int, resp: bytes) -> None:
        """Record the verdict; a refused recipient does not end the transaction."""
        index, address = self.current_rcpt
        if code == 421:  # the server is closing the session (RFC 5321 3.8)
            return self._refused("RCPT")(code, resp)
        self.replies.append(RecipientResult(address, code, *self._reply(code, resp)))
        if 200 <= code < 300:
            self.accepted.append(index)
        if self.pending_rcpts:
            return self._send_rcpt()
        if not self.accepted:
            return self._fail(_no_recipient_error(self.replies))
        self._expected = [354]
        self._okresponse = self.smtpState_data
        self._failresponse = self._on_data_reply  # refusing DATA refuses them all
        self.sendLine(b"DATA")

    def smtpState_data(self, code: int, resp: bytes) -> None:
        """354: send the message in one write, already dot-stuffed and
        terminated by encode_data(), then wait for the verdict: one reply in
        SMTP, one per accepted recipient in LMTP (RFC 2033 4.2)."""
        self.transport.write(self.request.payload)
        self.data_sent = True
        self.stage = "end of data"
        self.tracer.event("relay.data", conn=self.conn_id, octets=len(self.request.payload))
        self.resetTimeout()
        self._expected = range(0, 1000)
        if self.request.lmtp:
            self.awaiting_lmtp = list(self.accepted)
            self._okresponse = self._on_lmtp_reply
        else:
            self._okresponse = self._on_data_reply

    def _on_data_reply(self, code: int, resp: bytes) -> None:
        """SMTP: one reply speaks for every accepted recipient."""
        status, text = self._reply(code, resp)
        for index in self.accepted:
            self.replies[index] = RecipientResult(self.replies[index].address, code, status, text)
        self._succeed()

    def _on_lmtp_reply(self, code: int, resp: bytes) -> None:
        """LMTP: the next reply belongs to the next accepted recipient, in
        RCPT order (RFC 2033 4.2) -- one may be stored, another over quota."""
        index = self.awaiting_lmtp.pop(0)
        address = self.replies[index].address
        self.replies[index] = RecipientResult(address, code, *self._reply(code, resp))
        if not self.awaiting_lmtp:
            self._succeed()

    # Failures with no reply: timeout, lost connection, garbage.

    def timeoutConnection(self) -> None:
        """The server stayed silent for ``timeout`` seconds. RFC 5321
        4.5.3.2 suggests minutes per command on the Internet; the lab is
        local, so the caller picks."""
        if self.result.called:  # our QUIT went unanswered
            self.transport.abortConnection()
            return
        self._fail(
            SMTPDeliveryError(
                421, "4.4.2", f"no reply within {self.timeout}s (waiting for {self.stage})",
                stage=self.stage,
            ),
            polite=False,
        )

    def connectionLost(self, reason=None) -> None:
        self.connected = False
        super().connectionLost(reason)  # stops the idle timer
        if self.result.called:
            return
        if self.request.lmtp and self.data_sent and len(self.awaiting_lmtp) < len(self.accepted):
            # Some LMTP verdicts are in: those recipients are settled, so
            # report them and mark only the silent ones for retry.
            for index in self.awaiting_lmtp:
                address = self.replies[index].address
                self.replies[index] = RecipientResult(
                    address, 421, "4.4.2", "connection lost before this recipient's reply"
                )
            self.awaiting_lmtp = []
            return self._succeed()
        self._fail(self._connection_lost_error(reason), polite=False)

    def _connection_lost_error(self, reason: Failure | None) -> SMTPDeliveryError:
        why = reason.getErrorMessage() if reason is not None else "unknown"
        # SSL.Error: the chain does not lead to the lab CA (or the handshake
        # broke); VerificationError: the certificate names another host.
        if reason is not None and reason.check(SSL.Error, VerificationError):
            return SMTPDeliveryError(421, "4.7.5", f"TLS handshake failed: {why}", stage="TLS")
        if self.data_sent:
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
        self._fail(
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


def _tls_version(transport) -> str | None:
    """"TLSv1.3" and the like, from whichever object holds the TLS connection."""
    for candidate in (transport, getattr(transport, "protocol", None)):
        try:
            handle = candidate.getHandle()
        except Exception:
            continue
        if hasattr(handle, "get_protocol_version_name"):
            return handle.get_protocol_version_name()
    return None


class _DeliveryFactory(Factory):
    def __init__(self, request, result, reactor, tracer, started):
        self.request, self.result, self.reactor = request, result, reactor
        self.tracer, self.started = tracer, started
        self.client: DeliveryClient | None = None

    def buildProtocol(self, addr):
        self.client = DeliveryClient(
            self.request, self.result, self.reactor, self.tracer, self.started
        )
        self.client.factory = self
        return self.client


# --- The public entry point -------------------------------------------------------


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
    """
    if tls not in TLS_MODES:
        raise ValueError(f"tls must be one of {TLS_MODES}, not {tls!r}")
    if not isinstance(content, bytes):
        raise TypeError("content must be bytes")
    if not rcpt_tos:
        raise ValueError("at least one recipient is needed")
    if (username is None) != (password is None):
        raise ValueError("give both username and password, or neither")
    if username is not None and tls == "none":
        raise ValueError("credentials need TLS; tls='none' would send them in clear")
    tls_context = None
    if tls != "none":
        if ca_cert is None:
            raise ValueError("ca_cert is needed: TLS peers are verified against the lab CA")
        tls_context = client_context(Path(ca_cert), tls_hostname or host)
    addresses = [mail_from, *rcpt_tos]
    for address in addresses:
        _envelope_address(address)
    normalized = normalize_line_breaks(content)
    request = _Request(
        helo=helo.encode("ascii"),
        mail_from=_envelope_address(mail_from),
        rcpt_tos=tuple(rcpt_tos),
        payload=encode_data(content),
        size=len(normalized),
        eight_bit=any(b > 127 for b in normalized),
        smtputf8=not all(a.isascii() for a in addresses),
        tls=tls,
        tls_context=tls_context,
        username=username.encode("utf-8") if username is not None else None,
        password=password.encode("utf-8") if password is not None else None,
        lmtp=lmtp,
        timeout=timeout,
    )
    started = now_us()
    tracer.event(
        "relay.connect", host=host, port=port, tls=tls, lmtp=lmtp, bind=bind_address,
        rcpts=len(rcpt_tos),
    )

    cancelled = False

    def cancel(_: defer.Deferred) -> None:
        nonlocal cancelled
        cancelled = True
        if not connecting.called:
            connecting.cancel()
        elif factory.client is not None and factory.client.transport is not None:
            factory.client.transport.abortConnection()

    result = defer.Deferred(canceller=cancel)
    factory = _DeliveryFactory(request, result, reactor, tracer, started)
    endpoint_class = TCP6ClientEndpoint if ":" in host else TCP4ClientEndpoint
    bind = (bind_address, 0) if bind_address else None
    endpoint = endpoint_class(reactor, host, port, timeout=timeout, bindAddress=bind)
    if tls == "implicit":
        endpoint = wrapClientTLS(tls_context, endpoint)

    # The endpoint's own timeout covers the TCP connect; this watchdog also
    # covers name resolution, so the result can never hang here.
    connecting = endpoint.connect(factory)
    watchdog = reactor.callLater(timeout, connecting.cancel) if not connecting.called else None

    def connected(client):
        if watchdog is not None and watchdog.active():
            watchdog.cancel()

    def not_connected(reason: Failure) -> None:
        timed_out = watchdog is not None and not watchdog.active() and not cancelled
        if watchdog is not None and watchdog.active():
            watchdog.cancel()
        if cancelled or result.called:
            return
        if timed_out:
            why = f"no connection within {timeout}s"
        elif reason.check(ConnectionRefusedError):
            why = "connection refused"
        else:
            why = reason.getErrorMessage()
        error = SMTPDeliveryError(
            421, "4.4.1", f"cannot connect to {host}:{port}: {why}", stage="connect"
        )
        tracer.event("relay.done", host=host, port=port, error=str(error), permanent=False)
        result.errback(Failure(error))

    connecting.addCallbacks(connected, not_connected)
    return result
