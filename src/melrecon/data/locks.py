"""An exclusive lock on a lock file (``fcntl.flock``), for folders that several processes write.

Used by the synthetic generator (two trainings generating the same dataset at once: the second
waits, then reuses the set), by ``reconstruct`` (one writer per ``--out`` folder), by training
(one writer per run folder: ``melrecon.lit.app``) and by studies (one per ``out_dir``).

The lock file is removed on release, so nothing is left behind. That is safe because a process
that obtains the lock then checks that the file it locked is still the one at ``path`` (same
device and inode); a process that locked a file unlinked meanwhile retries on the new one.
flock locks belong to an open file description, so two threads of one process exclude each
other as two processes do. The kernel releases a flock when its process ends, however it ends
(``kill -9`` included), so a lock is never stale: a lock file left behind names a dead process
and is taken by the next one at once. The holder writes its pid into the file, so that a
refused process can say who holds it. POSIX only (fcntl), as the rest of the tooling.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path


class LockBusy(OSError):
    """A non-blocking :func:`file_lock` found the lock held by someone else."""


def holder(path: str | os.PathLike) -> str:
    """``"process 1234"``: the holder a lock file names (its holder writes its pid), or
    ``"another process"`` when it names none."""
    try:
        pid = int(Path(path).read_text().strip())
    except (OSError, ValueError):
        return "another process"
    return f"process {pid}"


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, blocking: bool = True) -> Iterator[Path]:
    """Hold an exclusive lock on ``path`` (created if missing) for the ``with`` block.

    Args:
        path: the lock file; its folder must exist.
        blocking: wait for the lock (True) or raise :class:`LockBusy` at once (False).
    """
    path = Path(path)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            raise LockBusy(f"lock {path} is held by {holder(path)}") from None
        except BaseException:
            os.close(fd)
            raise
        try:
            held, there = os.fstat(fd), os.stat(path)
            if (held.st_dev, held.st_ino) == (there.st_dev, there.st_ino):
                break
        except FileNotFoundError:  # the previous holder removed it after we opened it
            pass
        os.close(fd)
    try:
        with contextlib.suppress(OSError):  # who holds it, for the message of a refused process
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # while still holding it: a waiter sees a stale inode and retries
        os.close(fd)
