"""Hooks in a running lab: every event fires at the agents it belongs to, failures are contained."""

from __future__ import annotations

import json
import poplib
import smtplib
import ssl
import textwrap

import pytest

from agents.cli import main as mailpipe
from agents.config import LabConfig
from agents.lab import LabError
from support import make_lab, running

HOOKS = textwrap.dedent('''
    """Logs every event; adds a header at each DATA; fails on purpose now and then."""
    from agents.hooks import reject


    def on_connect(ctx, session):
        ctx.log("connect")

    def on_helo(ctx, session, hostname):
        ctx.log("helo")

    def on_auth(ctx, session, user):
        ctx.log("auth", user=user)
        if user.startswith("bob"):
            return reject("bob may not submit today")

    def on_mail(ctx, session, envelope, address):
        ctx.log("mail")

    def on_rcpt(ctx, session, envelope, address):
        if address.startswith("boom"):
            raise RuntimeError("a student's bug")
        ctx.log("rcpt")

    def on_data(ctx, session, envelope, message):
        ctx.log("data")
        message.add_header("X-Hooked-By", ctx.agent)

    def on_queued(ctx, item):
        ctx.log("queued", queue_id=item.queue_id)

    def on_before_relay(ctx, item, route):
        ctx.log("before_relay", hosts=[h for _p, h in route.hosts])

    def on_delivery_result(ctx, item, outcomes):
        ctx.log("delivery_result", codes=[o.code for o in outcomes])

    def on_stored(ctx, user, folder, message_id):
        ctx.log("stored", user=user, folder=folder, message_id=message_id)

    def on_fetched(ctx, user, uid, message_id):
        ctx.log("fetched", user=user, uid=uid, message_id=message_id)
''')

SMTP_EVENTS = {"connect", "helo", "mail", "rcpt", "data"}
EXPECTED = {
    "msa.sender.test": SMTP_EVENTS | {"auth", "queued", "before_relay", "delivery_result"},
    "mta.sender.test": SMTP_EVENTS | {"queued", "before_relay", "delivery_result"},
    "mta.recipient.test": SMTP_EVENTS | {"queued", "before_relay", "delivery_result"},
    "mda.recipient.test": SMTP_EVENTS | {"stored", "fetched"},
}


@pytest.fixture(scope="module")
def hooked_lab(tmp_path_factory):
    hook_file = tmp_path_factory.mktemp("hooks") / "every.py"
    hook_file.write_text(HOOKS)
    sections = {**LabConfig.load(None).sections, "hooks": {"all": [str(hook_file)]}}
    with running(make_lab(tmp_path_factory, sections=sections)) as lab:
        yield lab


def logged(lab, **match):
    return [e for e in lab.trace() if e["event"] == "hook.log" and all(e.get(k) == v for k, v in match.items())]


@pytest.fixture(scope="module")
def delivered(hooked_lab):
    sent = hooked_lab.send("alice@sender.test", "bob@recipient.test", "hooked", "Hello through the hooks\n")
    return sent, hooked_lab.wait_for("bob@recipient.test", sent["message_id"])


def test_every_event_fires_at_the_agents_where_it_applies(hooked_lab, delivered):
    sent, _message = delivered
    for agent, events in EXPECTED.items():
        seen = {e["text"] for e in logged(hooked_lab, agent=agent)}
        assert events <= seen, f"{agent} never ran {sorted(events - seen)}"
    assert not logged(hooked_lab, agent="msa.recipient.test", text="queued")  # not on this path
    stored = logged(hooked_lab, agent="mda.recipient.test", text="stored")
    assert stored[0]["user"] == "bob@recipient.test" and stored[0]["message_id"] == sent["message_id"]
    fetched = logged(hooked_lab, agent="mda.recipient.test", text="fetched", message_id=sent["message_id"])
    assert fetched and fetched[0]["user"] == "bob@recipient.test" and fetched[0]["uid"] >= 1
    relay = logged(hooked_lab, agent="mta.sender.test", text="before_relay")
    assert relay[0]["hosts"] == ["mx.recipient.test", "mx2.recipient.test"]


def test_data_hooks_add_headers_at_each_hop_and_dkim_still_passes(delivered):
    _sent, message = delivered
    raw = message["raw"]
    hooked_by = [line.split(":", 1)[1].strip() for line in raw.splitlines() if line.startswith("X-Hooked-By:")]
    # Newest on top: the MDA's, then the receiving MTA's, the sending MTA's, the MSA's.
    assert hooked_by == ["mda.recipient.test", "mta.recipient.test", "mta.sender.test", "msa.sender.test"]
    assert "dkim=pass" in raw  # the MSA's and sending MTA's headers were there before signing


def test_pop3_retr_fires_fetched_too(hooked_lab, delivered):
    host, port = hooked_lab.endpoint("recipient.test", "pop3")
    context = ssl.create_default_context(cafile=str(hooked_lab.home.ca_cert))
    context.check_hostname = False
    pop = poplib.POP3(host, port, timeout=10)
    try:
        pop.stls(context)
        pop.user("bob@recipient.test")
        pop.pass_("bob-secret")
        pop.retr(1)
    finally:
        pop.quit()
    assert any(e.get("uid") == 1 for e in logged(hooked_lab, agent="mda.recipient.test", text="fetched"))


def test_a_hook_that_raises_gives_451_is_traced_by_name_and_the_agent_goes_on(hooked_lab):
    with pytest.raises(LabError, match="451 4.3.0"):
        hooked_lab.send("alice@sender.test", "boom@recipient.test", "bug", "x\n")
    errors = [e for e in hooked_lab.trace() if e["event"] == "hook.error" and e["agent"] == "msa.sender.test"]
    assert errors and errors[-1]["hook"].endswith("every.py:on_rcpt") and "a student's bug" in errors[-1]["error"]
    assert "every.py:" in errors[-1]["where"]  # the file and line that raised
    assert hooked_lab.is_running("msa.sender.test")
    again = hooked_lab.send("alice@sender.test", "bob@recipient.test", "after the bug", "still here\n")
    assert again["accepted"]


def test_an_auth_hook_can_refuse_a_user_with_the_right_password(hooked_lab):
    host, port = hooked_lab.endpoint("recipient.test", "submission")
    context = ssl.create_default_context(cafile=str(hooked_lab.home.ca_cert))
    context.check_hostname = False
    with smtplib.SMTP(host, port, timeout=10) as client:
        client.starttls(context=context)
        with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
            client.login("bob@recipient.test", "bob-secret")
        assert refused.value.smtp_code == 535 and b"5.7.8 bob may not submit today" in refused.value.smtp_error


def test_hooks_list_shows_what_each_agent_loads(hooked_lab, capsys):
    assert mailpipe(["--config", str(hooked_lab.home.config_file), "hooks", "list", "--json"]) == 0
    listing = {a["agent"]: a for a in json.loads(capsys.readouterr().out)["agents"]}
    assert {h["event"] for h in listing["mda.recipient.test"]["hooks"]} == EXPECTED["mda.recipient.test"] | {
        "auth", "queued", "before_relay", "delivery_result"}
    assert all(not a["errors"] for a in listing.values())
