"""The MUA: the user's mail client. It composes, submits, and reads mail.

Composing uses Python's :mod:`email` package, as real clients use a MIME
library. Submitting follows RFC 6409: find the user's own provider's
submission server (``smtp.<domain>``, by the lab DNS), upgrade to TLS
(STARTTLS on port 587, or TLS from the first byte on 465, RFC 8314), log in
(AUTH, RFC 4954), and hand over the message. Reading uses IMAP4rev1
(RFC 3501) at ``imap.<domain>``, with STARTTLS before LOGIN, and IDLE
(RFC 2177) to hear about new mail as it arrives.

Each command is one short-lived process (``python -m agents mua send ...``),
so notebooks never run a reactor themselves.
"""

from __future__ import annotations

import argparse
import email.policy
import json
import sys
import time
from email.message import EmailMessage
from email.parser import BytesParser

from twisted.internet import defer, protocol
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.mail import imap4

from .config import LabConfig
from .home import LabHome
from .net import no_delay
from .resolver import LabResolver
from .smtpclient import send as smtp_send
from .tls import client_context
from .trace import Tracer, now_us


class MUAError(Exception):
    """A one-line reason a MUA command failed."""


class ComposeError(ValueError):
    """The message cannot be composed as asked (e.g. a newline in a header)."""


def compose(sender: str, to: list[str], subject: str, body: str,
            from_header: str | None = None, extra_headers: dict[str, str] | None = None) -> bytes:
    """A MIME message with CRLF line endings, ready for SMTP.

    Header values come from the user; a CR or LF in one would let the user
    (or whoever filled the form) add header fields of their own (the
    CVE-2024-6923 class in :mod:`email` on some Python releases), so any
    value with one is refused outright.
    """
    headers = {"From": from_header or sender, "To": ", ".join(to), "Subject": subject}
    headers.update(extra_headers or {})
    for name, value in headers.items():
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
            raise ComposeError(f"a newline in the {name} header is not allowed")
    msg = EmailMessage(policy=email.policy.SMTP)
    for name, value in headers.items():
        try:
            msg[name] = value
        except ValueError as e:  # e.g. an encoded-word that decodes to a CR or LF in an address
            raise ComposeError(f"the {name} header cannot be used: {e}") from None
    msg.set_content(body)
    data = msg.as_bytes()
    # The generator may encode long or non-ASCII values; check that the
    # result has exactly the fields we asked for, nothing smuggled in.
    parsed = BytesParser(policy=email.policy.SMTP).parsebytes(data, headersonly=True)
    expected = {n.lower() for n in headers} | {"content-type", "content-transfer-encoding", "mime-version"}
    if {k.lower() for k in parsed.keys()} - expected:
        raise ComposeError("composed message gained an unexpected header field")
    return data


class MUA:
    """One lab user's mail client."""

    def __init__(self, reactor, home: LabHome, config: LabConfig, user: str, password: str | None = None):
        self.reactor, self.home, self.config = reactor, home, config
        self.user = user.lower()
        lab_user = config.user(user)
        self.password = password if password is not None else (lab_user.password if lab_user else None)
        if self.password is None:
            raise MUAError(f"{user} is not a lab user; give --password")
        self.domain = config.domain(self.user.rpartition("@")[2])
        self.tracer = Tracer(home.trace_file("mua") if config.trace else None, "mua", "mua", self.domain.name,
                             scheduler=reactor.callLater)
        # Events wait for the end of the reactor turn; the last turn's go out here.
        reactor.addSystemEventTrigger("after", "shutdown", self.tracer.flush)
        self.resolver = LabResolver(config.dns_server, reactor=reactor, tracer=self.tracer)

    @defer.inlineCallbacks
    def _address_of(self, host: str):
        ips = yield self.resolver.lookup_a(host)
        if not ips:
            raise MUAError(f"{host} has no address in the lab DNS; is the lab up?")
        return ips[0]

    # -- submission ---------------------------------------------------------

    @defer.inlineCallbacks
    def submit(self, to: list[str], content: bytes, mail_from: str | None = None, implicit_tls: bool = False,
               message_id: str | None = None):
        host = self.domain.host("msa")
        started = now_us()
        self.tracer.event("submit.start", message_id=message_id, rcpts=len(to))
        address = yield self._address_of(host)
        service = "submissions" if implicit_tls else "submission"
        result = yield smtp_send(
            self.reactor, address, self.config.ports[service],
            helo=f"mua.{self.domain.name}", mail_from=mail_from if mail_from is not None else self.user,
            rcpt_tos=to, content=content,
            tls="implicit" if implicit_tls else "starttls", tls_hostname=host,
            ca_cert=self.home.ca_cert, username=self.user, password=self.password,
            tracer=self.tracer,
        )
        recipients = [
            {"address": r.address, "code": r.code, "status": r.status, "text": r.text}
            for r in result.recipients
        ]
        self.tracer.event("submit.done", message_id=message_id,
                          ms=round((now_us() - started) / 1000, 3),
                          codes=[r["code"] for r in recipients])
        return {"server": f"{host} ({address}:{self.config.ports[service]})", "recipients": recipients,
                "accepted": all(200 <= r["code"] < 300 for r in recipients)}

    @defer.inlineCallbacks
    def submission_session(self, implicit_tls: bool = False):
        """An open, authenticated submission session for sending many messages."""
        from .smtpclient import open_session

        host = self.domain.host("msa")
        address = yield self._address_of(host)
        service = "submissions" if implicit_tls else "submission"
        session = yield open_session(
            self.reactor, address, self.config.ports[service],
            helo=f"mua.{self.domain.name}", tls="implicit" if implicit_tls else "starttls",
            tls_hostname=host, ca_cert=self.home.ca_cert, username=self.user,
            password=self.password, lmtp=False, bind_address=None, timeout=30, tracer=self.tracer,
        )
        return session

    # -- reading -----------------------------------------------------------

    @defer.inlineCallbacks
    def imap_session(self):
        """Connect to ``imap.<domain>``, STARTTLS, LOGIN; returns the client."""
        host = self.domain.host("mda")
        address = yield self._address_of(host)
        endpoint = TCP4ClientEndpoint(self.reactor, address, self.config.ports["imap"], timeout=10)
        client = yield endpoint.connect(_IMAPClientFactory(self.tracer))
        yield client.greeted
        yield client.getCapabilities()
        yield client.startTLS(client_context(self.home.ca_cert, host))
        yield client.login(self.user.encode(), self.password.encode())
        self.tracer.event("imap.login", user=self.user)
        return client

    @defer.inlineCallbacks
    def fetch(self, folder: str = "INBOX"):
        client = yield self.imap_session()
        try:
            messages = yield self._fetch_all(client, folder)
        finally:
            yield _logout(client)
        return messages

    @defer.inlineCallbacks
    def _fetch_all(self, client, folder: str):
        info = yield client.select(folder)
        if not info.get("EXISTS"):
            return []
        data = yield client.fetchSpecific("1:*", peek=True)
        flags = yield client.fetchFlags("1:*")
        uids = yield client.fetchUID("1:*")
        out = []
        for seq in sorted(data):
            raw = _body_from_fetch(data[seq])
            summary = summarize(raw)
            summary.update(uid=int(uids[seq]["UID"]), flags=flags.get(seq, {}).get("FLAGS", []))
            self.tracer.event("fetched", message_id=summary["message_id"], uid=summary["uid"], folder=folder)
            out.append(summary)
        return out

    @defer.inlineCallbacks
    def wait_for(self, message_id: str, folder: str = "INBOX", timeout: float = 20.0):
        """Wait in IMAP IDLE until a message with ``message_id`` is in ``folder``."""
        client = yield self.imap_session()
        deadline = time.monotonic() + timeout
        announced = False
        try:
            while True:
                messages = yield self._fetch_all(client, folder)
                for m in messages:
                    if m["message_id"] == message_id:
                        return m
                if not announced:
                    announced = True
                    print(f"waiting for {message_id} in IDLE", file=sys.stderr, flush=True)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise MUAError(f"{message_id} did not arrive in {timeout:.0f} s")
                yield client.idle_until_news(min(remaining, 5.0))
        finally:
            yield _logout(client)

    @defer.inlineCallbacks
    def watch(self, folder: str = "INBOX", count: int | None = None, as_json: bool = False):
        """Print each new message as it arrives (IDLE), until ``count`` were seen."""
        client = yield self.imap_session()
        seen = {m["uid"] for m in (yield self._fetch_all(client, folder))}
        shown = 0
        print(f"watching {self.user} {folder} (Ctrl-C to stop)", file=sys.stderr, flush=True)
        while count is None or shown < count:
            yield client.idle_until_news(60.0)
            for m in (yield self._fetch_all(client, folder)):
                if m["uid"] not in seen:
                    seen.add(m["uid"])
                    shown += 1
                    print(json.dumps(m) if as_json else f"{m['date']}  {m['from']}  {m['subject']}", flush=True)


def _body_from_fetch(items) -> bytes:
    # fetchSpecific answers [[b"BODY", [], b"<the message>"]] per message.
    for item in items:
        if isinstance(item, list) and item and item[0] in ("BODY", b"BODY"):
            value = item[-1]
            return value.encode("latin-1") if isinstance(value, str) else value
    raise ValueError(f"no BODY in fetch response {items!r}")


def summarize(raw: bytes) -> dict:
    """The fields a reader wants to see, plus the raw message for the curious."""
    msg = BytesParser(policy=email.policy.default).parsebytes(raw)
    body = msg.get_body(preferencelist=("plain",))
    return {
        "message_id": msg.get("Message-ID"),
        "from": msg.get("From"),
        "to": msg.get("To"),
        "subject": msg.get("Subject"),
        "date": msg.get("Date"),
        "received": [str(v) for v in msg.get_all("Received", [])],
        "body": body.get_content() if body is not None else "",
        "size": len(raw),
        "raw": raw.decode("utf-8", "replace"),
    }


@defer.inlineCallbacks
def _logout(client):
    try:
        yield client.logout()
    except Exception:
        pass
    client.transport.loseConnection()


class _IMAPClient(imap4.IMAP4Client):
    """Twisted's IMAP client plus IDLE (RFC 2177), which it lacks."""

    _idle_tag = b"MPIDLE"

    def __init__(self, tracer):
        super().__init__()
        self.greeted = defer.Deferred()
        self._idle = None
        #: Messages in the selected mailbox, as the server last said (EXISTS).
        self.exists = None
        self.tracer = tracer
        self.conn = tracer.new_connection_id()

    def serverGreeting(self, caps):
        self.greeted.callback(caps)

    def sendLine(self, line):
        self.tracer.line(self.conn, "C", line)
        return super().sendLine(line)

    def lineReceived(self, line):
        self.tracer.line(self.conn, "S", line)
        if self._idle is not None:
            return self._idle_line(line)
        if line.startswith(b"* ") and line.upper().endswith(b" EXISTS"):
            # Twisted hands an EXISTS that arrives during another command
            # (say a FETCH) to that command's parser, which drops it; the
            # count would be lost. Note it here (RFC 3501 7.3.1).
            self.exists = int(line.split()[1])
        return super().lineReceived(line)

    def idle_until_news(self, timeout: float):
        """IDLE until the server reports new mail (``* n EXISTS``) or ``timeout``."""
        done = defer.Deferred()
        self._idle = {"done": done, "news": False}
        self.sendLine(self._idle_tag + b" IDLE")
        timer = self.factory.reactor.callLater(timeout, self._end_idle)
        # A server that never answers DONE has lost the plot: give up on it.
        watchdog = self.factory.reactor.callLater(timeout + 15, self.transport.abortConnection)
        done.addBoth(lambda r: ([t.cancel() for t in (timer, watchdog) if t.active()], r)[1])
        return done

    def _end_idle(self):
        if self._idle is not None and not self._idle.get("ending"):
            self._idle["ending"] = True
            self.sendLine(b"DONE")

    def connectionMade(self):
        no_delay(self.transport)  # see agents.net
        super().connectionMade()

    def connectionLost(self, reason):
        if self._idle is not None:
            state, self._idle = self._idle, None
            state["done"].errback(reason)
        super().connectionLost(reason)

    def newMessages(self, exists, recent):
        """Untagged EXISTS outside IDLE (after NOOP, SELECT...): remember the count."""
        if exists is not None:
            self.exists = exists

    def _idle_line(self, line: bytes):
        if line.startswith(b"* ") and line.upper().endswith(b" EXISTS"):
            self.exists = int(line.split()[1])
            self._idle["news"] = True
            self._end_idle()
        elif line.startswith(self._idle_tag + b" "):
            state, self._idle = self._idle, None
            state["done"].callback(state["news"])


class _IMAPClientFactory(protocol.ClientFactory):
    def __init__(self, tracer):
        from twisted.internet import reactor

        self.reactor = reactor
        self.tracer = tracer

    def buildProtocol(self, addr):
        p = _IMAPClient(self.tracer)
        p.factory = self
        return p


# -- command line ------------------------------------------------------------

def add_send_arguments(p) -> None:
    """The options of ``send``, shared by ``python -m agents mua`` and ``mailpipe``."""
    p.add_argument("--from", dest="sender", required=True)
    p.add_argument("--to", action="append", required=True)
    p.add_argument("--subject", default="Hello from mailpipe")
    p.add_argument("--body", default="Hello!\n")
    p.add_argument("--password")
    p.add_argument("--header-from", help="a From: header other than the sender (for the spoofing lesson)")
    p.add_argument("--implicit-tls", action="store_true", help="use port 465 (RFC 8314) instead of 587")
    p.add_argument("--message-id", help="the Message-ID to use (default: a new one)")
    p.add_argument("--direct-mx", nargs="?", const="", metavar="DOMAIN",
                   help="skip the MSA: talk SMTP to the recipients' MX (or DOMAIN's), as an MTA does")
    p.add_argument("--source-address", help="with --direct-mx: connect from this address")
    p.add_argument("--helo", help="with --direct-mx: the name to give in EHLO")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m agents mua")
    parser.add_argument("--home", default=None)
    sub = parser.add_subparsers(dest="command", required=True)
    add_send_arguments(sub.add_parser("send", help="compose and submit a message"))
    for name in ("fetch", "wait", "watch"):
        p = sub.add_parser(name)
        p.add_argument("user")
        p.add_argument("--password")
        p.add_argument("--folder", default="INBOX")
        if name == "wait":
            p.add_argument("--message-id", required=True)
            p.add_argument("--timeout", type=float, default=20.0)
        if name == "watch":
            p.add_argument("--count", type=int)
    for p in sub.choices.values():
        p.add_argument("--json", action="store_true")
        p.add_argument("--home", default=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    home = LabHome.at(args.home)
    config = LabConfig.load(home.config_file if home.config_file.exists() else None)
    out: dict = {}

    @defer.inlineCallbacks
    def run(reactor):
        if args.command == "send" and args.direct_mx is not None:  # see agents.directmx
            from .directmx import send_direct
            from .headers import get_header

            content = compose(args.sender, args.to, args.subject, args.body, from_header=args.header_from,
                              extra_headers={"Message-ID": args.message_id or f"<{time.time_ns():x}.direct@"
                                             f"{args.sender.rpartition('@')[2]}>"})
            result = yield send_direct(reactor, home, config, mail_from=args.sender, to=args.to, content=content,
                                       via=args.direct_mx, source_address=args.source_address, helo=args.helo)
            out.update(result, message_id=get_header(content, "Message-ID"))
        elif args.command == "send":
            mua = MUA(reactor, home, config, args.sender, args.password)
            content = compose(args.sender, args.to, args.subject, args.body, from_header=args.header_from,
                              extra_headers={"Message-ID": args.message_id
                                             or f"<{time.time_ns():x}.mua@{mua.domain.name}>"})
            from .headers import get_header

            message_id = get_header(content, "Message-ID")
            result = yield mua.submit(args.to, content, implicit_tls=args.implicit_tls, message_id=message_id)
            out.update(result, message_id=message_id)
        elif args.command == "fetch":
            mua = MUA(reactor, home, config, args.user, args.password)
            out["messages"] = yield mua.fetch(args.folder)
        elif args.command == "wait":
            mua = MUA(reactor, home, config, args.user, args.password)
            out["message"] = yield mua.wait_for(args.message_id, args.folder, args.timeout)
        elif args.command == "watch":
            mua = MUA(reactor, home, config, args.user, args.password)
            yield mua.watch(args.folder, args.count, args.json)

    if not home.ca_cert.exists():
        print(f"mailpipe: no lab CA at {home.ca_cert}; start the lab first ('mailpipe up')", file=sys.stderr)
        return 1
    outcome = run_reactor(run)
    if isinstance(outcome, BaseException):
        print(f"mailpipe: {explain(outcome)}", file=sys.stderr)
        return 1
    if args.command != "watch":
        if args.json:
            print(json.dumps(out))
        else:
            _print_human(args.command, out)
    return 0


def explain(error: BaseException) -> str:
    """One line for a person: what went wrong and what to do."""
    text = str(error) or type(error).__name__
    status = getattr(error, "status", "")
    if status in ("4.4.1",) or isinstance(error, ConnectionRefusedError):
        return f"{text}; is that agent running? ('mailpipe status')"
    if status.startswith("4.7.5"):
        return f"{text}; the server's certificate is not from this lab's CA ('mailpipe up' recreates it)"
    from .resolver import LookupFailed

    if isinstance(error, LookupFailed):
        return f"{text}; is the lab DNS running? ('mailpipe status')"
    return text


def run_reactor(function):
    """Run ``function(reactor)`` (returning a Deferred) to completion.

    Returns its result, or the exception it failed with.
    """
    from twisted.internet import reactor
    from twisted.python.failure import Failure

    box = {}

    def finished(result):
        box["result"] = result.value if isinstance(result, Failure) else result
        reactor.stop()

    reactor.callWhenRunning(lambda: defer.maybeDeferred(function, reactor).addBoth(finished))
    try:
        reactor.run()
    except KeyboardInterrupt:
        return KeyboardInterrupt("interrupted")
    return box.get("result", KeyboardInterrupt("interrupted"))


def _print_human(command: str, out: dict) -> None:
    if command == "send":
        print(f"submitted {out['message_id']} to {out['server']}")
        for r in out["recipients"]:
            print(f"  {r['address']}: {r['code']} {r['status']} {r['text']}")
    elif command == "fetch":
        for m in out["messages"]:
            print(f"{m['uid']:>4}  {m['date']}  {m['from']}  {m['subject']}")
        if not out["messages"]:
            print("(no messages)")
    elif command == "wait":
        m = out["message"]
        print(f"arrived: {m['message_id']}  {m['subject']}")
