"""Fakes for the mailbox protocols' tests: no sockets, no reactor.

The IMAP and POP3 servers are tested the way Twisted tests its own protocols:
the server protocol writes into a ``StringTransport``, and the test feeds it
lines and reads what came back.
"""

from __future__ import annotations

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.internet import defer, task
from twisted.internet.interfaces import ITLSTransport
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from agents.maildir import MailStore

USER, PASSWORD = "alice@lab.test", "s3cret"


@implementer(ITLSTransport)
class FakeTLSTransport(StringTransport):
    """A StringTransport that can 'start TLS' and pulls from producers at once."""

    tls_context = None

    def startTLS(self, contextFactory, normal=True):
        self.tls_context = contextFactory

    def registerProducer(self, producer, streaming):
        super().registerProducer(producer, streaming)
        if not streaming:
            while self.producer is not None:
                producer.resumeProducing()


def run_now(iterator):
    """A server's output scheduler that writes everything at once (no reactor needed)."""
    for _ in iterator:
        pass
    return defer.succeed(None)


class MailboxClient:
    """Drives one IMAP or POP3 server protocol line by line, like a very patient client.

    The server reads Maildirs under ``tmp_path/mail`` (deliveries run inline,
    not in a thread) and knows one user, :data:`USER`. A subclass says how to
    build its factory and where the server keeps its output scheduler.
    """

    #: the server's attribute for its output scheduler: :func:`run_now` goes there
    scheduler_attribute = ""

    def __init__(self, tmp_path, tls=True, **factory_options):
        self.store = MailStore(tmp_path / "mail", run_in_thread=defer.maybeDeferred)
        checker = InMemoryUsernamePasswordDatabaseDontUse()
        checker.addUser(USER.encode(), PASSWORD.encode())
        self.server = self.make_factory(self.store, checker, object() if tls else None,
                                        **factory_options).buildProtocol(None)
        self.server.callLater = task.Clock().callLater  # idle timeouts, never fired
        setattr(self.server, self.scheduler_attribute, run_now)
        self.transport = FakeTLSTransport()
        self.server.makeConnection(self.transport)
        self.greeting = self.take()

    def make_factory(self, store, checker, tls_context, **options):
        raise NotImplementedError

    def take(self) -> bytes:
        data = self.transport.value()
        self.transport.clear()
        return data

    def send(self, *lines: bytes) -> bytes:
        self.server.dataReceived(b"".join(line + b"\r\n" for line in lines))
        return self.take()
