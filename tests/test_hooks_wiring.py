"""Where the hooks plug into the agents: AUTH, the router, the queue, loading, install (no sockets)."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest
from twisted.internet import defer, task

from agents.config import LabConfig
from agents.hooks import (
    CONTINUE, Hook, HookContext, HookedHandler, HookLoadError, HookRunner, MessageView, describe, entries_for,
    install_hooks, load_entry, reject, tempfail,
)
from agents.runtime import CannotStart
from agents.smtpserver import Reply, ServerPolicy, SMTPHandler
from test_mx import BACKUP, PRIMARY, router
from test_queue import MESSAGE, FakeTransport, make_queue
from test_smtpserver import RecordingTracer, auth_portal, codes, plain, talk, tls_session

ALICE = b"alice@lab.test"


def runner(event, function, **ctx_fields):
    trace = RecordingTracer()
    ctx = HookContext("msa.lab.test", "msa", "lab.test", clock=task.Clock().seconds, tracer=trace, **ctx_fields)
    return HookRunner([Hook(f"t:on_{event}", event, function)], ctx), trace


# -- AUTH: the handler may still refuse a user whose password was right ------------

class RefusingAuth(SMTPHandler):
    def __init__(self, reply):
        self.reply, self.asked = reply, []

    def handle_AUTH(self, session, user):
        self.asked.append(user)
        return self.reply


def auth(handler, tracer=None):
    policy = ServerPolicy(hostname="smtp.lab.test", tls_context=object(), require_auth=True)
    proto, t, _ = tls_session(policy=policy, handler=handler, portal=auth_portal(), tracer=tracer)
    lines = talk(proto, t, b"AUTH PLAIN " + plain(ALICE, b"s3cret") + b"\r\n")
    return proto, t, lines


def test_handle_auth_refusal_is_sent_and_the_session_stays_unauthenticated():
    handler = RefusingAuth(Reply(535, "5.7.8", "Not you, not today"))
    tracer = RecordingTracer()
    proto, t, lines = auth(handler, tracer)
    assert lines == [b"535 5.7.8 Not you, not today"] and handler.asked == ["alice@lab.test"]
    assert proto.session.user is None
    assert codes(talk(proto, t, b"MAIL FROM:<alice@lab.test>\r\n")) == [530]
    assert tracer.first("auth.result")["refused_by"] == "handler"
    # The client may try again, and a handler that says yes logs it in.
    handler.reply = None
    assert talk(proto, t, b"AUTH PLAIN " + plain(ALICE, b"s3cret") + b"\r\n") == [b"235 2.7.0 Authentication successful"]
    assert proto.session.user == "alice@lab.test"


def test_a_handle_auth_that_raises_is_a_temporary_failure_not_a_login():
    class Broken(SMTPHandler):
        def handle_AUTH(self, session, user):
            raise RuntimeError("bug")

    proto, _t, lines = auth(Broken())
    assert codes(lines) == [451] and proto.session.user is None


@pytest.mark.parametrize("verdict, expected", [
    (reject("You are suspended"), [b"535 5.7.8 You are suspended"]),
    (tempfail("Directory is down"), [b"454 4.7.0 Directory is down"]),
    (CONTINUE, [b"235 2.7.0 Authentication successful"]),
])
def test_auth_hook_verdicts_use_rfc_4954_codes(verdict, expected):
    run, _trace = runner("auth", lambda ctx, session, user: verdict)
    proto, _t, lines = auth(HookedHandler(SMTPHandler(), run))
    assert lines == expected
    assert (proto.session.user is not None) == (verdict == CONTINUE)


def test_a_raising_auth_hook_is_contained_and_named_in_the_trace():
    def on_auth(ctx, session, user):
        raise KeyError(user)

    run, trace = runner("auth", on_auth)
    proto, _t, lines = auth(HookedHandler(SMTPHandler(), run))
    assert codes(lines) == [454] and proto.session.user is None
    assert trace.first("hook.error")["hook"] == "t:on_auth"


# -- before_relay: the route is the hook's to change ----------------------------------

ITEM = SimpleNamespace(queue_id="Q1", message_id="<m@x>", mail_from="alice@sender.test", pending=[])


def relay(hook, answers=None):
    r = router(answers=answers)
    r.hooks, _trace = runner("before_relay", hook)
    outcomes = r.by_mx("recipient.test", ITEM, ["bob@recipient.test"], b"x").result
    return r, [(o.code, o.status) for o in outcomes]


def test_before_relay_sees_the_mx_hosts_and_may_reorder_them():
    seen = []

    def on_before_relay(ctx, item, route):
        seen.append((route.domain, list(route.recipients), list(route.hosts)))
        route.hosts.reverse()

    r, outcomes = relay(on_before_relay)
    assert seen == [("recipient.test", ["bob@recipient.test"], [(10, "mx.recipient.test"), (20, "mx2.recipient.test")])]
    assert r.tried == [BACKUP] and outcomes == [(250, "2.0.0")]


def test_before_relay_may_replace_the_hosts_and_new_ones_are_looked_up():
    def on_before_relay(ctx, item, route):
        route.hosts[:] = [(5, "mx.other.test")]

    r, _outcomes = relay(on_before_relay)
    assert r.tried == ["127.0.6.1"]


@pytest.mark.parametrize("verdict, expected", [
    (reject("no relaying to them", 554, "5.7.1"), (554, "5.7.1")),
    (tempfail("later", 451, "4.4.5"), (451, "4.4.5")),
])
def test_a_before_relay_refusal_is_every_recipients_outcome(verdict, expected):
    r, outcomes = relay(lambda ctx, item, route: verdict)
    assert outcomes == [expected] and r.tried == []


def test_a_raising_before_relay_hook_keeps_the_message_queued():
    def on_before_relay(ctx, item, route):
        raise ValueError("oops")

    r, outcomes = relay(on_before_relay)
    assert outcomes == [(451, "4.3.0")] and r.tried == []


def test_before_relay_on_the_own_domain_route_uses_the_hooks_first_host():
    seen = []

    def on_before_relay(ctx, item, route):
        seen.append((route.domain, list(route.hosts)))
        route.hosts[0] = (0, "mx2.recipient.test")

    r = router()
    r.hooks, _ = runner("before_relay", on_before_relay)
    r.to_own_mta(ITEM, ["bob@recipient.test"], b"x")  # the MSA's route: its own MTA
    assert seen == [("sender.test", [(0, "mx.sender.test")])] and r.tried == [BACKUP]


def test_without_before_relay_hooks_the_router_is_unchanged():
    r, outcomes = relay(lambda ctx, item, route: None)
    assert r.tried == [PRIMARY] and outcomes == [(250, "2.0.0")]


# -- the queue tells queued and delivery_result hooks -----------------------------------

def test_queue_reports_each_spooled_message_and_each_attempt(tmp_path):
    seen = []
    trace = RecordingTracer()
    ctx = HookContext("mta.x.test", "mta", "x.test", tracer=trace)
    hooks = HookRunner([
        Hook("t:on_queued", "queued", lambda ctx, item: seen.append(("queued", item.queue_id, item.mail_from))),
        Hook("t:on_delivery_result", "delivery_result",
             lambda ctx, item, outcomes: seen.append(("result", [(o.address, o.code) for o in outcomes]))),
    ], ctx)
    q, _spool, clock = make_queue(tmp_path, FakeTransport({"c@y.test": 451}, {}), hooks=hooks)
    qids = []
    q.accept("a@x.test", ["b@y.test", "c@y.test"], MESSAGE).addCallback(qids.append)
    clock.advance(0)
    clock.advance(15)
    assert seen == [("queued", qids[0], "a@x.test"),
                    ("result", [("b@y.test", 250), ("c@y.test", 451)]),
                    ("result", [("c@y.test", 250)])]


def test_an_observe_only_hook_that_raises_does_not_disturb_the_queue(tmp_path):
    def on_delivery_result(ctx, item, outcomes):
        raise RuntimeError("student bug")

    hooks, trace = runner("delivery_result", on_delivery_result)
    q, spool, clock = make_queue(tmp_path, FakeTransport({}), hooks=hooks)
    q.accept("a@x.test", ["b@y.test"], MESSAGE)
    clock.advance(0)
    assert q.stats["delivered"] == 1 and list(spool.queue.iterdir()) == []
    assert trace.first("hook.error")["hook_event"] == "delivery_result"


# -- the hook context --------------------------------------------------------------------

def test_each_run_gets_its_own_notes_even_across_an_await():
    waiting = defer.Deferred()
    seen = []

    async def on_mail(ctx, session, envelope, address):
        if address == "first@x.test":
            await waiting
        seen.append((address, ctx.notes["who"]))

    run, _ = runner("mail", on_mail)
    run.run("mail", None, None, "first@x.test", notes={"who": "first"})
    run.run("mail", None, None, "second@x.test", notes={"who": "second"})
    waiting.callback(None)
    assert seen == [("second@x.test", "second"), ("first@x.test", "first")]


def test_set_body_adds_a_footer_with_crlf_line_ends():
    view = MessageView(b"Subject: x\r\n\r\nHello\r\n")
    view.set_body(view.body + b"-- \nfooter")
    assert view.final_content() == b"Subject: x\r\n\r\nHello\r\n-- \r\nfooter\r\n"
    view = MessageView(b"Subject: x\r\n\r\nHello\r\n")
    view.body += b"bare\nlf\n"  # assigned directly: line ends are fixed on the way out
    assert view.final_content() == b"Subject: x\r\n\r\nHello\r\nbare\r\nlf\r\n"
    untouched = MessageView(b"Subject: x\r\n\r\nno final newline")
    assert untouched.final_content() == b"Subject: x\r\n\r\nno final newline"


# -- loading and installing ------------------------------------------------------------------

HOOK_FILE = "def on_rcpt(ctx, s, e, a):\n    return None\n\ndef on_mail(ctx, s, e, a):\n    return None\n"


def test_an_entry_may_name_one_function_of_a_file_or_a_whole_directory(tmp_path):
    (tmp_path / "mine.py").write_text(HOOK_FILE)
    (tmp_path / "other.py").write_text("def on_data(ctx, s, e, m):\n    pass\n")
    assert [h.event for h in load_entry(f"{tmp_path}/mine.py:on_rcpt")] == ["rcpt"]
    assert sorted(h.event for h in load_entry(str(tmp_path))) == ["data", "mail", "rcpt"]


def test_load_errors_name_the_entry_and_where_the_problem_is(tmp_path):
    (tmp_path / "broken.py").write_text("def on_rcpt(ctx, s, e, a)\n    return None\n")
    with pytest.raises(HookLoadError, match=r"broken.py.*SyntaxError.*line 1"):
        load_entry(str(tmp_path / "broken.py"))
    with pytest.raises(HookLoadError, match="no such file"):
        load_entry(str(tmp_path / "missing.py"))
    with pytest.raises(HookLoadError, match="not a hook"):
        load_entry("agents.hooks:accept")  # a function, but not called on_<event>


def with_hooks_config(table: dict) -> LabConfig:
    config = LabConfig.load(None)
    return dataclasses.replace(config, sections={**config.sections, "hooks": table})


def test_describe_lists_each_agents_hooks_and_load_errors(tmp_path):
    (tmp_path / "mine.py").write_text(HOOK_FILE)
    config = with_hooks_config({"msa": [str(tmp_path / "mine.py")], "mta.recipient.test": ["nope.nothing:on_rcpt"]})
    by_agent = {a["agent"]: a for a in describe(config)}
    assert sorted(h["event"] for h in by_agent["msa.sender.test"]["hooks"]) == ["mail", "rcpt"]
    assert by_agent["mta.recipient.test"]["errors"][0]["entry"] == "nope.nothing:on_rcpt"
    assert not by_agent["mda.sender.test"]["hooks"] and "dns" not in by_agent


def fake_agent(config, name, tmp_path):
    return SimpleNamespace(config=config, spec=config.agent(name), home=SimpleNamespace(root=tmp_path),
                           reactor=task.Clock(), tracer=RecordingTracer(), resolver=lambda: "a resolver")


def test_install_hooks_builds_one_runner_per_agent_with_the_lab_settings(tmp_path):
    (tmp_path / "mine.py").write_text(HOOK_FILE)
    config = with_hooks_config({"mta": [str(tmp_path / "mine.py")], "settings": {"greylist_delay": 2}})
    ctx = fake_agent(config, "mta.recipient.test", tmp_path)
    run = install_hooks(ctx)
    assert ctx.hooks is run and run.active("rcpt") and run.active("mail")
    assert run.ctx.settings == {"greylist_delay": 2} and run.ctx.data_dir == tmp_path / "hooks"
    assert run.ctx.data_dir.is_dir() and run.ctx.resolver == "a resolver" and run.ctx.clock() == 0
    other = fake_agent(config, "msa.sender.test", tmp_path)
    assert install_hooks(other) is None and other.hooks is None


def test_an_agent_with_a_broken_hook_file_does_not_start(tmp_path):
    (tmp_path / "broken.py").write_text("import no_such_module_here\n")
    ctx = fake_agent(with_hooks_config({"all": [str(tmp_path / "broken.py")]}), "mda.sender.test", tmp_path)
    with pytest.raises(CannotStart, match="no_such_module_here"):
        install_hooks(ctx)



# -- the reference docs: one runnable example per event ----------------------------------------

def example_arguments(event, tmp_path):
    from agents.grading.core import envelope, session
    from agents.hooks import Route
    from agents.queue import Outcome

    item = SimpleNamespace(queue_id="Q1", mail_from="alice@sender.test", recipients=["bob@recipient.test"],
                           pending=["bob@recipient.test"], message_id="<m@x>", attempts=1, received_at=0.0)
    s, e = session(peer="203.0.113.5"), envelope()
    return {
        "connect": (s,), "helo": (s, "localhost"), "auth": (s, "alice@sender.test"),
        "mail": (s, e, "alice@sender.test"), "rcpt": (s, e, "bob@recipient.test"),
        "data": (s, e, MessageView(b"Received: x\r\nSubject: hi\r\n\r\nbody\r\n")),
        "queued": (item,), "before_relay": (item, Route("recipient.test", ["bob@recipient.test"], [(10, "a"), (20, "b")])),
        "delivery_result": (item, [Outcome("bob@recipient.test", 550, "5.1.1", "no")]),
        "stored": ("bob@recipient.test", "Junk", "<m@x>"), "fetched": ("bob@recipient.test", 1, "<m@x>"),
    }[event]


def test_every_event_has_a_short_example_in_docs_hooks_md_that_runs(tmp_path):
    from agents.hooks import EVENTS

    text = (Path(__file__).resolve().parent.parent / "docs" / "hooks.md").read_text()
    parts = re.split(r"^### `(\w+)`", text, flags=re.M)
    documented = dict(zip(parts[1::2], parts[2::2]))
    assert set(documented) == set(EVENTS)
    for event, section in documented.items():
        assert "**When:**" in section and "**Sees:**" in section, event
        code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
        assert len(code.strip().splitlines()) <= 6, f"{event}: the example should be about five lines"
        namespace = {}
        exec("from agents.hooks import CONTINUE, accept, reject, tempfail\n" + code, namespace)
        trace = RecordingTracer()
        ctx = HookContext("mta.recipient.test", "mta", "recipient.test", clock=task.Clock().seconds,
                          tracer=trace, data_dir=tmp_path)
        d = HookRunner([Hook(f"docs:on_{event}", event, namespace[f"on_{event}"])], ctx).run(
            event, *example_arguments(event, tmp_path))
        assert d.called and not [f for name, f in trace.events if name == "hook.error"], (event, trace.events)


def test_a_hooks_table_keyed_by_agent_name_survives_the_trip_to_the_agents():
    """The lab hands its config to the agents as TOML: "mta.recipient.test" is one key, not three."""
    config = with_hooks_config({"mta.recipient.test": ["/x/grey.py"], "all": ["m.n:on_rcpt"],
                                "settings": {"greylist_delay": 0.5, "odd.key": "v"}})
    back = LabConfig.from_dict(tomllib.loads(config.to_toml()))
    assert back.section("hooks") == config.section("hooks")
    assert [e for _k, e in entries_for(back, back.agent("mta.recipient.test"))] == ["m.n:on_rcpt", "/x/grey.py"]
