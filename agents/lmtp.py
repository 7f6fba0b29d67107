# -*- test-case-name: tests.test_lmtp -*-
"""LMTP, the Local Mail Transfer Protocol (RFC 2033), for the MDA.

LMTP is SMTP with two changes that matter to a final delivery agent:

* the client says ``LHLO`` instead of HELO/EHLO (RFC 2033 4.1), so nobody
  mistakes an LMTP listener for an SMTP one;
* after the final dot the server answers **once per accepted recipient**, in
  RCPT order (RFC 2033 4.2), so one mailbox being full does not bounce or
  retry the message for everybody else.

Everything else (framing, DATA state machine, pipelining order, limits) is the
hardened :class:`agents.smtpserver.SMTPServer`. There is no AUTH: LMTP runs
between trusted hops inside one site.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger

from agents.smtpserver import (
    LOCAL_ERROR,
    Envelope,
    Reply,
    ServerPolicy,
    SMTPHandler,
    SMTPServer,
    SMTPServerFactory,
)
from agents.trace import NULL_TRACER, Tracer

_log = Logger()


class LMTPServer(SMTPServer):
    """One LMTP connection. ``handle_DATA`` returns (a Deferred of) a list of
    replies, one per ``envelope.rcpt_tos`` entry; a single :class:`Reply` is
    taken to apply to every recipient."""

    COMMANDS = (SMTPServer.COMMANDS - {"HELO", "EHLO", "AUTH"}) | {"LHLO"}
    PROTOCOL_NAME = "LMTP"

    def do_LHLO(self, arg: bytes) -> None:
        self._hello(arg, esmtp=True, verb="LHLO")

    def _unknown_command(self, verb: str) -> Reply:
        if verb in ("HELO", "EHLO"):
            return Reply(500, "5.5.1", "This is LMTP: use LHLO (RFC 2033 4.1)")
        return super()._unknown_command(verb)

    def _data_reply_count(self, envelope: Envelope) -> int:
        return len(envelope.rcpt_tos)

    def _data_replies(self, outcome: Any, envelope: Envelope) -> list[Reply]:
        count = len(envelope.rcpt_tos)
        if isinstance(outcome, list):
            if len(outcome) == count and all(isinstance(r, Reply) for r in outcome):
                return [self._verdict(r, "handle_DATA", default=LOCAL_ERROR) for r in outcome]
            _log.error(
                "handle_DATA gave {got} replies for {count} recipients",
                got=len(outcome),
                count=count,
            )
            return [LOCAL_ERROR] * count
        return [self._verdict(outcome, "handle_DATA", default=LOCAL_ERROR)] * count


class LMTPServerFactory(SMTPServerFactory):
    """Builds :class:`LMTPServer` protocols; never offers AUTH (no portal)."""

    protocol = LMTPServer

    def __init__(self, policy: ServerPolicy, handler: SMTPHandler, tracer: Tracer = NULL_TRACER):
        super().__init__(policy, handler, portal=None, tracer=tracer)
