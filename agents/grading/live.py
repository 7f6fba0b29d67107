"""A lab started for grading, and plain blocking clients to drive it.

:class:`LiveLab` runs a whole lab in a temporary home on a loopback subnet of
its own (``127.N.x.y``, N from 100 to 250), so it never meets the lab a
student has running. :meth:`LiveLab.use` plugs one exercise's hooks in:
it rewrites the ``[hooks]`` table of the lab config and restarts only the
agents whose hooks change, so the checks of many exercises (or of many
students) share one lab and each starts from fresh hook state.

The clients are the standard library's ``smtplib`` and ``imaplib``: no
reactor runs in the grading process, and every reply code is seen exactly.
"""

from __future__ import annotations

import email
import email.policy
import imaplib
import random
import shutil
import smtplib
import socket
import ssl
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..config import LabConfig, User
from ..headers import rfc5322_date
from ..lab import Lab
from ..trace import now_us, read_events

#: A second user at sender.test: the rate-limit checks show that one sender's limit is not another's.
EXTRA_USERS = (User("carol@sender.test", "carol-secret"),)


def free_subnet(rng: random.Random | None = None) -> int:
    """A ``127.N.0.0/16`` where nothing listens on the lab's DNS and SMTP ports."""
    rng = rng or random.Random()
    for _ in range(200):
        n = rng.randint(100, 250)
        if all(_bindable(f"127.{n}.{host}", port) for host, port in (("0.1", 1053), ("1.1", 1025), ("2.1", 1025))):
            return n
    raise RuntimeError("no free 127.N.0.0/16 subnet for a grading lab")


def _bindable(address: str, port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind((address, port))
        except OSError:
            return False
    return True


@dataclass
class Transaction:
    """The replies to one mail transaction: ``(command, code, text)`` in order."""

    replies: list[tuple[str, int, str]] = field(default_factory=list)

    def reply(self, command: str, index: int = 0) -> tuple[int, str] | None:
        found = [(code, text) for cmd, code, text in self.replies if cmd == command]
        return found[index] if len(found) > index else None

    @property
    def accepted(self) -> bool:
        """Did the message get its 250 at the end of DATA?"""
        data = self.reply("DATA")
        return data is not None and data[0] == 250

    def __str__(self) -> str:
        return "; ".join(f"{cmd} -> {code} {text}" for cmd, code, text in self.replies)


class _SMTP:
    """One open SMTP session (see :meth:`LiveLab.submission`, :meth:`LiveLab.mx_session`)."""

    def __init__(self, client: smtplib.SMTP):
        self.client = client

    def send(self, mail_from: str, rcpts: list[str], content: bytes) -> Transaction:
        t = Transaction()
        code, text = self.client.mail(mail_from)
        t.replies.append(("MAIL", code, text.decode("utf-8", "replace")))
        if code != 250:
            self.client.rset()
            return t
        accepted = 0
        for rcpt in rcpts:
            code, text = self.client.rcpt(rcpt)
            t.replies.append(("RCPT", code, text.decode("utf-8", "replace")))
            accepted += code in (250, 251)
        if not accepted:
            self.client.rset()
            return t
        try:
            code, text = self.client.data(content)
        except smtplib.SMTPDataError as e:  # DATA itself refused
            code, text = e.smtp_code, e.smtp_error
        t.replies.append(("DATA", code, text.decode("utf-8", "replace")))
        return t


class LiveLab:
    """A lab for grading: ``with LiveLab() as lab: lab.use(hooks, settings) ...``."""

    def __init__(self, home: str | Path | None = None, subnet: int | None = None):
        self._tmp = None if home else tempfile.mkdtemp(prefix="mailpipe-grading-lab-")
        config = LabConfig.load(None).relocated(subnet if subnet is not None else free_subnet())
        config = replace(config, users=config.users + EXTRA_USERS,
                         sections={**config.sections, "hooks": {}})
        self.lab = Lab(home=home or self._tmp, config=config)

    # -- lifetime --------------------------------------------------------------

    def up(self) -> "LiveLab":
        self.lab.up()
        return self

    def down(self) -> None:
        self.lab.down()
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> "LiveLab":
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()

    @property
    def data_dir(self) -> Path:
        """``ctx.data_dir`` of the hooks in this lab."""
        return self.lab.home.root / "hooks"

    def use(self, hooks: dict, settings: dict) -> None:
        """Run with this ``[hooks]`` table (and ``[hooks.settings]``) from now on.

        The agents whose hooks change are restarted (hook state is per
        process, so it starts empty), and ``HOME/hooks`` is emptied.
        """
        before = self._agents_with(self.lab.config.section("hooks"))
        table = {**hooks, "settings": dict(settings)}
        self.lab.config = replace(self.lab.config, sections={**self.lab.config.sections, "hooks": table})
        self.lab.home.config_file.write_text(self.lab.config.to_toml())  # what agents read at start
        shutil.rmtree(self.data_dir, ignore_errors=True)
        for name in sorted(before | self._agents_with(table)):
            self.lab.stop_agent(name)
        for name in sorted(before | self._agents_with(table)):
            self.lab.start_agent(name)

    def _agents_with(self, table: dict) -> set[str]:
        keys = {k for k, v in table.items() if k != "settings" and v}
        return {spec.name for spec in self.lab.config.agents()
                if spec.role != "dns" and keys & {"all", spec.role, spec.name}}

    # -- sending -----------------------------------------------------------------

    def _tls(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.lab.home.ca_cert))
        context.check_hostname = False  # we connect by address; the chain is still checked
        return context

    @contextmanager
    def submission(self, user: str):
        """An authenticated submission session (STARTTLS, AUTH) at ``user``'s MSA."""
        host, port = self.lab.endpoint(user.rpartition("@")[2], "submission")
        password = self.lab.config.user(user).password
        with smtplib.SMTP(host, port, local_hostname="grader.test", timeout=15) as client:
            client.starttls(context=self._tls())
            client.login(user, password)
            yield _SMTP(client)

    @contextmanager
    def mx_session(self, domain: str, helo: str = "mail.grader.example"):
        """A plain SMTP session with ``domain``'s MX, as another provider's MTA would have."""
        host, port = self.lab.endpoint(domain, "smtp")
        with smtplib.SMTP(host, port, local_hostname=helo, timeout=15) as client:
            client.ehlo()
            yield _SMTP(client)

    def submit(self, user: str, rcpts: list[str], content: bytes) -> Transaction:
        with self.submission(user) as s:
            return s.send(user, rcpts, content)

    @staticmethod
    def message_id(domain: str) -> str:
        return f"<grade.{uuid.uuid4().hex[:16]}@{domain}>"

    @staticmethod
    def compose(sender: str, to: str, subject: str, body: str, message_id: str,
                extra: tuple[str, ...] = ()) -> bytes:
        """A small text/plain message with CRLF line ends."""
        head = [f"From: <{sender}>", f"To: <{to}>", f"Subject: {subject}", f"Date: {rfc5322_date()}",
                f"Message-ID: {message_id}", *extra, "MIME-Version: 1.0",
                "Content-Type: text/plain; charset=us-ascii", "Content-Transfer-Encoding: 7bit"]
        return ("\r\n".join(head) + "\r\n\r\n" + body.replace("\n", "\r\n")).encode()

    # -- reading -----------------------------------------------------------------

    def wait_for(self, user: str, match, timeout: float = 20.0, folder: str = "INBOX") -> bytes | None:
        """The first message in ``user``'s folder that ``match`` accepts (a function of
        the raw bytes, or a Message-ID), read over IMAP; None after ``timeout`` seconds."""
        if isinstance(match, str):
            wanted = match
            match = lambda raw: header(raw, "Message-ID") == wanted  # noqa: E731
        host, port = self.lab.endpoint(user.rpartition("@")[2], "imap")
        deadline = time.monotonic() + timeout
        with imaplib.IMAP4(host, port, timeout=15) as imap:
            imap.starttls(ssl_context=self._tls())
            imap.login(user, self.lab.config.user(user).password)
            while True:
                imap.select(folder, readonly=True)
                _typ, data = imap.search(None, "ALL")
                for number in (data[0] or b"").split():
                    _typ, parts = imap.fetch(number, "(BODY.PEEK[])")
                    raw = parts[0][1] if parts and isinstance(parts[0], tuple) else b""
                    if match(raw):
                        return raw
                if time.monotonic() > deadline:
                    return None
                time.sleep(0.1)

    def since(self) -> int:
        """A timestamp for :meth:`events` (microseconds, as the trace writes them)."""
        return now_us()

    def events(self, since: int, agent: str | None = None, event: str | None = None, **fields) -> list[dict]:
        """Trace events since ``since``, of one agent and name, whose fields match."""
        return [e for e in read_events(self.lab.home.trace_dir)
                if e.get("ts", 0) >= since and (agent is None or e.get("agent") == agent)
                and (event is None or e.get("event") == event)
                and all(e.get(k) == v for k, v in fields.items())]

    def wait_events(self, since: int, timeout: float = 10.0, **criteria) -> list[dict]:
        """Like :meth:`events`, waiting up to ``timeout`` seconds for at least one."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.events(since, **criteria)
            if found or time.monotonic() > deadline:
                return found
            time.sleep(0.05)


def header(raw: bytes, name: str) -> str | None:
    """One header field of a raw message (unfolded), or None."""
    value = email.message_from_bytes(raw, policy=email.policy.compat32).get(name)
    return " ".join(str(value).split()) if value is not None else None


def body_of(raw: bytes) -> bytes:
    """The body of a raw message: everything after the first empty line."""
    _head, _sep, body = raw.partition(b"\r\n\r\n")
    return body
