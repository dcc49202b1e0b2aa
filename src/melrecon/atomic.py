"""Output files that are either complete or absent, and write failures said in one line.

Every file melrecon writes for a user (result ``.h5``, NIfTI, PNG, GIF, CSV, JSON, the cached
data checks; checkpoints through :class:`melrecon.lit.checkpoint_io.AtomicCheckpointIO`) is
written to a hidden temporary name in its own folder and renamed over the final name when
complete (``os.replace``: atomic within one file system). A failure (a full disk, a quota, a
killed process) therefore leaves no partial file under a final name; the temporary file is
removed (a ``kill -9`` can leave a hidden ``.tmp<pid>-<name>``, which no reader lists).

A failed write raises :class:`WriteError`, an ``OSError`` whose message names the output file
(not the temporary one) and the reason, e.g. ``cannot write out/a.nii.gz: No space left on
device``; the command-line tools print it as their one-line error.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

HEADROOM_BYTES = 1 << 16
"""Free space kept beyond a file's size by :func:`check_free_space` (64 KiB: the
file system's own blocks and what other writers add meanwhile)."""


class WriteError(OSError):
    """Writing the output file ``filename`` failed (``errno``, ``strerror``: the reason).

    ``str()`` is one line naming the file: ``cannot write PATH: REASON``.
    """

    def __str__(self) -> str:
        return f"cannot write {self.filename}: {self.strerror}"


def _reason(err: BaseException) -> str:
    """The short reason of a failed write: the OS's text for its errno, else its first line."""
    code = getattr(err, "errno", None)
    if isinstance(code, int) and code > 0:
        return os.strerror(code)
    text = " ".join(str(err).split())
    return text[:200] or type(err).__name__


def write_error(path: str | os.PathLike, err: BaseException) -> WriteError:
    """A :class:`WriteError` for ``path`` carrying the errno and reason of ``err``."""
    if isinstance(err, WriteError):
        return err
    code = getattr(err, "errno", None)
    return WriteError(code if isinstance(code, int) else errno.EIO, _reason(err), str(path))


def temporary_name(path: str | os.PathLike) -> Path:
    """``.tmp<pid>-<name>`` beside ``path``: hidden, and ending like ``path``, so writers that
    choose the format by extension (nibabel's ``.nii.gz``, Pillow) write the right one."""
    path = Path(path)
    return path.with_name(f".tmp{os.getpid()}-{path.name}")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary name beside ``path``; on success it replaces ``path`` in one step, on
    any error it is removed, so a reader never sees a half-written file.

    An ``OSError`` while writing or renaming is raised as :class:`WriteError` naming ``path``
    (chained to the original error). The folder must exist.
    """
    path = Path(path)
    tmp = temporary_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as err:
        raise write_error(path, err) from err
    finally:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        except OSError:  # the folder itself went away: nothing left to clean
            pass


@contextmanager
def all_or_none() -> Iterator[list[Path]]:
    """Yield a list to append each completed output file to; if the block fails, those files are
    removed, so that several files that belong together (one scan's outputs) are kept all or none."""
    written: list[Path] = []
    try:
        yield written
    except BaseException:
        for p in written:
            try:
                Path(p).unlink()
            except OSError:
                pass
        raise


def check_free_space(path: str | os.PathLike, nbytes: int, headroom: int = HEADROOM_BYTES) -> None:
    """Raise :class:`WriteError` (ENOSPC) naming ``path`` when its folder's file system has less
    than ``nbytes + headroom`` bytes free: refuse before a library that fails badly on a full disk
    (HDF5) starts writing. A folder whose free space cannot be read is not checked."""
    path = Path(path)
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        return
    need = int(nbytes) + int(headroom)
    if free < need:
        raise WriteError(errno.ENOSPC, f"No space left on device (needs about {_mib(need)}, "
                                       f"{_mib(free)} free)", str(path))


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


__all__ = ["WriteError", "atomic_path", "all_or_none", "check_free_space", "temporary_name", "write_error", "HEADROOM_BYTES"]
