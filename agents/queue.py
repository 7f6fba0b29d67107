"""The delivery queue: try, retry with backoff, give up with a bounce.

A queueing agent (the MSA, each MTA) hands every accepted message to a
:class:`DeliveryQueue`. The queue

1. writes it to the :class:`~agents.spool.Spool` before the 250 goes out;
2. tries to deliver it at once through the agent's ``transport`` (a function
   that returns one result per recipient);
3. keeps the recipients that failed temporarily (4xx, refused connection, DNS
   timeout) and retries them later, waiting twice as long each time (with
   jitter, so queued messages do not all retry in the same second) up to a
   maximum, as RFC 5321 4.5.4.1 recommends;
4. bounces the ones that failed permanently (5xx), or that are still not
   delivered when the queue lifetime is over, with a delivery status
   notification to the sender (RFC 3464, see :mod:`agents.dsn`). A message
   from the null sender ``<>`` is itself a bounce and is never bounced
   (RFC 5321 4.5.5), only dropped with a trace event.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Callable

from twisted.internet import defer, threads
from twisted.python import log

from .spool import QueuedMessage, Spool, new_queue_id
from .trace import NULL_TRACER


@dataclass
class Outcome:
    """What happened to one recipient in one delivery attempt."""

    address: str
    code: int
    status: str
    text: str

    @property
    def delivered(self) -> bool:
        return 200 <= self.code < 300

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    @classmethod
    def from_error(cls, address: str, error: BaseException) -> "Outcome":
        """The outcome for a recipient whose whole delivery attempt failed.

        Only an error that says it is permanent (a 5xx from the server) is;
        anything else (refused connection, timeout, TLS failure) is retried.
        """
        permanent = bool(getattr(error, "permanent", False))
        code = getattr(error, "code", None) or (550 if permanent else 451)
        if not permanent and code >= 500:
            code = 451
        status = getattr(error, "status", None) or ("5.0.0" if permanent else "4.4.1")
        text = getattr(error, "text", None) or str(error) or type(error).__name__
        return cls(address, code, status, text)


def outcomes_for_failure(recipients: list[str], error: BaseException) -> list[Outcome]:
    """Per-recipient outcomes when a delivery attempt failed as a whole.

    If the server refused every recipient at RCPT, the error carries each
    refusal: keep them, so a 550 for one bounces while a 450 for another is
    retried. Otherwise every recipient shares the one error.
    """
    known = {r.address: r for r in getattr(error, "recipients", None) or []}
    out = []
    for address in recipients:
        r = known.get(address)
        out.append(Outcome(address, r.code, r.status, r.text) if r else Outcome.from_error(address, error))
    return out


class DeliveryQueue:
    def __init__(
        self,
        spool: Spool,
        transport: Callable[[QueuedMessage, bytes], "defer.Deferred"],
        *,
        reactor,
        tracer=NULL_TRACER,
        retry_min: float = 1.0,
        retry_max: float = 30.0,
        lifetime: float = 600.0,
        make_bounce: Callable | None = None,
        concurrency: int = 20,
        run_blocking=threads.deferToThread,
    ):
        self.spool = spool
        self.transport = transport
        self.reactor = reactor
        self.tracer = tracer
        self.retry_min, self.retry_max, self.lifetime = retry_min, retry_max, lifetime
        self.make_bounce = make_bounce
        # Disk work runs in a thread; tests pass a synchronous stand-in.
        self._blocking = run_blocking
        self._slots = defer.DeferredSemaphore(concurrency)
        self._timers: dict[str, object] = {}
        self.items: dict[str, QueuedMessage] = {}

    # -- accepting ---------------------------------------------------------

    def accept(self, mail_from: str, recipients: list[str], content: bytes,
               message_id: str | None = None, queue_id: str | None = None, conn: str | None = None):
        """Spool a message durably; fires with its queue id once it is on disk.

        ``conn`` is the id of the SMTP connection the message came in on: the
        ``spooled`` event carries it, so a trace reader can join the message
        to that connection's transcript (see :mod:`agents.traceview`).
        """
        item = QueuedMessage(queue_id or new_queue_id(), mail_from, list(recipients), message_id)
        d = self._blocking(self.spool.store, item, content)

        def stored(_):
            self.tracer.event(
                "spooled", queue_id=item.queue_id, message_id=message_id,
                bytes=len(content), rcpts=len(recipients), conn=conn,
            )
            self.items[item.queue_id] = item
            # Deliver right away, from memory: no need to read the spool back.
            self.reactor.callLater(0, self._attempt, item, content)
            return item.queue_id

        return d.addCallback(stored)

    def recover(self):
        """Pick up everything left in the spool by an earlier run (or a crash)."""
        d = self._blocking(self.spool.recover)

        def loaded(result):
            items, corrupt = result
            for qid in corrupt:
                self.tracer.event("spool.corrupt", queue_id=qid)
            for item in items:
                self.items[item.queue_id] = item
                self.tracer.event("recovered", queue_id=item.queue_id, message_id=item.message_id)
                self._schedule(item, max(0.0, item.next_attempt - time.time()))
            return len(items)

        return d.addCallback(loaded)

    # -- delivering --------------------------------------------------------

    def _schedule(self, item: QueuedMessage, delay: float) -> None:
        if item.held:
            return
        self._timers[item.queue_id] = self.reactor.callLater(delay, self._attempt, item, None)

    def flush(self) -> None:
        """Retry every waiting message now (``mailpipe queue flush``)."""
        for qid, timer in list(self._timers.items()):
            if timer.active():
                timer.cancel()
            item = self.items.get(qid)
            if item is not None:
                self._attempt(item, None)

    def _attempt(self, item: QueuedMessage, content: bytes | None):
        self._timers.pop(item.queue_id, None)
        return self._slots.run(self._run_attempt, item, content).addErrback(log.err)

    @defer.inlineCallbacks
    def _run_attempt(self, item: QueuedMessage, content: bytes | None):
        if content is None:
            content = yield self._blocking(self.spool.content, item.queue_id)
        item.attempts += 1
        self.tracer.event(
            "dequeued", queue_id=item.queue_id, message_id=item.message_id,
            attempt=item.attempts, rcpts=len(item.pending),
        )
        try:
            outcomes = yield self.transport(item, content)
        except Exception as e:  # the whole attempt failed: every recipient shares it
            outcomes = outcomes_for_failure(item.pending, e)
        yield self._record(item, content, outcomes)

    @defer.inlineCallbacks
    def _record(self, item: QueuedMessage, content: bytes, outcomes: list[Outcome]):
        failed, waiting = [], []
        for o in outcomes:
            if o.delivered:
                self.tracer.event("delivered", queue_id=item.queue_id, message_id=item.message_id,
                                  rcpt=o.address, code=o.code, status=o.status)
            elif o.permanent:
                failed.append(o)
                self.tracer.event("bounced", queue_id=item.queue_id, message_id=item.message_id,
                                  rcpt=o.address, code=o.code, status=o.status, text=o.text)
            else:
                waiting.append(o)
        expired = time.time() - item.received_at > self.lifetime
        if waiting and expired:
            for o in waiting:
                failed.append(Outcome(o.address, 550, "5.4.7", f"delivery time expired: {o.text}"))
                self.tracer.event("expired", queue_id=item.queue_id, rcpt=o.address)
            waiting = []
        if failed:
            yield self._bounce(item, content, failed)
        if waiting:
            item.pending = [o.address for o in waiting]
            delay = min(self.retry_max, self.retry_min * 2 ** (item.attempts - 1))
            delay *= random.uniform(0.8, 1.2)
            item.next_attempt = time.time() + delay
            item.last_error = f"{waiting[0].code} {waiting[0].status} {waiting[0].text}"
            yield self._blocking(self.spool.save_state, item)
            self.tracer.event("deferred", queue_id=item.queue_id, message_id=item.message_id,
                              rcpts=item.pending, code=waiting[0].code, status=waiting[0].status,
                              text=waiting[0].text, retry_in=round(delay, 3))
            self._schedule(item, delay)
        else:
            self.items.pop(item.queue_id, None)
            yield self._blocking(self.spool.remove, item.queue_id)
            self.tracer.event("done", queue_id=item.queue_id, message_id=item.message_id)

    def _bounce(self, item: QueuedMessage, content: bytes, failed: list[Outcome]):
        if not item.mail_from:
            self.tracer.event("bounce.dropped", queue_id=item.queue_id,
                              reason="the message is itself a bounce (null sender)")
            return defer.succeed(None)
        if self.make_bounce is None:
            return defer.succeed(None)
        report = self.make_bounce(item, content, failed)
        return self.accept("", [item.mail_from], report, message_id=None)
