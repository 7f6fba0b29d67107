"""Writing a file so that it survives a crash: the one recipe every agent uses.

RFC 5321 6.1: once a server has answered 250 to DATA, "it MUST NOT lose the
message". The answer may only go out after the bytes are on stable storage:

1. write the data to a temporary file in the same file system;
2. ``fsync`` the file, so its bytes are on disk;
3. ``rename`` it to its final name, which is atomic: a reader sees the whole
   file or none of it, never half;
4. ``fsync`` the directory, so the rename itself is on disk.

These calls block, so agents never run them on the reactor: each agent has
one :class:`DiskThread` that does its disk work in order.
"""

from __future__ import annotations

import os
import queue
import threading
from pathlib import Path

from twisted.internet import defer
from twisted.python.failure import Failure


def write_durably(tmp_path: str | Path, final_path: str | Path, data: bytes, mode: int = 0o600,
                  reuse: str | Path | None = None) -> None:
    """Write ``data`` to ``final_path`` via ``tmp_path``, crash-safely (see above).

    ``reuse`` names an old file, no longer needed, to overwrite instead of
    creating ``tmp_path``: it plays the part of the temporary file (written,
    cut to length, fsynced, renamed), and the file system allocates no new
    inode (see :mod:`agents.spool`, which recycles its files so).
    """
    fd = _reopen(reuse) if reuse is not None else None
    if fd is None:  # nothing to reuse (or it is gone): a new file, as usual
        reuse, fd = None, os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    written_path = reuse if reuse is not None else tmp_path
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        if reuse is not None:
            os.ftruncate(fd, len(data))  # the old contents may have been longer
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        try:
            os.unlink(written_path)
        except OSError:
            pass
        raise
    os.close(fd)
    os.rename(written_path, final_path)
    fsync_directory(os.path.dirname(os.fspath(final_path)))
    if reuse is not None:
        # The rename took the file out of another directory: sync that one too,
        # so that after a crash the file has one name, never two.
        fsync_directory(os.path.dirname(os.fspath(reuse)))


def _reopen(path) -> int | None:
    """A descriptor to overwrite ``path`` with, or None if it cannot be had."""
    try:
        return os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
    except OSError:
        return None


#: Inside a DiskThread batch: the directories whose fsync waits for the batch's end.
_batch = threading.local()


def fsync_directory(directory: str | Path) -> None:
    """Make a directory's entries (a rename, an unlink) durable.

    Inside a :class:`DiskThread` batch the fsync is only noted: the batch
    syncs each directory once at its end, before any of its jobs is
    reported done (a group commit).
    """
    pending = getattr(_batch, "directories", None)
    if pending is not None:
        pending.add(str(directory))
        return
    _fsync_directory_now(str(directory))


def _fsync_directory_now(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DiskThread:
    """One thread for all of an agent's disk work, run in the order asked.

    ``run(f, *args)`` is a drop-in for Twisted's ``deferToThread``: it
    returns a Deferred that fires, on the reactor thread, with what ``f``
    returned (or failed with). Why not Twisted's thread pool? Under the GIL
    only one thread runs Python at a time, and every hand-over between
    threads costs wake-ups. The pool's bookkeeping takes several locks per
    job and lets several workers fight for the GIL; one plain thread fed by
    a queue does not. Measured on the benchmark (issue 3): the agents'
    CPU time per message fell by about a quarter.

    The thread takes every job that is waiting as one batch and commits it
    as a group: each directory that the batch's jobs renamed files into is
    fsynced once, at the end (a directory fsync makes every rename in it
    durable), and only then go the results back to the reactor, all in one
    ``callFromThread``. When the disk is slow, jobs pile up, batches grow,
    and the cost per message falls: the same idea as a database's group
    commit.
    """

    _STOP = object()

    def __init__(self, reactor, name: str = "disk"):
        self._reactor = reactor
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._name = name
        self._thread: threading.Thread | None = None
        self._stopped: defer.Deferred | None = None

    def run(self, f, *args, **kwargs) -> defer.Deferred:
        """Run ``f(*args, **kwargs)`` in the disk thread."""
        if self._stopped is not None:
            return defer.fail(RuntimeError("the disk thread has stopped"))
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name=self._name, daemon=True)
            self._thread.start()
        d = defer.Deferred()
        self._jobs.put((d, f, args, kwargs))
        return d

    def stop(self) -> defer.Deferred:
        """Finish the jobs already asked for, then end the thread (a shutdown trigger)."""
        if self._stopped is None:
            self._stopped = defer.Deferred()
            if self._thread is None:
                self._stopped.callback(None)
            else:
                self._jobs.put(self._STOP)
        return self._stopped

    def _work(self) -> None:
        _name_os_thread("disk")
        while True:
            batch = [self._jobs.get()]
            while True:  # whatever else is waiting goes in the same batch
                try:
                    batch.append(self._jobs.get_nowait())
                except queue.Empty:
                    break
            results, stop = [], False
            for job in batch:
                if job is self._STOP:
                    stop = True
                    continue
                d, f, args, kwargs = job
                _batch.directories = touched = set()
                try:
                    results.append([d, f(*args, **kwargs), None, touched])
                except BaseException:
                    results.append([d, None, Failure(), touched])
                finally:
                    _batch.directories = None
            self._commit(results)
            self._reactor.callFromThread(self._deliver, results, stop)
            if stop:
                return

    @staticmethod
    def _commit(results: list) -> None:
        """fsync each directory the batch touched, once; a job whose directory
        could not be synced fails (its message is not safe, so no 250)."""
        for directory in set().union(*(touched for *_, touched in results)):
            try:
                _fsync_directory_now(directory)
            except OSError:
                failure = Failure()
                for result in results:
                    if directory in result[3] and result[2] is None:
                        result[1], result[2] = None, failure

    def _deliver(self, results: list, stop: bool) -> None:
        for d, value, failure, _touched in results:
            if failure is None:
                d.callback(value)
            else:
                d.errback(failure)
        if stop and self._stopped is not None and not self._stopped.called:
            self._stopped.callback(None)


def _name_os_thread(name: str) -> None:
    """Show this thread as ``name`` in ``ps -L``, ``top -H`` and ``/proc`` (Linux only).

    Python names its threads only for itself; the kernel knows every thread
    of an agent as ``python``. :mod:`agents.usage` reads the name to tell
    the disk thread's CPU time from the reactor thread's.
    """
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/comm", "w") as comm:
            comm.write(name[:15])  # the kernel keeps 15 characters
    except OSError:
        pass
