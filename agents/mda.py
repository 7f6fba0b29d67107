"""The MDA: final delivery into mailboxes, and the way users read them.

Mail arrives from the domain's MTA over LMTP (RFC 2033). LMTP is SMTP without
a queue: the MDA either stores the message for a recipient right now or says
why not, and it says so *per recipient* after the data, so one full mailbox
does not hold up the others. Each message is written to the user's Maildir
(tmp -> fsync -> rename into new), and only then acknowledged.

Users read their mail over IMAP4rev1 (RFC 3501; STARTTLS, and implicit TLS on
imaps, RFC 8314) and POP3 (RFC 1939; STLS, RFC 2595, and pop3s). A user in IMAP IDLE
(RFC 2177) hears about a delivery the moment it is stored.
"""

from __future__ import annotations

import errno

from twisted.internet import defer

from .control import AgentControl
from .headers import get_header, received_field
from .hooks import install_hooks, with_hooks
from .imap import make_imap_factory
from .lmtp import LMTPServerFactory
from .maildir import MailStore
from .pop3 import make_pop3_factory
from .quarantine import folder_for
from .security import login_throttle
from .smtpserver import Reply, ServerPolicy, SMTPHandler
from .quota import Quotas
from .quota import usage as quota_usage
from .spool import new_queue_id
from .users import UserDB, UserDBChecker


class LocalDeliveryPolicy(SMTPHandler):
    """The MDA's decisions, one hook per step of the LMTP transaction."""

    def __init__(self, ctx, store: MailStore):
        self.ctx, self.store = ctx, store
        self.domain = ctx.domain
        self.quotas = Quotas(ctx.config)

    def handle_CONNECT(self, session):
        # Only this domain's MTA delivers here; LMTP is not for the internet.
        if session.peer != self.domain.address:
            return Reply(554, "5.7.1", "LMTP is only for this domain's MTA")
        return None

    def handle_RCPT(self, session, envelope, address, options):
        user = self.ctx.config.user(address)
        if user is None or user.domain != self.domain.name:
            return Reply(550, "5.1.1", f"<{address}>: no such user here")
        return None

    def handle_DATA(self, session, envelope):
        """Store one copy per recipient; RFC 2033 4.2: one reply each, in order."""
        queue_id = new_queue_id()
        message_id = get_header(envelope.content, "Message-ID")
        replies = [self._deliver_one(session, envelope, rcpt, queue_id, message_id)
                   for rcpt in envelope.rcpt_tos]
        return defer.gatherResults(replies)

    def _deliver_one(self, session, envelope, rcpt: str, queue_id: str, message_id: str | None):
        # RFC 5321 4.4: the final delivery adds Return-Path (the envelope
        # sender) and, by convention, Delivered-To; plus our Received line.
        trace = f"Return-Path: <{envelope.mail_from}>\r\nDelivered-To: {rcpt}\r\n".encode()
        trace += received_field(helo=session.helo, peer_ip=session.peer, by=self.domain.host("mda"),
                                protocol="LMTP", queue_id=queue_id, recipient=rcpt)
        # The MTA marks a message that DMARC quarantined (see agents.quarantine).
        folder, content = folder_for(envelope.content)
        message = trace + content
        limit = self.quotas.limit(rcpt)
        if limit:
            d = self.ctx.disk.run(quota_usage, self.store.user_path(rcpt))
            d.addCallback(lambda used: self._store_within(rcpt, message, folder, used, limit))
        else:
            d = self.store.deliver(rcpt, message, folder=folder)

        def stored(name):
            self.ctx.tracer.event("stored", queue_id=queue_id, rcpt=rcpt, maildir_file=name,
                                  message_id=message_id, conn=session.conn_id, folder=folder)
            if self.ctx.hooks is not None:  # coursework hooks (agents.hooks)
                self.ctx.hooks.notify("stored", rcpt, folder, message_id)
            return Reply(250, "2.0.0", f"<{rcpt}> delivered as {queue_id}")

        def failed(f):
            err = f.value
            self.ctx.tracer.event("store.failed", queue_id=queue_id, rcpt=rcpt, error=str(err))
            if isinstance(err, OverQuota):
                return Reply(452, "4.2.2", f"<{rcpt}>: mailbox full ({err})")
            if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
                return Reply(452, "4.2.2", f"<{rcpt}>: mailbox full or disk full")
            return Reply(451, "4.3.0", f"<{rcpt}>: cannot store the message now")

        return d.addCallbacks(stored, failed)


    def _store_within(self, rcpt: str, message: bytes, folder: str, used: int, limit: int):
        if used + len(message) > limit:
            raise OverQuota(f"quota {limit} bytes, {used} used, message {len(message)}")
        return self.store.deliver(rcpt, message, folder=folder)


class OverQuota(Exception):
    """Storing this message would take the user over quota (RFC 3463 X.2.2)."""


def build(ctx) -> None:
    hooks = install_hooks(ctx)  # coursework hooks from the lab config, if any (agents.hooks)
    store = MailStore(ctx.home.maildirs, run_in_thread=ctx.disk.run)
    for user in ctx.config.users_of(ctx.domain.name):
        store.maildir(user.address)
    checker = UserDBChecker(UserDB(ctx.home.users_file))
    tls = ctx.server_tls()
    lmtp_policy = ServerPolicy(
        hostname=ctx.domain.host("lmtp"),
        max_message_size=ctx.config.max_message_size,
        max_recipients=ctx.config.max_recipients,
        tls_context=None,
        implicit_tls=False,
        require_auth=False,
    )
    # mailpipe fault / queue stats, and a ledger that counts duplicate deliveries (agents.control)
    control = AgentControl(ctx)
    delivery = control.wrap(with_hooks(LocalDeliveryPolicy(ctx, control.watch_store(store)), hooks))
    ctx.listen_tcp("lmtp", LMTPServerFactory(lmtp_policy, delivery, tracer=ctx.tracer))
    # One brute-force throttle for all four: a guesser gains nothing by switching.
    fetched = (lambda *args: hooks.notify("fetched", *args)) if hooks else None  # coursework hooks
    shared = {"tracer": ctx.tracer, "throttle": login_throttle(ctx), "on_fetched": fetched}
    ctx.listen_tcp("imap", make_imap_factory(store, checker, tls, **shared))
    ctx.listen_ssl("imaps", make_imap_factory(store, checker, tls, implicit_tls=True, **shared), tls)
    ctx.listen_tcp("pop3", make_pop3_factory(store, checker, tls, **shared))
    ctx.listen_ssl("pop3s", make_pop3_factory(store, checker, tls, implicit_tls=True, **shared), tls)
