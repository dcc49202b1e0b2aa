"""Check files against the melrecon HDF5 layout.

Usage::

    python -m melrecon.data.validate PATH [PATH ...]

Each PATH is an ``.h5`` file or a folder (searched recursively). Prints one line per file and
exits with status 1 if any file is bad (or no file was found), 0 otherwise. Bad files are
reported as ``BAD <file>: field '<field>': <problem>``. Without ``--quick``, a fully sampled file
whose coil maps are zero on part of the RSS object (an ESPIRiT crop too tight) gets a
``WARN <file>: field 'maps': ...`` line (the file stays valid: the status is unchanged).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from melrecon.data.h5 import LayoutError, find_files, validate_file


def collect(paths: list[str]) -> list[Path]:
    """Expand folders into their ``.h5`` files; keep files as given (any suffix)."""
    out: list[Path] = []
    for p in map(Path, paths):
        out.extend(find_files(p) if p.is_dir() else [p])
    return out


def maps_warning(path: Path) -> str | None:
    """:func:`melrecon.data.convert.common.maps_cover_warning` of a fully sampled file (cine: per
    slice, the coil images of every frame)."""
    from melrecon.data.convert.common import maps_cover_warning
    from melrecon.data.h5 import read_scan
    from melrecon.data.npfft import ifftc_np

    arrays, info = read_scan(path)
    kspace, maps = arrays["kspace"], arrays["maps"]
    if info.kind == "cine":  # (S,) C, T, X, Y with maps (S,) C, X, Y
        return maps_cover_warning(path, np.expand_dims(maps, -3), ifftc_np(kspace, axes=(-2, -1)), kspace.ndim - 4)
    return maps_cover_warning(path, maps, ifftc_np(kspace, axes=(-2, -1)), 0)


def build_parser(prog: str = "python -m melrecon.data.validate") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument("paths", nargs="+", help="files or folders")
    parser.add_argument("--quick", action="store_true", help="skip the finiteness scan (metadata only)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    files = collect(args.paths)
    if not files:
        print(f"BAD: no .h5 files found in {args.paths}", file=sys.stderr)
        return 1
    bad = 0
    for path in files:
        try:
            info = validate_file(path, check_values=not args.quick)
        except LayoutError as err:
            bad += 1
            print(f"BAD {err}", file=sys.stderr)
        else:
            extra = (" prospective (stored mask" + ("" if info.has_target else ", no target") + ")") if info.has_mask else ""
            print(f"ok  {path}: {info.kind} {info.axes} {info.shape} max={info.max:.4g}{extra}")
            warning = None if args.quick or not info.has_target else maps_warning(path)
            if warning:
                print(f"WARN {warning}", file=sys.stderr)
    print(f"{len(files) - bad} ok, {bad} bad", file=sys.stderr if bad else sys.stdout)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
