"""How agents ask the lab DNS: MX, then A (RFC 5321 5.1), and TXT.

The resolver talks to the lab DNS server and to nothing else. Twisted's
``createResolver`` would mix in ``/etc/hosts`` and the system's name servers
(see the project notes), so we build a bare ``client.Resolver`` with one
server. Answers are cached for their TTL, as a real caching resolver does,
and every query and answer is a trace event with its duration, tagged with
the queue id or connection it was asked for (:func:`agents.trace.working_for`).
"""

from __future__ import annotations

import time

from twisted.internet import defer
from twisted.names import client, dns, error

from .trace import NULL_TRACER, work_fields


class LookupFailed(Exception):
    """A DNS lookup failed; ``temporary`` tells a queue whether to retry."""

    def __init__(self, name: str, qtype: str, reason: str, temporary: bool):
        super().__init__(f"{qtype} {name}: {reason}")
        self.name, self.qtype, self.reason, self.temporary = name, qtype, reason, temporary


class LabResolver:
    def __init__(self, server: tuple[str, int], reactor=None, tracer=NULL_TRACER, timeout=(1, 3)):
        kwargs = {"servers": [server], "timeout": timeout}
        if reactor is not None:
            kwargs["reactor"] = reactor
        self._resolver = client.Resolver(**kwargs)
        self._clock = reactor
        self._cache: dict[tuple[str, str], tuple[float, list]] = {}
        self.tracer = tracer

    def _now(self) -> float:
        return self._clock.seconds() if self._clock is not None else time.monotonic()

    def _lookup(self, qtype: str, name: str, method, extract) -> defer.Deferred:
        key = (qtype, name.lower())
        cached = self._cache.get(key)
        if cached and cached[0] > self._now():  # most lookups: answered at once, no query
            self.tracer.event("dns.answer", qtype=qtype, qname=name, answer=cached[1], cached=True, ms=0.0,
                              **work_fields())
            return defer.succeed(cached[1])
        return self._ask(key, qtype, name, method, extract)

    @defer.inlineCallbacks
    def _ask(self, key, qtype: str, name: str, method, extract):
        tags = work_fields()  # read now: this generator keeps the caller's context
        started = time.perf_counter()
        self.tracer.event("dns.query", qtype=qtype, qname=name, **tags)
        try:
            answers, _authority, _additional = yield method(name)
        except error.DomainError:
            result, ttl = [], 60  # NXDOMAIN: the name does not exist
        except defer.TimeoutError:
            self.tracer.event("dns.error", qtype=qtype, qname=name, reason="timeout", **tags)
            raise LookupFailed(name, qtype, "timeout", temporary=True)
        except error.DNSNameError:
            result, ttl = [], 60
        except Exception as e:  # SERVFAIL, refused, ...: try again later
            self.tracer.event("dns.error", qtype=qtype, qname=name, reason=type(e).__name__, **tags)
            raise LookupFailed(name, qtype, type(e).__name__, temporary=True)
        else:
            wanted = [a for a in answers if a.type == getattr(dns, qtype)]
            result = extract(wanted)
            ttl = min([a.ttl for a in wanted] or [60])
        ms = (time.perf_counter() - started) * 1000
        self.tracer.event("dns.answer", qtype=qtype, qname=name, answer=result, ms=round(ms, 3), **tags)
        self._cache[key] = (self._now() + ttl, result)
        return result

    def lookup_mx(self, domain: str):
        """MX records of ``domain`` as ``[(preference, host), ...]``, best first."""

        def extract(answers):
            return sorted((a.payload.preference, a.payload.name.name.decode()) for a in answers)

        return self._lookup("MX", domain, self._resolver.lookupMailExchange, extract)

    def lookup_a(self, host: str):
        """IPv4 addresses of ``host``."""
        return self._lookup(
            "A", host, self._resolver.lookupAddress, lambda ans: [a.payload.dottedQuad() for a in ans]
        )

    def lookup_txt(self, name: str):
        """TXT records of ``name``, each joined into one string (RFC 7208 3.3)."""

        def extract(answers):
            return [b"".join(a.payload.data).decode("utf-8", "replace") for a in answers]

        return self._lookup("TXT", name, self._resolver.lookupText, extract)

    @defer.inlineCallbacks
    def mail_exchangers(self, domain: str):
        """Where to deliver mail for ``domain``: ``[(preference, host, [ips])]``.

        RFC 5321 5.1: use the MX records in preference order; with no MX
        record at all, the domain's own A record is the "implicit MX". A null
        MX (RFC 7505: a single MX ``0 .``) means the domain takes no mail.
        """
        mxs = yield self.lookup_mx(domain)
        if not mxs:
            mxs = [(0, domain)]
        if len(mxs) == 1 and mxs[0][1] in ("", "."):
            return []
        out = []
        for pref, host in mxs:
            ips = yield self.lookup_a(host)
            if ips:
                out.append((pref, host, ips))
        return out
