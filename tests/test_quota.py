"""A full mailbox holds up only its own recipient (RFC 2033 4.2, RFC 3463 X.2.2)."""

from __future__ import annotations

from dataclasses import replace

from support import make_lab, running

from agents.config import User
from agents.quota import Quotas, usage


def test_usage_reads_sizes_from_maildir_names(tmp_path):
    from agents.maildir import Maildir

    box = Maildir(tmp_path / "u")
    box.deliver(b"x" * 100)
    Maildir(tmp_path / "u" / ".Junk").deliver(b"y" * 50)
    assert usage(tmp_path / "u") == 150


def test_quota_limits_come_from_the_config():
    from agents.config import LabConfig

    config = replace(LabConfig.load(None), sections={"quota": {"default": 10, "carol@recipient.test": 5}})
    quotas = Quotas(config)
    assert quotas.limit("Carol@recipient.test") == 5 and quotas.limit("bob@recipient.test") == 10


def test_one_recipient_over_quota_does_not_hold_up_the_other(tmp_path_factory):
    base = make_lab(tmp_path_factory)
    config = replace(
        base.config,
        users=base.config.users + (User("carol@recipient.test", "carol-secret"),),
        sections={**base.config.sections, "quota": {"default": 0, "carol@recipient.test": 100}},
    )
    base.config = config
    with running(base) as lab:
        sent = lab.send("alice@sender.test", ["bob@recipient.test", "carol@recipient.test"], "two", "x\n")
        assert sent["accepted"]
        assert lab.wait_for("bob@recipient.test", sent["message_id"])["subject"] == "two"
        events = lab.trace()
        lmtp = [e for e in events if e["agent"] == "mta.recipient.test" and e["event"] == "deferred"
                and e.get("message_id") == sent["message_id"]]
        assert lmtp and lmtp[0]["rcpts"] == ["carol@recipient.test"] and lmtp[0]["code"] == 452
        assert lmtp[0]["status"] == "4.2.2"
        assert lab.fetch("carol@recipient.test") == []
