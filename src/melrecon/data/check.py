"""Check every file of a dataset once, and remember the verdict while the file is unchanged.

The DataModule calls :func:`check_files` at set-up for each split it uses, so a truncated, empty,
non-HDF5, NaN-holding or physically inconsistent file is refused before training starts, in one
line naming file and field (:class:`melrecon.data.h5.LayoutError`), instead of a traceback
mid-epoch or a silently dropped volume.

The full check (:func:`melrecon.data.h5.validate_file` with values: every value read, the
target recomputed) costs one read of the dataset, so passes are cached, keyed by the file's
name, size and modification time (ns) and :data:`CHECK_VERSION`:

- in this process (a dict), and
- in a JSON file :data:`CACHE_NAME` in each checked file's folder, written atomically (a hidden
  temporary file, then ``os.replace``), so later runs skip the read. A folder that cannot be
  written (read-only data) just keeps the in-process cache. Only passes are stored: a bad
  file is checked (and refused) every time. Replacing or editing a file changes its size or
  mtime and so re-checks it.

:func:`file_hashes` gives each file's content hash (BLAKE2b of its bytes), cached the same way
(in the same JSON file, with its own size and mtime stamp), so that the DataModule can refuse a
file whose content is in two splits without reading every file at every set-up.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

from melrecon.data.h5 import LayoutError, ScanInfo, atomic_path, validate_file

#: bump when the checks change, so that files passed by older checks are checked again
CHECK_VERSION = 1
CACHE_NAME = ".melrecon-check.json"

_memory: dict[tuple[str, int, int], ScanInfo] = {}
_hashes: dict[tuple[str, int, int], str] = {}


def clear_memory_cache() -> None:
    """Forget this process's verdicts and hashes (the JSON caches stay)."""
    _memory.clear()
    _hashes.clear()


def _stamp(path: Path) -> tuple[int, int]:
    try:
        st = path.stat()
    except OSError as err:
        raise LayoutError(path, "file", f"cannot access: {err.strerror or err}") from None
    return st.st_size, st.st_mtime_ns


def _load(folder: Path) -> dict[str, dict]:
    try:
        data = json.loads((folder / CACHE_NAME).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != CHECK_VERSION or not isinstance(data.get("files"), dict):
        return {}
    return data["files"]


def _save(folder: Path, entries: dict[str, dict]) -> None:
    with contextlib.suppress(OSError):  # read-only data folder: the in-process cache still works
        with atomic_path(folder / CACHE_NAME) as tmp:
            tmp.write_text(json.dumps({"version": CHECK_VERSION, "files": entries}, indent=0))


def _from_entry(path: Path, entry: dict) -> ScanInfo | None:
    try:
        fields = dict(entry["info"])
        fields["path"] = str(path)
        fields["shape"] = tuple(int(n) for n in fields["shape"])
        return ScanInfo(**fields)
    except (KeyError, TypeError, ValueError):
        return None


def check_files(paths: Sequence[str | os.PathLike]) -> list[ScanInfo]:
    """Fully check every file (layout, finiteness, physical consistency), cached.

    Returns:
        The files' :class:`~melrecon.data.h5.ScanInfo`, in the order given.

    Raises:
        LayoutError: for the first bad file, naming file and field.
    """
    paths = [Path(p) for p in paths]
    by_folder: dict[Path, list[Path]] = {}
    for p in paths:
        by_folder.setdefault(p.resolve().parent, []).append(p)
    out: dict[Path, ScanInfo] = {}
    for folder, files in by_folder.items():
        entries = _load(folder)
        changed = False
        for p in files:
            size, mtime = _stamp(p)
            key = (str(p.resolve()), size, mtime)
            info = _memory.get(key)
            entry = entries.get(p.name)
            if info is None and entry and entry.get("size") == size and entry.get("mtime_ns") == mtime:
                info = _from_entry(p, entry)
            if info is None:
                info = validate_file(p, check_values=True)
                # merged: a content hash stored beside (with its own stamp) is kept
                entries[p.name] = {**(entry or {}), "size": size, "mtime_ns": mtime, "info": dataclasses.asdict(info)}
                changed = True
            _memory[key] = info
            out[p] = dataclasses.replace(info, path=str(p))
        if changed:
            _save(folder, entries)
    return [out[p] for p in paths]


def _content_hash(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    except OSError as err:
        raise LayoutError(path, "file", f"cannot read: {err.strerror or err}") from None
    return h.hexdigest()


def file_hashes(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Content hash (BLAKE2b-128 of the bytes, hex) of every file, in the order given; cached by
    path, size and mtime in this process and in each folder's :data:`CACHE_NAME`."""
    paths = [Path(p) for p in paths]
    out: dict[Path, str] = {}
    by_folder: dict[Path, list[Path]] = {}
    for p in paths:
        by_folder.setdefault(p.resolve().parent, []).append(p)
    for folder, files in by_folder.items():
        entries: dict[str, dict] | None = None  # the JSON cache, read only when this process lacks a hash
        changed = False
        for p in files:
            size, mtime = _stamp(p)
            key = (str(p.resolve()), size, mtime)
            digest = _hashes.get(key)
            if digest is None:
                entries = _load(folder) if entries is None else entries
                entry = entries.get(p.name) or {}
                if entry.get("hash_stamp") == [size, mtime] and isinstance(entry.get("blake2b"), str):
                    digest = entry["blake2b"]
                else:
                    digest = _content_hash(p)
                    entries[p.name] = {**entry, "blake2b": digest, "hash_stamp": [size, mtime]}
                    changed = True
            _hashes[key] = digest
            out[p] = digest
        if changed and entries is not None:
            _save(folder, entries)
    return [out[p] for p in paths]
