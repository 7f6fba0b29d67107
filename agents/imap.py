"""IMAP4rev1 (RFC 3501) over the Maildir store, on top of Twisted's IMAP4Server.

Twisted parses IMAP and runs the state machine; it has no mailbox that
keeps mail on disk, so this module supplies one over :mod:`agents.maildir`:

* :class:`MaildirAccount` (``IAccount``): a user's folders; INBOX, Junk,
  Sent and Trash always exist;
* :class:`MaildirMailbox` (``IMailbox``): one SELECTed folder as this session
  sees it. IMAP numbers messages 1..N per session, so the view only changes
  when the client is told: new mail at once with ``* N EXISTS`` (also during
  IDLE, RFC 2177), removals only at EXPUNGE, NOOP, CHECK or IDLE;
* :class:`MaildirMessage` (``IMessage``): one message file, its flags kept
  in the Maildir file name, its UID in the folder's UID list.

:class:`IMAPServer` adds what the lab needs on top of Twisted: a trace of
every command and response line, \\Seen set by a FETCH of the body
(RFC 3501 6.4.5), raw header bytes for BODY[HEADER], no plaintext commands
accepted after STARTTLS, and the fix for Twisted issue #12262.
"""

from __future__ import annotations

import bisect
import datetime
import email.utils
import io
import os
import time
import re
from email.message import Message
from email.parser import BytesHeaderParser
from email.policy import compat32

from twisted.internet import defer, interfaces
from twisted.mail import imap4
from twisted.python import log
from zope.interface import implementer

from agents.maildir import (
    DEFAULT_FOLDERS,
    DELIMITER,
    FolderExists,
    MailStore,
    MessageFile,
    NoSuchFolder,
    UnsafePath,
    check_folder_name,
    format_info,
)
from agents.security import ThrottledPortal, tls_failure
from agents.security import event as security_event
from agents.retrieval import MailboxRealm, RetrievalServerFactory, TracedLoginMixin, make_factory
from agents.net import no_delay
from agents.trace import NULL_TRACER, Tracer

#: IMAP system flags (RFC 3501 2.3.2) and their Maildir letters.
FLAG_TO_LETTER = {
    "\\Seen": "S",
    "\\Answered": "R",
    "\\Flagged": "F",
    "\\Deleted": "T",
    "\\Draft": "D",
}
LETTER_TO_FLAG = {letter: flag for flag, letter in FLAG_TO_LETTER.items()}
_FLAG_BY_LOWER = {flag.lower(): flag for flag in FLAG_TO_LETTER}
RECENT = "\\Recent"

#: RFC 6154 special-use attributes shown in LIST for the default folders.
SPECIAL_USE = {"Junk": "\\Junk", "Sent": "\\Sent", "Trash": "\\Trash"}


def flags_to_letters(flags) -> set[str]:
    """IMAP flags (case-insensitive) -> Maildir letters; keywords are dropped."""
    letters = set()
    for flag in flags:
        if isinstance(flag, bytes):
            flag = flag.decode("ascii", "replace")
        known = _FLAG_BY_LOWER.get(flag.lower())
        if known:
            letters.add(FLAG_TO_LETTER[known])
    return letters


def letters_to_flags(letters: str) -> list[str]:
    return [LETTER_TO_FLAG[letter] for letter in sorted(letters) if letter in LETTER_TO_FLAG]


def _literal(data: bytes) -> bytes:
    """An IMAP literal: ``{size}`` CRLF then the exact octets (RFC 3501 4.3)."""
    return b"{%d}\r\n%b" % (len(data), data)


# --------------------------------------------------------------------------
# Messages


def split_header_body(raw: bytes) -> tuple[bytes, bytes]:
    """Split at the first empty line; the header keeps its final CRLF CRLF."""
    match = re.search(rb"\r?\n\r?\n", raw)
    if raw.startswith((b"\r\n", b"\n")):
        end = 2 if raw.startswith(b"\r\n") else 1
        return raw[:end], raw[end:]
    if match is None:
        return raw, b""
    return raw[: match.end()], raw[match.end() :]


def _header_fields(header: bytes) -> list[tuple[str, bytes]]:
    """The header as ``(lower-case name, raw field bytes with folding)`` pairs."""
    fields: list[tuple[str, bytes]] = []
    for line in header.splitlines(keepends=True):
        if not line.strip():
            break
        if line[:1] in (b" ", b"\t") and fields:
            name, raw = fields[-1]
            fields[-1] = (name, raw + line)
        else:
            name = line.split(b":", 1)[0].strip().decode("ascii", "replace").lower()
            fields.append((name, line))
    return fields


@implementer(imap4.IMessagePart)
class MimePart:
    """A message or MIME body part, served from its exact bytes.

    IMAP hands out parts by number (``BODY[2.1]``) and sizes in octets, so
    parts are cut from the raw bytes along the multipart boundaries
    (RFC 2046 5.1.1) rather than re-serialised by a MIME library.
    """

    def __init__(self, raw: bytes):
        self._raw = raw

    def raw(self) -> bytes:
        return self._raw

    def header_bytes(self, names=(), negate: bool = True) -> bytes:
        """The header (or the named fields, or all but them) as sent, plus the blank line."""
        header, _ = split_header_body(self.raw())
        if not names and negate:
            return header if header.endswith(b"\n") else header + b"\r\n"
        wanted = {n.decode() if isinstance(n, bytes) else n for n in names}
        wanted = {n.lower() for n in wanted}
        kept = [raw for name, raw in _header_fields(header) if (name in wanted) != negate]
        return b"".join(kept) + b"\r\n"

    def _parsed(self) -> Message:
        header, _ = split_header_body(self.raw())
        return BytesHeaderParser(policy=compat32).parsebytes(header)

    def getHeaders(self, negate, *names):
        wanted = {(n.decode() if isinstance(n, bytes) else n).lower() for n in names}
        headers = {}
        for name, value in self._parsed().items():
            key = name.lower()
            if (key in wanted) != negate and key not in headers:
                headers[key] = value
        return headers

    def getBodyFile(self):
        return io.BytesIO(split_header_body(self.raw())[1])

    def getSize(self):
        return len(self.raw())

    def _content_type(self) -> tuple[str, str | None]:
        parsed = self._parsed()
        return parsed.get_content_type(), parsed.get_boundary()

    def isMultipart(self):
        content_type, boundary = self._content_type()
        return content_type.startswith("multipart/") and boundary is not None

    def getSubPart(self, part):
        content_type, boundary = self._content_type()
        body = split_header_body(self.raw())[1]
        if content_type == "message/rfc822":
            if part != 0:
                raise IndexError(part)
            return MimePart(body)
        if not content_type.startswith("multipart/") or boundary is None:
            raise TypeError("not a multipart message")
        return MimePart(split_multipart(body, boundary.encode("ascii", "replace"))[part])


def split_multipart(body: bytes, boundary: bytes) -> list[bytes]:
    """The body parts between ``--boundary`` lines (RFC 2046 5.1.1).

    The CRLF before a delimiter line belongs to the delimiter, not to the
    part before it; the preamble and the epilogue are not parts.
    """
    delimiter = re.compile(rb"(?:\A|\r?\n)--" + re.escape(boundary) + rb"(--)?[ \t]*(?:\r?\n|\Z)")
    parts, start = [], None
    for match in delimiter.finditer(body):
        if start is not None:
            parts.append(body[start : match.start()])
        if match.group(1):
            break
        start = match.end()
    return parts


@implementer(imap4.IMessage, imap4.IMessageFile)
class MaildirMessage(MimePart):
    """One message of a mailbox view; the file is read only when needed."""

    def __init__(self, mailbox: "MaildirMailbox", uid: int, file: MessageFile):
        self._mailbox, self._uid, self._file = mailbox, uid, file
        self._raw: bytes | None = None

    def raw(self) -> bytes:
        if self._raw is None:
            path = self._mailbox.maildir.find(self._file.key) or self._file.location
            with open(path, "rb") as f:
                self._raw = f.read()
        return self._raw

    def open(self):
        return io.BytesIO(self.raw())

    def getUID(self):
        return self._uid

    def getFlags(self):
        return self._mailbox.flags_of(self._uid)

    def getInternalDate(self):
        """The delivery time, which Maildir keeps as the file's mtime."""
        path = self._mailbox.maildir.find(self._file.key) or self._file.location
        return email.utils.formatdate(os.stat(path).st_mtime, usegmt=True)

    def message_id(self) -> str | None:
        """The Message-ID, unfolded, for the trace (RFC 5322 3.6.4).

        A scan of the header lines, not a parse by the ``email`` package:
        this runs for every message a client fetches, and in a profile of
        the benchmark the full parse took about a tenth of the MDA's CPU.
        """
        header, _ = split_header_body(self.raw())
        for name, field in _header_fields(header):
            if name == "message-id":
                value = field.split(b":", 1)[1].decode("utf-8", "replace")
                return " ".join(value.split()) or None
        return None


# --------------------------------------------------------------------------
# Mailboxes


def parse_append_date(date) -> float | None:
    """An APPEND date-time (``"17-Jul-1996 02:44:25 -0700"``) -> epoch seconds."""
    if not date:
        return None
    if isinstance(date, bytes):
        date = date.decode("ascii", "replace")
    try:
        return datetime.datetime.strptime(date.strip(), "%d-%b-%Y %H:%M:%S %z").timestamp()
    except ValueError:
        return None


@implementer(
    imap4.IMailbox, imap4.ICloseableMailbox, imap4.IMessageCopier, imap4.ISearchableMailbox
)
class MaildirMailbox:
    """One folder as one IMAP session sees it (RFC 3501 2.3.1.2).

    ``_uids[i]`` is the UID of message sequence number ``i + 1``. The view is
    read lazily: APPEND and COPY only deliver into a folder and must not
    claim its \\Recent messages, which happens on the first real look.
    """

    def __init__(self, store: MailStore, address: str, folder: str, writeable: bool):
        self.mail_store, self.address, self.folder = store, address, folder
        self.maildir = store.maildir(address, folder, create=False)
        self.writeable = bool(writeable)
        self._loaded = False
        self._uids: list[int] = []
        self._files: dict[int, MessageFile] = {}
        self._recent: set[int] = set()
        self._uid_validity = 0
        self._uid_next = 1
        self._listeners: list = []
        self._last_rescan = self.clock()
        self._rescan_interval = self.RESCAN_INTERVAL

    # -- the view -------------------------------------------------------------

    def _view(self) -> list[int]:
        if not self._loaded:
            self._loaded = True
            self._sync(expunge=True)
        return self._uids

    def _sync(self, expunge: bool) -> list[int]:
        """Bring the view up to date; return expunged sequence numbers.

        New messages are appended at once. Vanished ones are removed only if
        ``expunge``, as RFC 3501 7.4.1 allows EXPUNGE responses only when no
        FETCH, STORE or SEARCH is running. The numbers come highest first,
        so each stays valid as the client applies the previous ones.
        """
        snapshot = self.maildir.scan(claim_new=self.writeable)
        self._uid_validity, self._uid_next = snapshot.uid_validity, snapshot.uid_next
        current = {m.uid: m for m in snapshot.messages}
        for m in snapshot.messages:
            if m.key in snapshot.claimed or (not self.writeable and m.is_new):
                self._recent.add(m.uid)
        expunged = []
        if expunge:
            for index in range(len(self._uids) - 1, -1, -1):
                uid = self._uids[index]
                if uid not in current:
                    expunged.append(index + 1)
                    del self._uids[index]
                    self._files.pop(uid, None)
                    self._recent.discard(uid)
        highest = self._uids[-1] if self._uids else 0
        self._uids.extend(uid for uid in sorted(current) if uid > highest)
        for uid in self._uids:
            if uid in current:
                self._files[uid] = current[uid]
        self._recent.intersection_update(self._files)
        return expunged

    #: Seconds between full rescans of the folder when a client enters IDLE
    #: (NOOP and CHECK always rescan: the client asks for news). New mail does
    #: not wait for them (the store tells each session at once); they catch
    #: what other sessions or programs changed: expunges, flags, files put in
    #: by hand. A rescan costs time in proportion to the folder's size (0.1 to
    #: 0.15 s for 27,000 messages on the project's VM), so the interval grows
    #: with what the last one took: a session spends at most RESCAN_SHARE of
    #: its time rescanning, and waits at most RESCAN_MAX_INTERVAL, Dovecot's
    #: default for IDLE (``mailbox_idle_check_interval``).
    RESCAN_INTERVAL = 1.0
    RESCAN_MAX_INTERVAL = 30.0
    RESCAN_SHARE = 0.01
    clock = staticmethod(time.monotonic)

    def poll(self, force: bool = False) -> tuple[list[int], bool]:
        """Catch up at a command boundary: (expunged numbers, whether mail arrived)."""
        before = len(self._view())
        started = self.clock()
        if not force and started - self._last_rescan < self._rescan_interval:
            return [], False
        expunged = self._sync(expunge=True)
        self._last_rescan = done = self.clock()
        self._rescan_interval = min(self.RESCAN_MAX_INTERVAL,
                                    max(self.RESCAN_INTERVAL, (done - started) / self.RESCAN_SHARE))
        return expunged, len(self._uids) > before - len(expunged)

    def _delivered(self, folder: str, key: str) -> None:
        """Store subscriber: tell listeners (IDLE or not) about new mail at once."""
        if folder != self.folder or not self._loaded:
            return
        before = len(self._uids)
        if not self._append_delivered(key):
            self._sync(expunge=False)
        if len(self._uids) > before:
            for listener in list(self._listeners):
                listener.newMessages(len(self._uids), self.getRecentCount())

    def _append_delivered(self, key: str) -> bool:
        """Add just-delivered mail to the view without rescanning the folder.

        The store tells us the message's UID; if it is above everything we
        show, the message goes at the end (and, in a read-write session, is
        claimed as \\Recent by moving it to ``cur/``). Deliveries run in
        parallel threads, so the notice for UID 11 may come before the one
        for UID 10: then 10 and 11 are shown together, in UID order, with 10's
        key taken from the UID list (sequence numbers must follow UIDs, RFC
        3501 2.3.1.1), and 10's own notice later finds it shown. Anything
        else unusual falls back to a full scan, which costs time in
        proportion to the folder's size.
        """
        uid = self.mail_store.delivered_uid(self.address, self.folder, key)
        if uid is None:
            return False
        if uid in self._files:
            return True  # shown already, with a later UID's notice
        highest = self._uids[-1] if self._uids else 0
        if uid <= highest or uid < self._uid_next:
            return False
        keys = {uid: key}
        if uid > self._uid_next:
            earlier = self.maildir.keys_of(range(self._uid_next, uid))
            if earlier is None:
                return False
            keys.update(earlier)
        for new_uid in sorted(keys):
            if not self._show_new(new_uid, keys[new_uid]):
                return False  # the scan takes it from here; what we showed stays right
        return True

    def _show_new(self, uid: int, key: str) -> bool:
        """Append one message of ``new/`` to the view (claiming it if read-write)."""
        path = self.maildir.path / "new" / key
        if self.writeable:
            claimed = self.maildir.path / "cur" / (key + format_info(""))
            try:
                os.rename(path, claimed)
            except OSError:
                return False
            path = claimed
        elif not os.path.exists(path):
            return False
        self._uids.append(uid)
        self._files[uid] = MessageFile(uid, key, str(path))
        self.maildir._where[key] = str(path)  # so FETCH finds it without listing the folder
        self._recent.add(uid)
        self._uid_next = uid + 1
        return True

    def flags_of(self, uid: int) -> list[str]:
        file = self._files.get(uid)
        flags = letters_to_flags(file.flags) if file else []
        if uid in self._recent:
            flags.append(RECENT)
        return flags

    def _messages(self, messages: imap4.MessageSet, uid: bool):
        """(sequence number, UID) pairs in a sequence set, ``*`` being the highest.

        Each range is looked up in the view (UIDs ascend, RFC 3501 2.3.1.1,
        so a binary search finds them) instead of testing every message of
        the folder: ``FETCH 4711:4712`` costs the same in a big folder as in a
        small one. ``n:m`` is the same set as ``m:n`` (RFC 3501 9, seq-range).
        """
        view = self._view()
        if not view:
            return
        last = view[-1] if uid else len(view)
        indices: set[int] = set()
        for low, high in messages.ranges:
            low = last if low is None else low
            high = last if high is None else high
            if low > high:
                low, high = high, low
            if uid:
                indices.update(range(bisect.bisect_left(view, low), bisect.bisect_right(view, high)))
            else:
                indices.update(range(max(low, 1) - 1, min(high, len(view))))
        for index in sorted(indices):
            yield index + 1, view[index]

    # -- IMailboxInfo / IMailbox ----------------------------------------------

    def getFlags(self):
        return list(FLAG_TO_LETTER) + [RECENT]

    def getHierarchicalDelimiter(self):
        return DELIMITER

    def getUIDValidity(self):
        self._view()
        return self._uid_validity

    def getUIDNext(self):
        self._view()
        return self._uid_next

    def getUID(self, message):
        return self._view()[message - 1]

    def getMessageCount(self):
        return len(self._view())

    def getRecentCount(self):
        self._view()
        return len(self._recent)  # _sync keeps it a subset of the view

    def getUnseenCount(self):
        return sum(1 for uid in self._view() if "S" not in self._files[uid].flags)

    def isWriteable(self):
        return self.writeable

    def destroy(self):
        """Nothing to free: the folder's files go with MaildirAccount.delete."""

    def requestStatus(self, names):
        """STATUS (RFC 3501 6.3.10) from the same view that SELECT would show."""
        values = {
            "MESSAGES": self.getMessageCount,
            "RECENT": self.getRecentCount,
            "UIDNEXT": self.getUIDNext,
            "UIDVALIDITY": self.getUIDValidity,
            "UNSEEN": self.getUnseenCount,
        }
        return {name.upper(): values[name.upper()]() for name in names if name.upper() in values}

    def addListener(self, listener):
        if not self._listeners:
            self.mail_store.subscribe(self.address, self._delivered)
        self._listeners.append(listener)

    def removeListener(self, listener):
        if listener in self._listeners:
            self._listeners.remove(listener)
            if not self._listeners:
                self.mail_store.unsubscribe(self.address, self._delivered)

    def close(self):
        """ICloseableMailbox: stop hearing about deliveries."""
        for listener in list(self._listeners):
            self.removeListener(listener)

    def addMessage(self, message, flags=(), date=None):
        """APPEND: deliver durably in a thread; the store then notifies every view."""
        content = message.read()
        return self.mail_store.deliver(
            self.address,
            content,
            self.folder,
            flags="".join(sorted(flags_to_letters(flags))),
            mtime=parse_append_date(date),
        )

    def copy(self, message):
        """IMessageCopier: COPY keeps the flags and internal date (RFC 3501 6.4.7)."""
        flags = [f for f in message.getFlags() if f != RECENT]
        date = email.utils.parsedate_to_datetime(message.getInternalDate()).timestamp()
        return self.mail_store.deliver(
            self.address,
            message.raw(),
            self.folder,
            flags="".join(sorted(flags_to_letters(flags))),
            mtime=date,
        )

    def expunge(self):
        """Delete the \\Deleted messages (and report others' removals first)."""
        if not self.writeable:
            raise imap4.ReadOnlyMailbox()
        expunged = self._sync(expunge=True)
        for index in range(len(self._uids) - 1, -1, -1):
            uid = self._uids[index]
            file = self._files[uid]
            if "T" in file.flags:
                self.maildir.remove(file.key)
                del self._uids[index]
                del self._files[uid]
                self._recent.discard(uid)
                expunged.append(index + 1)
        return expunged

    def fetch(self, messages, uid):
        result = []
        for seq, message_uid in self._messages(messages, uid):
            file = self._files[message_uid]
            if self.maildir.find(file.key) is None:
                continue  # removed by another session; EXPUNGE comes at NOOP
            result.append((seq, MaildirMessage(self, message_uid, file)))
        return result

    def store(self, messages, flags, mode, uid):
        """STORE: +FLAGS (mode 1), -FLAGS (-1) or FLAGS (0), renaming the files."""
        if not self.writeable:
            raise imap4.ReadOnlyMailbox()
        letters = flags_to_letters(flags)
        changed = {}
        for seq, message_uid in list(self._messages(messages, uid)):
            file = self._files[message_uid]
            current = set(file.flags)
            if mode > 0:
                wanted = current | letters
            elif mode < 0:
                wanted = current - letters
            else:
                wanted = letters | (current - set(LETTER_TO_FLAG))  # keep P and others
            path = self.maildir.set_flags(file.key, "".join(sorted(wanted)))
            if path is None:
                continue
            self._files[message_uid] = MessageFile(message_uid, file.key, str(path))
            changed[seq] = self.flags_of(message_uid)
        return changed

    def search(self, query, uid):
        """SEARCH (RFC 3501 6.4.4): the matching sequence numbers.

        Twisted maps them to UIDs for UID SEARCH. Its own fallback search
        compares the query's bytes with str header values and fails.
        """
        view = self._view()
        highest = (len(view), view[-1] if view else 0)
        matches = []
        for seq, message_uid in enumerate(view, 1):
            message = MaildirMessage(self, message_uid, self._files[message_uid])
            if _Search(seq, message, highest).all(list(query)):
                matches.append(seq)
        return matches


_MONTHS = {m: i for i, m in enumerate("jan feb mar apr may jun jul aug sep oct nov dec".split(), 1)}


def _search_date(token: bytes) -> datetime.date:
    """A SEARCH date, ``1-Feb-1994`` (RFC 3501 9, ``date``)."""
    day, month, year = token.decode("ascii").split("-")
    return datetime.date(int(year), _MONTHS[month.lower()], int(day))


class _Search:
    """Evaluates one SEARCH program against one message, key by key."""

    _FLAG_KEYS = {
        b"ANSWERED": ("\\Answered", True),
        b"DELETED": ("\\Deleted", True),
        b"DRAFT": ("\\Draft", True),
        b"FLAGGED": ("\\Flagged", True),
        b"RECENT": (RECENT, True),
        b"SEEN": ("\\Seen", True),
        b"OLD": (RECENT, False),
        b"UNANSWERED": ("\\Answered", False),
        b"UNDELETED": ("\\Deleted", False),
        b"UNDRAFT": ("\\Draft", False),
        b"UNFLAGGED": ("\\Flagged", False),
        b"UNSEEN": ("\\Seen", False),
    }
    _HEADER_KEYS = {b"BCC", b"CC", b"FROM", b"SUBJECT", b"TO"}

    def __init__(self, seq: int, message: MaildirMessage, highest: tuple[int, int]):
        self.seq, self.message = seq, message
        self.last_seq, self.last_uid = highest

    def all(self, keys: list) -> bool:
        """Every key must match (keys are ANDed); evaluates them all in order."""
        result = True
        while keys:
            result = self.one(keys) and result
        return result

    def _text(self, keys: list) -> bytes:
        return keys.pop(0).lower()

    def _header(self, name: str, needle: bytes) -> bool:
        value = self.message.getHeaders(False, name).get(name.lower(), "")
        return needle.decode("utf-8", "replace").lower() in value.lower()

    def _internal_date(self) -> datetime.date:
        return email.utils.parsedate_to_datetime(self.message.getInternalDate()).date()

    def _sent_date(self) -> datetime.date | None:
        try:
            return email.utils.parsedate_to_datetime(
                self.message.getHeaders(False, "date").get("date", "")
            ).date()
        except (TypeError, ValueError):
            return None

    def one(self, keys: list) -> bool:
        key = keys.pop(0)
        if isinstance(key, list):
            return self.all(list(key))
        name = key.upper()
        if name == b"ALL":
            return True
        if name in self._FLAG_KEYS:
            flag, wanted = self._FLAG_KEYS[name]
            return (flag in self.message.getFlags()) == wanted
        if name == b"NEW":
            flags = self.message.getFlags()
            return RECENT in flags and "\\Seen" not in flags
        if name in self._HEADER_KEYS:
            return self._header(name.decode(), keys.pop(0))
        if name == b"HEADER":
            field = keys.pop(0).decode("ascii", "replace")
            return self._header(field, keys.pop(0))
        if name == b"BODY":
            return self._text(keys) in self.message.getBodyFile().read().lower()
        if name == b"TEXT":
            return self._text(keys) in self.message.raw().lower()
        if name in (b"KEYWORD", b"UNKEYWORD"):
            keys.pop(0)
            return name == b"UNKEYWORD"  # keywords are not kept
        if name in (b"LARGER", b"SMALLER"):
            size, limit = self.message.getSize(), int(keys.pop(0))
            return size > limit if name == b"LARGER" else size < limit
        if name in (b"BEFORE", b"ON", b"SINCE", b"SENTBEFORE", b"SENTON", b"SENTSINCE"):
            limit = _search_date(keys.pop(0))
            date = self._sent_date() if name.startswith(b"SENT") else self._internal_date()
            if date is None:
                return False
            if name.endswith(b"BEFORE"):
                return date < limit
            return date == limit if name.endswith(b"ON") else date >= limit
        if name == b"NOT":
            return not self.one(keys)
        if name == b"OR":
            first, second = self.one(keys), self.one(keys)
            return first or second
        if name == b"UID":
            return self.message.getUID() in imap4.parseIdList(keys.pop(0), self.last_uid)
        if key[:1].isdigit() or key[:1] == b"*":
            return self.seq in imap4.parseIdList(key, self.last_seq)
        raise imap4.IllegalQueryError(f"unknown search key {key!r}")


@implementer(imap4.IMailboxInfo)
class _ListedFolder:
    """What LIST shows about a folder: its attributes and the delimiter."""

    def __init__(self, attributes: list[str]):
        self._attributes = attributes

    def getFlags(self):
        return self._attributes

    def getHierarchicalDelimiter(self):
        return DELIMITER


@implementer(imap4.IAccount, imap4.INamespacePresenter)
class MaildirAccount:
    """A logged-in user's folders. Only this user's Maildir is reachable."""

    def __init__(self, store: MailStore, address: str):
        self.store, self.address = store, address.lower()
        for folder in DEFAULT_FOLDERS:
            store.maildir(self.address, folder)
        if not store.subscriptions(self.address):
            store.set_subscriptions(self.address, list(DEFAULT_FOLDERS))

    def _name(self, name) -> str:
        try:
            return check_folder_name(imap4._parseMbox(name))
        except UnsafePath as e:
            raise imap4.MailboxException(str(e))

    def addMailbox(self, name, mbox=None):
        return self.create(name)

    def create(self, pathspec):
        """CREATE, also making the levels above (RFC 3501 6.3.3)."""
        pathspec = imap4._parseMbox(pathspec).rstrip(DELIMITER)
        name = self._name(pathspec)
        if self.store.folder_exists(self.address, name):
            raise imap4.MailboxCollision(name)
        levels = name.split(DELIMITER)
        for depth in range(1, len(levels) + 1):
            self.store.maildir(self.address, DELIMITER.join(levels[:depth]))
        return True

    def select(self, name, readwrite=1):
        try:
            folder = self._name(name)
        except imap4.MailboxException:
            return None
        if not self.store.folder_exists(self.address, folder):
            return None
        return MaildirMailbox(self.store, self.address, folder, readwrite)

    def delete(self, name):
        name = self._name(name)
        if any(f.startswith(name + DELIMITER) for f in self.store.list_folders(self.address)):
            raise imap4.MailboxException("Mailbox has inferior hierarchical names")
        try:
            self.store.delete_folder(self.address, name)
        except NoSuchFolder:
            raise imap4.NoSuchMailbox(name)
        self.unsubscribe(name)
        return True

    def rename(self, oldname, newname):
        old, new = self._name(oldname), self._name(newname)
        try:
            self.store.rename_folder(self.address, old, new)
        except NoSuchFolder:
            raise imap4.NoSuchMailbox(old)
        except FolderExists:
            raise imap4.MailboxCollision(new)
        return True

    def isSubscribed(self, name):
        return imap4._parseMbox(name) in self.store.subscriptions(self.address)

    def subscribe(self, name):
        name = self._name(name)
        self.store.set_subscriptions(self.address, self.store.subscriptions(self.address) + [name])
        return True

    def unsubscribe(self, name):
        name = imap4._parseMbox(name)
        names = self.store.subscriptions(self.address)
        self.store.set_subscriptions(self.address, [n for n in names if n != name])
        return True

    def listMailboxes(self, ref, wildcard):
        """LIST: names matching ``ref + wildcard`` (``*`` any, ``%`` one level)."""
        ref, wildcard = imap4._parseMbox(ref), imap4._parseMbox(wildcard)
        if wildcard == "":
            # RFC 3501 6.3.8: LIST "" "" asks for the delimiter and the root.
            return [("", _ListedFolder(["\\Noselect"]))]
        pattern = imap4.wildcardToRegexp(ref + wildcard, DELIMITER)
        folders = self.store.list_folders(self.address)
        listed = []
        for name in folders:
            if not pattern.fullmatch(name):
                continue
            has_children = any(f.startswith(name + DELIMITER) for f in folders)
            attributes = ["\\HasChildren" if has_children else "\\HasNoChildren"]
            if name in SPECIAL_USE:
                attributes.append(SPECIAL_USE[name])
            listed.append((name, _ListedFolder(attributes)))
        return listed

    def getPersonalNamespaces(self):
        return [["", DELIMITER]]

    def getSharedNamespaces(self):
        return None

    def getOtherNamespaces(self):
        return None

    def getUserNamespaces(self):
        return None


class IMAPRealm(MailboxRealm):
    """Cred realm: the avatar id (the user's address) becomes their account."""

    interface = imap4.IAccount
    avatar_class = MaildirAccount


# --------------------------------------------------------------------------
# The protocol




_READS_FILE = {"body", "bodystructure", "envelope", "rfc822", "rfc822header", "rfc822text"}


def _reads_text(part) -> bool:
    """Does this FETCH item return message text (RFC822, BODY[], BODY[TEXT], BODY[1]...)?"""
    if part.type in ("rfc822", "rfc822text"):
        return True
    return part.type == "body" and not part.header and not part.mime and bool(part.text or part.empty or part.part)


def _sets_seen(part) -> bool:
    """Does this FETCH item read the body, so it sets \\Seen (RFC 3501 6.4.5)?"""
    if part.type in ("rfc822", "rfc822text"):
        return True
    return (
        part.type == "body"
        and not part.peek
        and bool(part.header or part.text or part.mime or part.empty or part.part)
    )


@implementer(interfaces.IHandshakeListener)
class IMAPServer(TracedLoginMixin, imap4.IMAP4Server):
    """Twisted's IMAP4rev1 server with the lab's fixes and a line trace.

    With a TLS context and no TLS yet, Twisted advertises
    ``STARTTLS LOGINDISABLED`` and refuses LOGIN (RFC 3501 6.2.3; RFC 8314
    prefers implicit TLS, for which this server is simply wrapped in TLS).
    With a ``throttle`` (:class:`agents.security.LoginThrottle`) failed logins
    are answered ever later, and past the limit with ``* BYE`` and a hang-up.
    """

    IDENT = b"mailpipe IMAP4rev1 ready"
    #: Called as ``on_fetched(user, uid, message_id)`` when a FETCH returns a
    #: message's text: the ``fetched`` coursework hook (agents.hooks).
    on_fetched = None

    def __init__(self, store: MailStore, tls_context=None, tracer: Tracer = NULL_TRACER,
                 throttle=None):  # fmt: skip
        super().__init__(contextFactory=tls_context)
        self.store, self.tracer, self.throttle = store, tracer, throttle
        self.conn_id, self.peer, self.user = tracer.new_connection_id(), None, None
        self._tls_begun = False  # implicit TLS, or STARTTLS answered
        self._handshake_done = False
        self._hang_up = False  # after the next tagged NO (too many failed logins)

    # -- connection, TLS and trace ---------------------------------------------

    def connectionMade(self):
        no_delay(self.transport)  # see agents.net: no 40 ms stalls between responses
        self.peer = getattr(self.transport.getPeer(), "host", None)
        if self.throttle is not None and self._portal is not None:
            self._portal = ThrottledPortal(self._portal, self.throttle, self.peer, protocol="imap",
                                           tracer=self.tracer, conn=self.conn_id,
                                           on_blocked=self._login_blocked)  # fmt: skip
        if interfaces.ISSLTransport(self.transport, None) is not None:
            self._tls_begun = True
            # Implicit TLS (RFC 8314): the channel is private, offer LOGIN and
            # AUTHENTICATE PLAIN from the start.
            self.challengers = dict(self.challengers)
            self.challengers.setdefault(b"PLAIN", imap4.PLAINCredentials)
            self.challengers.setdefault(b"LOGIN", imap4.LOGINCredentials)
        self.tracer.event("connection.accepted", conn=self.conn_id, peer=self.peer, protocol="imap")
        super().connectionMade()

    def connectionLost(self, reason):
        if self.mbox is not None:
            self.mbox.removeListener(self)
            self.mbox = None
        if (self._tls_begun or self.startedTLS) and not self._handshake_done:
            security_event(self.tracer, "security.tls_failed", conn=self.conn_id, peer=self.peer,
                           protocol="imap", reason=tls_failure(reason))  # fmt: skip
        self.tracer.event("connection.closed", conn=self.conn_id, peer=self.peer)
        super().connectionLost(reason)

    def lineReceived(self, line):
        # During AUTHENTICATE the lines are base64 credentials: never trace them.
        traced = b"***" if self.parseState == "pending" else line
        self.tracer.line(self.conn_id, "C", traced, peer=self.peer)
        return super().lineReceived(line)

    def sendLine(self, line):
        self.tracer.line(self.conn_id, "S", line, peer=self.peer)
        return super().sendLine(line)

    def do_STARTTLS(self, tag):
        super().do_STARTTLS(tag)
        if self.startedTLS:
            # Anything the client pipelined after STARTTLS came in clear text
            # and could have been injected by a man in the middle
            # (CVE-2011-0411 class): drop it, the client must wait (RFC 3501 6.2.1).
            self.clearLineBuffer()

    unauth_STARTTLS = (do_STARTTLS,)

    def handshakeCompleted(self):
        """IHandshakeListener: TLS is up (a handshake that never gets here failed)."""
        self._handshake_done = True

    def sendNegativeResponse(self, tag=None, message=b""):
        """Twisted #12262: some error paths pass str; the wire wants bytes."""
        if isinstance(message, str):
            message = message.encode("utf-8")
        super().sendNegativeResponse(tag, message)
        if self._hang_up:  # the tagged NO after "* BYE": now close (RFC 3501 7.1.5)
            self.transport.loseConnection()

    # -- login ---------------------------------------------------------------

    login_event = "imap.login"  # traced by TracedLoginMixin

    def _login_blocked(self) -> None:
        """Too many failed logins from this address: say BYE; the tagged NO follows, then we close."""
        self.sendUntaggedResponse(b"BYE Too many failed logins, closing connection")
        self._hang_up = True

    def do_LOGIN(self, tag, user, passwd):
        if b"LOGINDISABLED" in self.capabilities():  # refused by Twisted; the password is out
            user_text = user.decode("utf-8", "replace") if isinstance(user, bytes) else user
            security_event(self.tracer, "security.cleartext_auth", conn=self.conn_id, peer=self.peer,
                           protocol="imap", user=user_text)  # fmt: skip
        super().do_LOGIN(tag, user, passwd)

    unauth_LOGIN = (do_LOGIN, imap4.IMAP4Server.arg_astring, imap4.IMAP4Server.arg_finalastring)

    # -- mailbox changes at command boundaries (RFC 3501 7.4.1) ------------------

    def _report_changes(self, force: bool = True) -> None:
        """Report what changed; IDLE passes ``force=False`` (see RESCAN_INTERVAL)."""
        if self.mbox is None:
            return
        expunged, arrived = self.mbox.poll(force)
        for seq in expunged:
            self.sendUntaggedResponse(b"%d EXPUNGE" % seq)
        if arrived:
            self.sendUntaggedResponse(b"%d EXISTS" % self.mbox.getMessageCount())
            self.sendUntaggedResponse(b"%d RECENT" % self.mbox.getRecentCount())

    def do_NOOP(self, tag):
        self._report_changes()
        super().do_NOOP(tag)

    unauth_NOOP = auth_NOOP = select_NOOP = logout_NOOP = (do_NOOP,)

    def do_CHECK(self, tag):
        self._report_changes()
        super().do_CHECK(tag)

    select_CHECK = (do_CHECK,)

    def do_IDLE(self, tag):
        """IDLE (RFC 2177): report what is pending, then push EXISTS as mail comes.

        Clients re-enter IDLE after every notification, so this does not
        rescan the folder each time (new mail is pushed anyway).
        """
        self._report_changes(force=False)
        # Twisted answers a bare "+", but RFC 3501 9 requires "+" SP text
        # (continue-req); RFC 2177's own example says "+ idling".
        self.sendContinuationRequest(b"idling")
        self.parseTag = tag
        self.lastState = self.parseState
        self.parseState = "idle"

    select_IDLE = auth_IDLE = (do_IDLE,)

    def parse_idle(self, line):
        if line.strip().upper() != b"DONE":
            self.parseState = self.lastState
            del self.lastState
            self.sendBadResponse(self.parseTag, b"Expected DONE to end IDLE")
            del self.parseTag
            return
        super().parse_idle(line)

    # -- fetch -----------------------------------------------------------------

    def do_FETCH(self, tag, messages, query, uid=0):
        if query and self.mbox.isWriteable() and any(_sets_seen(part) for part in query):
            self.mbox.store(messages, ["\\Seen"], 1, uid)
        super().do_FETCH(tag, messages, query, uid)

    select_FETCH = (do_FETCH, imap4.IMAP4Server.arg_seqset, imap4.IMAP4Server.arg_fetchatt)

    def spewMessage(self, id, msg, query, uid):
        # The Message-ID costs a file read: only look when the file is read anyway.
        reads_file = any(part.type in _READS_FILE for part in query)
        message_id = msg.message_id() if reads_file and isinstance(msg, MaildirMessage) else None
        self.tracer.event(
            "imap.fetch",
            conn=self.conn_id,
            user=self.user,
            folder=getattr(self.mbox, "folder", None),
            uid=msg.getUID(),
            message_id=message_id,
            items=" ".join(str(part) for part in query),
        )
        if self.on_fetched is not None and any(_reads_text(part) for part in query):
            self.on_fetched(self.user, msg.getUID(), message_id)
        return super().spewMessage(id, msg, query, uid)

    def spew_rfc822header(self, id, msg, _w=None, _f=None):
        """RFC822.HEADER as the exact bytes on disk, not a re-formatted dict."""
        if not isinstance(msg, MimePart):
            return super().spew_rfc822header(id, msg, _w, _f)
        _w = _w or self.transport.write
        _w(b"RFC822.HEADER " + _literal(msg.header_bytes()))

    def spew_body(self, part, id, msg, _w=None, _f=None):
        """BODY[...HEADER...] and BODY[n.MIME] as exact bytes (RFC 3501 6.4.5)."""
        if not (part.header or part.mime) or not isinstance(msg, MimePart):
            return super().spew_body(part, id, msg, _w, _f)
        _w = _w or self.transport.write
        target = msg
        for index in part.part:
            target = target.getSubPart(index)
        if part.header:
            fields = part.header.fields or ()
            data = target.header_bytes(fields, part.header.negate)
        else:
            data = target.header_bytes()
        _w(part.__bytes__() + b" " + _literal(data))

    def do_SEARCH(self, tag, charset, query, uid=0):
        """SEARCH; answers ``* SEARCH`` with no trailing space when nothing matches.

        (Twisted writes ``* SEARCH `` there, which RFC 3501 9 does not allow.)
        """
        d = defer.maybeDeferred(self.mbox.search, query, uid=uid)

        def found(numbers):
            if uid:
                numbers = [self.mbox.getUID(seq) for seq in numbers]
            self.sendUntaggedResponse(b"".join([b"SEARCH"] + [b" %d" % n for n in numbers]))
            self.sendPositiveResponse(tag, b"SEARCH completed")

        def failed(failure):
            if failure.check(imap4.IllegalQueryError, ValueError, IndexError, KeyError):
                self.sendBadResponse(tag, b"SEARCH failed: bad search program")
            else:
                log.err(failure, "SEARCH failed")
                self.sendNegativeResponse(tag, b"SEARCH failed")

        d.addCallbacks(found, failed)

    select_SEARCH = (do_SEARCH, imap4.IMAP4Server.opt_charset, imap4.IMAP4Server.arg_searchkeys)

    # -- APPEND and COPY ------------------------------------------------------------

    def _cbAppendGotMailbox(self, mbox, tag, flags, date, message):
        """APPEND without Twisted's stale EXISTS from a second view of the folder.

        The store tells the SELECTed view about the new message itself.
        """
        if not mbox:
            self.sendNegativeResponse(tag, b"[TRYCREATE] No such mailbox")
            return
        d = mbox.addMessage(message, [f.decode("ascii", "replace") for f in flags or ()], date)

        def stored(_):
            self.sendPositiveResponse(tag, b"APPEND completed")

        def failed(failure):
            log.err(failure, "APPEND failed")
            self.sendNegativeResponse(tag, b"APPEND failed: could not store the message")

        d.addCallbacks(stored, failed)

    def _cbCopySelectedMailbox(self, mbox, tag, messages, mailbox, uid):
        if not mbox:
            # RFC 3501 6.4.7: a missing target MUST be answered with TRYCREATE.
            self.sendNegativeResponse(tag, b"[TRYCREATE] No such mailbox")
            return
        super()._cbCopySelectedMailbox(mbox, tag, messages, mailbox, uid)


class IMAPServerFactory(RetrievalServerFactory):
    """Builds one :class:`IMAPServer` per connection, sharing store and portal."""

    server_class = IMAPServer


def make_imap_factory(store, checker, tls_context, implicit_tls=False, tracer=NULL_TRACER,
                      throttle=None, on_fetched=None):  # fmt: skip
    """An IMAP server factory.

    * ``implicit_tls=False`` (port 143): listen with ``reactor.listenTCP``;
      STARTTLS is offered when ``tls_context`` is given, and LOGIN is
      refused until it has run (LOGINDISABLED, RFC 3501 6.2.3).
    * ``implicit_tls=True`` (port 993, RFC 8314): listen with
      ``reactor.listenSSL(port, factory, tls_context)``; the server sees a
      TLS transport, so it offers LOGIN at once and no STARTTLS.

    ``throttle``: an :class:`agents.security.LoginThrottle`, shared with the
    agent's other listeners, that slows down and then stops password guessing.
    ``on_fetched(user, uid, message_id)``: see :attr:`IMAPServer.on_fetched`.
    """
    return make_factory(IMAPServerFactory, IMAPRealm, store, checker, tls_context, implicit_tls, tracer,
                        throttle, on_fetched)


__all__ = [
    "IMAPRealm",
    "IMAPServer",
    "IMAPServerFactory",
    "MaildirAccount",
    "MaildirMailbox",
    "MaildirMessage",
    "MimePart",
    "make_imap_factory",
]
