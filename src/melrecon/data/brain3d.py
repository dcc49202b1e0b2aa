"""The brain study dataset: one command rebuilds it from the MNI152 T1 template in nilearn's wheel.

Usage::

    pip install nilearn            # or: pip install melrecon[brain]
    melrecon brain3d [OUT]         # OUT default data/brain3d; about 15 s of CPU, deterministic

Source: ``nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz``, the
skull-stripped ICBM 2009a nonlinear symmetric T1 template (Fonov et al., NeuroImage 2011;
Collins et al. 1999), 197 x 233 x 189 at 1 mm, uint8, RAS. Licence: the permissive notice
the MNI ICBM 2009 templates are released under ("Copyright (C) 1993-2004 Louis Collins,
McConnell Brain Imaging Centre, Montreal Neurological Institute, McGill University. Permission
to use, copy, modify, and distribute this software and its documentation for any purpose and
without fee is hereby granted, provided that the above copyright notice appear in all copies.
... It is provided 'as is' without express or implied warranty."); nilearn's own dataset
description lists the licence as "unknown".
The template is not redistributed here: it is read from the user's nilearn install and its
SHA-256 checked, so the dataset is the same everywhere.

What it is (:data:`OPTIONS`, passed to :func:`melrecon.data.convert.nifti.convert_nifti`):
resampled to 2 mm (spectrum crop: 2.01 mm exactly), cropped to the brain plus 4 mm (80 x 96 x
81 voxels), cut into a 2 x 3 x 3 grid (R x A x S) of 18 blocks of 40 x 32 x 27 voxels
(R, A, S), readout S (stored (X, Y, Z) = (S, R, A) = 27 x 40 x 32), 8 birdcage coils, SNR 30, a smooth random phase, true maps. The template is
left-right symmetric (an average with its mirror image), so the two blocks of a mirrored pair
always share a split: the split pattern has 9 entries, one per (A, S) cell, cycled over the
two R halves. Splits: train 10 blocks, val 4, test 4. A single subject: a test block is other
anatomy of the same brain, not another person.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

from melrecon.data.convert.nifti import NiftiOptions, convert_nifti, source_digest

TEMPLATE = "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
TEMPLATE_SHA256 = "421a10e872fd6cadae7f61d358dffbcc1795a497d61ee76c5dda2503e1a1e9e6"
DEFAULT_OUT = Path("data/brain3d")


def default_out() -> Path:
    """Where `melrecon brain3d` writes without an argument: ``$MELRECON_DATA_DIR/brain3d``, the
    folder ``data=brain3d`` reads (conf/paths/default.yaml), else ``data/brain3d``."""
    data_dir = os.environ.get("MELRECON_DATA_DIR")
    return Path(data_dir) / "brain3d" if data_dir else DEFAULT_OUT

#: (A, S) cells in grid order (S fastest): 0 posterior-inferior (cerebellum) ... 4 centre
#: (ventricles) ... 8 anterior-superior. val: cerebellum and anterior-middle; test: centre and
#: posterior-superior; the rest train.
SPLIT_PATTERN = ("val", "train", "test", "train", "test", "train", "train", "val", "train")

OPTIONS = NiftiOptions(voxel_mm=(2.0, 2.0, 2.0), readout="S", margin_mm=4.0, threshold=0.05, blocks=(2, 3, 3),
                       split_pattern=SPLIT_PATTERN, coils=8, snr=30.0, maps="true", phase_amplitude=1.0,
                       phase_correlation_mm=30.0, seed=0)


def template_path() -> Path:
    """The MNI152 template inside the installed nilearn (found without importing nilearn)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the brain dataset is built from the MNI152 template shipped with nilearn: pip install nilearn")
    path = Path(list(spec.submodule_search_locations)[0]) / TEMPLATE
    if not path.is_file():
        raise ValueError(f"nilearn is installed but has no {TEMPLATE}; install nilearn >= 0.10")
    return path


def build(out: str | Path = DEFAULT_OUT, progress: bool = True) -> dict:
    """Build the brain study dataset into the new folder ``out``; returns its manifest."""
    path = template_path()
    digest = source_digest(path)
    if digest != TEMPLATE_SHA256:
        raise ValueError(f"{path}: SHA-256 {digest[:12]}... differs from the template this dataset is defined on "
                         f"({TEMPLATE_SHA256[:12]}...): another nilearn version changed the file")
    return convert_nifti([path], out, OPTIONS, progress=progress)


def build_parser(prog: str = "python -m melrecon.data.brain3d") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument("out", nargs="?", type=Path, default=None,
                        help="new folder (missing or empty); default $MELRECON_DATA_DIR/brain3d, else data/brain3d")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.out is None:
        args.out = default_out()
    try:
        manifest = build(args.out)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    files = [o for e in manifest["inputs"] for o in e["outputs"]]
    counts = {s: sum(o["split"] == s for o in files) for s in ("train", "val", "test")}
    print(f"wrote {args.out}: " + ", ".join(f"{s} {n}" for s, n in counts.items()) + " volumes (manifest.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
