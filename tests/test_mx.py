"""Mail exchangers: MX preference, fallback to the next MX, backup MX, null MX (RFC 5321 5.1, RFC 7505).

Protocol level: the zone is asked directly, the resolver talks to a fake
name server, and the router's SMTP sends are replaced by a table of what
each address answers. No sockets, no reactor.
"""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
from twisted.internet import defer, task
from twisted.names import dns, error

from agents.config import AgentSpec, ConfigError, Domain, LabConfig
from agents.dns import LabZone
from agents.exchangers import BackupTransport, is_null_mx, mta_hostname, usable_exchangers
from agents.resolver import LabResolver
from agents.routing import Router
from agents.smtpclient import SMTPDeliveryError
from agents.trace import NULL_TRACER

PRIMARY, BACKUP = "127.0.2.1", "127.0.2.2"


# ---------------------------------------------------------------------------
# The zone the lab DNS serves


def records(zone, name, method):
    answers, _authority, additional = getattr(zone, method)(name).result
    return answers, additional


def test_backup_mx_is_served_as_mx_20_with_its_address():
    d = Domain("recipient.test", PRIMARY, options={"backup_mx": BACKUP})
    zone = LabZone(d, "127.0.0.1", 60)
    answers, additional = records(zone, "recipient.test", "lookupMailExchange")
    assert sorted((a.payload.preference, a.payload.name.name) for a in answers) == [
        (10, b"mx.recipient.test"), (20, b"mx2.recipient.test")]
    assert sorted(a.payload.dottedQuad() for a in additional if a.type == dns.A) == [PRIMARY, BACKUP]


def test_null_mx_domain_has_one_mx_to_the_root_and_no_mail_hosts():
    d = Domain("nomail.test", "127.0.4.1", has_mailboxes=False, options={"null_mx": True})
    zone = LabZone(d, "127.0.0.1", 60)
    answers, _ = records(zone, "nomail.test", "lookupMailExchange")
    assert [(a.payload.preference, a.payload.name.name) for a in answers] == [(0, b"")]
    texts, _ = records(zone, "nomail.test", "lookupText")
    assert [a.payload.data for a in texts] == [[b"v=spf1 -all"]]  # sends no mail either (RFC 7505 4.2)
    addresses, _ = records(zone, "nomail.test", "lookupAddress")
    assert [a.payload.dottedQuad() for a in addresses] == ["127.0.4.1"]  # the A record stays...
    failures = []
    zone.lookupAddress("mx.nomail.test").addErrback(failures.append)
    assert failures[0].check(error.AuthoritativeDomainError)  # NXDOMAIN: no mail host to find


# ---------------------------------------------------------------------------
# The resolver: preference order, implicit MX, null MX


class FakeNameServer:
    """Answers MX and A questions from two dicts, as twisted.names' client would."""

    def __init__(self, mx: dict, a: dict):
        self.mx, self.a = mx, a

    def _answer(self, table, name, make):
        if name not in table:
            return defer.fail(error.DomainError(name))
        return defer.succeed(([dns.RRHeader(name, r.TYPE, payload=r, ttl=60) for r in map(make, table[name])], [], []))

    def lookupMailExchange(self, name):
        return self._answer(self.mx, name, lambda pref_host: dns.Record_MX(pref_host[0], pref_host[1].encode(), ttl=60))

    def lookupAddress(self, name):
        return self._answer(self.a, name, lambda ip: dns.Record_A(ip, ttl=60))


def resolver(mx: dict, a: dict) -> LabResolver:
    r = LabResolver(("127.0.0.1", 53), reactor=task.Clock())
    r._resolver = FakeNameServer(mx, a)
    return r


A = {"mx.recipient.test": [PRIMARY], "mx2.recipient.test": [BACKUP], "plain.test": ["127.0.5.1"],
     "mx.other.test": ["127.0.6.1"]}
MX = {"recipient.test": [(20, "mx2.recipient.test"), (10, "mx.recipient.test")],
      "nomail.test": [(0, "")], "plain.test": [], "other.test": [(10, "mx.other.test")]}


def test_mail_exchangers_are_sorted_by_preference():
    found = resolver(MX, A).mail_exchangers("recipient.test").result
    assert found == [(10, "mx.recipient.test", [PRIMARY]), (20, "mx2.recipient.test", [BACKUP])]


def test_no_mx_means_the_domain_itself_is_the_implicit_mx():
    assert resolver(MX, A).mail_exchangers("plain.test").result == [(0, "plain.test", ["127.0.5.1"])]


def test_null_mx_means_no_exchangers():
    r = resolver(MX, A)
    assert r.mail_exchangers("nomail.test").result == []
    assert is_null_mx(r.lookup_mx("nomail.test").result)
    assert not is_null_mx(r.lookup_mx("recipient.test").result)


def test_an_mta_in_the_mx_list_keeps_only_better_exchangers():
    mxs = [(10, "mx", [PRIMARY]), (20, "mx2", [BACKUP]), (30, "mx3", ["127.0.2.3"])]
    assert usable_exchangers(mxs, "127.0.9.9") == mxs  # not in the list: use them all
    assert usable_exchangers(mxs, BACKUP) == [(10, "mx", [PRIMARY])]  # never itself, never worse
    assert usable_exchangers(mxs, PRIMARY) == []  # the best one: going on would loop


# ---------------------------------------------------------------------------
# The router: which exchanger gets the message


class FakeReactor(task.Clock):
    def addSystemEventTrigger(self, *args, **kwargs):
        pass


def router(mx=MX, a=A, address="127.0.1.1", domain="sender.test", answers=None, options=None):
    """A Router whose sends are looked up in ``answers``: ip -> code, or an exception.

    ``options`` replace the domain's config table (its switches, say)."""
    config = LabConfig.load(None)
    lab_domain = config.domain(domain)
    if options is not None:
        lab_domain = replace(lab_domain, options=options)
    ctx = SimpleNamespace(
        config=config, domain=lab_domain, tracer=NULL_TRACER, reactor=FakeReactor(),
        spec=AgentSpec(f"mta.{domain}", "mta", domain, address, {"smtp": 1025}),
        home=SimpleNamespace(ca_cert=None), resolver=lambda: resolver(mx, a),
    )
    r = Router(ctx)
    r.tried = []

    def send(ip, port, host, item, recipients, content, lmtp=False):
        r.tried.append(ip)
        answer = (answers or {}).get(ip, 250)
        if isinstance(answer, Exception):
            return defer.fail(answer)
        return defer.succeed(SimpleNamespace(recipients=[
            SimpleNamespace(address=x, code=answer, status=f"{answer // 100}.0.0", text="t") for x in recipients]))

    r._send = send
    return r


ITEM = SimpleNamespace(queue_id="Q1", message_id="<m@x>", mail_from="alice@sender.test")
REFUSED = SMTPDeliveryError(421, "4.4.1", "cannot connect: connection refused", stage="connect")


def by_mx(r, domain="recipient.test"):
    return [(o.code, o.status) for o in r.by_mx(domain, ITEM, ["bob@recipient.test"], b"x").result]


def test_the_best_mx_gets_the_message():
    r = router()
    assert by_mx(r) == [(250, "2.0.0")] and r.tried == [PRIMARY]


def test_a_temporary_failure_falls_back_to_the_next_mx():
    r = router(answers={PRIMARY: REFUSED})
    assert by_mx(r) == [(250, "2.0.0")] and r.tried == [PRIMARY, BACKUP]


def test_a_permanent_refusal_is_final_and_tries_no_other_mx():
    r = router(answers={PRIMARY: SMTPDeliveryError(550, "5.7.1", "no", stage="MAIL")})
    assert by_mx(r) == [(550, "5.7.1")] and r.tried == [PRIMARY]


def test_every_mx_down_is_a_temporary_failure():
    r = router(answers={PRIMARY: REFUSED, BACKUP: REFUSED})
    assert by_mx(r) == [(421, "4.4.1")] and r.tried == [PRIMARY, BACKUP]


def test_null_mx_bounces_at_once_with_556_5_1_10():
    r = router()
    assert by_mx(r, "nomail.test") == [(556, "5.1.10")] and r.tried == []


def test_the_backup_mx_relays_to_the_primary_and_never_to_itself():
    r = router(address=BACKUP, domain="recipient.test", answers={PRIMARY: REFUSED})
    assert by_mx(r) == [(421, "4.4.1")]  # wait and retry: no 554 "loop", no bounce
    assert r.tried == [PRIMARY]


def test_backup_transport_sends_even_local_users_by_mx():
    r = router(address=BACKUP, domain="recipient.test")
    r.to_own_mda = lambda *a: pytest.fail("a backup MX must not deliver to the mailboxes")
    transport = BackupTransport(r.ctx, r)
    item = SimpleNamespace(**vars(ITEM), pending=["bob@recipient.test", "carol@other.test"])
    outcomes = transport(item, b"x").result
    assert [(o.address, o.code) for o in outcomes] == [("bob@recipient.test", 250), ("carol@other.test", 250)]
    assert r.tried == [PRIMARY, "127.0.6.1"]


def test_the_backup_mta_names_itself_mx2():
    config = LabConfig.load(None)
    d = config.domain("recipient.test")
    backup = SimpleNamespace(domain=d, spec=config.agent("mta2.recipient.test"))
    primary = SimpleNamespace(domain=d, spec=config.agent("mta.recipient.test"))
    assert mta_hostname(backup) == "mx2.recipient.test" and mta_hostname(primary) == "mx.recipient.test"


# ---------------------------------------------------------------------------
# The config: backup MX agents, relocation, null-MX domains


def test_backup_mx_runs_a_second_mta_and_moves_with_the_lab():
    c = LabConfig.load(None)
    spec = c.agent("mta2.recipient.test")
    assert (spec.role, spec.address, spec.ports) == ("mta", "127.0.2.2", {"smtp": 1025})
    moved = c.relocated(77)
    assert moved.agent("mta2.recipient.test").address == "127.77.2.2"
    assert moved.domain("recipient.test").options["backup_mx"] == "127.77.2.2"


def test_null_mx_domain_runs_no_agents_and_backup_must_be_loopback():
    c = LabConfig.load(None)
    nomail = Domain("nomail.test", "127.0.4.1", False, {"null_mx": True})
    c2 = replace(c, domains=c.domains + (nomail,))
    assert not [a for a in c2.agents() if a.domain == "nomail.test"]
    with pytest.raises(ConfigError, match="loopback"):
        LabConfig.from_dict({"domain": [{"name": "a.test", "address": "127.0.9.1", "backup_mx": "10.0.0.2"}]})


def test_certificate_is_reissued_when_the_domain_gains_a_host(tmp_path):
    from cryptography import x509

    from agents.pki import ensure_host_cert

    path = ensure_host_cert(tmp_path, "recipient.test", ["mx.recipient.test"], PRIMARY)
    first = path.read_bytes()
    assert ensure_host_cert(tmp_path, "recipient.test", ["mx.recipient.test"], PRIMARY).read_bytes() == first
    ensure_host_cert(tmp_path, "recipient.test", ["mx.recipient.test", "mx2.recipient.test"], PRIMARY)
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "mx2.recipient.test" in names.get_values_for_type(x509.DNSName)


@pytest.mark.parametrize("relay_tls, expected", [(True, "opportunistic"), (False, "none")])
def test_relay_tls_decides_starttls_on_smtp_hops_and_lmtp_stays_plain(relay_tls, expected):
    """``relay_tls = false`` (a domain switch, agents.config): the SMTP hops go in plaintext."""
    r = router(options={"relay_tls": relay_tls})
    asked = []
    r.cache = SimpleNamespace(send=lambda *args, **kwargs: asked.append(kwargs["tls"]))
    for lmtp in (False, True):  # the Router's own _send, not the table router() puts in its place
        Router._send(r, PRIMARY, 1025, "mx.recipient.test", ITEM, ["bob@recipient.test"], b"x", lmtp=lmtp)
    assert asked == [expected, "none"]
