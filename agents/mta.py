"""The MTA: a domain's mail exchanger, relaying between domains (RFC 5321).

It listens on the SMTP port at ``mx.<domain>``, the host the domain's MX
record names, and accepts two kinds of mail:

* for its **own domain**, from anyone on the internet (that is what an MX is
  for), if the recipient exists; it then delivers to its MDA over LMTP;
* for **other domains**, only from its own domain's MSA (the provider's own
  address). Relaying for strangers is refused with ``554 5.7.1``: an "open
  relay" is how spam was sent in the 1990s (RFC 5321 3.6.2 and 7.1).

It answers 250 to DATA only after the message is durably in its spool
(RFC 5321 6.1), then routes each recipient: MX lookup and SMTP relay for other
domains, LMTP for its own. Loops are cut by counting ``Received:`` lines
(RFC 5321 6.3).

Mail from other domains is checked (SPF, DKIM, DMARC) before it is accepted,
and mail relayed to other domains is DKIM-signed: see :mod:`agents.senderauth`.
"""

from __future__ import annotations

from twisted.internet import defer

from .control import AgentControl
from .dsn import bounce_maker
from .exchangers import BackupTransport, is_backup_mx, mta_hostname
from .guards import RelayGuard
from .headers import get_header, header_fields, received_field
from .hooks import install_hooks, with_hooks
from .queue import DeliveryQueue, outcomes_for_failure, queue_settings, spool_failure_reply
from .routing import Router
from .senderauth import SigningRouter, inbound
from .smtpserver import Reply, ServerPolicy, SMTPHandler, SMTPServerFactory
from .spool import Spool, new_queue_id

#: RFC 5321 6.3: a message that has passed this many hops is looping.
MAX_HOPS = 30


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower()


class TransferPolicy(SMTPHandler):
    """The MTA's decisions, one hook per step of the SMTP transaction."""

    def __init__(self, ctx, queue: DeliveryQueue):
        self.ctx = ctx
        self.queue = queue
        self.domain = ctx.domain
        self.hostname = mta_hostname(ctx)  # mx.D, or mx2.D for the backup MX
        self.relay_guard = RelayGuard(ctx.tracer)

    def is_own_msa(self, session) -> bool:
        """Is the client our own provider's MSA? (The lab's "mynetworks".)"""
        return session.peer == self.domain.address

    def handle_RCPT(self, session, envelope, address, options):
        if not self.is_own_msa(session):  # user%elsewhere@here and friends: 550 5.7.1
            refused = self.relay_guard.check(session, address)
            if refused is not None:
                return refused
        rcpt_domain = domain_of(address)
        if rcpt_domain == self.domain.name:
            if self.ctx.config.user(address) is None:
                return Reply(550, "5.1.1", f"<{address}>: Recipient address rejected: user unknown")
            return None
        if self.is_own_msa(session):
            return None
        return self.relay_guard.deny(session, address)  # 554 5.7.1 Relay access denied

    def handle_DATA(self, session, envelope):
        hops = sum(1 for name, _ in header_fields(envelope.content) if name.lower() == "received")
        if hops >= MAX_HOPS:
            return Reply(554, "5.4.6", f"Too many hops ({hops}): mail loop?")
        queue_id = new_queue_id()
        received = received_field(
            helo=session.helo, peer_ip=session.peer, by=self.hostname,
            protocol="ESMTPS" if session.tls else "ESMTP", queue_id=queue_id,
            recipient=envelope.rcpt_tos[0] if len(envelope.rcpt_tos) == 1 else None,
            tls=session.notes.get("tls_version"),
        )
        message_id = get_header(envelope.content, "Message-ID")
        d = self.queue.accept(envelope.mail_from, envelope.rcpt_tos, received + envelope.content,
                              message_id=message_id, queue_id=queue_id, conn=session.conn_id)
        d.addCallback(lambda qid: Reply(250, "2.0.0", f"Ok: queued as {qid}"))
        d.addErrback(spool_failure_reply)  # disk full: 452 4.3.1, never a 250 we cannot keep
        return d


class Transport:
    """Deliver one queued message: group its recipients by domain, route each group."""

    def __init__(self, ctx, router: Router):
        self.ctx, self.router = ctx, router

    @defer.inlineCallbacks
    def __call__(self, item, content):
        by_domain: dict[str, list[str]] = {}
        for rcpt in item.pending:
            by_domain.setdefault(domain_of(rcpt), []).append(rcpt)
        attempts = []
        for domain, rcpts in by_domain.items():
            if domain == self.ctx.domain.name:
                attempts.append(self._guard(self.router.to_own_mda(item, rcpts, content), rcpts))
            else:
                attempts.append(self._guard(self.router.by_mx(domain, item, rcpts, content), rcpts))
        results = yield defer.gatherResults(attempts)
        return [o for group in results for o in group]

    @staticmethod
    def _guard(d, rcpts):
        """A route that fails as a whole fails each of its recipients, not the others'."""
        return d.addErrback(lambda f: outcomes_for_failure(rcpts, f.value))


def build(ctx) -> None:
    domain = ctx.domain
    hooks = install_hooks(ctx)  # coursework hooks from the lab config, if any (agents.hooks)
    router = SigningRouter(ctx)  # DKIM-signs what it relays to other domains (agents.senderauth)
    router.helo = hostname = mta_hostname(ctx)
    spool = Spool(ctx.home.spool(ctx.spec.name))
    # A backup MX relays even its own domain's mail to the primary (agents.exchangers).
    transport = BackupTransport(ctx, router) if is_backup_mx(ctx) else Transport(ctx, router)
    queue = DeliveryQueue(
        spool, transport, reactor=ctx.reactor, tracer=ctx.tracer, hooks=hooks, run_blocking=ctx.disk.run,
        make_bounce=bounce_maker(hostname, domain.name), **queue_settings(ctx.config),
    )
    control = AgentControl(ctx, queue=queue)  # mailpipe queue / fault (agents.control)
    policy = ServerPolicy(
        hostname=hostname,
        max_message_size=ctx.config.max_message_size,
        max_recipients=ctx.config.max_recipients,
        tls_context=ctx.server_tls(),
        implicit_tls=False,
        require_auth=False,
    )
    handler = inbound(TransferPolicy(ctx, queue), ctx)  # SPF, DKIM, DMARC on mail from other domains
    handler = with_hooks(handler, hooks)  # coursework hooks see each step before the checks
    handler = control.wrap(handler)  # injected faults, if any, come first
    ctx.listen_tcp("smtp", SMTPServerFactory(policy, handler, tracer=ctx.tracer))
    ctx.reactor.callWhenRunning(queue.recover)
