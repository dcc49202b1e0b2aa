"""What a reconstruction writes: one HDF5 file per scan, ``metrics.csv``, a table on screen.

An output folder holds the results of one checkpoint (``checkpoint_sha256`` attribute of every
result file) at one depth (``num_unrolls`` attribute: the unrolls the network ran, which
``--num-unrolls`` may change from the trained ``trained_num_unrolls``) and is written by one ``reconstruct`` at a time (:data:`LOCK_NAME`,
:func:`melrecon.data.locks.file_lock`). ``metrics.csv`` is rebuilt from every result file in
the folder (:func:`results_in`), so it always lists exactly the files beside it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import sys
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from melrecon.atomic import atomic_path, check_free_space
from melrecon.reconstruct.stitch import METRIC_KEYS, ScanResult

CSV_COLUMNS = ("file", "output", "kind", "acceleration", "mask", "num_unrolls", *METRIC_KEYS)
TRAINED_DEPTH = tuple(f"{k}_trained_depth" for k in ("psnr", "ssim", "nmse"))  # with --num-unrolls
LOCK_NAME = ".melrecon-reconstruct.lock"


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file (the identity of a checkpoint, whatever its name or path)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def result_attrs(path: str | os.PathLike) -> dict[str, Any] | None:
    """The attributes of a result file written by :func:`write_result`, or None for any other
    file (not HDF5, or no ``checkpoint`` attribute: not ours, left alone)."""
    try:
        with h5py.File(path, "r") as f:
            attrs = dict(f.attrs)
    except (OSError, RuntimeError):
        return None
    if "checkpoint" not in attrs:
        return None
    return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in attrs.items()}


def results_in(folder: str | os.PathLike) -> dict[Path, dict[str, Any]]:
    """Result files in ``folder`` (not recursive, hidden temporaries skipped) -> their attributes."""
    out = {}
    for p in sorted(Path(folder).glob("*.h5")):
        if p.name.startswith("."):
            continue
        attrs = result_attrs(p)
        if attrs is not None:
            out[p] = attrs
    return out


def csv_row(path: Path, attrs: dict[str, Any]) -> dict[str, Any]:
    """One ``metrics.csv`` row (plus ``name`` for the table) from a result file's attributes."""
    src = str(attrs.get("source_file", ""))
    return {"file": src, "name": Path(src).name, "output": str(path), "kind": attrs.get("kind", ""),
            "acceleration": float(attrs.get("acceleration", float("nan"))), "mask": attrs.get("mask", ""),
            "num_unrolls": attrs.get("num_unrolls", ""),
            **{k: float(attrs[k]) for k in (*METRIC_KEYS, *TRAINED_DEPTH) if k in attrs}}


def write_result(path: str | os.PathLike, result: ScanResult, attrs: dict[str, Any]) -> Path:
    """Write one result file whole or not at all.

    The HDF5 file is built in memory and its size checked against the free space of the folder
    (:func:`melrecon.atomic.check_free_space`) before anything is written: HDF5 writing into a
    full disk fails with errors and then crashes the process at exit (segmentation fault). The
    bytes then go to a hidden temporary file renamed over ``path`` (:func:`melrecon.atomic.atomic_path`).
    Raises :class:`melrecon.atomic.WriteError` naming ``path``; nothing is left on failure.
    """
    path = Path(path)
    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        f.create_dataset("reconstruction", data=result.reconstruction.astype(np.complex64))
        f.create_dataset("zero_filled", data=result.zero_filled.astype(np.complex64))
        f.create_dataset("mask", data=result.mask.astype(np.float32))
        for key, value in {**attrs, **result.metrics}.items():
            f.attrs[key] = value
    data = buf.getbuffer()
    check_free_space(path, data.nbytes)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path


def write_csv(path: str | os.PathLike, rows: list[dict[str, Any]]) -> Path:
    """``metrics.csv`` (columns :data:`CSV_COLUMNS`, plus :data:`TRAINED_DEPTH` when a row has
    them), written atomically. A file without a target leaves its metric cells empty."""
    path = Path(path)
    buf = io.StringIO()
    extra = [k for k in TRAINED_DEPTH if any(k in r for r in rows)]
    writer = csv.DictWriter(buf, fieldnames=[*CSV_COLUMNS, *extra], extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue())
    return path


def print_table(rows: list[dict[str, Any]], file: Any = None) -> None:
    """The per-volume metrics as a table (rich), with the mean over volumes if several."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="reconstruction metrics (fastMRI; _zf = zero-filled input)")
    for col in ("file", "R", *METRIC_KEYS):
        table.add_column(col, justify="left" if col == "file" else "right")

    def fmt(row: dict[str, Any]) -> list[str]:
        vals = ["-" if k not in row else f"{row[k]:.2f}" if k.startswith("psnr") else f"{row[k]:.4f}"
                for k in METRIC_KEYS]  # "-": no target (prospective file), nothing to score
        return [str(row["name"]), f"{row['acceleration']:.2f}", *vals]

    for row in rows:
        table.add_row(*fmt(row))
    scored = [r for r in rows if "psnr" in r]
    if len(rows) > 1:
        mean = {k: float(np.mean([r[k] for r in scored])) for k in METRIC_KEYS if scored}
        mean["acceleration"] = float(np.mean([r["acceleration"] for r in rows]))
        table.add_row(*fmt({"name": f"mean of {len(rows)}", **mean}), style="bold")
    Console(file=file or sys.stdout, width=160).print(table)
