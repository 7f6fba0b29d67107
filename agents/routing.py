"""Finding and talking to the next hop, the same way for every agent.

Three routes exist in the lab, each found through the lab DNS:

* MSA -> its own domain's MTA: the host ``mx.<domain>``, SMTP port;
* MTA -> another domain's MTA: that domain's MX records, best preference
  first, each host's A record (RFC 5321 5.1), SMTP port, STARTTLS when offered
  (verified against the lab CA: opportunistic but authenticated), unless the
  domain's config says ``relay_tls = false``: then its SMTP hops stay
  plaintext, as with a next hop that offers no STARTTLS;
* MTA -> its own domain's MDA: the host ``lmtp.<domain>``, LMTP (RFC 2033).

Every route connects *from* the agent's own domain address, so the receiver
sees the client address that the sender's SPF record names (RFC 7208).

Connections are reused between messages (:class:`~agents.smtpclient.ConnectionCache`):
a burst of mail to one next hop pays for one TCP and TLS handshake, not one
per message (RFC 5321 3.3 allows many transactions per session). Each
message's relay events still carry its queue id and Message-ID; the events of
the connection itself (``relay.connected``, ``tls.*``, ``relay.cache.*``)
carry the ``conn`` id that joins them to the messages it carried.
"""

from __future__ import annotations

from twisted.internet import defer

from .exchangers import is_null_mx, usable_exchangers
from .hooks import Route
from .queue import Outcome
from .resolver import LookupFailed
from .smtpclient import ConnectionCache, SMTPDeliveryError

#: How long the agent waits, at shutdown, for its idle connections to say QUIT.
SHUTDOWN_GRACE = 2.0


def outcomes(result) -> list[Outcome]:
    """One :class:`Outcome` per recipient from an SMTP/LMTP client result."""
    return [Outcome(r.address, r.code, r.status, r.text) for r in result.recipients]


class Router:
    def __init__(self, ctx):
        self.ctx = ctx
        self.domain = ctx.domain
        self.resolver = ctx.resolver()
        self.helo = self.domain.host(ctx.spec.role)
        self.relay_tls = "opportunistic" if self.domain.switch("relay_tls") else "none"
        self.cache = ConnectionCache(ctx.reactor, tracer=ctx.tracer)
        self.hooks = getattr(ctx, "hooks", None)  # coursework hooks: before_relay (agents.hooks)
        ctx.reactor.addSystemEventTrigger("before", "shutdown", self.close_connections)

    def close_connections(self):
        """QUIT every cached connection (RFC 5321 4.1.1.10), but do not let
        a silent next hop hold up our shutdown for long."""
        d = self.cache.close_all()
        d.addTimeout(SHUTDOWN_GRACE, self.ctx.reactor)  # then drop what is left
        return d.addErrback(lambda _: None)

    def _send(self, address: str, port: int, host: str, item, recipients, content, *, lmtp=False):
        return self.cache.send(
            address, port,
            helo=self.helo, mail_from=item.mail_from, rcpt_tos=recipients, content=content,
            tls="none" if lmtp else self.relay_tls, tls_hostname=host,
            ca_cert=self.ctx.home.ca_cert, lmtp=lmtp,
            bind_address=self.ctx.spec.address,  # the domain's, or a backup MX's own
            tracer=self.ctx.tracer.bind(queue_id=item.queue_id, message_id=item.message_id),
        )

    @defer.inlineCallbacks
    def before_relay(self, item, route: Route):
        """Run the ``before_relay`` hooks, which may reorder or replace ``route.hosts``.

        Returns None to go ahead, or the recipients' outcomes if a hook refused
        (a reject bounces them, a tempfail keeps them queued for a retry).
        """
        if self.hooks is None or not self.hooks.active("before_relay"):
            return None
        verdict = yield self.hooks.run("before_relay", item, route)
        if verdict.kind in ("reject", "tempfail"):
            return [Outcome(r, verdict.code, verdict.status, verdict.text) for r in route.recipients]
        return None

    @defer.inlineCallbacks
    def _send_to_host(self, host: str, service: str, item, recipients, content, lmtp=False):
        route = Route(self.domain.name, list(recipients), [(0, host)])
        refused = yield self.before_relay(item, route)
        if refused is not None:
            return refused
        if not route.hosts:
            raise SMTPDeliveryError(451, "4.4.0", "a before_relay hook left no host to try", permanent=False)
        host = route.hosts[0][1]  # the next hop of our own domain: only the first is tried
        ips = yield self.resolver.lookup_a(host)
        if not ips:
            raise SMTPDeliveryError(451, "4.4.4", f"{host} has no address record", permanent=False)
        result = yield self._send(ips[0], self.ctx.config.ports[service], host, item, recipients, content, lmtp=lmtp)
        return outcomes(result)

    def to_own_mta(self, item, recipients, content):
        """MSA -> MTA of the same domain (RFC 6409 3.1: the MSA hands on, the MTA relays)."""
        return self._send_to_host(self.domain.host("mta"), "smtp", item, recipients, content)

    def to_own_mda(self, item, recipients, content):
        """MTA -> MDA of the same domain over LMTP."""
        return self._send_to_host(self.domain.host("lmtp"), "lmtp", item, recipients, content, lmtp=True)

    @defer.inlineCallbacks
    def by_mx(self, domain: str, item, recipients, content):
        """Relay to ``domain``'s mail exchangers, trying each in preference order."""
        try:
            exchangers = yield self.resolver.mail_exchangers(domain)
        except LookupFailed as e:
            return [Outcome(r, 451, "4.4.3", f"DNS lookup for {domain} failed: {e.reason}") for r in recipients]
        if not exchangers:
            if is_null_mx((yield self.resolver.lookup_mx(domain))):  # cached by now
                return [Outcome(r, 556, "5.1.10", f"{domain} accepts no mail (null MX, RFC 7505)")
                        for r in recipients]
            return [Outcome(r, 550, "5.1.2", f"{domain} does not accept mail (no MX, no A, or null MX)")
                    for r in recipients]
        # RFC 5321 5.1: a backup MX drops itself and every MX no better than it.
        exchangers = usable_exchangers(exchangers, self.ctx.spec.address)
        if not exchangers:
            return [Outcome(r, 554, "5.4.6", f"mail for {domain} loops back to myself") for r in recipients]
        if self.hooks is not None and self.hooks.active("before_relay"):
            route = Route(domain, list(recipients), [(pref, host) for pref, host, _ips in exchangers])
            refused = yield self.before_relay(item, route)
            if refused is not None:
                return refused
            known = {host: ips for _pref, host, ips in exchangers}
            exchangers = []
            for pref, host in route.hosts:
                ips = known.get(host)
                if ips is None:  # a host the hook added: look up its address
                    ips = yield self.resolver.lookup_a(host)
                exchangers.append((pref, host, ips))
        last_error = None
        for _pref, host, ips in exchangers:
            for ip in ips:
                if ip == self.ctx.spec.address:
                    # RFC 5321 5.1: an MX pointing back at ourselves is a loop.
                    return [Outcome(r, 554, "5.4.6", f"mail for {domain} loops back to myself")
                            for r in recipients]
                try:
                    result = yield self._send(ip, self.ctx.config.ports["smtp"], host, item, recipients, content)
                except SMTPDeliveryError as e:
                    last_error = e
                    if e.permanent:
                        return [Outcome(r, e.code, e.status, e.text) for r in recipients]
                    continue  # temporary: try the next MX host
                return outcomes(result)
        e = last_error
        return [Outcome(r, e.code if e and e.code else 451, (e.status if e else None) or "4.4.1",
                        e.text if e else "no mail exchanger reachable") for r in recipients]
