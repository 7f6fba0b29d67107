"""The trace writer: valid JSON Lines, bound fields, masked secrets, batched writes."""

import json

from twisted.internet import task

from agents.trace import Tracer, read_events


def lines(path):
    return [json.loads(l) for l in path.read_text().splitlines()]


def test_events_are_json_lines_with_the_agent_fields(tmp_path):
    tracer = Tracer(tmp_path / "a.jsonl", "mta.x.test", "mta", "x.test")
    tracer.event("smtp.mail", sender='odd "quoted" <é@x.test>', size=12, nothing=None)
    tracer.line("c1", "C", b"MAIL FROM:<\xc3\xa9@x.test>\\", peer="127.0.0.1:1")
    first, second = lines(tmp_path / "a.jsonl")
    assert first["agent"] == "mta.x.test" and first["role"] == "mta" and first["domain"] == "x.test"
    assert first["event"] == "smtp.mail" and first["sender"] == 'odd "quoted" <é@x.test>'
    assert first["size"] == 12 and "nothing" not in first
    assert isinstance(first["ts"], int) and first["ts"] <= second["ts"]
    assert second == {**second, "event": "line", "conn": "c1", "dir": "C",
                      "line": "MAIL FROM:<é@x.test>\\", "peer": "127.0.0.1:1"}


def test_bound_fields_reach_every_event_and_the_event_wins(tmp_path):
    tracer = Tracer(tmp_path / "a.jsonl", "a", "mta", None)
    bound = tracer.bind(queue_id="Q1", message_id="<m@x>", unused=None)
    bound.event("relay.done", code=250)
    bound.line("c", "S", b"250 ok")
    bound.event("relay.done", queue_id="Q2")
    tracer.event("plain")
    a, b, c, d = lines(tmp_path / "a.jsonl")
    assert a["queue_id"] == b["queue_id"] == "Q1" and a["message_id"] == "<m@x>"
    assert "unused" not in a and a["code"] == 250
    assert c["queue_id"] == "Q2"  # the event's own field overrides the bound one
    assert "queue_id" not in d


def test_secrets_are_masked(tmp_path):
    tracer = Tracer(tmp_path / "a.jsonl", "a", "msa", None)
    tracer.line("c", "C", b"AUTH PLAIN AGFsaWNlAHNlY3JldA==")
    tracer.line("c", "C", b"a1 LOGIN bob hunter2")
    tracer.line("c", "C", b"PASS hunter2")
    text = (tmp_path / "a.jsonl").read_text()
    assert "AGFsaWNl" not in text and "hunter2" not in text
    assert [e["line"] for e in lines(tmp_path / "a.jsonl")] == ["AUTH PLAIN ***", "a1 LOGIN bob ***", "PASS ***"]


def test_with_a_scheduler_one_reactor_turn_is_one_write(tmp_path):
    clock = task.Clock()
    path = tmp_path / "a.jsonl"
    tracer = Tracer(path, "a", "mta", None, scheduler=clock.callLater)
    bound = tracer.bind(queue_id="Q")
    tracer.event("one")
    bound.event("two")  # a bound copy shares the batch
    assert path.read_text() == ""
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(0)
    assert [e["event"] for e in read_events(tmp_path)] == ["one", "two"]
    tracer.event("three")
    tracer.close()  # closing writes what is pending
    assert [e["event"] for e in read_events(tmp_path)] == ["one", "two", "three"]


def test_read_events_can_skip_lines_without_a_text_unparsed(tmp_path):
    tracer = Tracer(tmp_path / "a.jsonl", "a", "mta", None)
    tracer.event("dequeued", message_id="<m1@x.test>")
    tracer.event("dequeued", message_id="<m2@x.test>")
    tracer.event("relay.connected", conn="a/1/1")
    with (tmp_path / "a.jsonl").open("a") as f:
        f.write("not json, and no Message-ID\n")
    tracer.close()
    assert [e["message_id"] for e in read_events(tmp_path, containing="<m2@")] == ["<m2@x.test>"]
    assert len(list(read_events(tmp_path))) == 3  # the broken line is skipped either way


def test_a_disabled_tracer_writes_nothing(tmp_path):
    tracer = Tracer(None, "a", "mta", None)
    tracer.event("x")
    tracer.line("c", "C", b"HELO")
    tracer.bind(q=1).event("y")
    assert list(tmp_path.iterdir()) == []


def test_odd_values_still_make_valid_json(tmp_path):
    from pathlib import PurePath

    tracer = Tracer(tmp_path / "a.jsonl", "a", "mta", None)
    tracer.event("x", ok=True, ratio=0.5, hosts=["a", "b"], path=PurePath("/tmp/q"), nested={"k": 1})
    tracer.line(None, "S", b"220 ready", peer=("127.0.0.1", 25))
    x, line = lines(tmp_path / "a.jsonl")
    assert x["ok"] is True and x["ratio"] == 0.5 and x["hosts"] == ["a", "b"]
    assert x["path"] == "/tmp/q" and x["nested"] == {"k": 1}
    assert "conn" not in line and line["peer"] == ["127.0.0.1", 25]


def test_field_values_are_written_exactly_as_json_writes_them():
    """The shortcuts for common kinds must give json's own text, byte for byte."""
    import json

    from agents.trace import _json_value

    values = ["caf\u00e9 \"q\"\n", "", 0, -7, 2**70, 0.0, -1.5, 1e-7, 12.345, 1e22, float("nan"),
              float("inf"), True, False, [], ["a", "b\u00fc"], ["a", 1], [["x"]], {"k": [1.5]}]
    for value in values:
        assert _json_value(value) == json.dumps(value), value


def test_working_for_tags_lookups_across_yields_and_not_beyond(tmp_path):
    """A lookup started inside ``working_for`` keeps the tag when its answer comes
    later, from outside the block; one started after the block has none."""
    from twisted.internet import defer
    from twisted.names import dns

    from agents.resolver import LabResolver
    from agents.trace import work_fields, working_for

    tracer = Tracer(tmp_path / "t.jsonl", "mta.x.test", "mta", "x.test")
    resolver = LabResolver(("127.0.0.1", 53), reactor=task.Clock(), tracer=tracer)
    answers = []

    def lookup_mx(name):
        answers.append(defer.Deferred())
        return answers[-1]

    resolver._resolver.lookupMailExchange = lookup_mx
    with working_for(queue_id="Q1"):
        with working_for(conn="c7"):
            assert work_fields() == {"queue_id": "Q1", "conn": "c7"}
        first = resolver.lookup_mx("a.test")
    assert work_fields() == {}
    second = resolver.lookup_mx("b.test")
    for d, name in zip(answers, ("a.test", "b.test")):
        record = dns.RRHeader(name=name, type=dns.MX, ttl=60, payload=dns.Record_MX(10, f"mx.{name}"))
        d.callback(([record], [], []))  # as the reactor would, outside any block
    assert first.result == [(10, "mx.a.test")] and second.result == [(10, "mx.b.test")]
    events = [(e["event"], e["qname"], e.get("queue_id")) for e in lines(tmp_path / "t.jsonl")]
    assert events == [("dns.query", "a.test", "Q1"), ("dns.query", "b.test", None),
                      ("dns.answer", "a.test", "Q1"), ("dns.answer", "b.test", None)]
