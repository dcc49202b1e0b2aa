"""Synthetic datasets in the melrecon layout: knee-like 3D volumes and beating-heart cine.

Usage::

    python -m melrecon.data.synthetic {knee3d,cine} OUT [--preset small] [--seed 0]
        [--num-train N] [--num-val N] [--num-test N] [--coils C] [--snr DB-free-ratio]

writes ``OUT/{train,val,test}/<kind>_<split>_<i>.h5``. Each case: phantom image x (complex),
birdcage coil maps S (sum |S|^2 = 1), fully-sampled k-space k = F(S x) + n with complex
Gaussian noise n of std ``mean|x| / snr`` (mean over the object), target = S^H F^H k.
Case ``i`` of a split is seeded from (seed, split, i), so a case never depends on how many
others are generated. The whole dataset is written in a hidden temporary folder next to OUT and
renamed into place at the end: an interrupted run leaves no partial dataset behind, and a
temporary folder left by a killed run (``.OUT.tmp*``) is removed by the next generation.
Generation holds a lock (``.OUT.lock`` next to OUT, :func:`melrecon.data.locks.file_lock`), so
two trainings that need the same set at once generate it once: the second waits, then reuses it
(:func:`ensure_dataset`). Folders and files get the user's umask (not ``mkdtemp``'s 0700).
``OUT/synthetic.json`` records kind, preset, seed and parameters.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from melrecon.data.h5 import find_files, write_scan
from melrecon.data.locks import file_lock
from melrecon.data.npfft import fftc_np, ifftc_np, sense_combine_np
from melrecon.data.phantoms import cine_series, knee_volume
from melrecon.data.simulate import add_noise, coil_maps, simulate_kspace

log = logging.getLogger("melrecon")

SPLITS = ("train", "val", "test")
_SPLIT_ID = {s: i for i, s in enumerate(SPLITS)}

#: Presets per kind. ``shape`` is (X, Y, Z) for knee3d and (X, Y) for cine.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "knee3d": {
        "tiny": dict(shape=(8, 16, 16), coils=4, snr=50.0, num_train=2, num_val=1, num_test=1),
        "small": dict(shape=(20, 48, 40), coils=4, snr=40.0, num_train=16, num_val=3, num_test=3),
        # about 80 MB per case (k-space and maps, 8 coils): 2.5 GB in all
        "medium": dict(shape=(48, 128, 96), coils=8, snr=40.0, num_train=24, num_val=4, num_test=4),
    },
    "cine": {
        "tiny": dict(shape=(16, 16), frames=4, slices=1, coils=4, snr=50.0, respiration=0.02,
                     num_train=2, num_val=1, num_test=1),
        "small": dict(shape=(48, 48), frames=8, slices=1, coils=4, snr=40.0, respiration=0.02,
                      num_train=24, num_val=4, num_test=4),
        # about 19 MB per case: 1.2 GB in all
        "medium": dict(shape=(96, 96), frames=16, slices=2, coils=8, snr=40.0, respiration=0.03,
                       num_train=48, num_val=8, num_test=8),
    },
}


def make_knee_case(shape: tuple[int, int, int], coils: int, snr: float, seed: int | np.random.SeedSequence,
                   phantom_version: int = 1) -> dict[str, np.ndarray]:
    """One knee3d scan: ``kspace``/``maps`` (C, X, Y, Z) hybrid x-ky-kz, ``target`` (X, Y, Z)."""
    rng = np.random.default_rng(seed)
    image = knee_volume(tuple(shape), rng, version=phantom_version)
    maps = coil_maps(shape, coils, rng)
    return simulate_kspace(image, maps, snr, rng, fft_axes=(-2, -1))  # X stays in image space (hybrid)


def make_cine_case(
    shape: tuple[int, int], frames: int, slices: int, coils: int, snr: float, respiration: float,
    seed: int | np.random.SeedSequence, phantom_version: int = 1,
) -> dict[str, np.ndarray]:
    """One cine scan: ``kspace`` (S, C, T, X, Y), ``maps`` (S, C, X, Y), ``target`` (S, T, X, Y)."""
    rng = np.random.default_rng(seed)
    images = np.stack([cine_series(frames, tuple(shape), rng, respiration, version=phantom_version)
                       for _ in range(slices)])
    maps = np.stack([coil_maps(shape, coils, rng) for _ in range(slices)])
    kspace = fftc_np(maps[:, :, None] * images[:, None], axes=(-2, -1))
    kspace = add_noise(kspace, images, snr, rng)
    target = sense_combine_np(ifftc_np(kspace, axes=(-2, -1)), maps[:, :, None], coil_axis=1)
    return {"kspace": kspace, "maps": maps, "target": target}


MARKER = "synthetic.json"  # written into a generated dataset folder: what it was made from


def describe(kind: str, preset: str, seed: int, params: dict[str, Any]) -> dict[str, Any]:
    """The JSON-able identity of a synthetic dataset (compared by the DataModule on reuse)."""
    return json.loads(json.dumps({"kind": kind, "preset": preset, "seed": int(seed), "params": params}))


#: Options that no preset sets; they join a dataset's parameters (and its ``synthetic.json``
#: identity) only when given, so datasets generated before the option existed stay valid.
OPTIONAL = {"phantom_version": (1, 2)}  # phantoms.py: 2 adds fine through-plane / textured structure


def resolve_preset(kind: str, preset: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The preset's parameters with ``overrides`` (None values ignored) applied."""
    if kind not in PRESETS:
        raise ValueError(f"synthetic kind must be one of {tuple(PRESETS)}, got {kind!r}")
    if preset not in PRESETS[kind]:
        raise ValueError(f"synthetic preset for {kind} must be one of {tuple(PRESETS[kind])}, got {preset!r}")
    params = dict(PRESETS[kind][preset])
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key in OPTIONAL:
            if value not in OPTIONAL[key]:
                raise ValueError(f"synthetic option {key} must be one of {OPTIONAL[key]}, got {value!r}")
        elif key not in params:
            raise ValueError(f"unknown synthetic option {key!r} for {kind}; known: {sorted([*params, *OPTIONAL])}")
        params[key] = tuple(value) if key == "shape" else value
    return params


def expected_files(kind: str, params: dict[str, Any]) -> dict[str, list[str]]:
    """File names per split that a dataset of ``kind`` with ``params`` holds (``num_<split>``)."""
    return {s: [f"{kind}_{s}_{i:04d}.h5" for i in range(int(params[f"num_{s}"]))] for s in SPLITS}


def lock_path(root: str | os.PathLike) -> Path:
    """The lock file guarding the generation of ``root`` (hidden, next to it)."""
    root = Path(root)
    return root.parent / f".{root.name}.lock"


def _remove_stale_temporaries(root: Path) -> None:
    """Remove ``.ROOT.tmp*`` folders: under the generation lock, any that exists was left by a
    generation that was killed (a live one holds the lock while its folder exists)."""
    for stale in root.parent.glob(f".{root.name}.tmp*"):
        if stale.is_dir():
            log.warning("removing %s, left by an interrupted synthetic-data generation", stale)
            shutil.rmtree(stale, ignore_errors=True)


def _generate_locked(root: Path, kind: str, preset: str, seed: int, progress: bool,
                     params: dict[str, Any]) -> dict[str, list[Path]]:
    """Generate ``root`` (the caller holds the lock); see :func:`generate_dataset`."""
    _remove_stale_temporaries(root)
    if root.exists() and any(root.iterdir()):
        raise ValueError(f"synthetic dataset folder {root} is not empty; refusing to overwrite")
    # os.mkdir honours the umask (tempfile.mkdtemp would make the dataset 0700)
    tmp = root.parent / f".{root.name}.tmp{os.getpid()}_{secrets.token_hex(4)}"
    tmp.mkdir()
    names = expected_files(kind, params)
    files: dict[str, list[Path]] = {s: [] for s in SPLITS}
    jobs = [(s, i) for s in SPLITS for i in range(len(names[s]))]
    counts = ", ".join(f"{len(names[s])} {s}" for s in SPLITS)
    log.info("generating a synthetic %s dataset (preset %s, seed %d): %d files (%s) into %s; later runs reuse it",
             kind, preset, seed, len(jobs), counts, root)
    try:
        for split, i in tqdm(jobs, desc=f"synthetic {kind} ({preset})", disable=not progress, leave=False):
            ss = np.random.SeedSequence([int(seed), _SPLIT_ID[split], i, 0 if kind == "knee3d" else 1])
            source = f"melrecon.data.synthetic kind={kind} preset={preset} seed={seed} split={split} case={i} params={params}"
            name = names[split][i]
            if kind == "knee3d":
                case = make_knee_case(params["shape"], params["coils"], params["snr"], ss,
                                      params.get("phantom_version", 1))
                write_scan(tmp / split / name, **case, kind="volume3d", source=source)
            else:
                case = make_cine_case(params["shape"], params["frames"], params["slices"], params["coils"],
                                      params["snr"], params["respiration"], ss, params.get("phantom_version", 1))
                write_scan(tmp / split / name, **case, kind="cine", source=source)
            files[split].append(root / split / name)
        for split in SPLITS:
            (tmp / split).mkdir(exist_ok=True)
        (tmp / MARKER).write_text(json.dumps(describe(kind, preset, seed, params), indent=1))
        if root.exists():
            root.rmdir()  # empty (checked above); rename needs the name free
        os.replace(tmp, root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return files


def generate_dataset(
    root: str | os.PathLike,
    kind: str,
    preset: str = "small",
    seed: int = 0,
    progress: bool = True,
    **overrides: Any,
) -> dict[str, list[Path]]:
    """Generate ``root/{train,val,test}`` atomically, under the generation lock.

    Args:
        root: destination folder; must be missing or empty.
        kind: ``"knee3d"`` (stored as kind ``volume3d``) or ``"cine"``.
        preset: ``"tiny"``, ``"small"`` or ``"medium"`` (see :data:`PRESETS`).
        seed: dataset seed.
        progress: show a tqdm bar.
        overrides: preset keys to change (``shape``, ``coils``, ``snr``, ``num_train`` ...).

    Returns:
        The written files per split.
    """
    root = Path(root)
    params = resolve_preset(kind, preset, overrides)
    root.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(lock_path(root)):
        return _generate_locked(root, kind, preset, seed, progress, params)


def ensure_dataset(
    root: str | os.PathLike, kind: str, preset: str = "small", seed: int = 0, progress: bool = True,
    **overrides: Any,
) -> bool:
    """Generate ``root`` unless it already holds a dataset (``.h5`` files or ``synthetic.json``).

    Check and generation happen under the generation lock, so of two processes asking at once
    one generates and the other waits and then reuses the set. Returns True if it generated.
    Whether an existing folder matches the request is the caller's check (the DataModule
    compares ``synthetic.json`` and the files present).
    """
    root = Path(root)
    params = resolve_preset(kind, preset, overrides)
    root.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(lock_path(root)):
        if root.is_dir() and ((root / MARKER).is_file() or find_files(root)):
            return False
        _generate_locked(root, kind, preset, seed, progress, params)
        return True


def build_parser(prog: str = "python -m melrecon.data.synthetic") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument("kind", choices=tuple(PRESETS), help="knee3d (3D volumes) or cine (2D+t)")
    parser.add_argument("out", help="destination folder (missing or empty)")
    parser.add_argument("--preset", default="small", choices=("tiny", "small", "medium"),
                        help="sizes and counts (table in data/README.md)")
    parser.add_argument("--seed", type=int, default=0, help="base seed (case i of a split: seed, split, i)")
    parser.add_argument("--num-train", type=int, help="training files (default: the preset's)")
    parser.add_argument("--num-val", type=int, help="validation files (default: the preset's)")
    parser.add_argument("--num-test", type=int, help="test files (default: the preset's)")
    parser.add_argument("--coils", type=int, help="receive coils (default: the preset's)")
    parser.add_argument("--snr", type=float, help="mean object magnitude / noise std (0 = no noise)")
    parser.add_argument("--shape", type=int, nargs="+", help="(X Y Z) for knee3d, (X Y) for cine")
    parser.add_argument("--frames", type=int, help="cine frames")
    parser.add_argument("--phantom-version", type=int, choices=(1, 2),
                        help="2: fine through-plane structures and textures (melrecon.data.phantoms)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = dict(num_train=args.num_train, num_val=args.num_val, num_test=args.num_test,
                     coils=args.coils, snr=args.snr, shape=args.shape, phantom_version=args.phantom_version)
    if args.kind == "cine":
        overrides["frames"] = args.frames
    try:
        files = generate_dataset(args.out, args.kind, args.preset, args.seed, **overrides)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(", ".join(f"{s}: {len(v)}" for s, v in files.items()), f"files in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
