"""Writing a file so that it survives a crash: the one recipe every agent uses.

RFC 5321 6.1: once a server has answered 250 to DATA, "it MUST NOT lose the
message". The answer may only go out after the bytes are on stable storage:

1. write the data to a temporary file in the same file system;
2. ``fsync`` the file, so its bytes are on disk;
3. ``rename`` it to its final name, which is atomic: a reader sees the whole
   file or none of it, never half;
4. ``fsync`` the directory, so the rename itself is on disk.

These calls block, so agents run them in a thread (:func:`deferToThread`),
never on the reactor.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_durably(tmp_path: Path, final_path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to ``final_path`` via ``tmp_path``, crash-safely (see above)."""
    fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        try:
            os.unlink(tmp_path)
        except OSError:
            pass
        raise
    os.close(fd)
    os.rename(tmp_path, final_path)
    fsync_directory(Path(final_path).parent)


def fsync_directory(directory: Path) -> None:
    """Make a directory's entries (a rename, an unlink) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
