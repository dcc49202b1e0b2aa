"""Checkpoint files that are either complete or absent.

Lightning's ``TorchCheckpointIO`` serialises into memory and writes through an fsspec
transaction, which for local paths writes a file in the *system* temp folder and moves it into
place; across file systems that move is a copy, so a full disk leaves a truncated checkpoint
under its final name (and ``ModelCheckpoint`` later deletes the previous, valid one).
:class:`AtomicCheckpointIO` writes into a temporary file in the destination folder, flushes
and fsyncs it, then ``os.replace``-s it over the final name (atomic on POSIX within one file
system) and fsyncs the folder. A failed write removes the temporary file and raises
:class:`melrecon.atomic.WriteError` naming the checkpoint (one line from ``train.py``); the
previous files are untouched. It is the Trainer's plugin in ``conf/trainer/default.yaml``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from melrecon.atomic import write_error


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable (the directory entry); not every file system allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local writes are temporary file + fsync + rename.

    Remote paths (``s3://`` ...) are left to Lightning's fsspec implementation.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        dest = Path(path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
        try:
            os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a checkpoint follows the umask
            os.close(fd)
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, dest)
        except BaseException as err:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            if isinstance(err, OSError):  # a full disk: one line naming the checkpoint
                failed = write_error(dest, err)
                failed.strerror = f"{failed.strerror}; the checkpoints written before are intact"
                raise failed from err
            raise
        _fsync_dir(dest.parent)
        return None


__all__ = ["AtomicCheckpointIO"]
