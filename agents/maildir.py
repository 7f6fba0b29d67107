"""The mail store: one Maildir per user, with IMAP UIDs and folders.

Maildir (https://cr.yp.to/proto/maildir.html) keeps each message in its own
file and needs no locks to deliver:

* a message is written under ``tmp/``, then renamed into ``new/``; rename is
  atomic, so a reader sees the whole message or nothing;
* ``new/`` holds mail no client has seen yet; a client that sees it moves it
  to ``cur/`` and from then on keeps its flags in the name, after ``:2,``
  (``S`` seen, ``R`` replied, ``F`` flagged, ``T`` trashed, ``D`` draft);
* the part of the name before ``:`` never changes: it is the message's key.

IMAP (RFC 3501 2.3.1.1) also wants a *UID* per message that stays the same
across sessions, plus a UIDVALIDITY that changes if UIDs are ever reused.
Maildir has none, so, like Dovecot's ``dovecot-uidlist``, each folder keeps a
small ``mailpipe-uidlist`` file mapping keys to UIDs. It is rewritten
durably under an ``flock``: delivery threads and the reactor thread of the
MDA (and any other process) take turns.

Folders follow Maildir++: the user's Maildir is INBOX, and folder ``Junk``
is the sub-Maildir ``.Junk``; ``.`` separates levels (``.Archive.2024``).

The layout on disk is ``root/<domain>/<localpart>/``. Addresses and folder
names come from the network, so every path component is checked: no ``..``,
no ``/``, no symlink anywhere under ``root``.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import itertools
import os
import re
import socket
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from twisted.internet import threads
from twisted.python import log

from agents.durable import write_durably

INBOX = "INBOX"
#: The hierarchy delimiter of Maildir++ folder names, also used over IMAP.
DELIMITER = "."
#: The folders every user has; IMAP clients look for them (RFC 6154 roles).
DEFAULT_FOLDERS = (INBOX, "Junk", "Sent", "Trash")

UIDLIST_NAME = "mailpipe-uidlist"
_INFO_SEPARATOR = ":2,"
#: Maildir flag letters, in the order the spec asks for (ASCII order).
FLAG_LETTERS = "DFPRST"

_LOCAL_PART = re.compile(r"[a-z0-9!#$%&'*+=?^_`{|}~-]+(\.[a-z0-9!#$%&'*+=?^_`{|}~-]+)*\Z")
_DOMAIN = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*\Z")
_FOLDER_FORBIDDEN = re.compile(r"[/\\\x00-\x1f\x7f]")


class UnsafePath(ValueError):
    """An address or folder name that would leave the user's Maildir."""


class NoSuchFolder(LookupError):
    """The folder does not exist."""


class FolderExists(ValueError):
    """CREATE or RENAME onto a folder that already exists."""


# --------------------------------------------------------------------------
# Names and paths


def split_address(address: str) -> tuple[str, str]:
    """``Alice@Sender.TEST`` -> ``("alice", "sender.test")``, or UnsafePath.

    Only dot-atom local parts (RFC 5322 3.4.1) are accepted: they cannot
    spell ``..``, ``/`` or a hidden file, so they are safe as directory names.
    """
    if isinstance(address, bytes):
        address = address.decode("utf-8", "replace")
    local, at, domain = address.strip().lower().rpartition("@")
    if not at or not _LOCAL_PART.match(local) or not _DOMAIN.match(domain):
        raise UnsafePath(f"not a safe mailbox address: {address!r}")
    return local, domain


def check_folder_name(name: str) -> str:
    """Return the canonical folder name, or raise UnsafePath.

    INBOX is case-insensitive (RFC 3501 5.1); other names are kept as given.
    A name is levels joined by ``.``; no level may be empty (which rules out
    ``..`` and a leading or trailing dot) or hold ``/``, ``\\`` or controls.
    """
    if not isinstance(name, str) or not name or len(name) > 200:
        raise UnsafePath(f"bad folder name: {name!r}")
    if name.upper() == INBOX:
        return INBOX
    levels = name.split(DELIMITER)
    if any(not level or _FOLDER_FORBIDDEN.search(level) for level in levels):
        raise UnsafePath(f"bad folder name: {name!r}")
    return name


@functools.cache
def _host_in_names() -> str:
    """This host's name as it goes into Maildir file names, ``/`` and ``:`` escaped.

    Asked once per process: the answer does not change while an agent runs,
    and asking is a system call made in the disk thread at every delivery.
    """
    return socket.gethostname().replace("/", r"\057").replace(":", r"\072")


def _ensure_directory(path: Path, create: bool = True) -> bool:
    """Make sure ``path`` is a real directory (not a symlink); maybe create it."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        if not create:
            return False
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise UnsafePath(f"{path} is not a plain directory")
    return True


def format_info(letters: str) -> str:
    """The ``:2,`` info suffix for a set of flag letters, sorted as Maildir asks."""
    return _INFO_SEPARATOR + "".join(sorted(set(letters)))


def split_filename(filename: str) -> tuple[str, str]:
    """``key:2,FS`` -> ``("key", "FS")``; a name without info has no flags."""
    key, sep, letters = filename.partition(_INFO_SEPARATOR)
    if not sep:
        key = filename.partition(":")[0]
    return key, letters


# --------------------------------------------------------------------------
# One Maildir


@dataclass(frozen=True)
class MessageFile:
    """One message as found on disk, with its IMAP UID.

    ``location`` is the file's path as a plain string: a scan of a big
    folder makes one of these per message, and a ``Path`` costs several
    times more to build than the string the directory listing already gave.
    """

    uid: int
    key: str
    location: str

    @property
    def path(self) -> Path:
        return Path(self.location)

    @property
    def flags(self) -> str:
        """Maildir flag letters, e.g. ``"RS"``; messages in ``new/`` have none."""
        return split_filename(os.path.basename(self.location))[1] if not self.is_new else ""

    @property
    def is_new(self) -> bool:
        return os.path.basename(os.path.dirname(self.location)) == "new"


@dataclass(frozen=True)
class Snapshot:
    """A folder's messages in UID order, with UIDVALIDITY and UIDNEXT."""

    uid_validity: int
    uid_next: int
    messages: list[MessageFile]
    #: Keys of messages that this scan moved from ``new/`` to ``cur/``.
    claimed: frozenset[str] = frozenset()


class _UidList:
    """The parsed ``mailpipe-uidlist``: ``3 V<validity> N<next>`` then ``<uid> :<key>``.

    The header mimics Dovecot's ``dovecot-uidlist`` version 3, so a student
    who has seen one recognises the other.
    """

    def __init__(self, validity: int, uid_next: int, uids: dict[str, int]):
        self.validity, self.uid_next, self.uids = validity, uid_next, uids
        self.keys = {uid: key for key, uid in uids.items()}  # the other way round

    @classmethod
    def fresh(cls) -> "_UidList":
        return cls(int(time.time()), 1, {})

    @classmethod
    def parse(cls, text: str) -> "_UidList":
        lines = text.splitlines()
        header = dict(
            (field[0], int(field[1:])) for field in lines[0].split()[1:] if field[1:].isdigit()
        )
        uids = {}
        for line in lines[1:]:
            uid, _, key = line.partition(" :")
            uids[key] = int(uid)
        # Records are appended after the header is written, so its N is only
        # a lower bound (as in Dovecot): the next UID follows the highest record.
        uid_next = max([header["N"]] + [uid + 1 for uid in uids.values()])
        return cls(header["V"], uid_next, uids)

    def assign(self, key: str) -> int:
        uid = self.uids.get(key)
        if uid is None:
            uid = self.uids[key] = self.uid_next
            self.keys[uid] = key
            self.uid_next += 1
        return uid

    def forget(self, key: str) -> None:
        self.keys.pop(self.uids.pop(key), None)

    def render(self) -> bytes:
        lines = [f"3 V{self.validity} N{self.uid_next}"]
        lines += [f"{uid} :{key}" for key, uid in sorted(self.uids.items(), key=lambda i: i[1])]
        return ("\n".join(lines) + "\n").encode()


class Maildir:
    """One Maildir folder: ``tmp/``, ``new/``, ``cur/`` and the UID list.

    What waits for the disk, and what does not (the whole policy, here):

    * ``deliver`` fsyncs (the message, its directory, its UID record), so
      the MDA calls it in its disk thread and says 250 only after it;
    * everything else is quick and meant for the reactor thread, which must
      never wait for the disk, so it is not fsynced: flag renames, expunges
      (:meth:`remove`), folder deletes and renames, subscriptions. A crash
      can at worst undo one of them (a \\Seen flag lost, a deleted message
      or folder back), never lose a message; Dovecot makes the same trade.
      The one exception is a scan that finds files without a UID (put there
      by hand, or left by a crash): it rewrites the UID list durably.
    """

    _counter = itertools.count(1)

    #: Parsed UID lists of this process, by path, with the (inode, size,
    #: mtime) they were read at: a delivery then costs a ``stat`` instead of
    #: reading and parsing the whole list, which grows with the mailbox.
    _uidlist_cache: dict[Path, tuple[tuple, "_UidList"]] = {}

    def __init__(self, path: Path, create: bool = True):
        self.path = Path(path)
        for directory in (self.path, self.path / "tmp", self.path / "new", self.path / "cur"):
            if not _ensure_directory(directory, create):
                raise NoSuchFolder(str(self.path))
        self._uidlist_path = self.path / UIDLIST_NAME
        self._lock_path = self.path / (UIDLIST_NAME + ".lock")
        # key -> current file; refreshed by every scan, used to find a file
        # whose name changed because another session changed its flags.
        self._where: dict[str, str] = {}

    # -- delivery -----------------------------------------------------------

    def unique_name(self, size: int) -> str:
        """A name no other delivery can pick: ``<sec>.M<usec>P<pid>Q<n>.<host>,S=<size>``.

        Time, process id and a per-process counter make it unique on this
        host; ``S=`` lets readers learn the size without a ``stat``
        (a Maildir++ extension that Dovecot and Courier use).
        """
        now = time.time()
        seconds, micros = int(now), int((now % 1) * 1_000_000)
        return f"{seconds}.M{micros:06d}P{os.getpid()}Q{next(self._counter)}.{_host_in_names()},S={size}"

    def deliver(self, content: bytes, flags: str = "", mtime: float | None = None) -> str:
        """Store a message durably and give it a UID; return its key. Blocking.

        The bytes are stored exactly as given (the MDA passes CRLF lines, so
        the file size is the RFC822.SIZE that IMAP reports and POP3 counts).
        With ``flags`` (IMAP APPEND) the message goes straight to ``cur/``.
        """
        return self.deliver_with_uid(content, flags, mtime)[0]

    def deliver_with_uid(self, content: bytes, flags: str = "", mtime: float | None = None) -> tuple[str, int]:
        """Like :meth:`deliver`, and also return the UID the message got."""
        key = self.unique_name(len(content))
        final = self.path / "cur" / (key + format_info(flags)) if flags else self.path / "new" / key
        write_durably(self.path / "tmp" / key, final, content)
        if mtime is not None:
            os.utime(final, (mtime, mtime))
        appended = None
        with self._locked():
            signature = self._uidlist_signature()  # None: there is no list yet
            uidlist = self._read_uidlist(signature)
            uid = uidlist.assign(key)
            if signature is not None:
                appended = self._append_uid(uidlist, key, uid)
            else:
                self._write_uidlist(uidlist)
        if appended is not None:
            # The fsync waits for the disk, so it runs after the lock is given
            # back: an IMAP session scanning on the reactor thread takes that
            # lock, and must never wait for our disk.
            try:
                os.fsync(appended)
            finally:
                os.close(appended)
        return key, uid

    # -- reading ------------------------------------------------------------

    def scan(self, claim_new: bool = False) -> Snapshot:
        """List the messages with their UIDs, giving UIDs to any without one.

        With ``claim_new`` the caller is an IMAP session that will show the
        messages of ``new/`` as \\Recent: they move to ``cur/``, so that no
        other session reports them as recent too (RFC 3501 2.3.2).
        """
        with self._locked():
            files = self._list_files()
            uidlist = self._read_uidlist(self._uidlist_signature())
            changed = False
            for key in sorted(files):
                if key not in uidlist.uids:
                    uidlist.assign(key)
                    changed = True
            for key in [k for k in uidlist.uids if k not in files]:
                uidlist.forget(key)
                changed = True
            if changed:
                self._write_uidlist(uidlist)
            claimed = set()
            if claim_new:
                for key, path in files.items():
                    if os.path.basename(os.path.dirname(path)) == "new":
                        try:
                            files[key] = str(self._rename(
                                path, self.path / "cur" / (key + format_info(""))
                            ))
                            claimed.add(key)
                        except FileNotFoundError:
                            pass
            self._where = dict(files)
            # Read the list while the lock is held: a delivery in another
            # thread may give out the next UID the moment it is released, and
            # a snapshot whose uid_next counts a message it does not list
            # would make a session skip that message for good.
            messages = sorted(
                (MessageFile(uidlist.uids[key], key, path) for key, path in files.items()),
                key=lambda m: m.uid,
            )
            return Snapshot(uidlist.validity, uidlist.uid_next, messages, frozenset(claimed))

    def keys_of(self, uids: Iterable[int]) -> dict[int, str] | None:
        """The keys of these UIDs, from the UID list as this process last saw it.

        For the reactor thread: no lock and no disk, only what a delivery or
        scan of this process put in memory (a delivery thread may be adding
        to it meanwhile; a lookup is safe under the GIL). None if one of the
        UIDs is not known there; the caller then scans.
        """
        cached = self._uidlist_cache.get(self._uidlist_path)
        if cached is None:
            return None
        keys = {uid: cached[1].keys.get(uid) for uid in uids}
        return None if None in keys.values() else keys

    def find(self, key: str) -> Path | None:
        """The current file of a message, or None once it has been deleted."""
        path = self._where.get(key)
        if path is None or not os.path.exists(path):
            self._where = self._list_files()
            path = self._where.get(key)
        return Path(path) if path is not None else None

    def set_flags(self, key: str, letters: str) -> Path | None:
        """Rename the message to carry exactly these flags (moving it to ``cur/``)."""
        path = self.find(key)
        if path is None:
            return None
        target = self.path / "cur" / (key + format_info(letters))
        if target != path:
            try:
                self._rename(path, target)
            except FileNotFoundError:
                return None
        self._where[key] = str(target)
        return target

    def add_flags(self, key: str, letters: str) -> Path | None:
        """Add flags to those the file carries now (another session may have set some)."""
        path = self.find(key)
        if path is None:
            return None
        current = split_filename(path.name)[1] if path.parent.name == "cur" else ""
        return self.set_flags(key, "".join(sorted(set(current) | set(letters))))

    def remove(self, key: str) -> bool:
        """Delete a message (IMAP EXPUNGE, POP3 DELE+QUIT).

        Not fsynced, like a flag rename: this runs on the reactor thread,
        which must never wait for the disk, and a crash right after can only
        bring a deleted message back, never lose one (Dovecot makes the same
        trade). Durability matters where a message is *accepted*.
        """
        path = self.find(key)
        if path is None:
            return False
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        self._where.pop(key, None)
        return True

    # -- internals ----------------------------------------------------------

    def _list_files(self) -> dict[str, str]:
        """Every message file in ``new/`` and ``cur/``: key -> path (a string, see MessageFile)."""
        files: dict[str, str] = {}
        for sub in ("new", "cur"):
            with os.scandir(self.path / sub) as entries:
                for entry in entries:
                    if entry.name.startswith(".") or not entry.is_file(follow_symlinks=False):
                        continue
                    files[split_filename(entry.name)[0]] = entry.path
        return files

    def _rename(self, src: Path, dst: Path) -> Path:
        os.rename(src, dst)
        return dst

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the folder's UID lock: an ``flock`` on a file of its own.

        ``flock`` belongs to an open file description, so two threads of one
        process exclude each other as well as two processes do.
        """
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _uidlist_signature(self) -> tuple | None:
        try:
            st = os.stat(self._uidlist_path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _read_uidlist(self, signature: tuple | None) -> _UidList:
        """The folder's UID list (call with the lock held).

        ``signature`` is the list file's :meth:`_uidlist_signature`, just
        taken by the caller (who may need it too: one ``stat``, not two).
        """
        cached = self._uidlist_cache.get(self._uidlist_path)
        if signature is not None and cached is not None and cached[0] == signature:
            return cached[1]
        try:
            uidlist = _UidList.parse(self._uidlist_path.read_text())
            self._uidlist_cache[self._uidlist_path] = (signature, uidlist)
            return uidlist
        except FileNotFoundError:
            return _UidList.fresh()
        except (ValueError, KeyError, IndexError):
            # A damaged list: start again with a new UIDVALIDITY, which tells
            # every IMAP client to forget the UIDs it cached (RFC 3501 2.3.1.1).
            log.msg(f"mailpipe: damaged {self._uidlist_path}, renumbering")
            return _UidList.fresh()

    def _write_uidlist(self, uidlist: _UidList) -> None:
        """Rewrite the whole list (call with the lock held)."""
        tmp = self.path / (UIDLIST_NAME + ".tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()  # left over by a crash; we hold the lock
        self._uidlist_cache.pop(self._uidlist_path, None)
        write_durably(tmp, self._uidlist_path, uidlist.render())
        self._uidlist_cache[self._uidlist_path] = (self._uidlist_signature(), uidlist)

    def _append_uid(self, uidlist: _UidList, key: str, uid: int) -> int:
        """Add one record at the end, as Dovecot does (call with the lock held).

        One small append instead of rewriting the whole list at every
        delivery. Returns the open file: the caller fsyncs it, once the lock
        is released, and closes it. A crash before that can only lose the
        last record, never the message: the next scan gives the file a UID again.
        """
        self._uidlist_cache.pop(self._uidlist_path, None)
        fd = os.open(self._uidlist_path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
        try:
            os.write(fd, f"{uid} :{key}\n".encode())
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        self._uidlist_cache[self._uidlist_path] = ((st.st_ino, st.st_size, st.st_mtime_ns), uidlist)
        return fd


# --------------------------------------------------------------------------
# All users' Maildirs


Subscriber = Callable[[str, str], None]


class MailStore:
    """Every user's Maildir under ``root/<domain>/<localpart>/``.

    ``deliver`` writes in a thread and then, back on the reactor thread,
    tells subscribers (IMAP sessions in IDLE) about the new message at once.
    ``run_in_thread`` is :func:`deferToThread` unless a test passes a
    synchronous stand-in.
    """

    def __init__(self, root: Path, run_in_thread=threads.deferToThread):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._run_in_thread = run_in_thread
        self._subscribers: dict[str, list[Subscriber]] = {}
        self._delivered_uids: dict[tuple[str, str, str], int] = {}

    # -- paths --------------------------------------------------------------

    def user_path(self, address: str, create: bool = True) -> Path:
        local, domain = split_address(address)
        path = self.root
        for part in (domain, local):
            path = path / part
            if not _ensure_directory(path, create):
                raise NoSuchFolder(address)
        return path

    def folder_path(self, address: str, folder: str = INBOX, create: bool = True) -> Path:
        folder = check_folder_name(folder)
        user = self.user_path(address, create)
        return user if folder == INBOX else user / (DELIMITER + folder)

    def maildir(self, address: str, folder: str = INBOX, create: bool = True) -> Maildir:
        """The Maildir of one folder; created on demand unless ``create`` is False."""
        path = self.folder_path(address, folder, create)
        maildir = Maildir(path, create)
        if folder != INBOX and create:
            marker = path / "maildirfolder"  # Maildir++: "this is a subfolder"
            if not marker.exists():
                marker.touch(0o600)
        return maildir

    # -- folders ------------------------------------------------------------

    def folder_exists(self, address: str, folder: str) -> bool:
        try:
            path = self.folder_path(address, folder, create=False)
        except (UnsafePath, NoSuchFolder):
            return False
        return (path / "cur").is_dir() and not path.is_symlink()

    def list_folders(self, address: str) -> list[str]:
        """INBOX first, then every Maildir++ subfolder, sorted."""
        user = self.user_path(address)
        names = []
        for entry in os.scandir(user):
            if entry.name.startswith(DELIMITER) and entry.is_dir(follow_symlinks=False):
                name = entry.name[1:]
                try:
                    check_folder_name(name)
                except UnsafePath:
                    continue
                if os.path.isdir(os.path.join(entry.path, "cur")):
                    names.append(name)
        return [INBOX] + sorted(names)

    def create_folder(self, address: str, folder: str) -> None:
        if self.folder_exists(address, folder):
            raise FolderExists(folder)
        self.maildir(address, folder)

    def delete_folder(self, address: str, folder: str) -> None:
        """Delete a folder and its messages. INBOX cannot be deleted."""
        folder = check_folder_name(folder)
        if folder == INBOX or not self.folder_exists(address, folder):
            raise NoSuchFolder(folder)
        path = self.folder_path(address, folder, create=False)
        for sub in ("tmp", "new", "cur"):
            for entry in os.scandir(path / sub):
                os.unlink(entry.path)
            os.rmdir(path / sub)
        for entry in os.scandir(path):
            os.unlink(entry.path)
        os.rmdir(path)  # not fsynced: see Maildir

    def rename_folder(self, address: str, old: str, new: str) -> None:
        """Rename a folder and its subfolders (``A`` -> ``B`` moves ``A.x`` to ``B.x``)."""
        old, new = check_folder_name(old), check_folder_name(new)
        if INBOX in (old, new) or not self.folder_exists(address, old):
            raise NoSuchFolder(old)
        if self.folder_exists(address, new):
            raise FolderExists(new)
        moves = [(old, new)] + [
            (name, new + name[len(old) :])
            for name in self.list_folders(address)
            if name.startswith(old + DELIMITER)
        ]
        for src, dst in moves:
            check_folder_name(dst)
            os.rename(self.folder_path(address, src, False), self.folder_path(address, dst, False))
        # not fsynced: see Maildir

    def subscriptions(self, address: str) -> list[str]:
        """Maildir++ ``subscriptions``: the folders IMAP LSUB lists."""
        try:
            text = (self.user_path(address) / "subscriptions").read_text()
        except FileNotFoundError:
            return []
        return [line for line in text.splitlines() if line]

    def set_subscriptions(self, address: str, names: list[str]) -> None:
        user = self.user_path(address)
        data = "".join(name + "\n" for name in dict.fromkeys(names)).encode()
        tmp = user / "subscriptions.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, user / "subscriptions")  # whole or not at all; not fsynced: see Maildir

    # -- delivery and notification -------------------------------------------

    def deliver_now(self, address: str, content: bytes, folder: str = INBOX, **options) -> str:
        """Deliver in the calling thread (blocking). Does not notify."""
        return self._deliver(address, content, folder, **options)[0]

    def _deliver(self, address: str, content: bytes, folder: str, **options) -> tuple[str, int]:
        return self.maildir(address, folder).deliver_with_uid(content, **options)

    def delivered_uid(self, address: str, folder: str, key: str) -> int | None:
        """The UID a message just delivered got (for subscribers, during notify)."""
        return self._delivered_uids.get((address.lower(), folder, key))

    def deliver(self, address: str, content: bytes, folder: str = INBOX, **options):
        """Deliver in a thread; fire with the key once the message is on disk.

        Subscribers are told on the reactor thread, after the message is
        durable, so an IMAP client in IDLE can fetch it as soon as it hears.
        """
        address = address.lower()
        folder = check_folder_name(folder)
        d = self._run_in_thread(self._deliver, address, content, folder, **options)

        def delivered(result: tuple[str, int]) -> str:
            key, uid = result
            self._delivered_uids[(address, folder, key)] = uid
            try:
                self.notify(address, folder, key)
            finally:
                self._delivered_uids.pop((address, folder, key), None)
            return key

        return d.addCallback(delivered)

    def subscribe(self, address: str, callback: Subscriber) -> None:
        """Call ``callback(folder, key)`` whenever mail for ``address`` arrives."""
        self._subscribers.setdefault(address.lower(), []).append(callback)

    def unsubscribe(self, address: str, callback: Subscriber) -> None:
        callbacks = self._subscribers.get(address.lower(), [])
        if callback in callbacks:
            callbacks.remove(callback)
        if not callbacks:
            self._subscribers.pop(address.lower(), None)

    def notify(self, address: str, folder: str, key: str) -> None:
        for callback in list(self._subscribers.get(address.lower(), ())):
            try:
                callback(folder, key)
            except Exception:
                log.err(None, f"mail store subscriber failed for {address}")


__all__ = [
    "DEFAULT_FOLDERS",
    "DELIMITER",
    "INBOX",
    "FolderExists",
    "MailStore",
    "Maildir",
    "MessageFile",
    "NoSuchFolder",
    "Snapshot",
    "UnsafePath",
    "check_folder_name",
    "split_address",
]
