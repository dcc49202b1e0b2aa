"""What a reconstruction writes: one HDF5 file per scan, ``metrics.csv``, a table on screen."""

from __future__ import annotations

import csv
import io
import os
import sys
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from melrecon.data.h5 import atomic_path
from melrecon.reconstruct.stitch import METRIC_KEYS, ScanResult

CSV_COLUMNS = ("file", "output", "kind", "acceleration", *METRIC_KEYS)


def write_result(path: str | os.PathLike, result: ScanResult, attrs: dict[str, Any]) -> Path:
    """Write one result atomically: a hidden temporary file in the same folder, then
    ``os.replace``; on any error the temporary file is removed and nothing is left."""
    path = Path(path)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("reconstruction", data=result.reconstruction.astype(np.complex64))
        f.create_dataset("zero_filled", data=result.zero_filled.astype(np.complex64))
        f.create_dataset("mask", data=result.mask.astype(np.float32))
        for key, value in {**attrs, **result.metrics}.items():
            f.attrs[key] = value
    return path


def write_csv(path: str | os.PathLike, rows: list[dict[str, Any]]) -> Path:
    """``metrics.csv`` (columns :data:`CSV_COLUMNS`), written atomically."""
    path = Path(path)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore")
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
        vals = [f"{row[k]:.2f}" if k.startswith("psnr") else f"{row[k]:.4f}" for k in METRIC_KEYS]
        return [str(row["name"]), f"{row['acceleration']:.2f}", *vals]

    for row in rows:
        table.add_row(*fmt(row))
    if len(rows) > 1:
        mean = {k: float(np.mean([r[k] for r in rows])) for k in (*METRIC_KEYS, "acceleration")}
        table.add_row(*fmt({"name": f"mean of {len(rows)}", **mean}), style="bold")
    Console(file=file or sys.stdout, width=160).print(table)
