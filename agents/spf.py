"""SPF, the Sender Policy Framework (RFC 7208): may this IP address send for this domain?

A domain lists, in a DNS TXT record, the hosts allowed to send its mail::

    sender.test.  TXT  "v=spf1 ip4:127.0.1.1 -all"

A receiving MTA takes the client's IP address and a domain the client named
(the ``MAIL FROM`` domain, RFC 7208 2.4, and the ``HELO`` name, 2.3) and runs
``check_host()`` (section 4): fetch the record, then try its *mechanisms* left
to right; the first that matches the IP gives the result through its
*qualifier* (``+`` pass, ``-`` fail, ``~`` softfail, ``?`` neutral). Nothing
matches: ``redirect=`` if there is one, else ``neutral``.

SPF knows only the envelope: it says nothing about the ``From:`` a reader
sees. DMARC (:mod:`agents.dmarc`) ties the two together.

Every DNS question goes through the lab's :class:`~agents.resolver.LabResolver`
(or any object with the same ``lookup_txt``/``lookup_a``/``lookup_mx``), and
an evaluation is bounded the way section 4.6.4 asks: at most 10 mechanisms
that cost a DNS lookup, at most 2 lookups that find nothing ("void"), so a
hostile record cannot make us query the world.
"""

from __future__ import annotations

import ipaddress
import re
import time
from dataclasses import dataclass

from twisted.internet import defer

from .resolver import LookupFailed

#: RFC 7208 2.6: the results check_host() can give.
RESULTS = ("pass", "fail", "softfail", "neutral", "none", "permerror", "temperror")

#: RFC 7208 4.6.2: a mechanism's qualifier says what a match means.
QUALIFIERS = {"+": "pass", "-": "fail", "~": "softfail", "?": "neutral"}

#: RFC 7208 5: the mechanisms (any other term of a record is a modifier, 6).
MECHANISMS = {"all", "include", "a", "mx", "ptr", "ip4", "ip6", "exists"}

#: RFC 7208 4.6.4: mechanisms and modifiers that cost a DNS lookup, and the limits.
DNS_MECHANISMS = {"include", "a", "mx", "ptr", "exists", "redirect"}
MAX_DNS_MECHANISMS = 10
MAX_VOID_LOOKUPS = 2
MAX_MX_HOSTS = 10

_MECHANISM = re.compile(r"^([+\-~?]?)(all|include|a|mx|ptr|ip4|ip6|exists)(?=$|[:/])(.*)$", re.I)
_MODIFIER = re.compile(r"^([a-z][a-z0-9_.\-]*)=(.*)$", re.I)
_LABEL = re.compile(r"^[a-z0-9_]([a-z0-9_\-]{0,61}[a-z0-9_])?$", re.I)


@dataclass
class SPFResult:
    """The outcome of one check: what was checked, the result, and why."""

    identity: str  # "mailfrom" or "helo" (RFC 8601 2.7.2: smtp.mailfrom / smtp.helo)
    sender: str  # the address checked, e.g. alice@sender.test or postmaster@mx.sender.test
    domain: str  # the domain whose record was used
    ip: str
    result: str
    reason: str
    mechanism: str | None = None  # the term that matched, e.g. "-all"
    lookups: int = 0
    ms: float = 0.0


class _Abort(Exception):
    """Stop the evaluation with a permerror or temperror (RFC 7208 2.6.6, 2.6.7)."""

    def __init__(self, result: str, reason: str):
        super().__init__(reason)
        self.result, self.reason = result, reason


class _Budget:
    """The DNS work one check_host() may do, shared by its includes and redirects."""

    def __init__(self):
        self.lookups = 0
        self.voids = 0

    def spend(self, term: str) -> None:
        self.lookups += 1
        if self.lookups > MAX_DNS_MECHANISMS:
            raise _Abort("permerror", f"more than {MAX_DNS_MECHANISMS} DNS lookups ({term})")

    def void(self, name: str) -> None:
        self.voids += 1
        if self.voids > MAX_VOID_LOOKUPS:
            raise _Abort("permerror", f"more than {MAX_VOID_LOOKUPS} void lookups ({name})")


def valid_domain(domain: str) -> bool:
    """RFC 7208 4.3: a multi-label name whose labels are 1..63 characters."""
    labels = domain.rstrip(".").split(".")
    return len(labels) >= 2 and len(domain) <= 253 and all(_LABEL.match(label) for label in labels)


# -- macros (RFC 7208 7) -----------------------------------------------------

_MACRO = re.compile(r"%(?:\{([slodiphcrtv])(\d*)(r?)([.\-+,/_=]*)\}|(.))", re.I)


def expand(spec: str, *, sender: str, domain: str, ip: str, helo: str) -> str:
    """Expand the macros of a domain-spec, e.g. ``%{i}.%{d}`` in ``exists:``.

    Only what a domain-spec needs: the letters, a digit (keep the rightmost N
    parts), ``r`` (reverse) and delimiters. ``%{p}`` (the validated PTR name)
    would need reverse DNS, which the lab does not serve: it is ``unknown``,
    as section 7.3 allows.
    """
    local, _, sender_domain = sender.rpartition("@")
    address = ipaddress.ip_address(ip)
    if address.version == 4:
        dotted = ip
    else:  # 7.3: IPv6 addresses are written as dot-separated nibbles
        dotted = ".".join(address.exploded.replace(":", ""))
    values = {
        "s": sender, "l": local or "postmaster", "o": sender_domain, "d": domain, "i": dotted,
        "p": "unknown", "h": helo, "c": ip, "r": "unknown", "t": str(int(time.time())),
        "v": "in-addr" if address.version == 4 else "ip6",
    }

    def one(m: re.Match) -> str:
        if m.group(5) is not None:  # %%, %_ and %- (7.1)
            literal = {"%": "%", "_": " ", "-": "%20"}.get(m.group(5))
            if literal is None:
                raise _Abort("permerror", f"bad macro %{m.group(5)} in {spec!r}")
            return literal
        letter, digits, reverse, delimiters = m.groups()[:4]
        parts = re.split("[" + re.escape(delimiters or ".") + "]", values[letter.lower()])
        if reverse:
            parts.reverse()
        if digits:
            if int(digits) == 0:
                raise _Abort("permerror", f"macro keeps zero parts in {spec!r}")
            parts = parts[-int(digits):]
        return ".".join(parts)

    out = _MACRO.sub(one, spec)
    while len(out) > 253:  # 7.3: drop labels from the left until it fits
        out = out.partition(".")[2]
    return out


# -- the record ----------------------------------------------------------------

@dataclass
class _Term:
    kind: str  # a mechanism name, or "redirect"/"exp"/other modifier names
    qualifier: str = "+"
    target: str | None = None  # domain-spec (include, a, mx, ptr, exists, redirect)
    cidr4: int = 32
    cidr6: int = 128
    network: object = None  # ip4/ip6: an ipaddress network
    text: str = ""


def parse_record(record: str) -> list[_Term]:
    """Split an SPF record into terms; any syntax error is a permerror (4.6)."""
    terms = []
    for word in record.split()[1:]:  # skip "v=spf1"
        m = _MECHANISM.match(word)
        if m:
            qualifier, kind, rest = m.group(1) or "+", m.group(2).lower(), m.group(3)
            terms.append(_parse_mechanism(word, qualifier, kind, rest))
            continue
        m = _MODIFIER.match(word)
        if m:
            terms.append(_Term(kind=m.group(1).lower(), target=m.group(2), text=word))
            continue
        raise _Abort("permerror", f"unknown term {word!r}")
    for name in ("redirect", "exp"):
        if sum(1 for t in terms if t.kind == name) > 1:
            raise _Abort("permerror", f"{name}= appears twice")  # 6: at most once each
    return terms


def _parse_mechanism(word: str, qualifier: str, kind: str, rest: str) -> _Term:
    term = _Term(kind=kind, qualifier=qualifier, text=word)
    if kind == "all":
        if rest:
            raise _Abort("permerror", f"bad mechanism {word!r}")
    elif kind in ("ip4", "ip6"):
        if not rest.startswith(":"):
            raise _Abort("permerror", f"{kind} needs an address: {word!r}")
        try:
            network = ipaddress.ip_network(rest[1:], strict=False)
        except ValueError:
            raise _Abort("permerror", f"bad network in {word!r}") from None
        if network.version != (4 if kind == "ip4" else 6):
            raise _Abort("permerror", f"wrong address family in {word!r}")
        term.network = network
    else:  # include, a, mx, ptr, exists: [":" domain-spec] then, for a and mx, a dual-cidr
        spec, cidr = rest, ""
        if kind in ("a", "mx"):
            m = re.match(r"^(.*?)((?:/\d+)?(?://\d+)?)$", rest)
            spec, cidr = m.group(1), m.group(2)
        if spec and not spec.startswith(":"):
            raise _Abort("permerror", f"bad mechanism {word!r}")
        term.target = spec[1:] or None
        if kind in ("include", "exists") and not term.target:
            raise _Abort("permerror", f"{kind} needs a domain: {word!r}")
        if cidr:
            m = re.match(r"^(?:/(\d+))?(?://(\d+))?$", cidr)
            if m.group(1):
                term.cidr4 = int(m.group(1))
            if m.group(2):
                term.cidr6 = int(m.group(2))
            if term.cidr4 > 32 or term.cidr6 > 128:
                raise _Abort("permerror", f"bad prefix length in {word!r}")
    return term


def select_record(txts: list[str]) -> str | None:
    """RFC 7208 4.5: exactly one TXT record that is ``v=spf1`` followed by a space or nothing."""
    records = [t for t in txts if t.lower() == "v=spf1" or t.lower().startswith("v=spf1 ")]
    if len(records) > 1:
        raise _Abort("permerror", f"{len(records)} SPF records")
    return records[0] if records else None


# -- check_host() ----------------------------------------------------------------

class SPFChecker:
    """``check_host()`` over a resolver; one instance serves any number of checks."""

    def __init__(self, resolver):
        self.resolver = resolver

    @defer.inlineCallbacks
    def check_mail_from(self, ip: str, mail_from: str, helo: str):
        """The MAIL FROM identity (RFC 7208 2.4); the null sender ``<>`` uses postmaster@HELO."""
        sender = mail_from if mail_from else f"postmaster@{helo}"
        result = yield self._check("mailfrom", ip, sender, helo)
        return result

    @defer.inlineCallbacks
    def check_helo(self, ip: str, helo: str):
        """The HELO identity (RFC 7208 2.3): the client's own name, ``postmaster@`` it."""
        result = yield self._check("helo", ip, f"postmaster@{helo}", helo)
        return result

    @defer.inlineCallbacks
    def _check(self, identity: str, ip: str, sender: str, helo: str):
        started = time.perf_counter()
        domain = sender.rpartition("@")[2].lower().rstrip(".")
        budget = _Budget()
        if not valid_domain(domain):  # 4.3, and a HELO of [127.0.0.1] or "localhost"
            result, reason, matched = "none", f"{domain!r} is not a domain name", None
        else:
            try:
                result, reason, matched = yield self.check_host(ip, domain, sender, helo, budget)
            except _Abort as e:
                result, reason, matched = e.result, e.reason, None
        ms = round((time.perf_counter() - started) * 1000, 3)
        return SPFResult(identity, sender, domain, ip, result, reason, matched, budget.lookups, ms)

    @defer.inlineCallbacks
    def check_host(self, ip: str, domain: str, sender: str, helo: str, budget: _Budget):
        """RFC 7208 4: ``(result, reason, matching term)`` for ``ip`` sending as ``domain``."""
        try:
            txts = yield self.resolver.lookup_txt(domain)
        except LookupFailed as e:
            raise _Abort("temperror", f"DNS lookup of {domain} failed: {e.reason}") from None
        record = select_record(txts)
        if record is None:
            return "none", f"{domain} publishes no SPF record", None
        terms = parse_record(record)
        client = ipaddress.ip_address(ip)
        for term in terms:
            if term.kind not in MECHANISMS:
                continue  # redirect= comes last; exp= and unknown modifiers are ignored (6)
            if term.kind in DNS_MECHANISMS:
                budget.spend(term.text)
            matched = yield self._matches(term, client, ip, domain, sender, helo, budget)
            if matched:
                result = QUALIFIERS[term.qualifier]
                verb = "allowed" if result == "pass" else "not allowed"
                return result, f"{ip} is {verb} by {domain}: {term.text}", term.text
        redirect = next((t for t in terms if t.kind == "redirect"), None)
        if redirect is not None:  # 6.1: only when no mechanism matched (and so no "all")
            budget.spend(redirect.text)
            target = expand(redirect.target, sender=sender, domain=domain, ip=ip, helo=helo)
            result, reason, matched = yield self.check_host(ip, target, sender, helo, budget)
            if result == "none":
                raise _Abort("permerror", f"redirect to {target}, which has no SPF record")
            return result, reason, matched
        return "neutral", f"no mechanism of {domain} matches {ip}", None

    @defer.inlineCallbacks
    def _matches(self, term, client, ip, domain, sender, helo, budget):
        """Does one mechanism match the client address? (RFC 7208 5)"""
        kind = term.kind
        if kind == "all":
            return True
        if kind in ("ip4", "ip6"):
            return client.version == term.network.version and client in term.network
        target = expand(term.target, sender=sender, domain=domain, ip=ip, helo=helo) if term.target else domain
        if kind == "include":  # 5.2: only a pass of the included record is a match
            result, reason, _ = yield self.check_host(ip, target, sender, helo, budget)
            if result == "temperror":
                raise _Abort("temperror", reason)
            if result in ("permerror", "none"):
                raise _Abort("permerror", f"include:{target}: {reason}")
            return result == "pass"
        if kind == "ptr":
            # 5.5: "do not use"; it needs reverse DNS, which the lab does not serve.
            return False
        if kind == "exists":  # 5.7: any A record at all is a match
            addresses = yield self._addresses(target, budget)
            return bool(addresses)
        if kind == "a":
            addresses = yield self._addresses(target, budget)
            return _in_any(client, addresses, term)
        if kind == "mx":
            try:
                exchangers = yield self.resolver.lookup_mx(target)
            except LookupFailed as e:
                raise _Abort("temperror", f"MX lookup of {target} failed: {e.reason}") from None
            if not exchangers:
                budget.void(target)
            if len(exchangers) > MAX_MX_HOSTS:  # 4.6.4
                raise _Abort("permerror", f"{target} has more than {MAX_MX_HOSTS} MX records")
            for _pref, host in exchangers:
                addresses = yield self._addresses(host, budget)
                if _in_any(client, addresses, term):
                    return True
            return False
        raise _Abort("permerror", f"unknown mechanism {term.text!r}")

    @defer.inlineCallbacks
    def _addresses(self, name: str, budget: _Budget):
        """A records of ``name``; an empty answer counts as a void lookup (4.6.4).

        The lab's resolver asks only for A records: lab clients are IPv4, and
        section 5.3 matches an IPv4 client against A records only.
        """
        try:
            addresses = yield self.resolver.lookup_a(name)
        except LookupFailed as e:
            raise _Abort("temperror", f"A lookup of {name} failed: {e.reason}") from None
        if not addresses:
            budget.void(name)
        return addresses



def _in_any(client, addresses: list[str], term: _Term) -> bool:
    """Is ``client`` in the network of any address, with the term's prefix length?"""
    for address in addresses:
        ip = ipaddress.ip_address(address)
        if ip.version != client.version:
            continue
        prefix = term.cidr4 if ip.version == 4 else term.cidr6
        if client in ipaddress.ip_network(f"{address}/{prefix}", strict=False):
            return True
    return False
