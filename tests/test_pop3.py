"""POP3 with STLS over the Maildir store: protocol tests on an in-memory
transport, then Python's poplib against a real server over loopback."""

from __future__ import annotations

import json
import poplib
import ssl
import subprocess
import sys
import textwrap

import pytest

from twisted.mail import pop3

from agents.maildir import MailStore
from agents.pki import ensure_host_cert
from agents.pop3 import dot_stuff, make_pop3_factory, top_of
from fakes import PASSWORD, USER, MailboxClient

MESSAGE = b"From: bob@lab.test\r\nSubject: hi\r\n\r\nline one\r\n.dotted\r\nline three\r\n"


def tricky_message() -> bytes:
    """A '.' line first, and another exactly at offset 16384 (Twisted's chunk size)."""
    filler = b"x" * 77 + b"\r\n"
    content = b".first line starts with a dot\r\nFrom: bob@lab.test\r\n\r\n"
    while len(content) + len(filler) <= 16384:
        content += filler
    content += b"y" * (16384 - len(content) - 2) + b"\r\n"
    assert len(content) == 16384
    return content + b".\r\nafter the lone dot\r\n..two dots\r\nend\r\n"


class Client(MailboxClient):
    """A POP3 client that does exactly what the test says."""

    scheduler_attribute = "schedule"  # STAT, LIST, UIDL write at once, no reactor

    def make_factory(self, store, checker, tls_context, **options):
        return make_pop3_factory(store, checker, tls_context, **options)

    def login(self) -> None:
        assert self.send(b"STLS").startswith(b"+OK")
        assert self.send(b"USER " + USER.encode()).startswith(b"+OK")
        assert self.send(b"PASS " + PASSWORD.encode()).startswith(b"+OK")


@pytest.fixture
def client(tmp_path):
    return Client(tmp_path)


def test_dot_stuffing_covers_the_whole_message():
    content = tricky_message()
    encoded = dot_stuff(content)
    assert encoded.startswith(b"..first line")
    assert encoded[16385:].startswith(b"..\r\nafter")  # the '.' line at Twisted's chunk boundary
    assert b"\r\n...two dots\r\n" in encoded and encoded.endswith(b"end\r\n.\r\n")
    assert dot_stuff(b".x") == b"..x\r\n.\r\n"
    assert dot_stuff(b"a\nb\n") == b"a\r\nb\r\n.\r\n"  # bare LFs become CRLF, not CR CR LF


def test_twisted_per_chunk_stuffing_misses_both_lines():
    """Why RETR is overridden: Twisted's transformChunk sees 16 KiB at a time."""
    content = tricky_message()
    chunks = [content[i : i + 2**14] for i in range(0, len(content), 2**14)]
    twisted_output = b"".join(pop3.POP3().transformChunk(c) for c in chunks)
    assert twisted_output.startswith(b".first line")  # not stuffed
    assert b"\n.\r\r\nafter the lone dot" in twisted_output  # not stuffed: ends RETR early
    assert b"\r\r\n" in twisted_output  # and CRLF input comes out as CR CR LF
    assert twisted_output != dot_stuff(content)[:-3]


def test_top_of():
    assert top_of(MESSAGE, 0) == b"From: bob@lab.test\r\nSubject: hi\r\n\r\n"
    assert top_of(MESSAGE, 2).endswith(b"\r\n\r\nline one\r\n.dotted\r\n")
    assert top_of(MESSAGE, 99) == MESSAGE


def test_capa_offers_stls_before_tls_only(client):
    assert client.greeting == b"+OK mailpipe POP3 ready\r\n"  # no APOP timestamp
    capa = client.send(b"CAPA")
    assert b"STLS\r\n" in capa and b"USER\r\n" not in capa
    assert client.send(b"STLS") == b"+OK Begin TLS negotiation now\r\n"
    assert client.transport.tls_context is not None
    capa = client.send(b"CAPA")
    assert b"STLS" not in capa and b"USER\r\n" in capa
    assert client.send(b"STLS").startswith(b"-ERR")


def test_user_and_pass_refused_before_tls(client):
    assert client.send(b"USER " + USER.encode()).startswith(
        b"-ERR [AUTH] Plaintext authentication disallowed"
    )
    assert client.send(b"PASS " + PASSWORD.encode()).startswith(b"-ERR [AUTH]")
    assert client.send(b"APOP alice 0123").startswith(b"-ERR")
    assert client.server.mbox is None


def test_lines_pipelined_after_stls_are_dropped(client):
    reply = client.send(b"STLS", b"USER " + USER.encode(), b"PASS " + PASSWORD.encode())
    assert reply == b"+OK Begin TLS negotiation now\r\n"
    assert client.server.mbox is None and client.server._userIs is None


def test_retr_top_dele_quit(client):
    client.store.deliver(USER, MESSAGE)
    client.store.deliver(USER, tricky_message())
    client.login()
    assert client.send(b"STAT") == b"+OK 2 %d\r\n" % (len(MESSAGE) + len(tricky_message()))
    assert client.send(b"RETR 1") == b"+OK %d octets\r\n" % len(MESSAGE) + dot_stuff(MESSAGE)
    reply = client.send(b"RETR 2")
    assert reply.split(b"\r\n", 1)[1] == dot_stuff(tricky_message())
    assert client.send(b"TOP 1 1").endswith(b"\r\n\r\nline one\r\n.\r\n")
    uidl = client.send(b"UIDL 1")
    assert uidl.startswith(b"+OK 1 00000001")  # RFC 1939 7: number, then unique-id
    assert client.send(b"RETR 9") == b"-ERR no such message\r\n"
    assert client.send(b"RETR") == b"-ERR bad command syntax\r\n"
    assert client.send(b"LIST") == b"+OK listing follows\r\n1 %d\r\n2 %d\r\n.\r\n" % (
        len(MESSAGE),
        len(tricky_message()),
    )
    assert client.send(b"DELE 1") == b"+OK message 1 deleted\r\n"
    assert client.send(b"STAT") == b"+OK 1 %d\r\n" % len(
        tricky_message()
    )  # deleted messages no longer count
    assert client.send(b"UIDL").startswith(b"+OK listing follows\r\n2 00000002")
    assert client.send(b"LIST 1") == b"-ERR message already deleted\r\n"
    assert client.send(b"DELE 1") == b"-ERR message already deleted\r\n"
    assert client.send(b"RETR 1") == b"-ERR message already deleted\r\n"
    maildir = client.store.maildir(USER)
    assert len(maildir.scan().messages) == 2  # nothing is deleted before QUIT
    assert client.send(b"QUIT") == b"+OK bye\r\n"
    (left,) = maildir.scan().messages
    assert left.uid == 2 and "S" in left.flags  # RETR set \Seen, as IMAP sees it


def test_dropped_connection_deletes_nothing(client):
    client.store.deliver(USER, MESSAGE)
    client.login()
    client.send(b"DELE 1")
    client.server.connectionLost(None)
    assert len(client.store.maildir(USER).scan().messages) == 1


def test_rset_undeletes(client):
    client.store.deliver(USER, MESSAGE)
    client.login()
    client.send(b"DELE 1")
    assert client.send(b"RSET").startswith(b"+OK")
    client.send(b"QUIT")
    assert len(client.store.maildir(USER).scan().messages) == 1


# --------------------------------------------------------------------------
# Real loopback: poplib, STLS, the lab CA

SERVER_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
    from twisted.internet import reactor
    from agents.pop3 import make_pop3_factory
    from agents.maildir import MailStore
    from agents.tls import server_context

    root, pem, user, password = sys.argv[1:5]
    checker = InMemoryUsernamePasswordDatabaseDontUse(**{user: password.encode()})
    factory = make_pop3_factory(MailStore(Path(root)), checker, server_context(Path(pem)))
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    print(json.dumps({"pop3": port.getHost().port}), flush=True)
    reactor.run()
    """)


@pytest.fixture
def live_server(tmp_path):
    """The POP3 server in a child process, so this test owns no reactor."""
    pem = ensure_host_cert(tmp_path / "pki", "lab.test", ["imap.lab.test"], "127.0.0.1")
    root = tmp_path / "mail"
    process = subprocess.Popen(
        [sys.executable, "-c", SERVER_SCRIPT, str(root), str(pem), USER, PASSWORD],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        ports = json.loads(process.stdout.readline())
        tls = ssl.create_default_context(cafile=str(tmp_path / "pki" / "ca.pem"))
        yield MailStore(root), ports["pop3"], tls
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_poplib_stls_and_exact_content(live_server):
    store, port, tls = live_server
    store.deliver_now(USER, tricky_message())
    store.deliver_now(USER, MESSAGE)
    pop = poplib.POP3("127.0.0.1", port, timeout=10)
    try:
        assert "STLS" in pop.capa()
        with pytest.raises(poplib.error_proto):
            pop.user(USER)
        pop.stls(tls)
        pop.user(USER)
        pop.pass_(PASSWORD)
        count, _ = pop.stat()
        assert count == 2
        _, lines, _ = pop.retr(1)
        assert b"\r\n".join(lines) + b"\r\n" == tricky_message()  # poplib un-stuffs
        _, lines, _ = pop.retr(2)
        assert b"\r\n".join(lines) + b"\r\n" == MESSAGE
        assert pop.noop().startswith(b"+OK")  # still in step after the tricky message
        pop.dele(1)
        pop.quit()
    except BaseException:
        pop.close()
        raise
    (left,) = store.maildir(USER).scan().messages
    assert left.path.read_bytes() == MESSAGE
