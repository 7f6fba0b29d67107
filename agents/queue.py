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
   (RFC 5321 4.5.5), only dropped with a trace event;
5. optionally warns the sender once that a message is late (``Action:
   delayed``, RFC 3464 2.3.3), after ``[queue] delay_warning`` seconds.

The schedule's defaults are Postfix's: first retry after 300 s
(``minimal_backoff_time``), doubling up to 4000 s (``maximal_backoff_time``),
give up after 5 days (``maximal_queue_lifetime``). RFC 5321 4.5.4.1 asks for
"at least 30 minutes" between tries and "at least 4-5 days" in total. The lab
config scales these down to seconds (``[lab] retry_min``, ``retry_max``,
``queue_lifetime``) so a notebook can watch a retry happen.

The queue can be inspected and steered while it runs (``mailpipe queue``,
through :mod:`agents.control`): list, show, flush, hold, release, delete.
Time comes from ``reactor.seconds()``, so tests drive it with ``task.Clock``.
"""

from __future__ import annotations

import errno
import random
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Callable

from twisted.internet import defer, threads
from twisted.python import log

from .headers import get_header
from .smtpserver import Reply
from .spool import QueuedMessage, Spool, new_queue_id
from .trace import NULL_TRACER, working_for


#: Postfix's defaults (postconf(5)): minimal_backoff_time, maximal_backoff_time,
#: maximal_queue_lifetime. The lab config overrides them (see queue_settings).
POSTFIX_RETRY_MIN = 300.0
POSTFIX_RETRY_MAX = 4000.0
POSTFIX_LIFETIME = 5 * 24 * 3600.0


def backoff(attempts: int, retry_min: float, retry_max: float, rng=random) -> float:
    """Seconds to wait after failed attempt number ``attempts`` (1, 2, ...).

    Twice as long after each failure, never more than ``retry_max``, then a
    random +-20 %: without that jitter, every message deferred by the same
    outage would come back in the same second and knock the server over
    again (the "thundering herd").
    """
    delay = min(retry_max, retry_min * 2 ** max(0, attempts - 1))
    return delay * rng.uniform(0.8, 1.2)


def queue_settings(config) -> dict:
    """The DeliveryQueue keyword arguments of a lab config.

    ``[lab] retry_min``, ``retry_max``, ``queue_lifetime`` scale the schedule;
    ``[queue] delay_warning`` (seconds, 0 = never, Postfix's
    ``delay_warning_time``) turns on the "still trying" DSN.
    """
    section = config.section("queue")
    return {
        "retry_min": float(config.retry_min),
        "retry_max": float(config.retry_max),
        "lifetime": float(config.queue_lifetime),
        "delay_warning": float(section.get("delay_warning", 0.0)),
    }


#: errno values that mean "no room or no right to write": the disk, not the message.
_NO_STORAGE = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def spool_failure_reply(failure):
    """The answer to DATA when the message could not be spooled (an errback).

    We must not say 250 (we do not have the message) and must not say 5xx
    (nothing is wrong with it): a 4xx tells the client to keep its copy and
    try again later. ``452 4.3.1`` is RFC 5321's "insufficient system
    storage" with RFC 3463's "mail system full"; other write errors get
    ``451 4.3.0``, "local error in processing". Anything else is passed on.
    """
    error = failure.value
    if not isinstance(error, OSError):
        return failure
    if error.errno in _NO_STORAGE:
        why = "full" if error.errno in (errno.ENOSPC, errno.EDQUOT) else "not writable"
        return Reply(452, "4.3.1", f"Insufficient system storage: the spool is {why}, try again later")
    return Reply(451, "4.3.0", f"Local error in processing: cannot write the spool ({error.strerror})")


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


class NoSuchMessage(KeyError):
    """No message with that queue id (``mailpipe queue show/delete/...``)."""


class DeliveryQueue:
    def __init__(
        self,
        spool: Spool,
        transport: Callable[[QueuedMessage, bytes], "defer.Deferred"],
        *,
        reactor,
        tracer=NULL_TRACER,
        retry_min: float = POSTFIX_RETRY_MIN,
        retry_max: float = POSTFIX_RETRY_MAX,
        lifetime: float = POSTFIX_LIFETIME,
        delay_warning: float = 0.0,
        make_bounce: Callable | None = None,
        concurrency: int = 20,
        run_blocking=threads.deferToThread,
        rng: random.Random | None = None,
        hooks=None,
    ):
        self.spool = spool
        self.transport = transport
        self.reactor = reactor
        self.tracer = tracer
        self.retry_min, self.retry_max, self.lifetime = retry_min, retry_max, lifetime
        self.delay_warning = delay_warning
        self.make_bounce = make_bounce
        # Disk work runs in a thread; tests pass a synchronous stand-in.
        self._blocking = run_blocking
        self._rng = rng or random.Random()
        self._slots = defer.DeferredSemaphore(concurrency)
        self._timers: dict[str, object] = {}
        self._busy: set[str] = set()  # queue ids with a delivery attempt in progress
        self.items: dict[str, QueuedMessage] = {}
        #: what happened so far, for ``mailpipe queue stats``
        self.stats: Counter = Counter()
        #: coursework hooks (agents.hooks): told of each spooled message and each attempt
        self.hooks = hooks

    def _now(self) -> float:
        return self.reactor.seconds()

    # -- accepting ---------------------------------------------------------

    def accept(self, mail_from: str, recipients: list[str], content: bytes,
               message_id: str | None = None, queue_id: str | None = None, conn: str | None = None):
        """Spool a message durably; fires with its queue id once it is on disk.

        ``conn`` is the id of the SMTP connection the message came in on: the
        ``spooled`` event carries it, so a trace reader can join the message
        to that connection's transcript (see :mod:`agents.traceview`).
        """
        item = QueuedMessage(queue_id or new_queue_id(), mail_from, list(recipients), message_id,
                             received_at=self._now())
        d = self._blocking(self.spool.store, item, content)

        def stored(_):
            self.tracer.event(
                "spooled", queue_id=item.queue_id, message_id=message_id,
                bytes=len(content), rcpts=len(recipients), conn=conn,
            )
            self.items[item.queue_id] = item
            self.stats["spooled"] += 1
            if self.hooks is not None:
                self.hooks.notify("queued", item)
            # Deliver right away, from memory: no need to read the spool back.
            self.reactor.callLater(0, self._attempt, item, content)
            return item.queue_id

        def not_stored(failure):
            # No 250 goes out: the handler turns this into a 4xx (spool_failure_reply).
            self.stats["spool_failed"] += 1
            self.tracer.event("spool.failed", queue_id=item.queue_id, message_id=message_id,
                              error=failure.getErrorMessage(), conn=conn)
            return failure

        return d.addCallbacks(stored, not_stored)

    def recover(self):
        """Pick up everything left in the spool by an earlier run (or a crash)."""
        d = self._blocking(self.spool.recover)

        def loaded(result):
            items, corrupt = result
            for qid in corrupt:
                self.stats["corrupt"] += 1
                self.tracer.event("spool.corrupt", queue_id=qid)
            for item in items:
                self.items[item.queue_id] = item
                self.stats["recovered"] += 1
                self.tracer.event("recovered", queue_id=item.queue_id, message_id=item.message_id,
                                  held=item.held or None)
                self._schedule(item, max(0.0, item.next_attempt - self._now()))
            return len(items)

        return d.addCallback(loaded)

    # -- delivering --------------------------------------------------------

    def _schedule(self, item: QueuedMessage, delay: float) -> None:
        if item.held or item.queue_id not in self.items:
            return
        self._timers[item.queue_id] = self.reactor.callLater(delay, self._attempt, item, None)

    def _cancel_timer(self, queue_id: str) -> bool:
        """Stop a waiting message's next attempt; True if one was scheduled."""
        timer = self._timers.pop(queue_id, None)
        if timer is not None and timer.active():
            timer.cancel()
            return True
        return False

    def _attempt(self, item: QueuedMessage, content: bytes | None):
        self._timers.pop(item.queue_id, None)
        return self._slots.run(self._run_attempt, item, content).addErrback(log.err)

    @defer.inlineCallbacks
    def _run_attempt(self, item: QueuedMessage, content: bytes | None):
        if item.queue_id not in self.items:
            return  # deleted while it waited for a slot
        self._busy.add(item.queue_id)
        try:
            if content is None:
                content = yield self._blocking(self.spool.content, item.queue_id)
            item.attempts += 1
            self.tracer.event(
                "dequeued", queue_id=item.queue_id, message_id=item.message_id,
                attempt=item.attempts, rcpts=len(item.pending),
            )
            try:
                with working_for(queue_id=item.queue_id):  # its DNS lookups name it
                    attempt = self.transport(item, content)
                outcomes = yield attempt
            except Exception as e:  # the whole attempt failed: every recipient shares it
                outcomes = outcomes_for_failure(item.pending, e)
            yield self._record(item, content, outcomes)
        finally:
            self._busy.discard(item.queue_id)

    @defer.inlineCallbacks
    def _record(self, item: QueuedMessage, content: bytes, outcomes: list[Outcome]):
        if self.hooks is not None:
            self.hooks.notify("delivery_result", item, list(outcomes))
        failed, waiting = [], []
        for o in outcomes:
            if o.delivered:
                self.stats["delivered"] += 1
                self.tracer.event("delivered", queue_id=item.queue_id, message_id=item.message_id,
                                  rcpt=o.address, code=o.code, status=o.status)
            elif o.permanent:
                failed.append(o)
                self.tracer.event("bounced", queue_id=item.queue_id, message_id=item.message_id,
                                  rcpt=o.address, code=o.code, status=o.status, text=o.text)
            else:
                waiting.append(o)
        if item.queue_id not in self.items:
            # Deleted by an operator during this attempt: forget the rest.
            self.tracer.event("done", queue_id=item.queue_id, message_id=item.message_id, deleted=True)
            return
        now = self._now()
        expires = item.received_at + self.lifetime
        if waiting and now >= expires:
            for o in waiting:
                failed.append(Outcome(o.address, 550, "5.4.7", f"delivery time expired: {o.text}"))
                self.stats["expired"] += 1
                self.tracer.event("expired", queue_id=item.queue_id, message_id=item.message_id,
                                  rcpt=o.address)
            waiting = []
        if failed:
            self.stats["bounced"] += len(failed)
            yield self._bounce(item, content, failed)
        if waiting:
            item.pending = [o.address for o in waiting]
            # The last try is at the end of the lifetime, not a backoff later.
            delay = min(backoff(item.attempts, self.retry_min, self.retry_max, self._rng),
                        max(0.0, expires - now))
            item.next_attempt = now + delay
            item.last_error = f"{waiting[0].code} {waiting[0].status} {waiting[0].text}"
            if self._needs_delay_warning(item, now):
                yield self._warn(item, content, waiting)
            yield self._save_state(item)
            self.stats["deferred"] += 1
            self.tracer.event("deferred", queue_id=item.queue_id, message_id=item.message_id,
                              rcpts=item.pending, code=waiting[0].code, status=waiting[0].status,
                              text=waiting[0].text, retry_in=round(delay, 3), attempt=item.attempts)
            self._schedule(item, delay)
        else:
            self.items.pop(item.queue_id, None)
            yield self._blocking(self.spool.remove, item.queue_id)
            self.tracer.event("done", queue_id=item.queue_id, message_id=item.message_id)

    @defer.inlineCallbacks
    def _save_state(self, item: QueuedMessage):
        """Write the retry state. If the disk refuses, carry on from memory:
        the message itself is safe, and after a crash it only starts over."""
        try:
            yield self._blocking(self.spool.save_state, item)
        except OSError as e:
            self.tracer.event("spool.state_failed", queue_id=item.queue_id, error=str(e))

    def _bounce(self, item: QueuedMessage, content: bytes, failed: list[Outcome]):
        if not item.mail_from:
            self.stats["bounce_dropped"] += 1
            self.tracer.event("bounce.dropped", queue_id=item.queue_id,
                              reason="the message is itself a bounce (null sender)")
            return defer.succeed(None)
        if self.make_bounce is None:
            return defer.succeed(None)
        report = self.make_bounce(item, content, failed)
        return self._send_report(item, report, "bounce.sent")

    def _needs_delay_warning(self, item: QueuedMessage, now: float) -> bool:
        return bool(self.delay_warning and self.make_bounce and item.mail_from and not item.warned
                    and now - item.received_at >= self.delay_warning)

    def _warn(self, item: QueuedMessage, content: bytes, waiting: list[Outcome]):
        """Tell the sender, once, that the message is late but still being tried."""
        item.warned = True
        self.stats["delay_warnings"] += 1
        report = self.make_bounce(item, content, waiting, action="delayed",
                                  retry_until=item.received_at + self.lifetime)
        return self._send_report(item, report, "delay.warning")

    def _send_report(self, item: QueuedMessage, report: bytes, event: str):
        """Queue a DSN to the original sender, from the null sender ``<>``."""
        report_id = get_header(report, "Message-ID")
        self.tracer.event(event, queue_id=item.queue_id, message_id=item.message_id,
                          report_id=report_id, to=item.mail_from)
        d = self.accept("", [item.mail_from], report, message_id=report_id)
        # A full disk must not stop this message's own retries: log and go on.
        return d.addErrback(log.err)

    # -- operating (``mailpipe queue``, via agents.control) ------------------

    def _get(self, queue_id: str) -> QueuedMessage:
        try:
            return self.items[queue_id]
        except KeyError:
            raise NoSuchMessage(queue_id) from None

    def describe(self, item: QueuedMessage) -> dict:
        """One queued message as plain data (what ``mailpipe queue list`` shows)."""
        info = asdict(item)
        info["active"] = item.queue_id in self._busy
        return info

    def list(self) -> list[dict]:
        """Every queued message, oldest first."""
        return [self.describe(i) for i in sorted(self.items.values(), key=lambda i: i.received_at)]

    def show(self, queue_id: str):
        """One message and its header section; fires with a dict."""
        item = self._get(queue_id)
        d = self._blocking(self.spool.header_block, queue_id)
        return d.addCallback(lambda block: {**self.describe(item), "headers": block.decode("utf-8", "replace")})

    def flush(self, queue_id: str | None = None) -> int:
        """Try waiting messages now instead of at their next retry time
        (Postfix ``postqueue -f``, or ``-i ID`` for one). Held messages and
        messages already being tried are left alone. Returns how many."""
        if queue_id is not None:
            self._get(queue_id)
        flushed = 0
        for qid in [queue_id] if queue_id else list(self._timers):
            item = self.items.get(qid)
            if item is not None and not item.held and self._cancel_timer(qid):
                self._attempt(item, None)
                flushed += 1
        self.tracer.event("queue.flush", count=flushed, queue_id=queue_id)
        return flushed

    # hold, release and delete raise NoSuchMessage at once; the disk work is a Deferred.

    def hold(self, queue_id: str):
        """Park a message: no more attempts until released (Postfix ``postsuper -h``)."""
        item = self._get(queue_id)
        item.held = True
        self._cancel_timer(queue_id)
        self.stats["held"] += 1
        self.tracer.event("held", queue_id=queue_id, message_id=item.message_id)
        return self._save_state(item)

    def release(self, queue_id: str):
        """Undo :meth:`hold`; the message is tried at once (``postsuper -H``)."""
        item = self._get(queue_id)
        if not item.held:
            return defer.succeed(None)
        item.held = False
        self.stats["released"] += 1
        self.tracer.event("released", queue_id=queue_id, message_id=item.message_id)
        if queue_id not in self._busy:
            self._schedule(item, 0)
        return self._save_state(item)

    def delete(self, queue_id: str):
        """Remove a message without delivering or bouncing it (``postsuper -d``).

        The one way a queued message may disappear: an operator decided so,
        and the trace says who and when.
        """
        item = self._get(queue_id)
        self._cancel_timer(queue_id)
        del self.items[queue_id]
        self.stats["deleted"] += 1
        self.tracer.event("deleted", queue_id=queue_id, message_id=item.message_id,
                          pending=item.pending)
        return self._blocking(self.spool.remove, queue_id, recycle=False)
