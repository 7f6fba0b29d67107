"""SPF, DKIM and DMARC in a real lab: agents as processes, the lab DNS, real keys."""

from __future__ import annotations

import email
import email.policy
import re
import smtplib
import subprocess
import sys
import uuid

import dkim as dkimpy

from agents import authres
from agents.dig import dig


def auth_results(raw: str) -> list[str]:
    msg = email.message_from_string(raw, policy=email.policy.compat32)
    return [" ".join(v.split()) for v in msg.get_all("Authentication-Results", [])]


def lab_dnsfunc(lab):
    """dkimpy's DNS hook, answered by the lab DNS (through agents.dig, not dnspython)."""

    def dnsfunc(name, timeout=5):
        answer = dig(name.decode().rstrip("."), "TXT", server=lab.config.dns_server)
        for rr in answer["answers"]:
            if rr["type"] == "TXT":  # dig shows '"part1" "part2"': the record is the parts joined
                return "".join(re.findall(r'"([^"]*)"', rr["value"])).encode()
        return None

    return dnsfunc


def test_good_message_passes_all_three_and_lands_in_inbox(lab):
    sent = lab.send("alice@sender.test", "bob@recipient.test", "signed", "Hello Bob, the real Alice.\n")
    msg = lab.wait_for("bob@recipient.test", sent["message_id"])
    [ar] = auth_results(msg["raw"])
    authserv_id, results = authres.parse(ar)
    assert authserv_id == "mx.recipient.test"
    assert results == {"spf": "pass", "dkim": "pass", "dmarc": "pass"}
    assert "header.d=sender.test" in ar and "smtp.mailfrom=alice@sender.test" in ar
    assert "DKIM-Signature:" in msg["raw"]
    events = [e for e in lab.trace() if e.get("message_id") == sent["message_id"]]
    sign = next(e for e in events if e["event"] == "dkim.sign")
    assert sign["agent"] == "mta.sender.test" and sign["a"] == "rsa-sha256" and sign["ms"] >= 0
    checks = {e["event"]: e for e in events if e["agent"] == "mta.recipient.test"}
    for name in ("spf.result", "dkim.result", "dmarc.result", "senderauth.verdict"):
        assert checks[name]["ms"] >= 0
    assert checks["senderauth.verdict"]["disposition"] == "none"


def test_dkimpy_itself_accepts_our_signature_with_keys_from_the_lab_dns(lab):
    sent = lab.send("alice@sender.test", "bob@recipient.test", "independent check", "Verify me.\n")
    raw = lab.wait_for("bob@recipient.test", sent["message_id"])["raw"].encode()
    assert dkimpy.verify(raw, dnsfunc=lab_dnsfunc(lab))
    assert not dkimpy.verify(raw.replace(b"Verify me.", b"Verify m3."), dnsfunc=lab_dnsfunc(lab))


def test_the_lab_dns_publishes_spf_dkim_and_dmarc(lab):
    server = lab.config.dns_server

    def txt(name):
        return ["".join(re.findall(r'"([^"]*)"', rr["value"])) for rr in dig(name, "TXT", server=server)["answers"]]

    sender = lab.config.domain("sender.test")
    assert txt("sender.test") == [f"v=spf1 ip4:{sender.address} -all"]
    assert txt("_dmarc.sender.test") == ["v=DMARC1; p=reject"]
    assert txt("_dmarc.recipient.test") == ["v=DMARC1; p=quarantine"]
    assert txt("lab._domainkey.sender.test")[0].startswith("v=DKIM1; k=rsa; p=")
    assert txt("lab._domainkey.attacker.test")[0].startswith("v=DKIM1; k=ed25519; p=")


def test_forged_from_sent_from_attacker_address_is_rejected(lab):
    attacker = lab.config.domain("attacker.test").address
    sent = lab.send("alice@sender.test", "bob@recipient.test", "Urgent: new bank details", "Pay here.\n",
                    direct_mx=True, source_address=attacker)
    [r] = sent["recipients"]
    assert not sent["accepted"]
    assert (r["code"], r["status"]) == (550, "5.7.1")
    assert "DMARC policy of sender.test is reject" in r["text"]
    verdict = next(e for e in lab.trace() if e["event"] == "senderauth.verdict"
                   and e.get("message_id") == sent["message_id"])
    assert (verdict["spf"], verdict["dkim"], verdict["dmarc"]) == ("fail", ["none"], "fail")


def test_quarantine_policy_files_the_forgery_in_junk(lab):
    attacker = lab.config.domain("attacker.test").address
    sent = lab.send("bob@recipient.test", "alice@sender.test", "I am Bob, honest", "Click here.\n",
                    direct_mx=True, source_address=attacker)
    assert sent["accepted"]
    msg = lab.wait_for("alice@sender.test", sent["message_id"], folder="Junk")
    [ar] = auth_results(msg["raw"])
    assert authres.parse(ar)[1]["dmarc"] == "fail" and "p=quarantine dis=quarantine" in ar
    assert "X-Mailpipe-Folder" not in msg["raw"]  # the MDA removes the internal mark
    inbox = [m["message_id"] for m in lab.fetch("alice@sender.test")]
    assert sent["message_id"] not in inbox


def test_forged_authentication_results_are_stripped(lab):
    """A message sent from sender.test's own address (SPF passes) carries a forged
    Authentication-Results claiming the receiver: only the receiver's real one arrives."""
    message_id = f"<{uuid.uuid4().hex}@sender.test>"
    content = ("Authentication-Results: mx.recipient.test; spf=pass; dkim=pass; dmarc=pass\r\n"
               "Authentication-Results: recipient.test; dmarc=pass\r\n"
               "From: alice@sender.test\r\nTo: bob@recipient.test\r\nSubject: trust me\r\n"
               f"Message-ID: {message_id}\r\n\r\nAll checks passed, see above.\r\n")
    host, port = lab.endpoint("recipient.test", "smtp")
    source = lab.config.domain("sender.test").address
    with smtplib.SMTP(host, port, local_hostname="mx.sender.test", source_address=(source, 0), timeout=10) as s:
        s.sendmail("alice@sender.test", ["bob@recipient.test"], content.encode())
    msg = lab.wait_for("bob@recipient.test", message_id)
    [ar] = auth_results(msg["raw"])
    assert authres.parse(ar)[1] == {"spf": "pass", "dkim": "none", "dmarc": "pass"}
    assert "(signature verified)" not in ar
    stripped = next(e for e in lab.trace() if e["event"] == "senderauth.stripped"
                    and e.get("message_id") == message_id)
    assert stripped["authentication_results"] == 2


def test_lookalike_domain_passes_everything(lab):
    """attacker.test's own MTA relays and signs; relaxed alignment lets a subdomain pass."""
    attacker = lab.config.domain("attacker.test").address
    sent = lab.send("billing@attacker.test", "bob@recipient.test", "Invoice", "Pay here.\n",
                    header_from="Alice <alice@sender.test.attacker.test>",
                    direct_mx="attacker.test", source_address=attacker)
    assert sent["accepted"]
    msg = lab.wait_for("bob@recipient.test", sent["message_id"])
    [ar] = auth_results(msg["raw"])
    assert authres.parse(ar)[1] == {"spf": "pass", "dkim": "pass", "dmarc": "pass"}
    assert "header.a=ed25519-sha256" in ar


def test_no_dns_query_of_the_checks_goes_anywhere_but_the_lab_dns(lab):
    """Every question the receiving MTA traced was answered by the lab DNS server."""
    lab.send("alice@sender.test", "bob@recipient.test", "dns", "count my queries\n")
    events = lab.trace()
    asked = {(e["qtype"], e["qname"].lower()) for e in events
             if e["agent"] == "mta.recipient.test" and e["event"] == "dns.query"}
    served = {(e["qtype"], e["qname"].lower()) for e in events if e["agent"] == "dns" and e["event"] == "dns.query"}
    assert ("TXT", "_dmarc.sender.test") in asked and ("TXT", "lab._domainkey.sender.test") in asked
    assert asked <= served


def test_cli_send_direct_mx(lab):
    attacker = lab.config.domain("attacker.test").address
    out = subprocess.run(
        [sys.executable, "-m", "agents.cli", "--home", str(lab.home.root), "send", "--from", "alice@sender.test",
         "--to", "bob@recipient.test", "--subject", "cli forgery", "--direct-mx", "--source-address", attacker],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "550 5.7.1" in out.stdout


def test_a_lab_with_every_domain_switch_off_delivers_plain_unsigned_unchecked_mail(tmp_path_factory):
    """relay_tls, dkim_sign and check_sender_auth all false (agents.bench.bare_config, what
    ``benchmarks/pipeline.py --bare`` measures): the mail still arrives, but nothing on the
    way encrypted a relay hop, signed it or checked it. Submission keeps STARTTLS and AUTH."""
    from agents.bench import bare_config
    from support import make_lab, running

    bare = make_lab(tmp_path_factory, configure=bare_config)
    with running(bare):
        sent = bare.send("alice@sender.test", "bob@recipient.test", "bare", "Nothing on top.\n")
        raw = bare.wait_for("bob@recipient.test", sent["message_id"])["raw"]
        events = bare.trace()
    msg = email.message_from_string(raw, policy=email.policy.compat32)
    assert msg["DKIM-Signature"] is None and auth_results(raw) == []
    received = [" ".join(v.split()) for v in msg.get_all("Received")]
    assert any("by smtp.sender.test" in r and "with ESMTPSA" in r for r in received)  # submission: TLS+AUTH
    for by in ("mx.sender.test", "mx.recipient.test"):  # the two SMTP relay hops: no STARTTLS
        assert any(f"by {by}" in r and "with ESMTP " in r for r in received), received
    ours = [e for e in events if e.get("message_id") == sent["message_id"]]
    assert not [e for e in ours if e["event"] in ("dkim.sign", "spf.result", "dkim.result", "dmarc.result")]
    nokey = [e for e in events if e["event"] == "dkim.nokey" and e["agent"] == "mta.sender.test"]
    assert nokey and "dkim_sign = false" in nokey[0]["reason"]
