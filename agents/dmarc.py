"""DMARC (RFC 7489): does the ``From:`` a reader sees belong to who sent the mail?

SPF vouches for the envelope (``MAIL FROM``) domain, DKIM for the ``d=``
domain of a signature. Neither looks at the ``From:`` header, which is all a
reader sees; so an attacker can pass SPF and DKIM *for his own domain* while
writing ``From: alice@sender.test``. DMARC closes that gap (section 3.1):

    a message passes DMARC if SPF or DKIM passes for a domain that is
    *aligned* with the ``From:`` domain.

*Aligned* means the same domain (``adkim=s``/``aspf=s``, strict) or the same
*organizational domain* (relaxed, the default): ``mx.sender.test`` and
``sender.test`` are aligned in relaxed mode, ``sender.test`` and
``attacker.test`` never are.

The ``From:`` domain's owner publishes what to do with mail that fails, at
``_dmarc.<domain>`` (6.1): ``p=none`` (just tell me), ``p=quarantine`` (treat
as suspicious: our MDA files it in Junk), ``p=reject`` (refuse it at SMTP
time). ``sp=`` is the policy for subdomains, ``pct=`` the share of failing
mail the policy applies to (6.6.4).

What DMARC does not do: judge content. A look-alike domain that its owner
set up properly (``sender-test.example``) passes DMARC perfectly.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

from email.utils import getaddresses

from twisted.internet import defer

from .resolver import LookupFailed

POLICIES = ("none", "quarantine", "reject")
#: RFC 8601 2.7.1 / RFC 7489 11.2: the results reported as dmarc=...
RESULTS = ("pass", "fail", "none", "temperror", "permerror")


@dataclass(frozen=True)
class DMARCRecord:
    """A parsed ``v=DMARC1`` record (RFC 7489 6.3)."""

    p: str
    sp: str
    adkim: str = "r"
    aspf: str = "r"
    pct: int = 100
    domain: str = ""  # where it was found: the From: domain or its organizational domain
    text: str = ""


@dataclass
class DMARCResult:
    result: str  # pass, fail, none, temperror, permerror
    from_domain: str
    reason: str
    policy: str = "none"  # the policy that applies (p= or sp=)
    disposition: str = "none"  # what we do: none (deliver), quarantine, reject (RFC 7489 7.2 "dis")
    record: DMARCRecord | None = None
    spf_aligned: bool = False
    dkim_aligned: bool = False
    ms: float = 0.0
    lookups: list[str] = field(default_factory=list)


def parse_record(text: str) -> DMARCRecord | None:
    """A DMARC record, or ``None`` if ``text`` is not one (6.3, 6.6.3).

    ``v=DMARC1`` must come first and ``p=`` is required; unknown tags are
    ignored. A bad ``sp=``, ``adkim=``, ``aspf=`` or ``pct=`` falls back to
    its default (6.3 asks receivers to be lenient with what follows).
    """
    tags = {}
    for part in text.split(";"):
        name, eq, value = part.partition("=")
        if eq:
            tags.setdefault(name.strip().lower(), value.strip())
    parts = [p.strip() for p in text.split(";") if p.strip()]
    if not parts or parts[0].replace(" ", "") != "v=DMARC1":
        return None
    p = tags.get("p", "").lower()
    if p not in POLICIES:
        return None
    sp = tags.get("sp", "").lower()
    try:
        pct = min(100, max(0, int(tags.get("pct", "100"))))
    except ValueError:
        pct = 100
    return DMARCRecord(
        p=p, sp=sp if sp in POLICIES else p,
        adkim="s" if tags.get("adkim", "r").lower() == "s" else "r",
        aspf="s" if tags.get("aspf", "r").lower() == "s" else "r",
        pct=pct, text=text,
    )


def organizational_domain(domain: str) -> str:
    """The registered domain, kept simple: the last two labels (RFC 7489 3.2).

    Real receivers use the Public Suffix List, so that ``example.co.uk`` and
    not ``co.uk`` is the organizational domain; every lab domain is directly
    under ``.test``, so "the last two labels" is the right answer here.
    """
    labels = domain.lower().rstrip(".").split(".")
    return ".".join(labels[-2:])


def aligned(domain: str, from_domain: str, mode: str) -> bool:
    """RFC 7489 3.1.1 and 3.1.2: strict = identical, relaxed = same organizational domain."""
    domain, from_domain = domain.lower().rstrip("."), from_domain.lower().rstrip(".")
    if mode == "s":
        return domain == from_domain
    return organizational_domain(domain) == organizational_domain(from_domain)


def from_domain(content_from_fields: list[str]) -> str:
    """The one ``From:`` domain, or ``ValueError`` (RFC 7489 6.6.1).

    A message with no From:, with two From: fields, or with two addresses in
    one, is not something DMARC can evaluate; an attacker would love us to
    check the first and show the second, so we refuse it instead.
    """
    if len(content_from_fields) != 1:
        raise ValueError(f"{len(content_from_fields)} From: fields, DMARC needs exactly one")
    addresses = [addr for _name, addr in getaddresses(content_from_fields) if addr]
    if len(addresses) != 1 or "@" not in addresses[0]:
        raise ValueError("From: must hold exactly one address")
    return addresses[0].rpartition("@")[2].lower().rstrip(".")


@defer.inlineCallbacks
def find_record(resolver, domain: str):
    """RFC 7489 6.6.3: ``_dmarc.<From domain>``, else ``_dmarc.<organizational domain>``.

    Fires with ``(record or None, names asked)``; a DNS failure raises
    :class:`~agents.resolver.LookupFailed` (a temperror).
    """
    asked = []
    for candidate in dict.fromkeys([domain, organizational_domain(domain)]):
        name = f"_dmarc.{candidate}"
        asked.append(name)
        txts = yield resolver.lookup_txt(name)
        records = [r for r in (parse_record(t) for t in txts) if r is not None]
        if len(records) == 1:  # several records: as if none (6.6.3 step 3)
            r = records[0]
            return DMARCRecord(r.p, r.sp, r.adkim, r.aspf, r.pct, candidate, r.text), asked
    return None, asked


def evaluate(from_dom: str, record: DMARCRecord | None, spf: tuple[str, str] | None,
             dkim: list[tuple[str, str]], rng=random) -> DMARCResult:
    """The DMARC verdict, from results already computed (no DNS here).

    ``spf`` is ``(result, domain)`` for the SPF-checked identity (MAIL FROM,
    or HELO for the null sender, RFC 7489 3.1.2); ``dkim`` is one
    ``(result, d=)`` per signature. Only a *pass* can align; a DKIM pass for
    another domain counts for nothing here.
    """
    if record is None:
        return DMARCResult("none", from_dom, f"{from_dom} publishes no DMARC policy")
    spf_ok = bool(spf) and spf[0] == "pass" and aligned(spf[1], from_dom, record.aspf)
    dkim_ok = any(result == "pass" and aligned(d, from_dom, record.adkim) for result, d in dkim)
    # sp= applies to a subdomain whose own name has no record (6.3, 6.6.3)
    policy = record.sp if record.domain != from_dom else record.p
    out = DMARCResult("fail", from_dom, "", policy=policy, record=record,
                      spf_aligned=spf_ok, dkim_aligned=dkim_ok)
    if spf_ok or dkim_ok:
        out.result, out.disposition = "pass", "none"
        out.reason = "aligned " + " and ".join(n for n, ok in (("SPF", spf_ok), ("DKIM", dkim_ok)) if ok)
        return out
    out.reason = "neither SPF nor DKIM passed for a domain aligned with " + from_dom
    out.disposition = policy
    if policy != "none" and record.pct < 100 and rng.randrange(100) >= record.pct:
        # 6.6.4: outside the sampled pct=, apply the next milder policy
        out.disposition = "quarantine" if policy == "reject" else "none"
        out.reason += f" (pct={record.pct}: sampled out, {out.disposition})"
    return out


@defer.inlineCallbacks
def check(resolver, from_fields: list[str], spf: tuple[str, str] | None,
          dkim: list[tuple[str, str]], rng=random):
    """Find the policy for the message's ``From:`` and :func:`evaluate` it."""
    started = time.perf_counter()
    try:
        dom = from_domain(from_fields)
    except ValueError as e:
        return DMARCResult("permerror", "", str(e), policy="reject", disposition="reject")
    try:
        record, asked = yield find_record(resolver, dom)
    except LookupFailed as e:
        return DMARCResult("temperror", dom, f"DMARC lookup failed: {e.reason}",
                           ms=round((time.perf_counter() - started) * 1000, 3))
    out = evaluate(dom, record, spf, dkim, rng)
    out.lookups = asked
    out.ms = round((time.perf_counter() - started) * 1000, 3)
    return out


def record_for(domain) -> str:
    """The ``_dmarc`` TXT record a lab domain publishes, from its config table.

    Keys of a ``[[domain]]`` table: ``dmarc_policy`` (``none``, the default,
    ``quarantine`` or ``reject``), ``dmarc_subdomain_policy`` (sp=),
    ``dmarc_pct``, ``dmarc_adkim`` and ``dmarc_aspf`` (``r`` or ``s``).
    """
    from .config import ConfigError

    options = domain.options
    p = str(options.get("dmarc_policy", "none")).lower()
    sp = options.get("dmarc_subdomain_policy")
    if p not in POLICIES or (sp is not None and str(sp).lower() not in POLICIES):
        raise ConfigError(f"{domain.name}: DMARC policies are none, quarantine or reject")
    text = f"v=DMARC1; p={p}"
    if sp is not None:
        text += f"; sp={str(sp).lower()}"
    for key, tag in (("dmarc_adkim", "adkim"), ("dmarc_aspf", "aspf"), ("dmarc_pct", "pct")):
        if key in options:
            text += f"; {tag}={options[key]}"
    return text
