# -*- test-case-name: tests.test_security -*-
"""Abuse controls shared by every listener: brute-force throttling, rate limits, routing tricks.

A mail server on the internet is attacked all day. Three attacks matter here:

* **Password guessing.** A bot tries one password after another over AUTH
  (SMTP), LOGIN (IMAP) or USER/PASS (POP3). :class:`LoginThrottle` counts
  failed logins per client address: each failure is answered later than the
  one before (0.5 s, 1 s, 2 s ... up to a cap), and after ``max_failures``
  the client is told ``421 4.7.0`` (IMAP ``* BYE``, POP3 ``-ERR``) and
  disconnected. A correct password is never delayed. The delay uses the
  reactor's ``callLater``: the server keeps serving everybody else while
  one client waits (a ``time.sleep`` would freeze them all).
* **Floods.** A stolen account or a compromised laptop sends thousands of
  messages a minute. :class:`RateLimiter` counts messages per user and per
  client address in a sliding window; the MSA answers ``450 4.7.1`` over the
  limit (RFC 2505 2.8 "rate control"), a temporary refusal that a real
  client retries later.
* **Open relay tricks.** Old mailers honoured routing *inside* an address:
  ``user%elsewhere@relay``, ``elsewhere!user@relay``, ``@relay:user@elsewhere``,
  ``"user@elsewhere"@relay``. A relay that passes such an address on forwards
  mail for anybody. :func:`routing_trick` recognises them so that the MTA can
  refuse with ``5.7.1`` (RFC 2505 2.1, RFC 5321 3.6.1 and 4.1.1.3).

Everything here is recorded as a trace event whose name starts with
``security.`` (see :data:`EVENTS`), so ``mailpipe monitor`` (RFC 2505 2.4:
"log all anti-relay/anti-spam actions") can tell who is attacking whom.

Settings come from the ``[security]`` table of the lab config
(:class:`SecuritySettings`); each agent process builds one
:class:`LoginThrottle` and shares it among all its listeners, so a guesser
cannot get a fresh allowance by switching from IMAP to POP3.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, fields
from typing import Any, Callable

from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, task

from agents.config import ConfigError
from agents.trace import NULL_TRACER, Tracer

#: The security events, and what each one means. The monitor reads these.
EVENTS = {
    "security.login_failed": "a wrong user name or password (SMTP AUTH, IMAP LOGIN/AUTHENTICATE, POP3 PASS)",
    "security.login_blocked": "a client over the failed-login limit was refused and disconnected",
    "security.cleartext_auth": "a client tried to log in before TLS; refused, the password may have leaked",
    "security.relay_denied": "mail for another domain (or with a routing trick) from a stranger",
    "security.rate_limited": "a user or client sent more messages than the MSA allows per window",
    "security.sender_spoof": "an authenticated user tried to send as someone else",
    "security.starttls_injection": "commands pipelined behind STARTTLS were thrown away (CVE-2011-0411 class)",
    "security.tls_failed": "a TLS handshake that began never completed",
}


def event(tracer: Tracer, name: str, **fields: Any) -> None:
    """Record one security event (the name must be listed in :data:`EVENTS`)."""
    if name not in EVENTS:
        raise ValueError(f"unknown security event {name!r}")
    tracer.event(name, **fields)


# ---------------------------------------------------------------------------
# Settings


class SecuritySettingsError(ConfigError):
    """A value in the ``[security]`` table is of the wrong type or out of range."""


@dataclass(frozen=True)
class SecuritySettings:
    """The ``[security]`` table of the lab config; every key is optional.

    The defaults suit the lab: a typo costs a student half a second, a
    password-guessing script is stopped after six tries, and ``mailpipe
    bench`` stays well under the message limits.
    """

    #: Delay before answering the first failed login from an address (seconds).
    login_delay: float = 0.5
    #: Each further failure doubles the delay, up to this cap.
    login_max_delay: float = 4.0
    #: Failures after which the client is disconnected and refused.
    login_max_failures: int = 6
    #: Failures older than this are forgotten (seconds), which also ends a block.
    login_window: float = 600.0
    #: Sliding window of the MSA message limits (seconds).
    rate_window: float = 60.0
    #: Messages one authenticated user may submit per window (0: no limit).
    max_messages_per_user: int = 1000
    #: Messages one client address may submit per window (0: no limit).
    max_messages_per_client: int = 2000
    #: The MSA refuses an envelope sender or From: the user does not own.
    #: Turn it off to show how easily mail is spoofed.
    enforce_sender: bool = True

    @classmethod
    def from_config(cls, config) -> "SecuritySettings":
        """Read ``config.section("security")``; unknown keys and bad values are errors."""
        table = config.section("security")
        known = {f.name: f for f in fields(cls)}
        unknown = set(table) - set(known)
        if unknown:
            raise SecuritySettingsError(f"[security]: unknown key(s) {sorted(unknown)}")
        values = {}
        for name, value in table.items():
            kind = type(getattr(cls, name))
            if kind is bool:
                ok = isinstance(value, bool)
            else:  # ints where ints are meant; a float may be written as 1 or 1.0
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
                ok = ok and (kind is float or isinstance(value, int)) and value >= 0
            if not ok:
                raise SecuritySettingsError(f"[security]: {name} = {value!r} is not a valid {kind.__name__}")
            values[name] = kind(value)
        settings = cls(**values)
        if settings.login_max_failures < 1:
            raise SecuritySettingsError("[security]: login_max_failures must be at least 1")
        return settings


# ---------------------------------------------------------------------------
# Brute force


class LoginBlocked(UnauthorizedLogin):
    """The client has failed too often; no password is checked until it cools down.

    A subclass of UnauthorizedLogin, so a protocol that knows nothing of
    throttling still answers it as a failed login.
    """


@dataclass(frozen=True)
class Verdict:
    """What one failed login costs: the wait before the reply, and whether it was the last."""

    failures: int  # failed logins from this client within the window, this one included
    delay: float  # seconds before the failure is answered
    blocked: bool  # the limit is reached: answer 421 / BYE / -ERR and disconnect


class _Client:
    __slots__ = ("failures", "in_flight")

    def __init__(self) -> None:
        self.failures: deque[float] = deque()  # times of failed logins, oldest first
        self.in_flight = 0  # logins being checked right now


class LoginThrottle:
    """Failed logins per client address, in a sliding window.

    ``begin(client)`` before checking a password (False: refuse, the client
    is blocked), ``end(client, ok)`` after. At most ``max_concurrent`` logins
    from one address are checked at the same time (like Postfix's anvil
    limits), and once an address has failed, its logins in progress count
    against the limit too: a script that opens fifty connections and guesses
    in all of them at once gets ``max_concurrent`` guesses in its first wave
    and few after. A mail client that opens ten connections with the right
    password is never held up.

    Successful logins are never delayed and do not wipe the record: otherwise
    an attacker who owns one account could reset the count between guesses
    at another. A blocked address is refused even with the right password
    until its failures age out of the window (that is what stops the
    guessing), but other addresses are not affected at all.
    """

    #: Forget idle clients once this many are tracked (bounded memory).
    MAX_CLIENTS = 10_000

    def __init__(self, clock=None, *, base_delay: float = 0.5, max_delay: float = 4.0,
                 max_failures: int = 6, window: float = 600.0, max_concurrent: int = 32):  # fmt: skip
        if clock is None:
            from twisted.internet import reactor as clock
        self.clock = clock
        self.base_delay, self.max_delay = base_delay, max_delay
        self.max_failures, self.window = max_failures, window
        self.max_concurrent = max_concurrent
        self._clients: dict[str, _Client] = {}

    @classmethod
    def from_settings(cls, settings: SecuritySettings, clock=None) -> "LoginThrottle":
        return cls(clock, base_delay=settings.login_delay, max_delay=settings.login_max_delay,
                   max_failures=settings.login_max_failures, window=settings.login_window)  # fmt: skip

    def delay(self, failures: int) -> float:
        """The wait after the ``failures``-th failure: base, 2 x base, 4 x base ... capped."""
        if failures <= 0:
            return 0.0
        return min(self.base_delay * 2 ** min(failures - 1, 32), self.max_delay)

    def failures(self, client: str) -> int:
        """Failed logins from ``client`` within the window."""
        record = self._clients.get(client)
        if record is None:
            return 0
        self._expire(record)
        return len(record.failures)

    def is_blocked(self, client: str) -> bool:
        record = self._clients.get(client)
        if record is None:
            return False
        self._expire(record)
        failures = len(record.failures)
        if failures >= self.max_failures or record.in_flight >= self.max_concurrent:
            return True
        return failures > 0 and failures + record.in_flight >= self.max_failures

    def begin(self, client: str) -> bool:
        """A login attempt starts; False means refuse it without checking the password."""
        if self.is_blocked(client):
            return False
        if client not in self._clients and len(self._clients) >= self.MAX_CLIENTS:
            self._forget_idle()
        self._clients.setdefault(client, _Client()).in_flight += 1
        return True

    def end(self, client: str, ok: bool | None) -> Verdict | None:
        """The attempt is over: ``ok`` True (logged in), False (wrong credentials),
        or None (the check itself failed, which is not the client's guess).
        Returns the :class:`Verdict` for a failure, else None."""
        record = self._clients.get(client)
        if record is None:  # forgotten meanwhile (MAX_CLIENTS): start afresh
            record = self._clients[client] = _Client()
        else:
            record.in_flight = max(0, record.in_flight - 1)
        if ok is not False:
            self._drop_if_idle(client, record)
            return None
        record.failures.append(self.clock.seconds())
        self._expire(record)
        count = len(record.failures)
        return Verdict(count, self.delay(count), count >= self.max_failures)

    def _expire(self, record: _Client) -> None:
        horizon = self.clock.seconds() - self.window
        while record.failures and record.failures[0] <= horizon:
            record.failures.popleft()

    def _drop_if_idle(self, client: str, record: _Client) -> None:
        self._expire(record)
        if not record.failures and not record.in_flight:
            self._clients.pop(client, None)

    def _forget_idle(self) -> None:
        for client, record in list(self._clients.items()):
            self._drop_if_idle(client, record)


def _username(credentials) -> str | None:
    user = getattr(credentials, "username", None)
    if isinstance(user, bytes):
        user = user.decode("utf-8", "replace")
    return user


class ThrottledPortal:
    """A cred Portal for one connection that slows down, then stops, password guessing.

    It wraps the real portal, so the same throttle serves SMTP AUTH, IMAP
    LOGIN/AUTHENTICATE and POP3 USER/PASS: each protocol calls
    ``portal.login(credentials, ...)`` and gets its result, only later when
    the password was wrong. ``on_blocked`` (optional) runs just before a
    :class:`LoginBlocked` failure is delivered, for a protocol that must say
    goodbye (IMAP ``* BYE``) before its usual failure reply.
    """

    def __init__(self, portal, throttle: LoginThrottle, client: str, *, protocol: str,
                 tracer: Tracer = NULL_TRACER, conn: str | None = None,
                 on_blocked: Callable[[], None] | None = None):  # fmt: skip
        self.portal, self.throttle, self.client = portal, throttle, client
        self.protocol, self.tracer, self.conn, self.on_blocked = protocol, tracer, conn, on_blocked

    def login(self, credentials, mind, *interfaces):
        user = _username(credentials)
        if not self.throttle.begin(self.client):
            self._event("security.login_blocked", user=user, failures=self.throttle.failures(self.client))
            return self._blocked()
        d = defer.maybeDeferred(self.portal.login, credentials, mind, *interfaces)

        def succeeded(result):
            self.throttle.end(self.client, ok=True)
            return result

        def failed(failure):
            if not failure.check(UnauthorizedLogin):
                self.throttle.end(self.client, ok=None)  # a broken backend is not a guess
                return failure
            verdict = self.throttle.end(self.client, ok=False)
            self._event("security.login_failed", user=user, failures=verdict.failures,
                        delay=verdict.delay, blocked=verdict.blocked)  # fmt: skip
            # The answer waits on the reactor's clock, never in a sleep: every
            # other connection is served meanwhile.
            later = task.deferLater(self.throttle.clock, verdict.delay, lambda: None)
            return later.addCallback(lambda _: self._blocked() if verdict.blocked else failure)

        return d.addCallbacks(succeeded, failed)

    def _blocked(self) -> defer.Deferred:
        if self.on_blocked is not None:
            self.on_blocked()
        return defer.fail(LoginBlocked(f"too many failed logins from {self.client}"))

    def _event(self, name: str, **fields: Any) -> None:
        event(self.tracer, name, conn=self.conn, peer=self.client, protocol=self.protocol, **fields)


# ---------------------------------------------------------------------------
# Message rate limits


class RateLimiter:
    """At most ``limit`` events per key in any ``window`` seconds (a sliding log).

    Each key keeps the times of its recent events; an event is allowed when
    fewer than ``limit`` of them are younger than ``window``. Unlike a fixed
    "per minute" counter, a burst cannot get twice the limit through by
    straddling the turn of the minute. ``limit == 0`` means no limit.
    """

    def __init__(self, limit: int, window: float, clock=None):
        if clock is None:
            from twisted.internet import reactor as clock
        self.limit, self.window, self.clock = limit, window, clock
        self._log: dict[str, deque[float]] = {}

    def hit(self, key: str) -> bool:
        """Count one event for ``key``; False (and not counted) if over the limit."""
        if self.full(key):
            return False
        self.record(key)
        return True

    def full(self, key: str) -> bool:
        """Would one more event for ``key`` go over the limit?"""
        if not self.limit:
            return False
        times = self._log.get(key)
        if not times:
            return False
        horizon = self.clock.seconds() - self.window
        while times and times[0] <= horizon:
            times.popleft()
        return len(times) >= self.limit

    def record(self, key: str) -> None:
        """Count one event for ``key`` (whether or not it was over the limit)."""
        if not self.limit:
            return
        now = self.clock.seconds()
        self._log.setdefault(key, deque()).append(now)
        if len(self._log) > LoginThrottle.MAX_CLIENTS:
            self._forget_idle(now)

    def count(self, key: str) -> int:
        times = self._log.get(key, ())
        now = self.clock.seconds()
        return sum(1 for t in times if t > now - self.window)

    def retry_after(self, key: str) -> float:
        """Seconds until ``key`` may send again (0 if it may now)."""
        times = self._log.get(key)
        if not self.limit or not times or len(times) < self.limit:
            return 0.0
        return max(0.0, times[0] + self.window - self.clock.seconds())

    def _forget_idle(self, now: float) -> None:
        for key, times in list(self._log.items()):
            if not times or times[-1] <= now - self.window:
                del self._log[key]


# ---------------------------------------------------------------------------
# Routing tricks in addresses

#: An RFC 5321 A-d-l source route in front of a mailbox: ``@a.test,@b.test:``.
_SOURCE_ROUTE = re.compile(r"@[^,:@]+(?:,@[^,:@]+)*:")
#: A quoted string (RFC 5321 4.1.2), whose content is data, not syntax.
_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')


def routing_trick(path: bytes | str) -> str | None:
    """Name the relay trick hidden in an address, or None for a plain one.

    ``path`` is what the client put between ``<`` and ``>``, valid or not.
    These are the forms by which old mailers let a *sender* choose the route
    (RFC 5321 3.6.1 says not to honour them; RFC 2505 2.1 says a relay must
    not be talked into forwarding by them):

    * ``@relay:user@elsewhere`` -- an RFC 821 source route;
    * ``user%elsewhere@relay`` -- the "percent hack";
    * ``elsewhere!user@relay`` -- a UUCP bang path;
    * ``"user@elsewhere"@relay`` -- an ``@`` hidden in a quoted local part;
    * ``user@elsewhere@relay`` -- more than one ``@``;
    * ``user@relay.`` -- an absolute domain name, which string comparisons
      with the lab's domains would not recognise.

    Address literals (``user@[192.0.2.1]``) are not a trick by themselves: the
    MTA treats them as a domain that is not its own, i.e. relaying.
    """
    if isinstance(path, bytes):
        path = path.decode("utf-8", "replace")
    if _SOURCE_ROUTE.match(path):
        return "source route"
    # Quoted strings hide their content from the syntax, not from old
    # mailers: look for routing characters in the local part as sent, but
    # count the @ signs that are syntax.
    bare = _QUOTED.sub('""', path)
    if bare.count("@") > 1:
        return "more than one @"
    _local, at, domain = bare.partition("@")
    local = path[: len(path) - len(domain) - len(at)]
    if "%" in local:
        return "percent hack"
    if "!" in local:
        return "bang path"
    if "@" in local or ":" in local:
        return "routing characters in a quoted local part"
    if domain.endswith("."):
        return "absolute domain (trailing dot)"
    return None


# ---------------------------------------------------------------------------
# TLS


def tls_failure(reason) -> str:
    """A short description of why a TLS connection was lost (for ``security.tls_failed``)."""
    value = getattr(reason, "value", reason)
    text = str(value).strip() or type(value).__name__
    return f"{type(value).__name__}: {text}"[:300]


# ---------------------------------------------------------------------------
# One throttle per agent process

def login_throttle(ctx) -> LoginThrottle:
    """The agent's shared :class:`LoginThrottle`, built from its ``[security]`` settings.

    Called by each listener of an agent (the MSA's two ports; the MDA's IMAP,
    IMAPS, POP3 and POP3S), it returns the same object every time, so a
    client's failures count across all of them.
    """
    throttle = getattr(ctx, "login_throttle", None)
    if throttle is None:
        settings = SecuritySettings.from_config(ctx.config)
        throttle = ctx.login_throttle = LoginThrottle.from_settings(settings, ctx.reactor)
    return throttle


__all__ = [
    "EVENTS",
    "LoginBlocked",
    "LoginThrottle",
    "RateLimiter",
    "SecuritySettings",
    "SecuritySettingsError",
    "ThrottledPortal",
    "Verdict",
    "event",
    "login_throttle",
    "routing_trick",
    "tls_failure",
]
