"""IMAP4rev1 over the Maildir store: protocol tests on an in-memory transport,
then Python's imaplib against a real server over loopback with STARTTLS."""

from __future__ import annotations

import imaplib
import json
import re
import ssl
import subprocess
import sys
import textwrap

import pytest
from twisted.internet import defer

from agents.imap import MimePart, make_imap_factory, split_multipart
from agents.maildir import MailStore
from agents.pki import ensure_host_cert
from agents.trace import Tracer
from fakes import PASSWORD, USER, MailboxClient

MESSAGE = (
    b"From: Bob <bob@lab.test>\r\n"
    b"To: alice@lab.test\r\n"
    b"Subject: lunch\r\n"
    b"Message-ID: <m1@lab.test>\r\n"
    b"\r\n"
    b"Noon?\r\n"
)


class Client(MailboxClient):
    """An IMAP client that does exactly what the test says."""

    scheduler_attribute = "_scheduler"  # FETCH writes everything at once

    def __init__(self, tmp_path, tls=True, tracer=None):
        super().__init__(tmp_path, tls, **({"tracer": tracer} if tracer else {}))

    def make_factory(self, store, checker, tls_context, **options):
        return make_imap_factory(store, checker, tls_context, **options)

    def login(self) -> None:
        assert b"OK" in self.send(b"t0 STARTTLS")
        reply = self.send(b"t1 LOGIN %s %s" % (USER.encode(), PASSWORD.encode()))
        assert reply.endswith(b"t1 OK LOGIN succeeded\r\n"), reply

    def deliver(self, content: bytes = MESSAGE, folder="INBOX") -> None:
        self.store.deliver(USER, content, folder)


@pytest.fixture
def client(tmp_path):
    return Client(tmp_path)


def test_login_is_disabled_before_starttls(client):
    assert b"STARTTLS" in client.greeting and b"LOGINDISABLED" in client.greeting
    reply = client.send(b"a LOGIN alice@lab.test s3cret")
    assert reply.startswith(b"a BAD LOGIN is disabled before STARTTLS")


def test_starttls_then_login(client):
    assert client.send(b"a STARTTLS") == b"a OK Begin TLS negotiation now\r\n"
    assert client.transport.tls_context is not None
    caps = client.send(b"b CAPABILITY")
    assert b"LOGINDISABLED" not in caps and b"STARTTLS" not in caps and b"AUTH=PLAIN" in caps
    assert client.send(b"c LOGIN alice@lab.test wrong") == b"c NO LOGIN failed\r\n"
    assert client.send(b"d LOGIN alice@lab.test s3cret") == b"d OK LOGIN succeeded\r\n"


def test_commands_pipelined_after_starttls_are_dropped(client):
    # Sent in clear text in the same packet as STARTTLS: a man in the middle
    # could have added them, so the server must not run them.
    reply = client.send(b"a STARTTLS", b"b LOGIN alice@lab.test s3cret")
    assert reply == b"a OK Begin TLS negotiation now\r\n"
    assert client.server.account is None


def test_select_fetch_store_expunge(client):
    client.deliver()
    client.deliver(MESSAGE.replace(b"lunch", b"dinner"))
    client.login()
    reply = client.send(b"s SELECT INBOX")
    assert b"* 2 EXISTS\r\n" in reply and b"* 2 RECENT\r\n" in reply
    validity = int(re.search(rb"UIDVALIDITY (\d+)", reply).group(1))
    assert reply.endswith(b"s OK [READ-WRITE] SELECT successful\r\n")

    reply = client.send(b"f1 FETCH 1 (FLAGS UID RFC822.SIZE)")
    assert b"* 1 FETCH (FLAGS (\\Recent) UID 1 RFC822.SIZE %d)" % len(MESSAGE) in reply

    reply = client.send(b"f2 FETCH 1 BODY[]")
    assert b"BODY[] {%d}\r\n%s)" % (len(MESSAGE), MESSAGE) in reply
    reply = client.send(b"f3 FETCH 1 (FLAGS)")
    assert b"\\Seen" in reply  # a FETCH of BODY[] sets \Seen (RFC 3501 6.4.5)

    reply = client.send(b"f4 FETCH 2 BODY.PEEK[HEADER.FIELDS (SUBJECT)]")
    assert b"{19}\r\nSubject: dinner\r\n\r\n" in reply
    assert b"\\Seen" not in client.send(b"f5 FETCH 2 (FLAGS)")

    reply = client.send(b"st STORE 2 +FLAGS (\\Deleted \\Flagged)")
    assert b"* 2 FETCH (FLAGS (\\Flagged \\Deleted \\Recent))" in reply
    cur = client.store.maildir(USER).path / "cur"
    assert len(list(cur.glob("*:2,FT"))) == 1  # flags live in the file name

    reply = client.send(b"u UID FETCH 2 (FLAGS)")
    assert b"* 2 FETCH (FLAGS (\\Flagged \\Deleted \\Recent) UID 2)" in reply

    reply = client.send(b"x EXPUNGE")
    assert reply == b"* 2 EXPUNGE\r\nx OK EXPUNGE completed\r\n"
    assert len(list(cur.iterdir())) == 1

    # A new session sees the same UIDs and UIDVALIDITY; UID 2 is never reused.
    again = Client.__new__(Client)
    again.__dict__.update(Client(client.store.root.parent).__dict__)
    again.login()
    reply = again.send(b"s SELECT INBOX")
    assert b"[UIDVALIDITY %d]" % validity in reply and b"* 1 EXISTS" in reply
    client.deliver()
    reply = again.send(b"n NOOP")
    assert b"* 2 EXISTS" in reply
    assert b"* 2 FETCH (UID 3)" in again.send(b"u UID FETCH 1:* (UID)")


def test_idle_hears_new_mail_at_once(client):
    client.deliver()
    client.login()
    client.send(b"s SELECT INBOX")
    assert client.send(b"i IDLE") == b"+ idling\r\n"  # RFC 3501 9: "+" SP text
    client.deliver()  # the MDA delivering over LMTP, in the same process
    assert client.take() == b"* 2 EXISTS\r\n* 2 RECENT\r\n"
    assert client.send(b"DONE") == b"i OK IDLE terminated\r\n"
    reply = client.send(b"f FETCH 2 (UID BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
    assert b"UID 2" in reply and b"<m1@lab.test>" in reply


def test_notices_out_of_uid_order_show_mail_in_order_without_a_rescan(client, monkeypatch):
    """Two deliveries in parallel threads: UID 3's notice comes before UID 2's.
    The session in IDLE shows both at once, in UID order, from the UID list;
    no folder rescan (it costs time in proportion to the folder's size)."""
    from agents.maildir import Maildir

    client.deliver()
    client.login()
    client.send(b"s SELECT INBOX")
    assert client.send(b"i IDLE") == b"+ idling\r\n"
    notices = []

    def thread_done_but_notice_late(f, *args, **kwargs):
        result = f(*args, **kwargs)  # on disk, UID given...
        notices.append((defer.Deferred(), result))
        return notices[-1][0]  # ...but the reactor hears of it when we say

    client.store._run_in_thread = thread_done_but_notice_late
    scans = []
    real_scan = Maildir.scan
    monkeypatch.setattr(Maildir, "scan", lambda self, *a, **kw: scans.append(1) or real_scan(self, *a, **kw))
    client.deliver(MESSAGE.replace(b"lunch", b"second"))
    client.deliver(MESSAGE.replace(b"lunch", b"third"))
    (first, first_result), (second, second_result) = notices
    second.callback(second_result)
    assert client.take() == b"* 3 EXISTS\r\n* 3 RECENT\r\n"
    first.callback(first_result)
    assert client.take() == b""  # shown already
    assert scans == []
    assert client.send(b"DONE") == b"i OK IDLE terminated\r\n"
    reply = client.send(b"f FETCH 2:3 (UID BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert reply.index(b"* 2 FETCH (UID 2") < reply.index(b"second") < reply.index(b"* 3 FETCH (UID 3") \
        < reply.index(b"third"), reply


def test_other_sessions_expunge_is_reported_at_noop(client, tmp_path):
    client.deliver()
    client.deliver()
    client.login()
    client.send(b"s SELECT INBOX")
    first = client.store.maildir(USER).scan().messages[0]
    client.store.maildir(USER).remove(first.key)  # e.g. a POP3 session's DELE+QUIT
    assert client.send(b"n NOOP") == b"* 1 EXPUNGE\r\nn OK NOOP No operation performed\r\n"
    assert b"* 1 FETCH (UID 2)" in client.send(b"f FETCH 1 (UID)")


def test_idle_rescans_a_big_folder_less_often(client, monkeypatch):
    """Entering IDLE rescans the folder for what others changed, but a session
    spends at most 1 % of its time on it: a scan that took 0.05 s waits 5 s for
    the next (RESCAN_SHARE), one that took 1 s waits 30 s, not 100 (Dovecot's
    mailbox_idle_check_interval). NOOP always rescans: the client asks for news."""
    from agents.imap import MaildirMailbox
    from agents.maildir import Maildir

    now, scan_takes = [0.0], [0.05]
    monkeypatch.setattr(MaildirMailbox, "clock", staticmethod(lambda: now[0]))
    real_scan = Maildir.scan

    def slow_scan(self, *args, **kwargs):  # as if the folder were big
        now[0] += scan_takes[0]
        return real_scan(self, *args, **kwargs)

    monkeypatch.setattr(Maildir, "scan", slow_scan)
    for _ in range(3):
        client.deliver()
    client.login()
    client.send(b"s SELECT INBOX")

    def idle_at(t: float) -> bytes:
        now[0] = t
        reply = client.send(b"i IDLE")
        assert reply.endswith(b"+ idling\r\n") and client.send(b"DONE") == b"i OK IDLE terminated\r\n"
        return reply[: -len(b"+ idling\r\n")]

    assert idle_at(1.1) == b""  # the first rescan, 1 s after the first look: nothing changed
    maildir = client.store.maildir(USER)
    messages = maildir.scan().messages
    maildir.remove(messages[0].key)  # another session, or a program, deletes one
    assert idle_at(3.0) == b""  # 1.85 s after a 0.05 s scan: too soon to look again
    assert idle_at(6.2) == b"* 1 EXPUNGE\r\n"  # more than 5 s: rescanned, and reported
    scan_takes[0] = 1.0
    maildir.remove(messages[1].key)
    assert idle_at(11.3) == b"* 1 EXPUNGE\r\n"  # rescanned; that scan took 1 s
    maildir.remove(messages[2].key)
    assert idle_at(41.0) == b""  # 28.7 s later: still too soon
    assert client.send(b"n NOOP").startswith(b"* 1 EXPUNGE\r\n")  # NOOP does not wait
    assert idle_at(42.0) == b""


def test_folders_and_special_use(client):
    client.login()
    reply = client.send(b'l LIST "" "*"')
    for line in (
        b'* LIST (\\HasNoChildren) "." "INBOX"',
        b'* LIST (\\HasNoChildren \\Junk) "." "Junk"',
        b'* LIST (\\HasNoChildren \\Sent) "." "Sent"',
        b'* LIST (\\HasNoChildren \\Trash) "." "Trash"',
    ):
        assert line in reply
    assert client.send(b"c CREATE Work.2024") == b"c OK Mailbox created\r\n"
    assert b'"Work.2024"' in client.send(b'l LIST "" "Work.%"')
    assert b'(\\Noselect) "." ""' in client.send(b'l LIST "" ""')
    assert client.send(b"c COPY 1 Nope").startswith(b"c BAD")  # not selected yet
    client.send(b"s SELECT INBOX")
    assert client.send(b"c COPY 1:* Nope") == b"c NO [TRYCREATE] No such mailbox\r\n"


@pytest.mark.parametrize("name", [b"../bob", b'"../../lab.test/bob"', b'"/etc"', b"..", b'"a/b"'])
def test_mailbox_names_cannot_escape(client, name):
    client.login()
    assert client.send(b"s SELECT " + name).startswith(b"s NO")
    assert client.send(b"c CREATE " + name).startswith(b"c NO")
    root = client.store.root
    assert sorted(p.name for p in root.iterdir()) == ["lab.test"]
    assert sorted(p.name for p in (root / "lab.test").iterdir()) == ["alice"]


def test_copy_and_append(client):
    client.deliver()
    client.login()
    client.send(b"s SELECT INBOX")
    client.send(b"st STORE 1 +FLAGS (\\Flagged)")
    assert client.send(b"c COPY 1 Junk") == b"c OK COPY completed\r\n"
    (copied,) = client.store.maildir(USER, "Junk").scan().messages
    assert copied.flags == "F" and copied.path.read_bytes() == MESSAGE

    client.server.dataReceived(b"a APPEND INBOX (\\Seen) {%d}\r\n" % len(MESSAGE))
    assert client.take().startswith(b"+ ")
    reply = client.send(MESSAGE)
    assert reply == b"* 2 EXISTS\r\n* 1 RECENT\r\na OK APPEND completed\r\n"
    assert b"FLAGS (\\Seen)" in client.send(b"f FETCH 2 (FLAGS)")


def test_search(client):
    client.deliver()
    client.deliver(MESSAGE.replace(b"lunch", b"dinner").replace(b"<m1@", b"<m2@"))
    client.login()
    client.send(b"s SELECT INBOX")
    client.send(b"st STORE 1 +FLAGS (\\Seen)")
    assert b"* SEARCH 2\r\n" in client.send(b's SEARCH HEADER Message-ID "<m2@lab.test>"')
    assert b"* SEARCH 1 2\r\n" in client.send(b"s SEARCH FROM bob ALL")
    assert b"* SEARCH 2\r\n" in client.send(b"s SEARCH UNSEEN SUBJECT DINNER")
    assert b"* SEARCH 1\r\n" in client.send(b"s SEARCH OR (SEEN) (SUBJECT nothing) NOT 2")
    assert b"* SEARCH 1 2\r\n" in client.send(b"s SEARCH TEXT noon SINCE 1-Jan-2000")
    assert b"* SEARCH 2\r\n" in client.send(b"s UID SEARCH UID 2:*")
    assert client.send(b"s SEARCH BODY lunch") == b"* SEARCH\r\ns OK SEARCH completed\r\n"
    assert client.send(b"s SEARCH FRUMP x").startswith(b"s BAD")


def test_status_does_not_claim_recent(client):
    client.deliver()
    client.login()
    reply = client.send(b"s STATUS INBOX (MESSAGES RECENT UIDNEXT UNSEEN)")
    assert b"MESSAGES 1" in reply and b"RECENT 1" in reply and b"UIDNEXT 2" in reply
    assert b"* 1 RECENT" in client.send(b"s SELECT INBOX")


def test_multipart_parts_are_cut_from_the_raw_bytes():
    raw = (
        b"Content-Type: multipart/mixed; boundary=XX\r\n\r\n"
        b"preamble\r\n--XX\r\nContent-Type: text/plain\r\n\r\none\r\n"
        b"--XX\r\nContent-Type: text/html\r\n\r\n<b>two</b>\r\n--XX--\r\nepilogue\r\n"
    )
    part = MimePart(raw)
    assert part.isMultipart()
    assert part.getSubPart(1).getBodyFile().read() == b"<b>two</b>"
    assert part.getSubPart(0).header_bytes() == b"Content-Type: text/plain\r\n\r\n"
    with pytest.raises(IndexError):
        part.getSubPart(2)
    assert split_multipart(b"--B\r\nx\r\n--B--", b"B") == [b"x"]


def test_trace_masks_the_password_and_records_events(tmp_path):
    path = tmp_path / "trace.jsonl"
    client = Client(tmp_path, tracer=Tracer(path, "mda", "mda", "lab.test"))
    client.deliver()
    client.login()
    client.send(b"s SELECT INBOX", b"f FETCH 1 BODY.PEEK[]")
    events = [json.loads(line) for line in path.read_text().splitlines()]
    lines = [e["line"] for e in events if e["event"] == "line"]
    assert "t1 LOGIN alice@lab.test ***" in lines and not any("s3cret" in line for line in lines)
    assert {"event": "imap.login", "user": USER, "ok": True}.items() <= next(
        e for e in events if e["event"] == "imap.login"
    ).items()
    fetch = next(e for e in events if e["event"] == "imap.fetch")
    assert fetch["uid"] == 1 and fetch["message_id"] == "<m1@lab.test>"


@pytest.mark.parametrize("content, expected", [
    (b"Subject: a\r\nMessage-ID:\r\n <folded@lab.test>\r\n\r\nbody\r\n", "<folded@lab.test>"),
    (b"Subject: a\nmessage-id: <lf@lab.test>\n\nMessage-ID: <body@x>\n", "<lf@lab.test>"),
    (b"Subject: none\r\n\r\nMessage-ID: <in-body@x>\r\n", None),
])  # fmt: skip
def test_fetch_event_names_the_message_id_from_the_header_only(tmp_path, content, expected):
    path = tmp_path / "trace.jsonl"
    client = Client(tmp_path, tracer=Tracer(path, "mda", "mda", "lab.test"))
    client.deliver(content)
    client.login()
    client.send(b"s SELECT INBOX", b"f FETCH 1 BODY.PEEK[HEADER.FIELDS (SUBJECT)]")
    events = [json.loads(line) for line in path.read_text().splitlines()]
    fetch = next(e for e in events if e["event"] == "imap.fetch")
    assert fetch.get("message_id") == expected


# --------------------------------------------------------------------------
# Real loopback: imaplib, STARTTLS, the lab CA

SERVER_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
    from twisted.internet import reactor
    from agents.imap import make_imap_factory
    from agents.pop3 import make_pop3_factory
    from agents.maildir import MailStore
    from agents.tls import server_context

    root, pem, user, password = sys.argv[1:5]
    store = MailStore(Path(root))
    checker = InMemoryUsernamePasswordDatabaseDontUse(**{user: password.encode()})
    ctx = server_context(Path(pem))
    imap = reactor.listenTCP(0, make_imap_factory(store, checker, ctx), interface="127.0.0.1")
    imaps = reactor.listenSSL(
        0, make_imap_factory(store, checker, ctx, implicit_tls=True), ctx, interface="127.0.0.1"
    )
    pop3 = reactor.listenTCP(0, make_pop3_factory(store, checker, ctx), interface="127.0.0.1")
    ports = {"imap": imap.getHost().port, "imaps": imaps.getHost().port, "pop3": pop3.getHost().port}
    print(json.dumps(ports), flush=True)
    reactor.run()
    """)


@pytest.fixture
def live_server(tmp_path):
    """The IMAP and POP3 servers in a child process, on 127.0.0.1 ports."""
    pem = ensure_host_cert(tmp_path / "pki", "lab.test", ["imap.lab.test"], "127.0.0.1")
    root = tmp_path / "mail"
    store = MailStore(root)
    process = subprocess.Popen(
        [sys.executable, "-c", SERVER_SCRIPT, str(root), str(pem), USER, PASSWORD],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        ports = json.loads(process.stdout.readline())
        tls = ssl.create_default_context(cafile=str(tmp_path / "pki" / "ca.pem"))
        yield store, ports, tls
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_imaplib_over_starttls(live_server):
    store, ports, tls = live_server
    store.deliver_now(USER, MESSAGE)
    with imaplib.IMAP4("127.0.0.1", ports["imap"], timeout=10) as imap:
        assert "LOGINDISABLED" in imap.capabilities
        with pytest.raises(imaplib.IMAP4.error):
            imap.login(USER, PASSWORD)
        imap.starttls(tls)
        assert imap.login(USER, PASSWORD)[0] == "OK"
        typ, data = imap.select("INBOX")
        assert (typ, data) == ("OK", [b"1"])
        typ, data = imap.uid("FETCH", "1", "(RFC822)")
        assert data[0][1] == MESSAGE
        imap.store("1", "+FLAGS", "\\Deleted")
        typ, data = imap.expunge()
        assert data == [b"1"]
        typ, data = imap.list()
        assert b'(\\HasNoChildren \\Junk) "." Junk' in data or any(b"Junk" in d for d in data)
        imap.logout()
    assert store.maildir(USER).scan().messages == []


def test_imaplib_over_implicit_tls(live_server):
    store, ports, tls = live_server
    store.deliver_now(USER, MESSAGE)
    with imaplib.IMAP4_SSL("127.0.0.1", ports["imaps"], ssl_context=tls, timeout=10) as imap:
        assert "LOGINDISABLED" not in imap.capabilities and "STARTTLS" not in imap.capabilities
        assert "AUTH=PLAIN" in imap.capabilities
        imap.login(USER, PASSWORD)
        assert imap.select("INBOX", readonly=True) == ("OK", [b"1"])
        typ, data = imap.fetch("1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        assert data[0][1] == b"Subject: lunch\r\n\r\n"
        imap.logout()


def test_str_error_messages_are_sent_as_bytes(client):
    """Twisted #12262: some error paths hand sendNegativeResponse a str."""
    client.server.sendNegativeResponse(b"t", "[ALERT] Some messages were not copied")
    assert client.take() == b"t NO [ALERT] Some messages were not copied\r\n"


def test_sequence_sets_pick_messages_by_number_and_by_uid(tmp_path):
    """RFC 3501 9 (sequence-set): ranges either way round, ``*`` the highest,
    UID ranges across gaps left by expunged messages."""
    from twisted.mail.imap4 import parseIdList

    from agents.imap import MaildirMailbox

    store = MailStore(tmp_path, run_in_thread=lambda f, *a, **kw: defer.maybeDeferred(f, *a, **kw))
    keys = [store.maildir("bob@x.test", "INBOX").deliver(b"Subject: %d\r\n\r\nbody\r\n" % i)
            for i in range(1, 8)]
    for key in (keys[1], keys[4]):  # UIDs 2 and 5 are gone
        store.maildir("bob@x.test", "INBOX").remove(key)
    box = MaildirMailbox(store, "bob@x.test", "INBOX", writeable=True)

    def pick(text, uid):
        return list(box._messages(parseIdList(text.encode()), uid))

    assert box._view() == [1, 3, 4, 6, 7]
    assert pick("1:*", False) == [(1, 1), (2, 3), (3, 4), (4, 6), (5, 7)]
    assert pick("4:2", False) == [(2, 3), (3, 4), (4, 6)]
    assert pick("*", False) == [(5, 7)]
    assert pick("5:*,1,1", False) == [(1, 1), (5, 7)]
    assert pick("9", False) == []
    assert pick("2:6", True) == [(2, 3), (3, 4), (4, 6)]
    assert pick("5", True) == []
    assert pick("*", True) == [(5, 7)]
    assert pick("100:*", True) == [(5, 7)]  # n:* always takes the highest UID
    assert pick("1,4,7", True) == [(1, 1), (3, 4), (5, 7)]
    assert box.getRecentCount() == 5
