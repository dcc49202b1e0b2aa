"""CSV rows of the GPU kit: a writer that flushes every row (a step may be killed by its timeout)
and a reader that turns the numbers back into floats."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def fmt(value: Any) -> Any:
    """CSV cell: floats with 6 significant digits, None as an empty cell."""
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else value


class RowWriter:
    """A CSV file with fixed ``columns`` (other keys are dropped); each row is flushed at once.

    ``append``: add rows to an existing file of the same columns (the header is written only to a
    new or empty file; a file with other columns is an error naming both).
    """

    def __init__(self, path: Path, columns: Sequence[str], append: bool = False) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not append or not path.is_file() or path.stat().st_size == 0
        if not fresh:
            with path.open(newline="") as f:
                header = next(csv.reader(f), [])
            if header != list(columns):
                raise ValueError(f"{path}: cannot append, its columns {header} differ from {list(columns)}")
        self._f = path.open("w" if fresh else "a", newline="")
        self._w = csv.DictWriter(self._f, fieldnames=list(columns), extrasaction="ignore")
        if fresh:
            self._w.writeheader()
            self._f.flush()

    def write(self, row: dict[str, Any]) -> None:
        self._w.writerow({k: fmt(v) for k, v in row.items()})
        self._f.flush()

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "RowWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a CSV file ([] if it does not exist)."""
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def number(cell: str | None) -> float | None:
    """A CSV cell as a float (NaN and inf included: a NaN loss must be seen); None for an empty
    or non-numeric cell."""
    if cell is None or cell == "":
        return None
    try:
        return float(cell)
    except ValueError:
        return None
