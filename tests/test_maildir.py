"""The Maildir store: names, durability, UIDs, flags, folders, path safety."""

from __future__ import annotations

import os
import re
import threading

import pytest
from twisted.internet import defer

from agents.maildir import (
    UIDLIST_NAME,
    Maildir,
    MailStore,
    NoSuchFolder,
    UnsafePath,
    check_folder_name,
    split_address,
)

MESSAGE = b"From: a@b.test\r\nSubject: hi\r\n\r\nbody\r\n"


def sync_store(root) -> MailStore:
    """A store whose 'thread' runs at once, so tests need no reactor."""
    return MailStore(root, run_in_thread=lambda f, *a, **kw: defer.maybeDeferred(f, *a, **kw))


def test_deliver_writes_into_new_with_a_unique_name(tmp_path):
    md = Maildir(tmp_path / "md")
    key = md.deliver(MESSAGE)
    assert re.fullmatch(r"\d+\.M\d{6}P\d+Q\d+\.[^/:]+,S=%d" % len(MESSAGE), key)
    assert (tmp_path / "md" / "new" / key).read_bytes() == MESSAGE
    assert os.listdir(tmp_path / "md" / "tmp") == []
    assert md.deliver(MESSAGE) != key


def test_deliver_goes_through_write_durably(tmp_path, monkeypatch):
    calls = []
    import agents.maildir as module

    real = module.write_durably

    def spy(tmp, final, data, *args):
        calls.append((tmp, final))
        return real(tmp, final, data, *args)

    monkeypatch.setattr(module, "write_durably", spy)
    key = Maildir(tmp_path / "md").deliver(MESSAGE)
    tmp, final = calls[0]
    assert tmp.parent.name == "tmp" and final.parent.name == "new" and final.name == key


def test_uids_are_stable_and_survive_a_restart(tmp_path):
    md = Maildir(tmp_path / "md")
    keys = [md.deliver(MESSAGE + b"%d" % i) for i in range(3)]
    first = md.scan()
    assert [m.uid for m in first.messages] == [1, 2, 3]
    assert [m.key for m in first.messages] == keys
    assert first.uid_next == 4

    md.remove(keys[1])
    md.deliver(MESSAGE)
    again = Maildir(tmp_path / "md").scan()  # a new process, say
    assert again.uid_validity == first.uid_validity
    assert [m.uid for m in again.messages] == [1, 3, 4]  # 2 is never reused
    header = (tmp_path / "md" / UIDLIST_NAME).read_text().splitlines()[0]
    assert header == f"3 V{first.uid_validity} N5"


def test_files_dropped_in_by_hand_get_uids(tmp_path):
    md = Maildir(tmp_path / "md")
    (tmp_path / "md" / "cur" / "123.handmade:2,S").write_bytes(MESSAGE)
    (snapshot_message,) = md.scan().messages
    assert snapshot_message.uid == 1 and snapshot_message.flags == "S"


def test_damaged_uidlist_gets_a_new_uidvalidity(tmp_path):
    md = Maildir(tmp_path / "md")
    md.deliver(MESSAGE)
    (tmp_path / "md" / UIDLIST_NAME).write_text("garbage\n")
    snapshot = md.scan()
    assert [m.uid for m in snapshot.messages] == [1]


def test_concurrent_deliveries_get_distinct_uids(tmp_path):
    md = Maildir(tmp_path / "md")
    threads = [
        threading.Thread(target=lambda: [md.deliver(MESSAGE) for _ in range(5)]) for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    uids = [m.uid for m in md.scan().messages]
    assert sorted(uids) == list(range(1, 21))


def test_flags_live_in_the_file_name(tmp_path):
    md = Maildir(tmp_path / "md")
    key = md.deliver(MESSAGE)
    snapshot = md.scan(claim_new=True)
    assert snapshot.claimed == {key}
    assert (tmp_path / "md" / "cur" / (key + ":2,")).exists()
    md.set_flags(key, "TS")
    md.add_flags(key, "F")
    assert (tmp_path / "md" / "cur" / (key + ":2,FST")).exists()
    assert md.scan().messages[0].flags == "FST"
    assert md.remove(key) and md.scan().messages == []


def test_deliver_with_flags_goes_to_cur(tmp_path):
    md = Maildir(tmp_path / "md")
    key = md.deliver(MESSAGE, flags="S", mtime=1_000_000_000)
    path = tmp_path / "md" / "cur" / (key + ":2,S")
    assert path.exists() and path.stat().st_mtime == 1_000_000_000


def test_store_layout_is_domain_then_local_part(tmp_path):
    store = sync_store(tmp_path)
    md = store.maildir("Alice@Sender.TEST")
    assert md.path == tmp_path / "sender.test" / "alice"
    junk = store.maildir("alice@sender.test", "Junk")
    assert junk.path == tmp_path / "sender.test" / "alice" / ".Junk"
    assert (junk.path / "maildirfolder").exists()
    assert store.list_folders("alice@sender.test") == ["INBOX", "Junk"]


@pytest.mark.parametrize(
    "address",
    [
        "../x@b.test",
        "a/b@b.test",
        "a@../b",
        "/etc/passwd",
        "..@b.test",
        ".a@b.test",
        "a@b.test/..",
        "nobody",
    ],
)
def test_unsafe_addresses_are_rejected(tmp_path, address):
    with pytest.raises(UnsafePath):
        sync_store(tmp_path).maildir(address)


@pytest.mark.parametrize(
    "name", ["..", "../x", "a/b", "/abs", ".hidden", "a..b", "a.", "", "a\x00b", "a\\b"]
)
def test_unsafe_folder_names_are_rejected(name):
    with pytest.raises(UnsafePath):
        check_folder_name(name)


def test_folder_names():
    assert check_folder_name("inbox") == "INBOX"
    assert check_folder_name("Archive.2024") == "Archive.2024"
    assert split_address("Bob@Example.Test") == ("bob", "example.test")


def test_symlinks_are_refused(tmp_path):
    store = sync_store(tmp_path / "root")
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "root" / "evil.test").mkdir()
    os.symlink(outside, tmp_path / "root" / "evil.test" / "bob")
    with pytest.raises(UnsafePath):
        store.maildir("bob@evil.test")
    store.maildir("carol@evil.test")
    os.symlink(outside, tmp_path / "root" / "evil.test" / "carol" / ".Junk")
    with pytest.raises(UnsafePath):
        store.maildir("carol@evil.test", "Junk")
    assert not store.folder_exists("carol@evil.test", "Junk")
    assert os.listdir(outside) == []


def test_missing_folder_is_not_created_when_asked_not_to(tmp_path):
    store = sync_store(tmp_path)
    with pytest.raises(NoSuchFolder):
        store.maildir("a@b.test", "Nope", create=False)


def test_folder_create_rename_delete(tmp_path):
    store = sync_store(tmp_path)
    store.create_folder("a@b.test", "Work")
    store.create_folder("a@b.test", "Work.Old")
    store.rename_folder("a@b.test", "Work", "Jobs")
    assert store.list_folders("a@b.test") == ["INBOX", "Jobs", "Jobs.Old"]
    store.delete_folder("a@b.test", "Jobs.Old")
    assert store.list_folders("a@b.test") == ["INBOX", "Jobs"]
    with pytest.raises(NoSuchFolder):
        store.delete_folder("a@b.test", "INBOX")


def test_store_deliver_notifies_subscribers_after_the_write(tmp_path):
    store = sync_store(tmp_path)
    heard = []

    def listener(folder, key):
        heard.append((folder, key, (store.maildir("a@b.test").path / "new" / key).exists()))

    store.subscribe("A@b.test", listener)
    results = []
    store.deliver("a@b.test", MESSAGE).addCallback(results.append)
    assert heard == [("INBOX", results[0], True)]
    store.unsubscribe("a@b.test", listener)
    store.deliver("a@b.test", MESSAGE)
    assert len(heard) == 1


def test_store_deliver_runs_in_a_thread_by_default(tmp_path):
    from twisted.internet import threads

    store = MailStore(tmp_path)
    assert store._run_in_thread is threads.deferToThread


def test_uid_records_are_appended_and_read_back_by_a_new_process(tmp_path):
    from agents.maildir import Maildir, UIDLIST_NAME

    box = Maildir(tmp_path / "box")
    keys = [box.deliver(f"Subject: {i}\r\n\r\nx\r\n".encode()) for i in range(3)]
    text = (tmp_path / "box" / UIDLIST_NAME).read_text().splitlines()
    assert text[1:] == [f"{i + 1} :{k}" for i, k in enumerate(keys)]  # one record per delivery
    Maildir._uidlist_cache.clear()  # as a fresh process would start
    snapshot = Maildir(tmp_path / "box").scan()
    assert [(m.uid, m.key) for m in snapshot.messages] == [(i + 1, k) for i, k in enumerate(keys)]
    assert snapshot.uid_next == 4  # from the records, although the header still says N1 or N2
    assert Maildir(tmp_path / "box").deliver_with_uid(b"Subject: 4\r\n\r\nx\r\n")[1] == 4


def test_uid_cache_notices_a_list_changed_by_someone_else(tmp_path):
    from agents.maildir import Maildir, UIDLIST_NAME

    box = Maildir(tmp_path / "box")
    box.deliver(b"Subject: a\r\n\r\nx\r\n")
    path = tmp_path / "box" / UIDLIST_NAME
    header, record = path.read_text().splitlines()
    validity = header.split()[1]
    path.write_text(f"3 {validity} N50\n{record.replace('1 :', '49 :')}\n")  # another process renumbered
    assert box.deliver_with_uid(b"Subject: b\r\n\r\nx\r\n")[1] == 50


def test_a_scan_never_counts_a_uid_it_does_not_list(tmp_path):
    """A delivery that takes the next UID just after a scan lets go of the lock
    must not show up in that scan's uid_next: an IMAP view taking uid_next from
    it would treat the following UID as the next one and skip this message."""
    import contextlib

    class RacingMaildir(Maildir):
        racing = False

        @contextlib.contextmanager
        def _locked(self):
            with super()._locked():
                yield
            if self.racing:  # the scan has just released the lock
                self.racing = False
                self.deliver(MESSAGE)  # another thread's delivery, at the worst moment

    md = RacingMaildir(tmp_path / "md")
    md.deliver(MESSAGE)
    md.racing = True
    snapshot = md.scan()
    assert [m.uid for m in snapshot.messages] == [1]
    assert snapshot.uid_next == 2
    assert [m.uid for m in md.scan().messages] == [1, 2]


class ThreadCallsReactor:
    """Just ``callFromThread``: calls are collected, and run by the test's thread."""

    def __init__(self):
        import threading

        self.calls, self.lock = [], threading.Lock()

    def callFromThread(self, f, *args):
        with self.lock:
            self.calls.append((f, args))

    def run_pending(self, until, timeout=5.0):
        import time

        deadline = time.monotonic() + timeout
        while not until() and time.monotonic() < deadline:
            with self.lock:
                calls, self.calls = self.calls, []
            for f, args in calls:
                f(*args)
            time.sleep(0.001)


def test_disk_thread_runs_jobs_in_order_and_reports_failures():
    """agents.durable.DiskThread: deferToThread's contract, one thread, FIFO;
    stop() lets the jobs already asked for finish."""
    import threading

    from agents.durable import DiskThread

    reactor = ThreadCallsReactor()
    disk = DiskThread(reactor)
    order, threads_seen = [], set()

    def job(n):
        threads_seen.add(threading.get_ident())
        order.append(n)
        if n == 3:
            raise OSError("disk full")
        return n * 10

    results = []
    for n in range(6):
        disk.run(job, n).addCallbacks(results.append, lambda f: results.append(f.value))
    stopped = disk.stop()
    refused = []
    disk.run(job, 99).addErrback(refused.append)  # asked after stop(): refused at once
    assert len(refused) == 1 and refused[0].check(RuntimeError)
    reactor.run_pending(lambda: stopped.called)
    assert order == [0, 1, 2, 3, 4, 5] and len(threads_seen) == 1
    assert threading.get_ident() not in threads_seen
    assert results[:3] == [0, 10, 20] and isinstance(results[3], OSError) and results[4:] == [40, 50]
    assert stopped.called


def test_disk_thread_commits_a_batch_with_one_fsync_per_directory(tmp_path, monkeypatch):
    """Group commit: three messages written while the thread was busy form one
    batch; their directory is fsynced once, and none is reported done before."""
    import threading

    from agents import durable

    synced = []
    real = durable._fsync_directory_now
    monkeypatch.setattr(durable, "_fsync_directory_now", lambda d: synced.append(d) or real(d))
    reactor = ThreadCallsReactor()
    disk = durable.DiskThread(reactor)
    gate, done = threading.Event(), []
    disk.run(gate.wait, 5)  # holds the thread while the next three queue up
    for n in range(3):
        disk.run(durable.write_durably, tmp_path / f"tmp{n}", tmp_path / f"msg{n}", b"x" * n).addCallback(
            lambda _, n=n: done.append((n, list(synced))))
    gate.set()
    stopped = disk.stop()
    reactor.run_pending(lambda: stopped.called)
    assert synced == [str(tmp_path)]  # one directory fsync for the three renames
    assert done == [(n, [str(tmp_path)]) for n in range(3)]  # each reported after it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["msg0", "msg1", "msg2"]


def test_a_failed_directory_fsync_fails_the_jobs_that_needed_it(tmp_path, monkeypatch):
    from agents import durable

    def broken(directory):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(durable, "_fsync_directory_now", broken)
    reactor = ThreadCallsReactor()
    disk = durable.DiskThread(reactor)
    outcomes = []
    disk.run(durable.write_durably, tmp_path / "t", tmp_path / "m", b"x").addBoth(outcomes.append)
    disk.run(len, b"abc").addBoth(outcomes.append)  # touched no directory: unaffected
    stopped = disk.stop()
    reactor.run_pending(lambda: stopped.called)
    assert outcomes[0].check(OSError) and outcomes[1] == 3


def test_the_uid_record_is_fsynced_outside_the_lock(tmp_path, monkeypatch):
    """IMAP sessions scan (and take the UID lock) on the reactor thread: a
    delivery must not hold that lock while it waits for the disk."""
    import fcntl
    import os as os_module

    box = Maildir(tmp_path / "m")
    box.deliver(b"Subject: first\r\n\r\n1\r\n")  # creates the UID list
    lock_free_at_fsync = []
    real_fsync = os_module.fsync

    def fsync(fd):
        probe = os_module.open(box._lock_path, os_module.O_RDWR)
        try:
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if the lock is held
            lock_free_at_fsync.append(os_module.readlink(f"/proc/self/fd/{fd}"))
        except BlockingIOError:
            lock_free_at_fsync.append(None)
        finally:
            os_module.close(probe)
        return real_fsync(fd)

    monkeypatch.setattr(os_module, "fsync", fsync)
    key, uid = box.deliver_with_uid(b"Subject: second\r\n\r\n2\r\n")
    record_syncs = [p for p in lock_free_at_fsync if p is None or p.endswith(UIDLIST_NAME)]
    assert record_syncs == [str(box._uidlist_path)]  # synced, and with the lock free
    assert uid == 2 and box.scan().uid_next == 3
