"""The MSA: where a domain's own users submit mail (RFC 6409).

Submission is not relay. A client talking to port 587 (or 465 with TLS from
the first byte, RFC 8314) is a *user* of this provider, so the MSA:

* requires TLS before authentication, and authentication before MAIL
  (RFC 6409 4.3, RFC 4954 4, RFC 3207 4);
* lets a user send only as themselves: envelope sender and ``From:`` must be
  the authenticated address (RFC 6409 4.1 lets the MSA enforce this;
  ``[security] enforce_sender = false`` turns it off for the spoofing lesson);
* slows down password guessing and limits how many messages a user or a
  client address may send per minute (:mod:`agents.security`);
* completes the message: ``Message-ID`` and ``Date`` when missing (RFC 6409
  8.2, 8.3) and its own ``Received:`` line (RFC 5321 4.4);
* spools it durably, answers 250, then hands it to its domain's MTA, which
  does the relaying to other domains.

Everything this agent decides is in :class:`SubmissionPolicy`; the protocol
rules (syntax, sequence, TLS, AUTH mechanics) live in :mod:`agents.smtpserver`.
"""

from __future__ import annotations


from .control import AgentControl
from .dsn import bounce_maker
from .hooks import install_hooks, with_hooks
from .guards import SubmissionGuard
from .headers import complete_for_submission, get_header, received_field
from .queue import DeliveryQueue, queue_settings, spool_failure_reply
from .routing import Router
from .security import login_throttle
from .smtpserver import Reply, ServerPolicy, SMTPHandler, SMTPServerFactory, make_auth_portal
from .spool import Spool, new_queue_id
from .users import UserDB, UserDBChecker


class SubmissionPolicy(SMTPHandler):
    """The MSA's decisions, one hook per step of the SMTP transaction."""

    def __init__(self, ctx, queue: DeliveryQueue):
        self.ctx = ctx
        self.queue = queue
        self.domain = ctx.domain
        self.guard = SubmissionGuard.for_agent(ctx)

    def handle_MAIL(self, session, envelope, address, options):
        # Message rate limits (450 4.7.1), then RFC 6409 4.1 and 8.1: the MSA
        # may check that the sender is the authenticated user. We do: a lab
        # user may not send as another (agents.guards.SubmissionGuard).
        return self.guard.check_mail(session, address)

    def handle_DATA(self, session, envelope):
        from_header = get_header(envelope.content, "From")
        if from_header is None:
            return Reply(550, "5.6.0", "Message has no From: header (RFC 5322 3.6)")
        refused = self.guard.check_from(session, from_header)
        if refused is not None:
            return refused
        content, message_id = complete_for_submission(envelope.content, self.domain.name)
        queue_id = new_queue_id()
        received = received_field(
            helo=session.helo, peer_ip=session.peer, by=self.domain.host("msa"),
            protocol="ESMTPSA" if session.tls else "ESMTPA", queue_id=queue_id,
            recipient=envelope.rcpt_tos[0] if len(envelope.rcpt_tos) == 1 else None,
            tls=session.notes.get("tls_version"),  # RFC 8314 7.4, as the MTA does
        )
        d = self.queue.accept(envelope.mail_from, envelope.rcpt_tos, received + content,
                              message_id=message_id, queue_id=queue_id, conn=session.conn_id)
        d.addCallback(lambda qid: Reply(250, "2.0.0", f"Ok: queued as {qid}"))
        d.addErrback(spool_failure_reply)  # disk full: 452 4.3.1, never a 250 we cannot keep
        return d


def build(ctx) -> None:
    domain = ctx.domain
    hooks = install_hooks(ctx)  # coursework hooks from the lab config, if any (agents.hooks)
    router = Router(ctx)
    spool = Spool(ctx.home.spool(ctx.spec.name))
    queue = DeliveryQueue(
        spool, lambda item, content: router.to_own_mta(item, item.pending, content),
        reactor=ctx.reactor, tracer=ctx.tracer, hooks=hooks, run_blocking=ctx.disk.run,
        make_bounce=bounce_maker(domain.host("msa"), domain.name), **queue_settings(ctx.config),
    )
    control = AgentControl(ctx, queue=queue)  # mailpipe queue / fault (agents.control)
    handler = control.wrap(with_hooks(SubmissionPolicy(ctx, queue), hooks))  # faults, hooks, policy
    portal = make_auth_portal(UserDBChecker(UserDB(ctx.home.users_file)))
    tls = ctx.server_tls()

    def policy(implicit_tls: bool) -> ServerPolicy:
        return ServerPolicy(
            hostname=domain.host("msa"),
            max_message_size=ctx.config.max_message_size,
            max_recipients=ctx.config.max_recipients,
            tls_context=tls,
            implicit_tls=implicit_tls,
            require_auth=True,
            login_throttle=login_throttle(ctx),  # one for both ports
        )

    ctx.listen_tcp("submission", SMTPServerFactory(policy(False), handler, portal=portal, tracer=ctx.tracer))
    ctx.listen_ssl("submissions", SMTPServerFactory(policy(True), handler, portal=portal, tracer=ctx.tracer), tls)
    ctx.reactor.callWhenRunning(queue.recover)
