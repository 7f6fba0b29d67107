"""SPF, DKIM, DMARC and Authentication-Results, without sockets or a reactor.

DNS is a :class:`FakeDNS`: a dict of records with the resolver's interface
(``lookup_txt``, ``lookup_a``, ``lookup_mx``), answering at once and keeping
a log of every question, so a test can say exactly what was asked.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass, field

import pytest
from twisted.internet import defer
from twisted.python.failure import Failure

from agents import authres, dkim, dmarc, quarantine, spf
from agents.config import Domain, LabConfig
from agents.headers import get_header
from agents.resolver import LookupFailed
from agents.senderauth import InboundChecks, SenderAuth, dns_records
from agents.smtpserver import Envelope, Reply, Session

GOOD_IP, BAD_IP = "127.0.1.1", "127.0.3.1"


def result_of(d):
    """The result of a Deferred that has already fired (everything here is synchronous)."""
    box = []
    d.addBoth(box.append)
    assert box, "the Deferred did not fire: something waited for a reactor"
    if isinstance(box[0], Failure):
        box[0].raiseException()
    return box[0]


def now(f, *args):
    """A stand-in for deferToThread: run at once."""
    return defer.maybeDeferred(f, *args)


class FakeDNS:
    """A resolver over a dict; ``broken`` names fail as a timeout would."""

    def __init__(self, txt=None, a=None, mx=None, broken=()):
        self.txt = {k.lower(): list(v) for k, v in (txt or {}).items()}
        self.a = {k.lower(): list(v) for k, v in (a or {}).items()}
        self.mx = {k.lower(): list(v) for k, v in (mx or {}).items()}
        self.broken = set(broken)
        self.asked: list[tuple[str, str]] = []

    def _answer(self, qtype, table, name):
        self.asked.append((qtype, name.lower()))
        if name.lower() in self.broken:
            return defer.fail(LookupFailed(name, qtype, "timeout", temporary=True))
        return defer.succeed(list(table.get(name.lower(), [])))

    def lookup_txt(self, name):
        return self._answer("TXT", self.txt, name)

    def lookup_a(self, name):
        return self._answer("A", self.a, name)

    def lookup_mx(self, name):
        return self._answer("MX", self.mx, name)


def check_spf(records, ip=GOOD_IP, sender="alice@sender.test", helo="mx.sender.test", **dns):
    resolver = FakeDNS(txt=records, **dns)
    return result_of(spf.SPFChecker(resolver).check_mail_from(ip, sender, helo))


# -- SPF (RFC 7208) --------------------------------------------------------------

@pytest.mark.parametrize("record, ip, expected", [
    ("v=spf1 ip4:127.0.1.1 -all", GOOD_IP, "pass"),
    ("v=spf1 ip4:127.0.1.1 -all", BAD_IP, "fail"),
    ("v=spf1 ip4:127.0.1.1 ~all", BAD_IP, "softfail"),
    ("v=spf1 ip4:127.0.1.1 ?all", BAD_IP, "neutral"),
    ("v=spf1 ip4:127.0.1.1", BAD_IP, "neutral"),  # 4.7: nothing matches, no all
    ("v=spf1 ip4:127.0.0.0/16 -all", GOOD_IP, "pass"),  # a network, CIDR length
    ("v=spf1 -ip4:127.0.1.1 +all", GOOD_IP, "fail"),  # the first match wins
    ("v=spf1 ip6:2001:db8::/32 -all", GOOD_IP, "fail"),  # IPv6 never matches an IPv4 client
    ("V=SPF1 IP4:127.0.1.1 -ALL", GOOD_IP, "pass"),  # names are case-insensitive (4.6.1)
    ("v=spf1 ip4:127.0.1.1 foo=bar -all", GOOD_IP, "pass"),  # unknown modifiers are ignored
    ("v=spf1 ip4:999.0.0.1 -all", GOOD_IP, "permerror"),
    ("v=spf1 frobnicate -all", GOOD_IP, "permerror"),
    ("v=spf1 redirect=a.test redirect=b.test", GOOD_IP, "permerror"),
])
def test_spf_record_evaluation(record, ip, expected):
    assert check_spf({"sender.test": [record]}, ip=ip).result == expected


def test_spf_none_without_a_record_and_with_other_txt_records():
    assert check_spf({}).result == "none"
    assert check_spf({"sender.test": ["google-site-verification=abc", "v=spf10 +all"]}).result == "none"


def test_spf_two_records_are_a_permerror():
    r = check_spf({"sender.test": ["v=spf1 -all", "v=spf1 +all"]})
    assert r.result == "permerror" and "2 SPF records" in r.reason


def test_spf_dns_failure_is_a_temperror():
    r = result_of(spf.SPFChecker(FakeDNS(broken={"sender.test"})).check_mail_from(GOOD_IP, "a@sender.test", "h.test"))
    assert r.result == "temperror"


def test_spf_a_and_mx_mechanisms_with_cidr():
    dns = {"a": {"sender.test": ["127.0.1.9"], "mx.sender.test": [GOOD_IP], "other.test": ["127.0.9.1"]},
           "mx": {"sender.test": [(10, "mx.sender.test")]}}
    assert check_spf({"sender.test": ["v=spf1 mx -all"]}, **dns).result == "pass"
    assert check_spf({"sender.test": ["v=spf1 a -all"]}, **dns).result == "fail"
    assert check_spf({"sender.test": ["v=spf1 a/24 -all"]}, **dns).result == "pass"
    assert check_spf({"sender.test": ["v=spf1 a:other.test/8 -all"]}, **dns).result == "pass"


def test_spf_include_counts_only_a_pass_as_a_match():
    records = {"sender.test": ["v=spf1 include:relay.test ~all"],
               "relay.test": ["v=spf1 ip4:127.0.1.1 -all"]}
    assert check_spf(records).result == "pass"
    assert check_spf(records, ip=BAD_IP).result == "softfail"  # relay.test's fail is just "no match"
    r = check_spf({"sender.test": ["v=spf1 include:nothing.test -all"]})
    assert r.result == "permerror"  # 5.2: include of a domain without a record


def test_spf_redirect_is_used_only_when_nothing_matched():
    records = {"sender.test": ["v=spf1 ip4:127.0.3.1 redirect=_spf.sender.test"],
               "_spf.sender.test": ["v=spf1 ip4:127.0.1.1 -all"]}
    assert check_spf(records, ip=BAD_IP).result == "pass"
    assert check_spf(records).result == "pass"
    assert check_spf(records, ip="127.0.9.9").result == "fail"
    assert check_spf({"sender.test": ["v=spf1 redirect=void.test"]}).result == "permerror"


def test_spf_exists_with_macros():
    records = {"sender.test": ["v=spf1 exists:%{i}._spf.%{d} -all"]}
    dns = {"a": {"127.0.1.1._spf.sender.test": ["127.0.0.2"]}}
    assert check_spf(records, **dns).result == "pass"
    assert check_spf(records, ip=BAD_IP, **dns).result == "fail"


def test_spf_more_than_ten_lookups_is_a_permerror():
    chain = {f"d{i}.test": [f"v=spf1 include:d{i + 1}.test -all"] for i in range(12)}
    chain["sender.test"] = ["v=spf1 include:d0.test -all"]
    r = check_spf(chain)
    assert r.result == "permerror" and "more than 10 DNS lookups" in r.reason
    many = "v=spf1 " + " ".join(f"a:h{i}.test" for i in range(11)) + " -all"
    hosts = {f"h{i}.test": ["127.9.9.9"] for i in range(11)}
    assert check_spf({"sender.test": [many]}, a=hosts).result == "permerror"
    ten = "v=spf1 " + " ".join(f"a:h{i}.test" for i in range(10)) + " -all"
    assert check_spf({"sender.test": [ten]}, a=hosts).result == "fail"  # ten is still fine


def test_spf_more_than_two_void_lookups_is_a_permerror():
    two = {"sender.test": ["v=spf1 a:v1.test a:v2.test -all"]}
    three = {"sender.test": ["v=spf1 a:v1.test a:v2.test a:v3.test -all"]}
    assert check_spf(two).result == "fail"
    r = check_spf(three)
    assert r.result == "permerror" and "void" in r.reason


def test_spf_helo_identity_and_the_null_sender():
    records = {"mx.sender.test": ["v=spf1 a -all"]}
    dns = FakeDNS(txt=records, a={"mx.sender.test": [GOOD_IP]})
    checker = spf.SPFChecker(dns)
    helo = result_of(checker.check_helo(GOOD_IP, "mx.sender.test"))
    assert (helo.identity, helo.sender, helo.result) == ("helo", "postmaster@mx.sender.test", "pass")
    assert result_of(checker.check_helo(BAD_IP, "mx.sender.test")).result == "fail"
    bounce = result_of(checker.check_mail_from(GOOD_IP, "", "mx.sender.test"))  # 2.4: <> uses the HELO
    assert (bounce.sender, bounce.result) == ("postmaster@mx.sender.test", "pass")
    assert result_of(checker.check_helo(GOOD_IP, "[127.0.1.1]")).result == "none"  # 4.3: not a domain


@pytest.mark.parametrize("spec, expected", [  # RFC 7208 7.4, the RFC's own examples
    ("%{s}", "strong-bad@email.example.com"),
    ("%{o}", "email.example.com"),
    ("%{d}", "email.example.com"),
    ("%{d4}", "email.example.com"),
    ("%{d3}", "email.example.com"),
    ("%{d2}", "example.com"),
    ("%{d1}", "com"),
    ("%{dr}", "com.example.email"),
    ("%{d2r}", "example.email"),
    ("%{l}", "strong-bad"),
    ("%{l-}", "strong.bad"),
    ("%{lr}", "strong-bad"),
    ("%{lr-}", "bad.strong"),
    ("%{l1r-}", "strong"),
    ("%{ir}.%{v}._spf.%{d2}", "3.2.0.192.in-addr._spf.example.com"),
    ("%{lr-}.lp._spf.%{d2}", "bad.strong.lp._spf.example.com"),
    ("%{lr-}.lp.%{ir}.%{v}._spf.%{d2}", "bad.strong.lp.3.2.0.192.in-addr._spf.example.com"),
])
def test_spf_macro_expansion(spec, expected):
    got = spf.expand(spec, sender="strong-bad@email.example.com", domain="email.example.com",
                     ip="192.0.2.3", helo="mx.example.org")
    assert got == expected


def test_spf_macro_expansion_ipv6():
    got = spf.expand("%{ir}.%{v}._spf.%{d2}", sender="strong-bad@email.example.com",
                     domain="email.example.com", ip="2001:db8::cb01", helo="h")
    assert got == "1.0.b.c.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6._spf.example.com"


# -- DKIM (RFC 6376) ---------------------------------------------------------------

MESSAGE = (b"Received: from smtp.sender.test by mx.sender.test; Sun, 1 Nov 2026 10:00:00 +0000\r\n"
           b"From: Alice <alice@sender.test>\r\nTo: bob@recipient.test\r\nSubject: Invoice\r\n"
           b"Date: Sun, 1 Nov 2026 10:00:00 +0000\r\nMessage-ID: <inv-1@sender.test>\r\n"
           b"\r\nPlease pay 100 EUR to the usual account.\r\n")


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """One RSA (1024 bits: fast, still accepted) and one Ed25519 key, per domain."""
    root = tmp_path_factory.mktemp("home")
    made = {}
    for name, algorithm in (("sender.test", "rsa"), ("attacker.test", "ed25519"), ("recipient.test", "rsa")):
        made[name] = dkim.ensure_key(root, Domain(name, "127.0.0.9", True,
                                                  {"dkim_algorithm": algorithm, "dkim_bits": 1024}))
    return made


def key_dns(*ks, **extra) -> FakeDNS:
    return FakeDNS(txt={k.dns_name: [k.record] for k in ks}, **extra)


def verify(content, resolver):
    return result_of(dkim.verify(content, resolver, run_blocking=now))


def test_key_files_are_made_once_and_kept(tmp_path):
    d = Domain("sender.test", "127.0.1.1", True, {"dkim_bits": 1024})
    first = dkim.ensure_key(tmp_path, d)
    private, record = dkim.key_paths(tmp_path, "sender.test", "lab")
    assert private.stat().st_mode & 0o777 == 0o600
    assert record.read_text().startswith("v=DKIM1; k=rsa; p=")
    assert dkim.ensure_key(tmp_path, d) == first  # the same key on the next `mailpipe up`
    ed = dkim.ensure_key(tmp_path, Domain("sender.test", "127.0.1.1", True, {"dkim_algorithm": "ed25519"}))
    assert ed.algorithm == "ed25519" and ed.record.startswith("v=DKIM1; k=ed25519; p=")


def test_signature_tags(keys):
    signed = dkim.sign(MESSAGE, keys["sender.test"])
    tags = dkim.signatures(signed)[0]
    assert (tags["v"], tags["a"], tags["c"], tags["d"], tags["s"]) == (
        "1", "rsa-sha256", "relaxed/relaxed", "sender.test", "lab")
    assert "l" not in tags  # no body length limit: appended text would not be covered
    signed_headers = tags["h"].split(":")
    assert signed_headers.count("from") == 2  # oversigned: a second From: breaks it
    assert {"to", "subject", "date", "message-id"} <= set(signed_headers)
    assert "received" not in signed_headers  # trace fields change on the way


@pytest.mark.parametrize("domain", ["sender.test", "attacker.test"])
def test_dkim_pass_rsa_and_ed25519(keys, domain):
    key = keys[domain]
    [r] = verify(dkim.sign(MESSAGE, key), key_dns(key))
    assert (r.result, r.domain, r.selector) == ("pass", domain, "lab")
    assert r.algorithm == ("ed25519-sha256" if domain == "attacker.test" else "rsa-sha256")


def test_dkim_survives_what_relaxed_canonicalization_allows(keys):
    key = keys["sender.test"]
    signed = dkim.sign(MESSAGE, key)
    refolded = signed.replace(b"Subject: Invoice", b"Subject:   Invoice  ").replace(
        b"account.\r\n", b"account.  \r\n\r\n\r\n")
    refolded = b"Received: from mx.sender.test by mx.recipient.test\r\n" + refolded  # a new hop
    assert verify(refolded, key_dns(key))[0].result == "pass"


def test_dkim_tampered_body_fails_on_the_body_hash(keys):
    key = keys["sender.test"]
    tampered = dkim.sign(MESSAGE, key).replace(b"100 EUR", b"900 EUR")
    [r] = verify(tampered, key_dns(key))
    assert (r.result, r.reason) == ("fail", "body hash did not verify")


def test_dkim_tampered_header_or_added_from_fails(keys):
    key = keys["sender.test"]
    signed = dkim.sign(MESSAGE, key)
    assert verify(signed.replace(b"Subject: Invoice", b"Subject: Urgent"), key_dns(key))[0].result == "fail"
    second_from = signed.replace(b"\r\n\r\nPlease", b"\r\nFrom: ceo@attacker.test\r\n\r\nPlease")
    assert verify(second_from, key_dns(key))[0].result == "fail"


def test_dkim_no_signature_no_key_wrong_key_and_dns_trouble(keys):
    key = keys["sender.test"]
    signed = dkim.sign(MESSAGE, key)
    assert verify(MESSAGE, key_dns(key)) == []  # dkim=none
    [r] = verify(signed, FakeDNS())
    assert r.result == "permerror" and "no key" in r.reason
    wrong = FakeDNS(txt={key.dns_name: [keys["recipient.test"].record]})
    assert verify(signed, wrong)[0].result == "fail"
    assert verify(signed, FakeDNS(broken={key.dns_name}))[0].result == "temperror"
    revoked = FakeDNS(txt={key.dns_name: ["v=DKIM1; k=rsa; p="]})  # 3.6.1: an empty p= is a revoked key
    assert verify(signed, revoked)[0].result == "permerror"


# -- DMARC (RFC 7489) --------------------------------------------------------------

def test_dmarc_record_parsing():
    r = dmarc.parse_record("v=DMARC1; p=reject; sp=none; adkim=s; pct=50; rua=mailto:x@y.test")
    assert (r.p, r.sp, r.adkim, r.aspf, r.pct) == ("reject", "none", "s", "r", 50)
    assert dmarc.parse_record("v=DMARC1; p=quarantine").sp == "quarantine"  # sp defaults to p
    assert dmarc.parse_record("p=reject; v=DMARC1") is None  # v= must come first
    assert dmarc.parse_record("v=DMARC1; p=maybe") is None
    assert dmarc.parse_record("v=spf1 -all") is None


def test_organizational_domain_and_alignment():
    assert dmarc.organizational_domain("mx.sender.test") == "sender.test"
    assert dmarc.organizational_domain("sender.test.attacker.test") == "attacker.test"
    assert dmarc.aligned("mx.sender.test", "sender.test", "r")
    assert not dmarc.aligned("mx.sender.test", "sender.test", "s")
    assert dmarc.aligned("Sender.Test", "sender.test", "s")
    assert not dmarc.aligned("attacker.test", "sender.test", "r")


def test_dmarc_record_lookup_falls_back_to_the_organizational_domain():
    dns = FakeDNS(txt={"_dmarc.sender.test": ["v=DMARC1; p=reject; sp=quarantine"]})
    record, asked = result_of(dmarc.find_record(dns, "news.sender.test"))
    assert record.domain == "sender.test" and asked == ["_dmarc.news.sender.test", "_dmarc.sender.test"]
    sub = dmarc.evaluate("news.sender.test", record, ("fail", "news.sender.test"), [])
    assert (sub.policy, sub.disposition) == ("quarantine", "quarantine")  # sp= for a subdomain
    two = FakeDNS(txt={"_dmarc.sender.test": ["v=DMARC1; p=reject", "v=DMARC1; p=none"]})
    assert result_of(dmarc.find_record(two, "sender.test"))[0] is None  # 6.6.3: two records = none


def test_dmarc_pct_applies_the_policy_to_a_sample():
    record = dmarc.parse_record("v=DMARC1; p=reject; pct=25")

    class Dice:
        def __init__(self, value):
            self.value = value

        def randrange(self, n):
            return self.value

    assert dmarc.evaluate("sender.test", record, None, [], rng=Dice(10)).disposition == "reject"
    assert dmarc.evaluate("sender.test", record, None, [], rng=Dice(80)).disposition == "quarantine"


def test_dmarc_needs_exactly_one_from_address():
    dns = FakeDNS()
    for fields in ([], ["a@sender.test", "b@attacker.test"], ["a@sender.test, b@attacker.test"]):
        r = result_of(dmarc.check(dns, fields, None, []))
        assert (r.result, r.disposition) == ("permerror", "reject")


def test_dmarc_alignment_is_what_counts_not_a_pass():
    record = dmarc.parse_record("v=DMARC1; p=reject")
    # SPF and DKIM pass, but for the attacker's own domain: not aligned with sender.test
    r = dmarc.evaluate("sender.test", record, ("pass", "attacker.test"), [("pass", "attacker.test")])
    assert (r.result, r.disposition) == ("fail", "reject")
    strict = dmarc.parse_record("v=DMARC1; p=reject; aspf=s")
    assert dmarc.evaluate("sender.test", strict, ("pass", "bounces.sender.test"), []).result == "fail"
    assert dmarc.evaluate("sender.test", record, ("pass", "bounces.sender.test"), []).result == "pass"


# -- the whole inbound check: the verdict matrix ------------------------------------

SPF_RECORDS = {  # the SPF record sender.test publishes, per wanted result for a client at GOOD_IP
    "pass": "v=spf1 ip4:127.0.1.1 -all",
    "fail": "v=spf1 -all",
    "softfail": "v=spf1 ~all",
    "none": None,
}


@dataclass
class Case:
    spf: str
    dkim: str
    policy: str
    dmarc: str = field(init=False)
    disposition: str = field(init=False)

    def __post_init__(self):
        # RFC 7489 4.2: DMARC passes if SPF or DKIM passes aligned; else the policy applies
        self.dmarc = "pass" if "pass" in (self.spf, self.dkim) else "fail"
        self.disposition = "none" if self.dmarc == "pass" else self.policy


MATRIX = [Case(s, d, p) for s in SPF_RECORDS for d in ("pass", "fail", "none")
          for p in ("none", "quarantine", "reject")]


@pytest.mark.parametrize("case", MATRIX, ids=lambda c: f"spf={c.spf}-dkim={c.dkim}-p={c.policy}")
def test_verdict_matrix(case, keys):
    key = keys["sender.test"]
    txt = {"_dmarc.sender.test": [f"v=DMARC1; p={case.policy}"], key.dns_name: [key.record]}
    if SPF_RECORDS[case.spf]:
        txt["sender.test"] = [SPF_RECORDS[case.spf]]
    content = MESSAGE
    if case.dkim != "none":
        content = dkim.sign(MESSAGE, key)
    if case.dkim == "fail":
        content = content.replace(b"100 EUR", b"900 EUR")
    auth = SenderAuth(FakeDNS(txt=txt), "mx.recipient.test", run_blocking=now)
    verdict = result_of(auth.check(GOOD_IP, "mx.sender.test", "alice@sender.test", content))
    assert verdict.spf_mailfrom.result == case.spf
    assert [s.result for s in verdict.dkim] == ([] if case.dkim == "none" else [case.dkim])
    assert verdict.dmarc.result == case.dmarc
    assert verdict.disposition == case.disposition
    _id, results = authres.parse(get_header(verdict.header(), "Authentication-Results"))
    assert results == {"spf": case.spf, "dkim": case.dkim, "dmarc": case.dmarc}


def test_no_dmarc_record_means_dmarc_none_and_delivery():
    auth = SenderAuth(FakeDNS(txt={"sender.test": ["v=spf1 -all"]}), "mx.recipient.test", run_blocking=now)
    verdict = result_of(auth.check(BAD_IP, "evil.test", "alice@sender.test", MESSAGE))
    assert (verdict.dmarc.result, verdict.disposition) == ("none", "none")


# -- Authentication-Results (RFC 8601) ---------------------------------------------

def test_authentication_results_header_is_built_and_parsed():
    field_ = authres.build("mx.recipient.test", [
        authres.resinfo("spf", "pass", "127.0.1.1 is allowed", smtp_mailfrom="alice@sender.test"),
        authres.resinfo("dkim", "pass", header_d="sender.test", header_s="lab"),
        authres.resinfo("dmarc", "pass", "p=reject dis=none", header_from="sender.test"),
    ])
    assert field_.startswith(b"Authentication-Results: mx.recipient.test;\r\n\t")
    assert b"smtp.mailfrom=alice@sender.test" in field_ and b"header.d=sender.test" in field_
    assert authres.parse(get_header(field_ + b"\r\n", "Authentication-Results")) == (
        "mx.recipient.test", {"spf": "pass", "dkim": "pass", "dmarc": "pass"})


def test_untrusted_text_cannot_break_out_of_the_header():
    clause = authres.resinfo("spf", "fail", "evil) dmarc=pass (\r\nX-Injected: 1",
                             smtp_mailfrom="a@b;dmarc=pass\r\nX: y")
    assert "\r" not in clause and "\n" not in clause
    assert authres.parse("mx.r.test; " + clause)[1] == {"spf": "fail"}


def test_forged_authentication_results_claiming_us_are_stripped():
    forged = (b"Authentication-Results: mx.recipient.test; dmarc=pass header.from=sender.test\r\n"
              b"Authentication-Results: (trust me)\r\n\tRecipient.Test; spf=pass\r\n"
              b"Authentication-Results: imap.recipient.test; dkim=pass\r\n"
              b"Authentication-Results: mx.elsewhere.example; spf=fail\r\n") + MESSAGE
    stripped, removed = authres.strip_ours(forged, {"mx.recipient.test"}, "recipient.test")
    assert removed == 3
    assert stripped == b"Authentication-Results: mx.elsewhere.example; spf=fail\r\n" + MESSAGE
    assert authres.strip_ours(MESSAGE, {"mx.recipient.test"}, "recipient.test") == (MESSAGE, 0)


# -- the MTA's gate: reject, quarantine, strip --------------------------------------

class RecordingHandler:
    """Stands in for the MTA's TransferPolicy: records what it was asked to queue."""

    def __init__(self, own_address):
        self.own_address, self.queued = own_address, []

    def is_own_msa(self, session):
        return session.peer == self.own_address

    def handle_RCPT(self, session, envelope, address, options):
        return "rcpt-hook"

    def handle_DATA(self, session, envelope):
        self.queued.append(envelope.content)
        return Reply(250, "2.0.0", "Ok: queued")


def gate(txt):
    domain = Domain("recipient.test", "127.0.2.1")
    inner = RecordingHandler(domain.address)
    auth = SenderAuth(FakeDNS(txt=txt), "mx.recipient.test", run_blocking=now)
    return InboundChecks(inner, auth, domain), inner


def deliver(g, content, peer=BAD_IP, mail_from="alice@sender.test"):
    session = Session(conn_id="t/1", peer=peer)
    session.helo = "mx.attacker.test"
    envelope = Envelope(mail_from=mail_from, rcpt_tos=["bob@recipient.test"], content=content)
    return result_of(defer.maybeDeferred(g.handle_DATA, session, envelope))


POLICIES = {"sender.test": ["v=spf1 ip4:127.0.1.1 -all"]}


@pytest.mark.parametrize("policy, code, folder", [("reject", 550, None), ("quarantine", 250, "Junk"),
                                                  ("none", 250, None)])
def test_gate_applies_the_dmarc_policy(policy, code, folder):
    g, inner = gate({**POLICIES, "_dmarc.sender.test": [f"v=DMARC1; p={policy}"]})
    reply = deliver(g, MESSAGE)
    assert reply.code == code
    if code == 550:
        assert reply.status == "5.7.1" and not inner.queued
        assert "DMARC policy of sender.test is reject" in reply.text
        return
    queued = inner.queued[0]
    assert quarantine.folder_for(queued)[0] == (folder or "INBOX")
    assert b"dmarc=fail (p=" + policy.encode() in queued
    assert get_header(queued, "Authentication-Results").startswith("mx.recipient.test;")


def test_gate_strips_forgeries_and_adds_its_own_header():
    g, inner = gate({**POLICIES, "_dmarc.sender.test": ["v=DMARC1; p=none"]})
    forged = (b"X-Mailpipe-Folder: INBOX\r\n"
              b"Authentication-Results: mx.recipient.test; spf=pass; dkim=pass; dmarc=pass\r\n") + MESSAGE
    assert deliver(g, forged).code == 250
    queued = inner.queued[0]
    fields = [v for n, v in _fields(queued) if n.lower() == "authentication-results"]
    assert len(fields) == 1 and authres.parse(fields[0])[1]["spf"] == "fail"
    assert b"X-Mailpipe-Folder" not in queued
    assert g.handle_RCPT(None, None, "bob@recipient.test", {}) == "rcpt-hook"  # other hooks: the MTA's own


def test_gate_does_not_check_mail_from_its_own_msa_but_still_strips():
    g, inner = gate({"_dmarc.sender.test": ["v=DMARC1; p=reject"]})
    forged = b"Authentication-Results: mx.recipient.test; dmarc=pass\r\n" + MESSAGE
    assert deliver(g, forged, peer="127.0.2.1").code == 250
    assert inner.queued[0] == MESSAGE  # stripped, and nothing added
    assert g.auth.resolver.asked == []  # no check ran


def test_gate_with_checks_switched_off_checks_nothing_but_still_strips_forgeries():
    """check_sender_auth = false: an MTA without SPF, DKIM and DMARC software. Forged
    results that claim to be ours still go (RFC 8601 5): someone downstream trusts them."""
    domain = Domain("recipient.test", "127.0.2.1", True, {"check_sender_auth": False})
    inner = RecordingHandler(domain.address)
    auth = SenderAuth(FakeDNS(txt={"_dmarc.sender.test": ["v=DMARC1; p=reject"]}), "mx.recipient.test",
                      run_blocking=now)
    g = InboundChecks(inner, auth, domain, check=domain.switch("check_sender_auth"))
    forged = (b"X-Mailpipe-Folder: INBOX\r\n"
              b"Authentication-Results: mx.recipient.test; spf=pass; dkim=pass; dmarc=pass\r\n") + MESSAGE
    assert deliver(g, forged, peer=BAD_IP).code == 250  # a forgery DMARC would reject: accepted
    assert inner.queued == [MESSAGE]  # both forgeries removed, no header of our own added
    assert auth.resolver.asked == []  # and no check asked the DNS anything


def test_the_helo_identity_is_checked_once_per_session():
    """RFC 7208 2.3: the HELO name is the client's, the same for every message of
    a session. Its SPF result serves the session's later messages (the trace says
    so), until the client says another name; a temperror is asked again."""
    records = {**POLICIES, "_dmarc.sender.test": ["v=DMARC1; p=none"], "mx.attacker.test": ["v=spf1 a -all"]}
    g, inner = gate(records)
    events = []

    class Recorder:
        def bind(self, **fields):
            return self

        def event(self, name, **fields):
            events.append((name, fields))

    g.tracer = Recorder()
    session = Session(conn_id="t/1", peer=BAD_IP)

    def send(helo):
        session.helo = helo
        envelope = Envelope(mail_from="alice@sender.test", rcpt_tos=["bob@recipient.test"], content=MESSAGE)
        return result_of(defer.maybeDeferred(g.handle_DATA, session, envelope))

    def helo_lookups():
        return [q for q in g.auth.resolver.asked if q[1] in ("mx.attacker.test", "mx.other.test")]

    def helo_results():
        return [f for name, f in events if name == "spf.result" and f["identity"] == "helo"]

    assert send("mx.attacker.test").code == 250
    first = helo_lookups()
    assert first  # the first message asks DNS about the HELO name
    assert send("mx.attacker.test").code == 250
    assert helo_lookups() == first  # the second does not ask again
    one, two = helo_results()
    assert one["result"] == two["result"] == "fail" and two["reused"] and two["ms"] == 0.0
    assert not one.get("reused")  # None: the real tracer leaves the field out
    for queued in inner.queued:  # both messages carry the HELO result in their header
        assert re.search(rb"spf=fail \([^)]*\) smtp\.helo=mx\.attacker\.test", queued.replace(b"\r\n\t", b" "))

    g.auth.resolver.broken.add("mx.other.test")
    send("mx.other.test")  # a new name: asked, and DNS fails
    send("mx.other.test")  # a temperror is not kept: asked again
    assert [f["result"] for f in helo_results()[2:]] == ["temperror", "temperror"]
    assert not any(f.get("reused") for f in helo_results()[2:])
    assert sum(q[1] == "mx.other.test" for q in g.auth.resolver.asked) == 2


def _fields(content):
    from agents.headers import header_fields

    return header_fields(content)


# -- no DNS query leaves the lab resolver --------------------------------------------

def test_no_dns_query_leaves_the_lab_resolver(keys, monkeypatch):
    """Every name the checks need is asked through our resolver; dkimpy's own DNS
    code (dnspython), and the socket layer under it, are never called."""
    import dkim as dkimpy
    import dns.resolver

    def forbidden(*args, **kwargs):
        raise AssertionError(f"a DNS query went around the lab resolver: {args!r}")

    monkeypatch.setattr(dkimpy.dnsplug, "get_txt", forbidden)
    monkeypatch.setattr(dkimpy, "get_txt", forbidden)
    monkeypatch.setattr(dns.resolver, "resolve", forbidden)
    monkeypatch.setattr(dns.resolver.Resolver, "resolve", forbidden)
    monkeypatch.setattr(socket, "getaddrinfo", forbidden)
    monkeypatch.setattr(socket.socket, "sendto", forbidden)
    monkeypatch.setattr(socket.socket, "connect", forbidden)

    key = keys["sender.test"]
    resolver = key_dns(key, a={"mx.sender.test": [GOOD_IP]})
    resolver.txt.update({"sender.test": ["v=spf1 ip4:127.0.1.1 -all"], "mx.sender.test": ["v=spf1 a -all"],
                         "_dmarc.sender.test": ["v=DMARC1; p=reject"]})
    auth = SenderAuth(resolver, "mx.recipient.test", run_blocking=now)
    verdict = result_of(auth.check(GOOD_IP, "mx.sender.test", "alice@sender.test", dkim.sign(MESSAGE, key)))
    assert (verdict.spf_mailfrom.result, verdict.dkim[0].result, verdict.dmarc.result) == ("pass",) * 3
    assert set(resolver.asked) == {("TXT", "mx.sender.test"), ("A", "mx.sender.test"), ("TXT", "sender.test"),
                                   ("TXT", "lab._domainkey.sender.test"), ("TXT", "_dmarc.sender.test")}


# -- what the lab DNS publishes ----------------------------------------------------------

def test_published_records_follow_the_config(tmp_path):
    config = LabConfig.load(None)
    for d in config.domains:
        dkim.ensure_key(tmp_path, d)
    published = {d.name: dict(dns_records(d, tmp_path)) for d in config.domains}
    assert published["sender.test"]["_dmarc.sender.test"] == "v=DMARC1; p=reject"
    assert published["recipient.test"]["_dmarc.recipient.test"] == "v=DMARC1; p=quarantine"
    assert published["attacker.test"]["_dmarc.attacker.test"] == "v=DMARC1; p=none"
    assert published["attacker.test"]["lab._domainkey.attacker.test"].startswith("v=DKIM1; k=ed25519; p=")
    assert published["sender.test"]["lab._domainkey.sender.test"].startswith("v=DKIM1; k=rsa; p=")
    assert published["sender.test"]["mx.sender.test"] == "v=spf1 a -all"


def test_dns_zone_serves_long_dkim_keys_in_255_byte_strings(tmp_path):
    from twisted.names import dns as tdns

    from agents.dns import zones

    config = LabConfig.load(None)
    dkim.ensure_keys(tmp_path, config)
    zone = next(z for z in zones(config, tmp_path) if z.soa[0] == b"sender.test")
    answers, _auth, _add = result_of(zone.lookupText("lab._domainkey.sender.test"))
    strings = answers[0].payload.data
    assert len(strings) > 1 and all(len(s) <= 255 for s in strings)
    assert b"".join(strings).decode() == dkim.load_key(tmp_path, config.domain("sender.test")).record
    answers, _auth, _add = result_of(zone.lookupText("mx.sender.test"))
    assert [a.payload.data for a in answers if a.type == tdns.TXT] == [[b"v=spf1 a -all"]]


def test_bad_sender_auth_settings_stop_the_lab_early(tmp_path):
    from agents.config import ConfigError
    from agents.senderauth import prepare

    for options in ({"dmarc_policy": "sometimes"}, {"dkim_algorithm": "dsa"}, {"dkim_bits": 512}):
        config = LabConfig.from_dict({"domain": [{"name": "x.test", "address": "127.0.9.1", **options}]})
        with pytest.raises(ConfigError):
            prepare(tmp_path, config)


# -- a backup MX (agents.exchangers) -------------------------------------------------

def test_mail_from_our_own_backup_mx_is_trusted_as_it_is():
    """The backup MX checked (and maybe quarantined) the message at the border; the
    primary keeps its verdict instead of checking again from the backup's address."""
    domain = Domain("recipient.test", "127.0.2.1", True, {"backup_mx": "127.0.2.2"})
    inner = RecordingHandler(domain.address)
    auth = SenderAuth(FakeDNS(txt={"_dmarc.sender.test": ["v=DMARC1; p=reject"]}), "mx.recipient.test",
                      run_blocking=now)
    g = InboundChecks(inner, auth, domain, internal={"127.0.2.2"})
    checked = quarantine.mark(b"Authentication-Results: mx2.recipient.test; dmarc=fail\r\n" + MESSAGE, "Junk")
    assert deliver(g, checked, peer="127.0.2.2").code == 250
    assert inner.queued == [checked] and auth.resolver.asked == []
    assert deliver(g, checked, peer=BAD_IP).code == 550  # the same from anyone else: checked


def test_backup_mx_does_not_sign_its_own_domains_mail(keys, monkeypatch):
    from types import SimpleNamespace

    import agents.routing
    from agents.senderauth import SigningRouter
    from agents.spool import QueuedMessage
    from agents.trace import NULL_TRACER

    calls = []

    def fake_by_mx(self, domain, item, recipients, content):  # the plain Router's relay
        calls.append((domain, content))
        return defer.succeed([])

    monkeypatch.setattr(agents.routing.Router, "by_mx", fake_by_mx)
    router = SigningRouter.__new__(SigningRouter)  # just what by_mx needs, no reactor or DNS
    router.ctx = SimpleNamespace(domain=Domain("recipient.test", "127.0.2.1"), tracer=NULL_TRACER)
    router.key, router._blocking = keys["recipient.test"], now
    item = QueuedMessage("Q1", "alice@sender.test", ["bob@recipient.test"])
    result_of(router.by_mx("recipient.test", item, ["bob@recipient.test"], MESSAGE))
    result_of(router.by_mx("sender.test", item, ["alice@sender.test"], MESSAGE))
    assert calls[0] == ("recipient.test", MESSAGE)  # up to our primary MX: as it was
    assert calls[1][1].startswith(b"DKIM-Signature:")  # out to another domain: signed


def test_a_domain_with_dkim_sign_false_relays_unsigned(tmp_path):
    from types import SimpleNamespace

    from twisted.internet.testing import MemoryReactorClock

    from agents.senderauth import SigningRouter
    from agents.trace import Tracer, read_events

    tracer = Tracer(tmp_path / "trace" / "mta.jsonl", "mta.sender.test", "mta", "sender.test")
    for signs in (True, False):
        domain = Domain("sender.test", "127.0.1.1", True, {"dkim_sign": signs, "dkim_bits": 1024})
        dkim.ensure_key(tmp_path, domain)
        ctx = SimpleNamespace(domain=domain, tracer=tracer, reactor=MemoryReactorClock(),
                              home=SimpleNamespace(root=tmp_path), spec=SimpleNamespace(role="mta"),
                              resolver=lambda: FakeDNS())
        router = SigningRouter(ctx, run_blocking=now)
        assert (router.key is not None) == signs
    [nokey] = [e for e in read_events(tmp_path / "trace") if e["event"] == "dkim.nokey"]
    assert "dkim_sign = false" in nokey["reason"]


def test_openssl_rsa_signing_gives_the_same_signature_as_dkimpy(tmp_path, monkeypatch):
    """Our fast path must be byte-for-byte what dkimpy's pure-Python RSA computes."""
    import dkim as dkimpy
    import dkim.crypto

    # t= is signed too: both signatures must be made in the same second.
    monkeypatch.setattr(dkimpy.time, "time", lambda: 1_800_000_000.0)

    from agents import dkim as ours
    from agents import dkimpy_speedups
    from agents.config import Domain

    key = ours.ensure_key(tmp_path, Domain("x.test", "127.0.9.1", True, {}))
    message = b"From: a@x.test\r\nTo: b@y.test\r\nSubject: s\r\n\r\nbody\r\n"

    def signature(signer):
        saved = dkimpy.RSASSA_PKCS1_v1_5_sign
        dkimpy.RSASSA_PKCS1_v1_5_sign = signer
        try:
            d = dkimpy.DKIM(message, linesep=b"\r\n")
            return d.sign(key.selector.encode(), b"x.test", key.dkimpy_private_key(),
                          include_headers=[b"from", b"to", b"subject"])
        finally:
            dkimpy.RSASSA_PKCS1_v1_5_sign = saved

    assert signature(dkimpy_speedups.rsa_sign_with_openssl) == signature(dkim.crypto.RSASSA_PKCS1_v1_5_sign)


def test_openssl_rsa_verification_agrees_with_dkimpy(tmp_path):
    """The verify fast path says True and False exactly where dkimpy's own code does."""
    import hashlib

    import dkim.crypto

    from agents import dkim as ours
    from agents import dkimpy_speedups
    from agents.config import Domain

    key = ours.ensure_key(tmp_path, Domain("x.test", "127.0.9.1", True, {}))
    private = dkim.crypto.parse_pem_private_key(key.dkimpy_private_key())
    public = {"modulus": private["modulus"], "publicExponent": private["publicExponent"]}
    digest = hashlib.sha256(b"signed headers")
    good = dkim.crypto.RSASSA_PKCS1_v1_5_sign(digest, private)
    bad = bytes([good[0] ^ 1]) + good[1:]
    other = hashlib.sha256(b"other headers")
    for sig, h in [(good, digest), (bad, digest), (good, other), (good[:-1], digest)]:
        assert dkimpy_speedups.rsa_verify_with_openssl(h, sig, public) == dkim.crypto.RSASSA_PKCS1_v1_5_verify(h, sig, public)
    assert dkimpy_speedups.rsa_verify_with_openssl(digest, good, public) is True


def test_small_messages_are_signed_inline_big_ones_in_a_thread():
    from agents.senderauth import INLINE_CRYPTO_LIMIT, crypto_runner

    thread = object()
    assert crypto_runner(b"x" * INLINE_CRYPTO_LIMIT, thread) is not thread
    assert crypto_runner(b"x" * (INLINE_CRYPTO_LIMIT + 1), thread) is thread
    run = crypto_runner(b"small", thread)
    assert result_of(run(lambda a, b: a + b, 2, 3)) == 5
    failure = run(lambda: 1 / 0)
    failure.addErrback(lambda f: f.trap(ZeroDivisionError) and None)
