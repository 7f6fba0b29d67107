"""Property-based fuzzing (hypothesis) of the SMTP command parser and the DATA reader.

Two properties keep client and server in step, whatever the bytes:

* **Command mode:** every line the client ends with LF gets exactly one
  final reply, in order, so a ``NOOP`` sent afterwards is answered by the
  very next reply. No input can make the server skip a line, answer twice,
  or start reading a message.
* **BDAT** (RFC 3030): the server reads exactly the octets each ``BDAT
  <size>`` announces, whatever they hold, whether or not it takes the
  chunk; the line after the last chunk is a command again.
* **DATA mode:** only ``CRLF . CRLF`` ends a message. Whatever comes before
  it (bare CR or LF, fake terminators, over-long lines, whole SMTP commands)
  the message gets exactly one verdict, the handler sees at most one
  message with exactly the expected content, and a command pipelined right
  behind the final dot is answered as a command.

The inputs are fed in randomly cut pieces, as TCP may deliver them.
Protocol level (StringTransport), so 200 examples take about a second.
"""

from __future__ import annotations

import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agents.smtpserver import Reply, ServerPolicy
from test_smtpserver import RecordingHandler, connect, ehlo

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
REPLY_LINE = re.compile(rb"\A[2-5]\d\d[ -]")

VERBS = [b"EHLO", b"HELO", b"MAIL", b"RCPT", b"DATA", b"RSET", b"NOOP", b"VRFY", b"EXPN", b"HELP",
         b"STARTTLS", b"AUTH", b"BDAT", b"mail", b"Rcpt", b"X"]  # fmt: skip
ARGS = [b"FROM:<a@b.test>", b"TO:<c@lab.test>", b"FROM:<>", b"TO:<@a.test:b@c.test>", b"TO:<a%b@c.test>",
        b"FROM:<a@b.test> SIZE=99999999999", b"FROM:<a@b.test> BODY=8BITMIME", b"client.test", b"PLAIN",
        b"PLAIN AGEAYg==", b"TO:<\"a@b\"@c.test>", b"<>", b":", b"\x00", b"\r", b"\xff\xfe", b" " * 10,
        b"x" * 600]  # fmt: skip


def feed(proto, transport, stream: bytes, cuts: list[int]) -> bytes:
    """Deliver ``stream`` in pieces cut at ``cuts``; return everything the server wrote."""
    transport.clear()
    start = 0
    for cut in sorted(set(cuts)) + [len(stream)]:
        if cut > start:
            proto.dataReceived(stream[start:cut])
            start = cut
    return transport.value()


def final_replies(output: bytes) -> list[bytes]:
    """The last line of each complete reply (RFC 5321 4.2.1: ``code SP text``)."""
    lines = output.split(b"\r\n")
    assert lines[-1] == b"", f"a reply line without CRLF: {lines[-1]!r}"
    for line in lines[:-1]:
        assert REPLY_LINE.match(line), f"not a reply line: {line!r}"
    return [line for line in lines[:-1] if line[3:4] == b" "]


# ---------------------------------------------------------------------------
# The command parser

command_line = st.one_of(
    st.tuples(st.sampled_from(VERBS), st.sampled_from([b"", b" ", b"  "]),
              st.one_of(st.sampled_from(ARGS), st.binary(max_size=40))).map(b"".join),  # fmt: skip
    st.binary(max_size=60),
)
line_end = st.sampled_from([b"\r\n", b"\n", b"\r\r\n"])


@FUZZ
@given(lines=st.lists(st.tuples(command_line, line_end).map(b"".join), max_size=25), data=st.data())
def test_command_parser_answers_every_line_exactly_once(lines, data):
    stream = b"".join(lines)
    # QUIT would end the session early, and BDAT makes the next octets data
    # (the property below); everything else must be answered.
    if any(line.strip().upper().startswith((b"QUIT", b"BDAT")) for line in stream.split(b"\n")):
        return
    # Recipients are refused, so DATA can never open a message here.
    handler = RecordingHandler(RCPT=Reply(550, "5.1.1", "no such user"))
    proto, transport, _ = connect(ServerPolicy(hostname="mx.lab.test"), handler=handler)
    transport.clear()
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=8))
    output = feed(proto, transport, stream + b"NOOP\r\n", cuts)
    replies = final_replies(output)
    assert len(replies) == stream.count(b"\n") + 1, (stream, replies)
    assert replies[-1] == b"250 2.0.0 OK"
    assert not handler.delivered and not transport.disconnecting


# ---------------------------------------------------------------------------
# The DATA reader

FRAGMENTS = [b"\r\n", b"\n", b"\r", b".", b"..", b"x", b" ", b"\x00", b"\xe9",
             b"MAIL FROM:<smuggler@evil.test>", b"RCPT TO:<victim@lab.test>", b"DATA", b"QUIT", b"RSET",
             b"\n.\n", b"\r.\r", b"\r\n.\r", b"\n.\r\n", b"\r.\r\n", b"\r\n.\n", b"y" * 999]  # fmt: skip
body_strategy = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.binary(max_size=12)), max_size=40).map(b"".join)


def without_terminator(body: bytes) -> bytes:
    """Dot-stuff every ``CRLF . CRLF`` (also one right after DATA), so only ours ends the data."""
    text = b"\r\n" + body
    while b"\r\n.\r\n" in text:
        text = text.replace(b"\r\n.\r\n", b"\r\n..\r\n")
    return text[2:]


def expected(body: bytes, max_line: int = 1000) -> bytes | None:
    """What a correct reader delivers for ``body`` + CRLF.CRLF, or None if it must refuse it."""
    lines = body.split(b"\r\n")[:-1]  # body ends with CRLF
    out = []
    for line in lines:
        if b"\r" in line or b"\n" in line:
            return None  # bare CR or LF (RFC 5321 2.3.8)
        text = line[1:] if line.startswith(b".") else line  # RFC 5321 4.5.2
        if len(text) + 2 > max_line:
            return None  # RFC 5321 4.5.3.1.6
        out.append(text + b"\r\n")
    return b"".join(out)


@FUZZ
@given(raw=body_strategy, data=st.data())
def test_data_reader_never_desyncs_and_never_takes_a_second_message(raw, data):
    body = without_terminator(raw if raw.endswith(b"\r\n") else raw + b"\r\n")
    handler = RecordingHandler()
    proto, transport, _ = connect(ServerPolicy(hostname="mx.lab.test"), handler=handler)
    ehlo(proto, transport)
    start = b"MAIL FROM:<alice@sender.test>\r\nRCPT TO:<bob@lab.test>\r\nDATA\r\n"
    stream = start + body + b".\r\nNOOP\r\n"
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=10))
    replies = final_replies(feed(proto, transport, stream, cuts))

    assert [r[:3] for r in replies[:3]] == [b"250", b"250", b"354"]
    assert len(replies) == 5, replies  # MAIL, RCPT, 354, the one verdict, NOOP
    check_one_message(handler, verdict=replies[3], noop=replies[4], want=expected(body))


def check_one_message(handler, verdict: bytes, noop: bytes, want: bytes | None) -> None:
    """One transaction, one verdict; the message kept exactly (``want``) or refused."""
    assert noop == b"250 2.0.0 OK", "the command after the message was not read as a command"
    assert len(handler.called("MAIL")) == 1 and len(handler.called("RCPT")) == 1, "a smuggled command ran"
    if want is None:
        assert verdict[:9] in (b"554 5.6.0", b"500 5.5.2"), verdict
        assert handler.delivered == []
    else:
        assert verdict.startswith(b"250 "), verdict
        assert handler.delivered == [want]


def read_data(stream: bytes, cuts: list[int], max_size: int, max_line: int, fast: bool):
    """Run a MessageReader over ``stream`` arriving in pieces, as SMTPServer._drain does."""
    from agents.smtpserver import MessageReader

    reader = MessageReader(max_size, max_line)
    buffer, done = bytearray(), False
    for piece in [stream[a:b] for a, b in zip([0, *sorted(cuts)], [*sorted(cuts), len(stream)])]:
        buffer += piece
        while not done:
            if fast:
                used, done = reader.feed_block(buffer)
                if used:
                    del buffer[:used]
                    continue
            end = buffer.find(b"\n")
            if end < 0:
                break
            line = bytes(buffer[: end + 1])
            del buffer[: end + 1]
            done = reader.feed(line)
    return done, reader.state, reader.size, reader.content(), bytes(buffer)


@FUZZ
@given(raw=body_strategy, data=st.data())
def test_the_block_fast_path_reads_exactly_what_the_line_reader_reads(raw, data):
    """feed_block is only a shortcut: same end, same verdict, same size, same bytes left over."""
    stream = raw + data.draw(st.sampled_from([b".\r\nNOOP\r\n", b"\r\n.\r\nQUIT\r\n", b""]))
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=8))
    max_size = data.draw(st.sampled_from([10 ** 6, 200, 40, 3]))
    max_line = data.draw(st.sampled_from([1000, 20, 5]))
    assert read_data(stream, cuts, max_size, max_line, fast=True) == \
        read_data(stream, cuts, max_size, max_line, fast=False)


# ---------------------------------------------------------------------------
# BDAT chunks


def expected_chunked(body: bytes, max_line: int = 1000) -> bytes | None:
    """What a correct server keeps of a message sent by BDAT, or None if it must refuse it."""
    text = body if not body or body.endswith(b"\r\n") else body + b"\r\n"
    lines = text.split(b"\r\n")[:-1]
    if any(b"\r" in line or b"\n" in line or len(line) + 2 > max_line for line in lines):
        return None
    return text


@FUZZ
@given(body=body_strategy, data=st.data())
def test_bdat_reads_exactly_the_announced_octets(body, data):
    """Any bytes (fake terminators, whole commands) cut into chunks of any sizes,
    sent in one pipelined stream cut anywhere by TCP: one 250 per chunk, one
    verdict for LAST, the message exactly as sent, and the NOOP after it read
    as a command. No dot-stuffing happens in either direction."""
    handler = RecordingHandler()
    proto, transport, _ = connect(ServerPolicy(hostname="mx.lab.test"), handler=handler)
    ehlo(proto, transport)
    bounds = sorted(set(data.draw(st.lists(st.integers(0, len(body)), max_size=4))))
    pieces = [body[a:b] for a, b in zip([0, *bounds], [*bounds, len(body)])]
    stream = b"MAIL FROM:<alice@sender.test>\r\nRCPT TO:<bob@lab.test>\r\n"
    for i, piece in enumerate(pieces):
        last = b" LAST" if i == len(pieces) - 1 else b""
        stream += b"BDAT %d%s\r\n" % (len(piece), last) + piece
    stream += b"NOOP\r\n"
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=10))
    replies = final_replies(feed(proto, transport, stream, cuts))

    assert len(replies) == 2 + len(pieces) + 1, replies
    assert [r[:3] for r in replies[:2]] == [b"250", b"250"]
    assert all(r.startswith(b"250 2.0.0 ") and r.endswith(b"octets received") for r in replies[2:-2])
    check_one_message(handler, verdict=replies[-2], noop=replies[-1], want=expected_chunked(body))
    assert not transport.disconnecting
