"""POP3 (RFC 1939) with STLS (RFC 2595) over the user's INBOX Maildir.

Twisted's ``POP3`` runs the command loop; this module adds what it lacks:

* a maildrop over :mod:`agents.maildir` (:class:`POP3Maildrop`), fixed for
  the session as RFC 1939 asks: DELE only marks, QUIT deletes the files
  (the UPDATE state), a dropped connection deletes nothing;
* RETR and TOP that byte-stuff the *whole* message. Twisted stuffs each
  16 KiB chunk on its own and never the first line, so a line holding only
  ``.`` at offset 16384 ends the response early and the rest of the message
  is read as replies; it also turns CRLF into CR CR LF;
* STLS: offered in CAPA before TLS only; text pipelined after it is dropped
  (it came in clear and may be injected); USER and PASS are refused until
  TLS is up when a TLS context is configured;
* no APOP: its MD5 challenge needs clear-text passwords on the server, and
  the lab stores scrypt hashes only (see :mod:`agents.users`).
"""

from __future__ import annotations

import io
import os
import re

from twisted.cred import error as cred_error
from twisted.internet import interfaces
from twisted.mail import pop3
from twisted.python import log
from zope.interface import implementer

from agents.headers import get_header
from agents.maildir import MailStore
from agents.security import LoginBlocked, ThrottledPortal, tls_failure
from agents.security import event as security_event
from agents.retrieval import MailboxRealm, RetrievalServerFactory, TracedLoginMixin, make_factory
from agents.net import no_delay
from agents.trace import NULL_TRACER, Tracer

# --------------------------------------------------------------------------
# Multi-line responses


def normalize_crlf(content: bytes) -> bytes:
    """Every line ends in CRLF on the wire (RFC 1939 3); fix bare LFs."""
    return re.sub(rb"\r?\n", b"\r\n", content)


def dot_stuff(content: bytes) -> bytes:
    """Encode a message as a multi-line response body, terminator included.

    RFC 1939 3: each line that starts with ``.`` gets one more ``.``; the
    response ends with CRLF ``.`` CRLF. Done over the whole message at once,
    so no line can slip through at a buffer boundary.
    """
    data = re.sub(rb"(?m)^\.", b"..", normalize_crlf(content))
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data + b".\r\n"


def top_of(content: bytes, lines: int) -> bytes:
    """TOP: the header, the blank line, and the first ``lines`` body lines (RFC 1939 7)."""
    data = normalize_crlf(content)
    if data.startswith(b"\r\n"):
        head, body = b"\r\n", data[2:]
    else:
        end = data.find(b"\r\n\r\n")
        if end < 0:
            return data
        head, body = data[: end + 4], data[end + 4 :]
    body_lines = body.split(b"\r\n")
    if body.endswith(b"\r\n"):
        body_lines.pop()
    return head + b"".join(line + b"\r\n" for line in body_lines[:lines])


# --------------------------------------------------------------------------
# The maildrop


class MessageDeleted(Exception):
    """RETR, TOP or DELE of a message already marked for deletion."""


@implementer(pop3.IMailbox)
class POP3Maildrop:
    """The user's INBOX as listed at login; numbers stay fixed for the session.

    The unique-id listing (UIDL) is the IMAP UID and UIDVALIDITY in hex, as
    Dovecot's default ``%08Xu%08Xv``, so it never changes for a message.
    """

    def __init__(self, store: MailStore, address: str):
        self.address = address.lower()
        self.maildir = store.maildir(self.address)
        snapshot = self.maildir.scan()
        self._validity = snapshot.uid_validity
        self._messages = snapshot.messages
        self._sizes = []
        for message in self._messages:
            try:
                self._sizes.append(os.stat(message.location).st_size)
            except FileNotFoundError:
                self._sizes.append(0)
        self._deleted: set[int] = set()

    def _check(self, index: int) -> int:
        if not 0 <= index < len(self._messages):
            raise ValueError(index)
        return index

    def listMessages(self, index=None):
        if index is None:
            return [0 if i in self._deleted else size for i, size in enumerate(self._sizes)]
        self._check(index)
        return 0 if index in self._deleted else self._sizes[index]

    def read(self, index: int) -> bytes:
        """The message's bytes; ValueError, MessageDeleted or FileNotFoundError."""
        if self._check(index) in self._deleted:
            raise MessageDeleted(index)
        message = self._messages[index]
        path = self.maildir.find(message.key)
        if path is None:
            raise FileNotFoundError(message.key)
        return path.read_bytes()

    def getMessage(self, index):
        return io.BytesIO(self.read(index))

    def uid(self, index: int) -> int:
        """The message's IMAP UID (the first half of its UIDL)."""
        return self._messages[self._check(index)].uid

    def getUidl(self, index):
        return b"%08X%08X" % (self._messages[self._check(index)].uid, self._validity)

    def deleteMessage(self, index):
        if self._check(index) in self._deleted:
            raise MessageDeleted(index)
        self._deleted.add(index)

    def is_deleted(self, index: int) -> bool:
        return index in self._deleted

    def undeleted(self) -> list[int]:
        """Indexes of the messages not marked for deletion."""
        return [i for i in range(len(self._messages)) if i not in self._deleted]

    def undeleteMessages(self):
        self._deleted.clear()

    def mark_seen(self, index: int) -> None:
        """RETR shows the message to the user: set \\Seen, as an IMAP FETCH would."""
        self.maildir.add_flags(self._messages[index].key, "S")

    def sync(self) -> int:
        """The UPDATE state (RFC 1939 6): delete the marked files; return how many."""
        removed = sum(self.maildir.remove(self._messages[i].key) for i in sorted(self._deleted))
        self._deleted.clear()
        return removed


class POP3Realm(MailboxRealm):
    """Cred realm: the avatar id (the user's address) becomes their maildrop."""

    interface = pop3.IMailbox
    avatar_class = POP3Maildrop


# --------------------------------------------------------------------------
# The protocol


@implementer(interfaces.IHandshakeListener)
class POP3Server(TracedLoginMixin, pop3.POP3):
    """Twisted's POP3 with STLS, correct byte-stuffing and a line trace.

    With a ``throttle`` (:class:`agents.security.LoginThrottle`) a wrong PASS
    is answered ever later, and past the limit with ``-ERR`` and a hang-up.
    """

    AUTH_CMDS = pop3.POP3.AUTH_CMDS + [b"STLS"]
    #: Called as ``on_fetched(user, uid, message_id)`` after a RETR: the
    #: ``fetched`` coursework hook (agents.hooks).
    on_fetched = None
    MAX_LENGTH = 512  # RFC 2449 4: commands are at most 255 octets; be lenient

    def __init__(self, store: MailStore, tls_context=None, tracer: Tracer = NULL_TRACER,
                 throttle=None):  # fmt: skip
        self.store, self.tls_context, self.tracer = store, tls_context, tracer
        self.throttle = throttle
        self.conn_id, self.peer, self.user = tracer.new_connection_id(), None, None
        self._started_tls = False
        self._drop_clear_text = False
        self._handshake_done = False

    # -- connection, TLS and trace -----------------------------------------------

    def connectionMade(self):
        no_delay(self.transport)  # see agents.net
        # No APOP timestamp in the greeting (RFC 1939 7): APOP is not offered.
        self.peer = getattr(self.transport.getPeer(), "host", None)
        if self.throttle is not None and self._portal is not None:
            self._portal = ThrottledPortal(self._portal, self.throttle, self.peer, protocol="pop3",
                                           tracer=self.tracer, conn=self.conn_id)  # fmt: skip
        self.tracer.event("connection.accepted", conn=self.conn_id, peer=self.peer, protocol="pop3")
        self.successResponse(b"mailpipe POP3 ready")
        self.setTimeout(self.timeOut)

    def connectionLost(self, reason):
        if self.is_secure() and not self._handshake_done:
            security_event(self.tracer, "security.tls_failed", conn=self.conn_id, peer=self.peer,
                           protocol="pop3", reason=tls_failure(reason))  # fmt: skip
        self.tracer.event("connection.closed", conn=self.conn_id, peer=self.peer)
        super().connectionLost(reason)

    def handshakeCompleted(self):
        """IHandshakeListener: TLS is up (a handshake that never gets here failed)."""
        self._handshake_done = True

    def is_secure(self) -> bool:
        return self._started_tls or interfaces.ISSLTransport(self.transport, None) is not None

    def _needs_tls(self) -> bool:
        return self.tls_context is not None and not self.is_secure()

    def dataReceived(self, data):
        # Data after the STLS reply is only read in a later call, through TLS.
        self._drop_clear_text = False
        super().dataReceived(data)

    def lineReceived(self, line):
        if self._drop_clear_text:
            self.tracer.line(
                self.conn_id, "C", b"[dropped: sent in clear after STLS]", peer=self.peer
            )
            return
        self.tracer.line(self.conn_id, "C", line, peer=self.peer)
        super().lineReceived(line)

    def sendLine(self, line):
        self.tracer.line(self.conn_id, "S", line, peer=self.peer)
        super().sendLine(line)

    def successResponse(self, message=b""):
        if not isinstance(message, bytes):
            message = str(message).encode("utf-8")
        self.sendLine(b"+OK " + message if message else b"+OK")

    def state_COMMAND(self, line):
        """Answer bad commands with -ERR (Twisted crashes joining str error args)."""
        try:
            return self.processCommand(*line.split(b" "))
        except pop3.POP3Error as e:
            self.failResponse(e.args[0] if e.args else b"error")
        except TypeError:
            log.err(None, "POP3 command failed")
            self.failResponse(b"bad command syntax")

    def listCapabilities(self):
        """CAPA (RFC 2449): STLS only before TLS, USER only when it may be used."""
        caps = [b"TOP", b"UIDL", b"PIPELINING", b"RESP-CODES"]
        if self.tls_context is not None and not self.is_secure():
            caps.append(b"STLS")
        else:
            caps.append(b"USER")
        caps.append(b"IMPLEMENTATION mailpipe")
        return caps

    def do_STLS(self):
        """STLS (RFC 2595 4): only in the AUTHORIZATION state, only once."""
        if self.tls_context is None or self.is_secure():
            self.failResponse(b"STLS not available")
            return
        if self.mbox is not None:
            self.failResponse(b"STLS only before login")
            return
        self.successResponse(b"Begin TLS negotiation now")
        # Whatever the client sent after STLS came in clear: drop it
        # (the CVE-2011-0411 class of command injection).
        self._drop_clear_text = True
        self._buffer = b""
        self._userIs = None
        self.transport.startTLS(self.tls_context)
        self._started_tls = True

    # -- login -------------------------------------------------------------------

    login_event = "pop3.login"  # traced by TracedLoginMixin

    _PLAINTEXT_REFUSED = b"[AUTH] Plaintext authentication disallowed without TLS; use STLS first"

    def do_USER(self, user):
        if self._needs_tls():
            self._cleartext_auth("USER")
            self.failResponse(self._PLAINTEXT_REFUSED)
            return
        super().do_USER(user)

    def do_PASS(self, password=b"", *words):
        if self._needs_tls():
            self._cleartext_auth("PASS")
            self.failResponse(self._PLAINTEXT_REFUSED)
            return
        super().do_PASS(password, *words)

    def _cleartext_auth(self, command: str) -> None:
        """The client sent credentials in clear; refused, but an eavesdropper has them."""
        security_event(self.tracer, "security.cleartext_auth", conn=self.conn_id, peer=self.peer,
                       protocol="pop3", command=command)  # fmt: skip

    def do_APOP(self, user=None, digest=None):
        self.failResponse(b"APOP not supported")

    def _ebMailbox(self, failure):
        failure.trap(cred_error.LoginDenied, cred_error.LoginFailed)
        if failure.check(LoginBlocked):  # agents.security: too many failed logins
            self.failResponse(b"[AUTH] Too many failed logins, closing connection")
            self.transport.loseConnection()
            return
        self.failResponse(b"[AUTH] Authentication failed")

    # -- transaction ----------------------------------------------------------------

    def _message_number(self, argument) -> int | None:
        try:
            index = int(argument) - 1
            self.mbox.listMessages(index)
            return index
        except ValueError:
            self.failResponse(b"no such message")
            return None

    def _send_message(self, number, lines=None):
        index = self._message_number(number)
        if index is None:
            return
        try:
            content = self.mbox.read(index)
        except MessageDeleted:
            self.failResponse(b"message already deleted")
            return
        except FileNotFoundError:
            self.failResponse(b"message was removed by another session")
            return
        if lines is None:
            self.successResponse(b"%d octets" % len(content))
            self.transport.write(dot_stuff(content))
            self._highest = max(self._highest, index + 1)
            self.mbox.mark_seen(index)
            uidl = self.mbox.getUidl(index).decode()
            self.tracer.event(
                "pop3.retr", conn=self.conn_id, user=self.user, uidl=uidl, size=len(content)
            )
            if self.on_fetched is not None:
                self.on_fetched(self.user, self.mbox.uid(index), get_header(content, "Message-ID"))
        else:
            self.successResponse(b"top of message follows")
            self.transport.write(dot_stuff(top_of(content, lines)))

    def _listing(self, number, describe):
        """LIST and UIDL: one message, or all of them but those marked deleted (RFC 1939 5)."""
        if number is not None:
            index = self._message_number(number)
            if index is None:
                return
            if self.mbox.is_deleted(index):
                self.failResponse(b"message already deleted")
                return
            self.successResponse(b"%d %b" % (index + 1, describe(index)))
            return
        self.successResponse(b"listing follows")
        for index in self.mbox.undeleted():
            self.sendLine(b"%d %b" % (index + 1, describe(index)))
        self.sendLine(b".")

    def do_STAT(self):
        live = self.mbox.undeleted()
        self.successResponse(b"%d %d" % (len(live), sum(self.mbox.listMessages(i) for i in live)))

    def do_LIST(self, number=None):
        self._listing(number, lambda index: b"%d" % self.mbox.listMessages(index))

    def do_UIDL(self, number=None):
        self._listing(number, self.mbox.getUidl)

    def do_RETR(self, number):
        self._send_message(number)

    def do_TOP(self, number, lines):
        try:
            count = int(lines)
            if count < 0:
                raise ValueError(count)
        except ValueError:
            self.failResponse(b"bad line count")
            return
        self._send_message(number, count)

    def do_DELE(self, number):
        index = self._message_number(number)
        if index is None:
            return
        try:
            self.mbox.deleteMessage(index)
        except MessageDeleted:
            self.failResponse(b"message already deleted")
            return
        self.successResponse(b"message %d deleted" % (index + 1))

    def do_QUIT(self):
        """QUIT: in the TRANSACTION state, enter UPDATE and delete (RFC 1939 6)."""
        if self.mbox is not None:
            removed = self.mbox.sync()
            self.tracer.event("pop3.update", conn=self.conn_id, user=self.user, deleted=removed)
        self.successResponse(b"bye")
        self.transport.loseConnection()


class POP3ServerFactory(RetrievalServerFactory):
    """Builds one :class:`POP3Server` per connection, sharing store and portal."""

    server_class = POP3Server


def make_pop3_factory(store, checker, tls_context, implicit_tls=False, tracer=NULL_TRACER,
                      throttle=None, on_fetched=None):  # fmt: skip
    """A POP3 server factory.

    ``implicit_tls=False`` (port 110): listen with ``reactor.listenTCP``;
    STLS is offered when ``tls_context`` is given and USER/PASS wait for it.
    ``implicit_tls=True`` (port 995, RFC 8314): listen with
    ``reactor.listenSSL(port, factory, tls_context)``. ``throttle``: see
    :func:`agents.imap.make_imap_factory`.
    """
    return make_factory(POP3ServerFactory, POP3Realm, store, checker, tls_context, implicit_tls, tracer,
                        throttle, on_fetched)


__all__ = [
    "POP3Maildrop",
    "POP3Realm",
    "POP3Server",
    "POP3ServerFactory",
    "dot_stuff",
    "make_pop3_factory",
    "top_of",
]
