"""BART's ``.cfl``/``.hdr`` file pair, read and written (Debian's ``bart`` package ships no Python I/O).

The format (BART's ``python/cfl.py`` and ``src/misc/mmio.c``): ``name.hdr`` is text whose line after
``# Dimensions`` lists the array's dimensions (BART's 16, trailing 1s optional); ``name.cfl`` is the
raw complex64 data in column-major (Fortran) order. ``name`` is given without an extension.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_cfl(name: str | Path, array: np.ndarray) -> None:
    """Write ``array`` (any complex or real array; BART dims 0.. in order) as ``name.hdr``/``name.cfl``."""
    name = Path(name)
    arr = np.asarray(array, dtype=np.complex64)
    name.with_suffix(".hdr").write_text("# Dimensions\n" + " ".join(str(n) for n in arr.shape) + "\n")
    arr.ravel(order="F").tofile(name.with_suffix(".cfl"))


def read_cfl(name: str | Path) -> np.ndarray:
    """Read ``name.hdr``/``name.cfl`` into a complex64 array of the header's dims (trailing 1s dropped)."""
    name = Path(name)
    lines = name.with_suffix(".hdr").read_text().splitlines()
    try:
        dims = [int(n) for n in lines[lines.index("# Dimensions") + 1].split()]
    except (ValueError, IndexError) as err:
        raise ValueError(f"{name.with_suffix('.hdr')}: no '# Dimensions' line followed by integers") from err
    while len(dims) > 1 and dims[-1] == 1:
        dims.pop()
    data = np.fromfile(name.with_suffix(".cfl"), dtype=np.complex64)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{name.with_suffix('.cfl')}: {data.size} values, header dims {dims} need {int(np.prod(dims))}")
    return data.reshape(dims, order="F")
