"""Mail exchangers of a lab domain: the primary MX, a backup MX, or none at all.

RFC 5321 5.1 lets a domain name several mail exchangers with preferences; a
sender tries the lowest preference first and moves on to the next when one
is unreachable. The lab config can give a domain

* a **backup MX**, ``backup_mx = "127.0.2.2"`` in its ``[[domain]]`` table.
  The zone then says ``MX 20 mx2.D`` next to ``MX 10 mx.D``, and the lab runs
  a second MTA process, ``mta2.D``, at that address. It accepts mail for D's
  users while the primary is down, queues it, and relays it to the primary
  when it is back: it never delivers to the mailboxes itself (it is "another
  site"), which is what backup MX hosts on the internet do;
* a **null MX**, ``null_mx = true`` (RFC 7505): the single record
  ``MX 0 .`` says "this domain accepts no mail", so a sender bounces at once
  (``556 5.1.10``) instead of retrying an A record for days. Such a domain
  runs no agents.

The RFC 5321 5.1 rule that makes a backup MX work: an MTA that finds itself
in the MX list drops itself and every MX that is not better, so a backup
relays *up* to the primary and never to itself or sideways.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.names import dns

#: Preference of the backup MX record (the primary ``mx.D`` has 10).
BACKUP_PREFERENCE = 20


def backup_address(domain) -> str | None:
    """The backup MX address of a :class:`~agents.config.Domain`, if it has one."""
    return domain.options.get("backup_mx") or None


def backup_host(domain) -> str:
    return f"mx2.{domain.name}"


def has_null_mx(domain) -> bool:
    return bool(domain.options.get("null_mx"))


def extra_hosts(domain) -> list[str]:
    """Host names beyond ``mx``/``smtp``/``imap``/``lmtp`` that the domain's certificate must name."""
    return [backup_host(domain)] if backup_address(domain) else []


def add_zone_records(domain, records: dict, ttl: int) -> None:
    """Adjust a domain's zone (``{owner name: [records]}``) for a backup or null MX."""
    name = domain.name.encode()
    if has_null_mx(domain):
        # RFC 7505 3: the null MX is the only MX. RFC 7505 4.2 (and RFC 7208)
        # suggest saying the domain sends no mail either: "v=spf1 -all".
        # The host names of the mail agents are gone: there are none.
        kept = [r for r in records[name] if not isinstance(r, (dns.Record_MX, dns.Record_TXT))]
        records[name] = kept + [dns.Record_MX(0, b"", ttl=ttl), dns.Record_TXT(b"v=spf1 -all", ttl=ttl),
                                dns.Record_A(domain.address, ttl=ttl)]
        for host in ("mx", "smtp", "lmtp", "imap"):
            records.pop(f"{host}.{domain.name}".encode(), None)
        return
    address = backup_address(domain)
    if address:
        host = backup_host(domain).encode()
        records[name].append(dns.Record_MX(BACKUP_PREFERENCE, host, ttl=ttl))
        records[host] = [dns.Record_A(address, ttl=ttl)]


def is_null_mx(mxs: list[tuple[int, str]]) -> bool:
    """RFC 7505 3: exactly one MX record, and its host is the root ``.``."""
    return len(mxs) == 1 and mxs[0][1] in ("", ".")


def usable_exchangers(exchangers: list[tuple[int, str, list[str]]], own_address: str):
    """RFC 5321 5.1: if we are in the MX list, keep only the MX hosts *better* than us.

    ``exchangers`` are ``(preference, host, [addresses])`` best first, as
    :meth:`~agents.resolver.LabResolver.mail_exchangers` gives them. An
    empty result means we are the best MX ourselves: delivering further
    would be a loop.
    """
    mine = [pref for pref, _host, ips in exchangers if own_address in ips]
    if not mine:
        return exchangers
    return [e for e in exchangers if e[0] < min(mine)]


# -- the backup MTA ----------------------------------------------------------


def is_backup_mx(ctx) -> bool:
    """Is this MTA agent the backup MX of its domain (``mta2.D``)?"""
    return ctx.spec.role == "mta" and ctx.spec.address != ctx.domain.address


def mta_hostname(ctx) -> str:
    """The name this MTA gives in its greeting, EHLO and ``Received:`` lines."""
    return backup_host(ctx.domain) if is_backup_mx(ctx) else ctx.domain.host("mta")


class BackupTransport:
    """How a backup MX delivers a queued message: by MX, to a better exchanger.

    Even for its own domain it relays over SMTP to the primary MX instead of
    talking LMTP to the mailbox server; the primary's own spool, filters and
    mailboxes stay the one way in. While the primary is down, the attempt
    fails with a 4xx and the queue retries with backoff.
    """

    def __init__(self, ctx, router):
        self.ctx, self.router = ctx, router

    @defer.inlineCallbacks
    def __call__(self, item, content):
        from .queue import outcomes_for_failure  # here: the DNS agent imports this module too

        by_domain: dict[str, list[str]] = {}
        for rcpt in item.pending:
            by_domain.setdefault(rcpt.rpartition("@")[2].lower(), []).append(rcpt)
        attempts = [
            self.router.by_mx(domain, item, rcpts, content).addErrback(
                lambda f, rcpts=rcpts: outcomes_for_failure(rcpts, f.value))
            for domain, rcpts in by_domain.items()
        ]
        results = yield defer.gatherResults(attempts)
        return [o for group in results for o in group]
