"""Sender authentication at the MTA: SPF, DKIM and DMARC, in and out.

This module wires the three checks into the mail flow; each check lives in
its own module (:mod:`agents.spf`, :mod:`agents.dkim`, :mod:`agents.dmarc`).

**Outbound.** :class:`SigningRouter` is the MTA's router with one change: a
message relayed to another domain is DKIM-signed first, with the domain's key
from the lab home. The MSA has already completed the headers (Message-ID,
Date), so the signature covers them. Mail for the MTA's own domain goes to
the MDA over LMTP (or, from a backup MX, up to the primary MX) unsigned: it
never leaves the provider. A domain whose config says ``dkim_sign = false``
signs nothing.

**Inbound.** :class:`InboundChecks` stands in front of the MTA's own SMTP
handler. For a message from another domain (not from our own MSA) it

1. checks SPF for the HELO name and the MAIL FROM domain (RFC 7208 2.3, 2.4);
   the HELO name's result is kept for the rest of the session,
2. verifies every DKIM signature (RFC 6376 6),
3. evaluates DMARC for the ``From:`` domain (RFC 7489 6.6),
4. removes any ``Authentication-Results:`` that claims our authserv-id and
   adds its own (RFC 8601 5), and applies the DMARC policy: ``reject`` is a
   ``550 5.7.1`` at the end of DATA; ``quarantine`` marks the message for the
   recipient's Junk folder (:mod:`agents.quarantine`); ``none`` delivers.

A domain whose config says ``check_sender_auth = false`` runs none of the
checks (an MTA without SPF, DKIM or DMARC software), but still removes
forged ``Authentication-Results:`` that claim to be its own.

SPF alone never decides here: a ``-all`` fail also hits honest mail that was
forwarded, which is why RFC 7208 8.4 leaves the decision to the receiver and
DMARC lets the domain owner make it.

Every check is a trace event with its result and duration (``spf.result``,
``dkim.result``, ``dmarc.result``, ``senderauth.verdict``, ``dkim.sign``); the
DNS questions they ask are the resolver's ``dns.query``/``dns.answer`` events.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, replace

from twisted.internet import defer, threads

from . import authres, dkim, dmarc, quarantine
from .headers import get_header, header_fields
from .routing import Router
from .smtpserver import Reply
from .spf import SPFChecker, SPFResult
from .trace import NULL_TRACER


# -- what the lab DNS publishes ---------------------------------------------------

def dns_records(domain, home_root) -> list[tuple[str, str]]:
    """The TXT records that make ``domain``'s mail checkable, as ``(name, text)``.

    * ``mx.<domain>``: SPF for the HELO name (RFC 7208 2.3 asks every mail
      host to publish one): the host's own address, nothing else;
    * ``<selector>._domainkey.<domain>``: the DKIM public key, read from the
      key files in the lab home (absent until ``mailpipe up`` made them);
    * ``_dmarc.<domain>``: the domain's DMARC policy, from the lab config.

    The domain's own SPF record (``v=spf1 ip4:<address> -all``) is in the
    zone already (:mod:`agents.dns`).
    """
    from .exchangers import backup_address, backup_host

    records = [(domain.host("mta"), "v=spf1 a -all"), (f"_dmarc.{domain.name}", dmarc.record_for(domain))]
    if backup_address(domain):  # a backup MX says HELO mx2.<domain>
        records.append((backup_host(domain), "v=spf1 a -all"))
    key = dkim.load_key(home_root, domain) if home_root is not None else None
    if key is not None:
        records.append((key.dns_name, key.record))
    return records


def prepare(home_root, config) -> None:
    """Before the lab starts: a DKIM key pair for every domain (made once, kept in
    ``HOME/dkim``), and every domain's DMARC settings checked, so that a typo in
    the config stops ``mailpipe up`` with a clear message."""
    dkim.ensure_keys(home_root, config)
    for domain in config.domains:
        dmarc.record_for(domain)


# -- the inbound verdict ------------------------------------------------------------

@dataclass
class Verdict:
    """Everything the inbound checks found about one message."""

    authserv_id: str
    spf_helo: SPFResult
    spf_mailfrom: SPFResult
    dkim: list  # of dkim.DKIMResult
    dmarc: dmarc.DMARCResult

    @property
    def disposition(self) -> str:
        """``none`` (deliver), ``quarantine`` (Junk) or ``reject`` (550)."""
        return self.dmarc.disposition

    def header(self) -> bytes:
        """Our ``Authentication-Results:`` field (RFC 8601 2.2)."""
        results = [
            authres.resinfo("spf", self.spf_mailfrom.result, self.spf_mailfrom.reason,
                            smtp_mailfrom=self.spf_mailfrom.sender),
            authres.resinfo("spf", self.spf_helo.result, self.spf_helo.reason,
                            smtp_helo=self.spf_helo.domain),
        ]
        for sig in self.dkim:
            results.append(authres.resinfo("dkim", sig.result, sig.reason, header_d=sig.domain,
                                           header_s=sig.selector, header_a=sig.algorithm, header_b=sig.b))
        if not self.dkim:
            results.append(authres.resinfo("dkim", "none", "no signature"))
        d = self.dmarc
        why = f"p={d.policy} dis={d.disposition}" if d.record else d.reason
        results.append(authres.resinfo("dmarc", d.result, why, header_from=d.from_domain))
        return authres.build(self.authserv_id, results)

    def summary(self) -> str:
        """One line for an SMTP reply: what failed."""
        dk = ", ".join(f"DKIM {s.result} ({s.reason})" for s in self.dkim) or "DKIM none"
        return f"SPF {self.spf_mailfrom.result}, {dk}"


#: Messages up to this size are DKIM-signed and verified on the reactor thread.
#: That work is pure CPU (canonicalisation, hashing, one RSA operation), and
#: under the GIL a thread would not run it beside the reactor anyway: for a
#: small message a thread only adds two thread switches and lock traffic
#: (profiling showed them costing more than the signature). A big message
#: still goes to a thread, so that hashing it, milliseconds per megabyte, is
#: interleaved with the reactor's other work instead of stalling it.
INLINE_CRYPTO_LIMIT = 256 * 1024


def crypto_runner(content: bytes, run_blocking):
    """How to run DKIM work on ``content``: inline if small, else ``run_blocking``."""
    return defer.maybeDeferred if len(content) <= INLINE_CRYPTO_LIMIT else run_blocking


class SenderAuth:
    """The three inbound checks over one resolver, reporting to one tracer."""

    def __init__(self, resolver, authserv_id: str, tracer=NULL_TRACER,
                 run_blocking=threads.deferToThread, rng=random):
        self.resolver, self.authserv_id, self.tracer = resolver, authserv_id, tracer
        self.spf = SPFChecker(resolver)
        self._blocking = run_blocking  # for big messages (crypto_runner); tests pass a stand-in
        self.rng = rng

    @defer.inlineCallbacks
    def check(self, ip: str, helo: str, mail_from: str, content: bytes, tracer=None,
              spf_helo: SPFResult | None = None):
        """Run SPF (HELO and MAIL FROM), DKIM and DMARC; fires with a :class:`Verdict`.

        ``spf_helo`` is the HELO identity's result if this session has it
        already (see :meth:`InboundChecks.handle_DATA`): it is not checked again.
        """
        tracer = tracer or self.tracer
        started = time.perf_counter()
        helo_reused = spf_helo is not None
        if not helo_reused:
            spf_helo = yield self.spf.check_helo(ip, helo or "")
        spf_from = yield self.spf.check_mail_from(ip, mail_from, helo or "")
        for r, reused in ((spf_helo, helo_reused), (spf_from, False)):
            tracer.event("spf.result", identity=r.identity, sender=r.sender, ip=r.ip, result=r.result,
                         reason=r.reason, mechanism=r.mechanism,
                         lookups=0 if reused else r.lookups, ms=0.0 if reused else r.ms,
                         reused=reused or None)
        signatures = yield dkim.verify(content, self.resolver,
                                       run_blocking=crypto_runner(content, self._blocking))
        for s in signatures:
            tracer.event("dkim.result", d=s.domain, s=s.selector, a=s.algorithm, result=s.result,
                         reason=s.reason, dns_ms=s.dns_ms, crypto_ms=s.crypto_ms,
                         ms=round(s.dns_ms + s.crypto_ms, 3))
        if not signatures:
            tracer.event("dkim.result", result="none", reason="no signature", ms=0.0)
        # RFC 7489 3.1.2: the SPF identity DMARC uses is MAIL FROM, or HELO for <>
        spf_for_dmarc = spf_from if mail_from else spf_helo
        from_fields = [v for n, v in header_fields(content) if n.lower() == "from"]
        result = yield dmarc.check(self.resolver, from_fields, (spf_for_dmarc.result, spf_for_dmarc.domain),
                                   [(s.result, s.domain) for s in signatures], rng=self.rng)
        tracer.event("dmarc.result", from_domain=result.from_domain, result=result.result,
                     policy=result.policy, disposition=result.disposition, reason=result.reason,
                     record=result.record.text if result.record else None, ms=result.ms)
        verdict = Verdict(self.authserv_id, spf_helo, spf_from, signatures, result)
        tracer.event("senderauth.verdict", spf=spf_from.result, spf_helo=spf_helo.result,
                     dkim=[s.result for s in signatures] or ["none"], dmarc=result.result,
                     disposition=verdict.disposition, ms=round((time.perf_counter() - started) * 1000, 3))
        return verdict


class InboundChecks:
    """The MTA's SMTP handler with sender authentication in front of DATA.

    Every other hook (CONNECT, EHLO, MAIL, RCPT) is the MTA's own, unchanged.
    ``internal`` are the addresses of our domain's other mail exchangers (a
    backup MX): they checked the message at the border already, so what they
    pass on is trusted as it is, their Authentication-Results included.

    With ``check=False`` (``check_sender_auth = false`` in the domain's
    config) nothing is checked and no Authentication-Results is added, but
    forged ones claiming our authserv-id, and forged Junk marks, are still
    removed: whoever reads them downstream trusts them as ours (RFC 8601 5).
    """

    def __init__(self, handler, auth: SenderAuth, domain, tracer=NULL_TRACER, internal=frozenset(),
                 check: bool = True):
        self.handler, self.auth, self.domain, self.tracer = handler, auth, domain, tracer
        self.own_ids = {auth.authserv_id.lower(), domain.name.lower()}
        self.internal = set(internal)
        self.check = check

    def __getattr__(self, name):
        return getattr(self.handler, name)

    @defer.inlineCallbacks
    def handle_DATA(self, session, envelope):
        if session.peer in self.internal:  # our own backup MX: checked and marked already
            reply = yield self.handler.handle_DATA(session, envelope)
            return reply
        content, removed = authres.strip_ours(envelope.content, self.own_ids, self.domain.name)
        content, forged_folder = quarantine.remove(content)
        tracer = self.tracer.bind(message_id=get_header(content, "Message-ID"), conn=session.conn_id)
        if removed or forged_folder:
            tracer.event("senderauth.stripped", authentication_results=removed, folder_mark=forged_folder)
        if self.check and not self.handler.is_own_msa(session):  # from another domain: who sent it?
            verdict = yield self.auth.check(session.peer, session.helo, envelope.mail_from, content, tracer,
                                            spf_helo=self._session_spf_helo(session))
            self._remember_spf_helo(session, verdict.spf_helo)
            if verdict.disposition == "reject":
                return Reply(550, "5.7.1", f"Message rejected: DMARC policy of {verdict.dmarc.from_domain} "
                                           f"is reject ({verdict.summary()})"
                             if verdict.dmarc.record else f"Message rejected: {verdict.dmarc.reason}")
            content = verdict.header() + content
            if verdict.disposition == "quarantine":
                content = quarantine.mark(content, "Junk")
        reply = yield self.handler.handle_DATA(session, replace(envelope, content=content))
        return reply

    # The HELO identity (RFC 7208 2.3) is the client's, not the message's: the
    # same for every message of a session. So it is checked at a session's
    # first message, and its result serves the messages after it on the same
    # connection, as long as the client keeps its name. A temperror (DNS
    # failed) is not kept: the next message asks again.

    @staticmethod
    def _session_spf_helo(session) -> SPFResult | None:
        known = session.notes.get("spf_helo")
        return known[1] if known is not None and known[0] == session.helo else None

    @staticmethod
    def _remember_spf_helo(session, result: SPFResult) -> None:
        if result.result != "temperror":
            session.notes["spf_helo"] = (session.helo, result)


def inbound(handler, ctx) -> InboundChecks:
    """Put the inbound checks in front of an MTA's handler (what :mod:`agents.mta` calls).

    The authserv-id is the MTA's host name (``mx.D``, or ``mx2.D`` for a backup MX).
    """
    from .exchangers import backup_address, mta_hostname

    auth = SenderAuth(ctx.resolver(), mta_hostname(ctx), tracer=ctx.tracer)
    internal = {a for a in (backup_address(ctx.domain),) if a and a != ctx.spec.address}
    return InboundChecks(handler, auth, ctx.domain, tracer=ctx.tracer, internal=internal,
                         check=ctx.domain.switch("check_sender_auth"))


# -- outbound signing ---------------------------------------------------------------

class SigningRouter(Router):
    """The MTA's router, DKIM-signing what it relays to other domains (RFC 6376 5)."""

    def __init__(self, ctx, run_blocking=threads.deferToThread):
        super().__init__(ctx)
        signs = ctx.domain.switch("dkim_sign")
        self.key = dkim.load_key(ctx.home.root, ctx.domain) if signs else None
        self._blocking = run_blocking
        if self.key is None:
            ctx.tracer.event("dkim.nokey", domain=ctx.domain.name,
                             reason="no key in the lab home: relayed mail goes out unsigned" if signs
                             else "dkim_sign = false in the lab config: relayed mail goes out unsigned")

    @defer.inlineCallbacks
    def by_mx(self, domain: str, item, recipients, content):
        # Mail for our own domain that goes by MX (a backup MX passing it up to
        # the primary) stays inside our ADMD: signing it would vouch for a
        # stranger's message with our key.
        if self.key is not None and domain.lower() != self.ctx.domain.name:
            started = time.perf_counter()
            tracer = self.ctx.tracer.bind(queue_id=item.queue_id, message_id=item.message_id)
            try:
                content = yield crypto_runner(content, self._blocking)(dkim.sign, content, self.key)
            except Exception as e:  # a broken key must not stop the mail: it goes out unsigned
                tracer.event("dkim.error", d=self.key.domain, error=f"{type(e).__name__}: {e}")
            else:
                tracer.event("dkim.sign", d=self.key.domain, s=self.key.selector,
                             a=dkim.ALGORITHMS[self.key.algorithm].decode(),
                             ms=round((time.perf_counter() - started) * 1000, 3))
        outcomes = yield super().by_mx(domain, item, recipients, content)
        return outcomes
