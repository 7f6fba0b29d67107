# -*- test-case-name: tests.test_security -*-
"""The MSA's and the MTA's abuse rules, as SMTP replies.

:mod:`agents.security` has the mechanisms (rate limiter, routing tricks);
this module turns them into the answers the agents give from their handler
hooks, and records each refusal as a ``security.*`` trace event:

* :class:`SubmissionGuard` (MSA): per-user and per-client message rate limits
  (``450 4.7.1``) and sender ownership (``550 5.7.1``, RFC 6409 8.1);
* :class:`RelayGuard` (MTA): no open relay. A stranger may send only to
  this domain's own users, with plain addresses (``550``/``554 5.7.1``).
"""

from __future__ import annotations

from email.utils import getaddresses

from agents.security import RateLimiter, SecuritySettings, event, routing_trick
from agents.smtpserver import Reply
from agents.trace import NULL_TRACER, Tracer


class SubmissionGuard:
    """What an authenticated user may submit, and how often.

    ``check_mail`` runs at MAIL FROM, ``check_from`` on the ``From:`` header
    after DATA. With ``enforce_sender = false`` the spoofs are accepted (for
    the spoofing lesson) but still recorded as ``security.sender_spoof``.
    """

    def __init__(self, settings: SecuritySettings, clock=None, tracer: Tracer = NULL_TRACER):
        self.settings, self.tracer = settings, tracer
        self.per_user = RateLimiter(settings.max_messages_per_user, settings.rate_window, clock)
        self.per_client = RateLimiter(settings.max_messages_per_client, settings.rate_window, clock)

    @classmethod
    def for_agent(cls, ctx) -> "SubmissionGuard":
        return cls(SecuritySettings.from_config(ctx.config), ctx.reactor, ctx.tracer)

    def check_mail(self, session, address: str) -> Reply | None:
        """MAIL FROM: rate limits first (a flood gets no further), then ownership."""
        user = (session.user or "").lower()
        # RFC 2505 2.8 (rate control). Postfix counts MAIL commands the same
        # way (smtpd_client_message_rate_limit) and also answers 450 4.7.1.
        scopes = (("user", self.per_user, user), ("client", self.per_client, session.peer))
        for scope, limiter, key in scopes:
            if limiter.full(key):
                wait = limiter.retry_after(key)
                self._event("security.rate_limited", session, scope=scope, limit=limiter.limit,
                            window=limiter.window, retry_after=round(wait, 1))  # fmt: skip
                return Reply(450, "4.7.1", f"Too many messages from this {scope} "
                                           f"(limit {limiter.limit} per {limiter.window:g} s), "
                                           f"try again in {wait:.0f} s")  # fmt: skip
        for _scope, limiter, key in scopes:
            limiter.record(key)
        if address.lower() != user:
            # RFC 6409 8.1: the MSA may check that the sender is the
            # authenticated user. An empty sender (<>) is for bounces only.
            return self._spoof(session, "envelope", address,
                               Reply(550, "5.7.1", f"Sender address <{address}> not owned by user {session.user}"))  # fmt: skip
        return None

    def check_from(self, session, from_header: str) -> Reply | None:
        """The ``From:`` field must name exactly the authenticated user (RFC 6409 8.1)."""
        owners = {addr.lower() for _name, addr in getaddresses([from_header])}
        if owners != {(session.user or "").lower()}:
            return self._spoof(session, "header", from_header,
                               Reply(550, "5.7.1", f"From: header must be your own address <{session.user}>"))  # fmt: skip
        return None

    def _spoof(self, session, where: str, claimed: str, refusal: Reply) -> Reply | None:
        enforced = self.settings.enforce_sender
        self._event("security.sender_spoof", session, where=where, claimed=claimed, enforced=enforced)
        return refusal if enforced else None

    def _event(self, name: str, session, **fields) -> None:
        event(self.tracer, name, conn=session.conn_id, peer=session.peer, user=session.user,
              protocol="smtp", **fields)  # fmt: skip


class RelayGuard:
    """No open relay (RFC 5321 7.1, RFC 2505 2.1): strangers reach local users only.

    The MTA asks :meth:`check` for every recipient from a client that is not
    its own MSA, before anything else, and :meth:`deny` when the domain is
    not its own. Both record ``security.relay_denied``.
    """

    def __init__(self, tracer: Tracer = NULL_TRACER):
        self.tracer = tracer

    def check(self, session, address: str) -> Reply | None:
        """550 5.7.1 for an address that hides a route (``user%elsewhere@here``...)."""
        trick = routing_trick(address)
        if trick is None:
            return None
        self._event(session, address, trick)
        return Reply(550, "5.7.1", f"<{address}>: Sender-specified routing is not accepted ({trick})")

    def deny(self, session, address: str) -> Reply:
        """554 5.7.1 for a domain that is not ours, from a client that is not our MSA."""
        self._event(session, address, "foreign domain")
        return Reply(554, "5.7.1", f"<{address}>: Relay access denied")

    def _event(self, session, address: str, reason: str) -> None:
        event(self.tracer, "security.relay_denied", conn=session.conn_id, peer=session.peer,
              protocol="smtp", rcpt=address, reason=reason, helo=session.helo)  # fmt: skip


__all__ = ["RelayGuard", "SubmissionGuard"]
