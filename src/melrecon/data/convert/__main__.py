"""Convert raw data to the melrecon layout.

Usage::

    python -m melrecon.data.convert {mridata,fastmri,ocmr,cmrxrecon,twix} IN OUT
        [--calib 24] [--maps MAPS.npy] [--readout-crop N] [--key NAME] [--twix-mode auto]
        [--overwrite]
    python -m melrecon.data.convert nifti IN OUT [options]   (magnitude volumes -> simulated
        k-space; its own options: ``melrecon convert nifti --help``, melrecon.data.convert.nifti)

IN is a file or a folder (every ``*.h5`` / ``*.mat`` below it is converted; ``*.dat`` for twix). OUT is the output
``.h5`` file for a single input, otherwise a folder (``<stem>.h5`` per input; for CMRxRecon the
patient folder name is prefixed, e.g. ``P001_cine_sax.h5``). Coil maps are estimated with
ESPIRiT unless ``--maps`` gives known maps (a ``.npy`` in the output geometry; single input).
Exits 1 if any input failed, naming it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from melrecon.data.convert import CONVERTERS
from melrecon.data.convert.twix import MODES as TWIX_MODES


def _inputs(path: Path, fmt: str) -> list[Path]:
    suffixes = (".dat",) if fmt == "twix" else (".h5", ".mat")
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.suffix in suffixes and p.is_file())
    return [path]


def build_parser(prog: str = "python -m melrecon.data.convert") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument("format", choices=(*CONVERTERS, "nifti"),
                        help="the raw data's source: mridata (3D knee ISMRMRD .h5), fastmri (fastMRI .h5), "
                             "ocmr and cmrxrecon (cine), twix (Siemens .dat); nifti: magnitude volumes to simulated k-space (own "
                             "options: melrecon convert nifti --help)")
    parser.add_argument("input", type=Path,
                        help="a raw file, or a folder: every *.h5 / *.mat below it (*.dat for twix) is converted")
    parser.add_argument("output", type=Path,
                        help="the melrecon .h5 file for a single input, else a folder (<stem>.h5 per input)")
    parser.add_argument("--calib", type=int, default=24, help="ESPIRiT calibration width")
    parser.add_argument("--maps", type=Path, help="known coil maps (.npy, output geometry); skips ESPIRiT")
    parser.add_argument("--readout-crop", type=int,
                        help="fastmri: crop the oversampled readout to N; twix: readout size after removing the "
                             "oversampling (default: samples / Dicom.flReadoutOSFactor)")
    parser.add_argument("--key", help="cmrxrecon: variable name (default kspace_full, then kspace)")
    parser.add_argument("--twix-mode", choices=TWIX_MODES, default="auto",
                        help="twix: 3d -> volume3d, 2d multi-slice -> volume3d slice stack, cine -> cine "
                             "(default auto: 3d if the Par counter varies, cine if Phs does, else 2d)")
    parser.add_argument("--overwrite", action="store_true", help="replace output files that exist (default: refuse)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["nifti"]:  # simulated k-space from images: a different set of options
        from melrecon.data.convert.nifti import main as nifti_main

        return nifti_main(argv[1:])
    args = build_parser().parse_args(argv)
    inputs = _inputs(args.input, args.format)
    if not inputs or not inputs[0].exists():
        print(f"error: no input files at {args.input}", file=sys.stderr)
        return 1
    if args.maps is not None and len(inputs) != 1:
        print("error: --maps needs a single input file", file=sys.stderr)
        return 1
    single = len(inputs) == 1 and args.output.suffix == ".h5"
    extra = {}
    if args.format in ("fastmri", "twix") and args.readout_crop:
        extra["readout_crop"] = args.readout_crop
    if args.format == "twix":
        extra["mode"] = args.twix_mode
    if args.format == "cmrxrecon" and args.key:
        extra["key"] = args.key
    failed = 0
    for path in tqdm(inputs, desc=f"convert {args.format}", disable=len(inputs) == 1):
        name = f"{path.parent.name}_{path.stem}.h5" if args.format == "cmrxrecon" else f"{path.stem}.h5"
        out = args.output if single else args.output / name
        if out.exists() and not args.overwrite:
            print(f"skip {out} (exists; --overwrite to replace)")
            continue
        try:
            maps = np.load(args.maps) if args.maps is not None else None
            CONVERTERS[args.format](path, out, maps=maps, calib=args.calib, **extra)
        except (ValueError, OSError, KeyError) as err:
            failed += 1
            print(f"FAILED {path}: {err}", file=sys.stderr)
        else:
            print(f"wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
