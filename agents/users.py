"""Lab users and how agents check their passwords.

Passwords are never stored in clear: ``users.json`` in the lab home holds a
salted scrypt hash per user (RFC 7914; the parameters are OWASP's minimum).
Agents check credentials through a Twisted cred checker, so protocol code
(SMTP AUTH, IMAP LOGIN, POP3 USER/PASS) never sees how passwords are kept.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import time
from pathlib import Path

from twisted.cred import credentials, error
from twisted.cred.checkers import ICredentialsChecker
from twisted.internet import defer, threads
from zope.interface import implementer

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1


def hash_password(password: str, salt: bytes | None = None) -> str:
    salt = salt or os.urandom(16)
    digest = hashlib.scrypt(
        password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32
    )
    b64 = base64.b64encode
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
    except ValueError:
        return False
    if scheme != "scrypt":
        return False
    computed = hashlib.scrypt(
        password.encode(),
        salt=base64.b64decode(salt),
        n=int(n),
        r=int(r),
        p=int(p),
        dklen=32,
    )
    return hmac.compare_digest(computed, base64.b64decode(digest))


class UserDB:
    """The ``users.json`` file: ``{"alice@sender.test": "scrypt$..."}``."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def load(self) -> dict[str, str]:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}

    def save(self, users: dict[str, str]) -> None:
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(users, f, indent=1, sort_keys=True)
        os.replace(tmp, self.path)

    def set_password(self, address: str, password: str) -> None:
        users = self.load()
        users[address.lower()] = hash_password(password)
        self.save(users)

    def ensure(self, address: str, password: str) -> None:
        """Add a user with this password unless it is already there."""
        users = self.load()
        if address.lower() not in users:
            users[address.lower()] = hash_password(password)
            self.save(users)

    def remove(self, address: str) -> bool:
        users = self.load()
        found = users.pop(address.lower(), None) is not None
        self.save(users)
        return found

    def check(self, address: str, password: str) -> bool:
        stored = self.load().get(address.lower())
        if stored is None:
            # Spend the same time as for a real user, so timing does not
            # tell which addresses exist.
            verify_password(password, hash_password("x", b"0" * 16))
            return False
        return verify_password(password, stored)


@implementer(ICredentialsChecker)
class UserDBChecker:
    """A cred checker over :class:`UserDB`; the avatar id is the user's address.

    scrypt is deliberately slow (tens of milliseconds), so the check runs in a
    thread: the reactor keeps serving every other connection meanwhile.
    """

    credentialInterfaces = (credentials.IUsernamePassword,)

    def __init__(self, db: UserDB, cache_ttl: float = 60.0, clock=time.monotonic):
        self.db = db
        # Like Dovecot's auth cache: a client that logs in again within a
        # minute with the same password skips the slow scrypt. The cache keeps
        # an HMAC of the password under a key that lives only in this process,
        # so it never holds a password, nor a hash that works elsewhere.
        self.cache_ttl = cache_ttl
        self._cache: dict[tuple[str, bytes], float] = {}
        self._cache_key = os.urandom(32)
        self._clock = clock

    def _cache_id(self, username: str, password: str) -> tuple[str, bytes]:
        return username.lower(), hmac.new(self._cache_key, password.encode(), "sha256").digest()

    def requestAvatarId(self, creds):
        username = creds.username
        password = creds.password
        if isinstance(username, bytes):
            username = username.decode("utf-8", "replace")
        if isinstance(password, bytes):
            password = password.decode("utf-8", "replace")
        key = self._cache_id(username, password)
        expires = self._cache.get(key)
        if expires is not None and expires > self._clock():
            return defer.succeed(username.lower())
        d = threads.deferToThread(self.db.check, username, password)

        def decide(ok: bool):
            if ok:
                if self.cache_ttl > 0:
                    self._cache[key] = self._clock() + self.cache_ttl
                return username.lower()
            return defer.fail(error.UnauthorizedLogin("bad username or password"))

        return d.addCallback(decide)
