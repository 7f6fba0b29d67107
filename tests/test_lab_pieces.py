"""Unit tests for the small shared pieces: config, DNS zone, headers, users, MUA composing."""

from __future__ import annotations

import pytest
from twisted.names import dns

from agents.config import ConfigError, LabConfig
from agents.dns import LabZone
from agents.headers import complete_for_submission, get_header, received_field, safe_token
from agents.journey import hops
from agents.mua import ComposeError, compose
from agents.users import UserDB, hash_password, verify_password


def test_default_config_topology():
    c = LabConfig.load(None)
    assert c.dns_server == ("127.0.0.1", 1053)
    assert [d.name for d in c.domains] == ["sender.test", "recipient.test", "attacker.test"]
    assert not c.domain("attacker.test").has_mailboxes  # the spoofing lesson's domain: an MTA only
    assert c.ports["submission"] == 1587 and c.ports["lmtp"] == 1024
    assert c.user("ALICE@sender.test").password == "alice-secret"
    assert len(c.agents()) == 9  # 3 + 3 + mta2.recipient.test (backup MX) + mta.attacker.test + dns


def test_config_refuses_non_loopback_addresses():
    data = {"domain": [{"name": "x.test", "address": "10.0.0.1"}]}
    with pytest.raises(ConfigError, match="not a loopback"):
        LabConfig.from_dict(data)


def test_domain_switches_are_on_unless_set_false_and_must_be_booleans(tmp_path):
    from agents.bench import bare_config
    from agents.config import DOMAIN_SWITCHES

    c = LabConfig.load(None)
    assert all(d.switch(name) for d in c.domains for name in DOMAIN_SWITCHES)
    with pytest.raises(KeyError):
        c.domains[0].switch("dkim_sign_typo")
    bare = bare_config(c)
    assert not any(d.switch(name) for d in bare.domains for name in DOMAIN_SWITCHES)
    assert bare.domain("sender.test").options["dmarc_policy"] == "reject"  # the rest is kept
    path = tmp_path / "bare.toml"
    path.write_text(bare.to_toml())
    assert not LabConfig.load(path).domain("recipient.test").switch("check_sender_auth")
    for value in ("no", 0, "false"):  # TOML's false only: "false" in quotes is a typo to report
        data = {"domain": [{"name": "x.test", "address": "127.0.9.1", "relay_tls": value}]}
        with pytest.raises(ConfigError, match="relay_tls must be true or false"):
            LabConfig.from_dict(data)


def test_config_round_trips_through_toml(tmp_path):
    c = LabConfig.load(None).relocated(123)
    path = tmp_path / "lab.toml"
    path.write_text(c.to_toml())
    again = LabConfig.load(path)
    assert again.domains == c.domains and again.ports == c.ports and again.users == c.users
    assert again.domain("recipient.test").address == "127.123.2.1"


def _answers(deferred):
    answers, authority, additional = deferred.result
    return answers, additional


def test_zone_serves_mx_with_the_exchanger_address_as_additional():
    c = LabConfig.load(None)
    zone = LabZone(c.domain("recipient.test"), c.dns_address, c.ttl)
    answers, additional = _answers(zone.lookupMailExchange("recipient.test"))
    assert sorted((a.payload.preference, a.payload.name.name) for a in answers) == [
        (10, b"mx.recipient.test"), (20, b"mx2.recipient.test")]  # the backup MX (agents.exchangers)
    assert sorted(a.payload.dottedQuad() for a in additional if a.type == dns.A) == ["127.0.2.1", "127.0.2.2"]
    answers, _ = _answers(zone.lookupAddress("smtp.recipient.test"))
    assert answers[0].payload.dottedQuad() == "127.0.2.1"
    answers, _ = _answers(zone.lookupText("recipient.test"))
    assert answers[0].payload.data == [b"v=spf1 ip4:127.0.2.1 -all"]


def test_received_field_cannot_be_used_to_inject_headers():
    field = received_field(helo="evil\r\nX-Injected: yes", peer_ip="127.0.0.9", by="mx.b.test",
                           protocol="ESMTPS", queue_id="Q1", recipient="b@b.test")
    assert b"X-Injected: yes\r\n" not in field
    assert field.count(b"\r\n") == 3 and field.startswith(b"Received: from evil??X-Injected:?yes")
    assert safe_token("") == "unknown"


def test_submission_adds_message_id_and_date_only_when_missing():
    content = b"From: a@x.test\r\nSubject: hi\r\n\r\nbody\r\n"
    done, msg_id = complete_for_submission(content, "x.test")
    assert get_header(done, "Message-ID") == msg_id and msg_id.endswith("@x.test>")
    assert get_header(done, "Date")
    assert done.endswith(b"\r\n\r\nbody\r\n")
    again, same_id = complete_for_submission(done, "x.test")
    assert again == done and same_id == msg_id


def test_passwords_are_stored_as_salted_scrypt(tmp_path):
    db = UserDB(tmp_path / "users.json")
    db.set_password("Alice@x.test", "s3cret")
    stored = db.load()["alice@x.test"]
    assert stored.startswith("scrypt$") and "s3cret" not in stored
    assert db.check("alice@x.test", "s3cret") and not db.check("alice@x.test", "wrong")
    assert not db.check("nobody@x.test", "s3cret")
    assert hash_password("pw") != hash_password("pw")  # salted
    assert not verify_password("pw", "md5$whatever")


def test_compose_refuses_header_injection():
    with pytest.raises(ComposeError):
        compose("a@x.test", ["b@y.test"], "hello\r\nBcc: victim@z.test", "body")
    msg = compose("a@x.test", ["b@y.test"], "hello", "line\n.dot line\n")
    assert b"\r\nSubject: hello\r\n" in msg and msg.count(b"\n") == msg.count(b"\r\n")


def test_hops_join_arrivals_across_agents():
    def ev(ts, agent, role, event):
        return {"ts": ts, "agent": agent, "role": role, "event": event, "message_id": "<m>"}

    events = [
        ev(1000, "mua", "mua", "submit.start"),
        ev(5000, "msa.a", "msa", "spooled"),
        ev(9000, "mta.a", "mta", "spooled"),
        ev(9500, "mta.a", "mta", "spooled"),  # a second copy (a retry) is not a new hop
        ev(15000, "mta.b", "mta", "spooled"),
        ev(20000, "mda.b", "mda", "stored"),
        ev(21000, "mua", "mua", "fetched"),
    ]
    rows = hops(events, "<m>")
    assert [(r["from"], r["to"]) for r in rows] == [
        ("mua", "msa.a"), ("msa.a", "mta.a"), ("mta.a", "mta.b"), ("mta.b", "mda.b"), ("mda.b", "mua")]
    assert rows[0]["ms"] == 4.0 and rows[-1]["via"] == "IMAP"


def test_checker_caches_successful_logins_without_keeping_passwords(tmp_path, monkeypatch):
    from twisted.cred.credentials import UsernamePassword
    from twisted.internet import defer

    from agents import users
    from agents.users import UserDBChecker

    monkeypatch.setattr(users.threads, "deferToThread", lambda f, *a: defer.maybeDeferred(f, *a))
    db = UserDB(tmp_path / "users.json")
    db.set_password("a@x.test", "pw")
    now = [0.0]
    checker = UserDBChecker(db, cache_ttl=60, clock=lambda: now[0])
    calls = []
    real_check = db.check
    db.check = lambda u, p: calls.append(u) or real_check(u, p)
    assert checker.requestAvatarId(UsernamePassword(b"a@x.test", b"pw")).result == "a@x.test"
    assert checker.requestAvatarId(UsernamePassword(b"A@x.test", b"pw")).result == "a@x.test"
    assert len(calls) == 1  # the second login came from the cache
    wrong = checker.requestAvatarId(UsernamePassword(b"a@x.test", b"nope"))
    wrong.addErrback(lambda f: f.trap(Exception) and None)
    assert len(calls) == 2  # a wrong password is never served from the cache
    assert b"pw" not in repr(checker._cache).encode()
    now[0] = 61
    checker.requestAvatarId(UsernamePassword(b"a@x.test", b"pw"))
    assert len(calls) == 3  # expired


def test_negative_answer_from_our_zone_is_authoritative():
    from agents.dns import TracingDNSServerFactory
    from agents.trace import NULL_TRACER

    c = LabConfig.load(None)
    factory = TracingDNSServerFactory([LabZone(c.domain("recipient.test"), c.dns_address, c.ttl)], NULL_TRACER)
    query = dns.Message()
    query.addQuery(b"recipient.test", dns.A)
    zone = factory.resolver.resolvers[0]
    _, authority, _ = zone.lookupAddress("recipient.test").result
    response = factory._responseFromMessage(query, answers=[], authority=authority)
    assert response.auth and authority and authority[0].type == dns.SOA
