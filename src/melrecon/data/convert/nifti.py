"""Magnitude volumes (NIfTI) -> simulated multi-coil k-space in the volume3d layout.

Usage::

    melrecon convert nifti IN OUT [--voxel-mm 2] [--readout S|A|R] [--margin-mm 6]
        [--coils 8] [--snr 30] [--maps true|espirit] [--blocks 2x3x3] [--split-pattern train,val,...]
        [--phase-amplitude 1.0] [--phase-correlation-mm 30] [--seed 0] [--allow-band-limited]

IN: a ``.nii``/``.nii.gz`` file or a folder of them (sorted by path). OUT: a new folder (missing
or empty), written atomically (a hidden temporary folder renamed at the end), holding
``[<split>/]<stem>[_b<block>].h5`` and ``manifest.json`` (every option, the input's checksum,
orientation and voxel size, each output's block, seed and split).

Per input, in this order:

1. Read the magnitude volume (3D, or 4D with one volume) and its voxel size and orientation.
2. Refuse a data crime: a volume that was zero-padded in k-space or upsampled has almost no
   spectral energy near the stated resolution's edge (:func:`band_limit_ratios`); resampling
   to a voxel smaller than the file's is upsampling and is refused too.
3. Resample to ``--voxel-mm`` by cropping the centred spectrum (what a scan at that resolution
   measures; the Gibbs ringing at edges is real MRI behaviour). The voxel becomes FOV / new
   size, within a fraction of a voxel of the request; the manifest records the exact value.
4. Crop to the object's bounding box (voxels above ``--threshold`` of the maximum) plus
   ``--margin-mm``, grown so that each axis divides by the block grid.
5. Simulate on the whole cropped object (:mod:`melrecon.data.simulate`): a smooth random phase,
   birdcage coil maps in rings around the head's S axis, one noise std for the whole object
   from ``--snr``.
6. Cut ``--blocks`` non-overlapping blocks (a grid in the file's voxel axes; one number K:
   K blocks along the readout), move the readout axis first (X; Y and Z the other two axes in
   the file's order) and simulate each block's fully-sampled k-space (FFT over Y, Z: hybrid
   x-ky-kz) with its own noise draw. Maps: the simulated ones (``--maps true``) or ESPIRiT from
   the block's k-space (``--maps espirit``). Target = S^H F^H k.
7. Output ``n`` (inputs, then blocks, in order) goes to split ``pattern[n % len(pattern)]``.

Seeds: phase and maps of input ``f`` from ``SeedSequence([seed, f])``, noise of its block ``b``
from ``SeedSequence([seed, f, 1 + b])``. See docs/real-data.md for what simulated k-space lacks.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import shutil
import sys
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from melrecon.data.npfft import fftc_np, ifftc_np

NIFTI_SUFFIXES = (".nii", ".nii.gz")
#: Outer-band / mid-band spectral power below which a volume counts as band-limited (zero-padded
#: in k-space or interpolated). Measured: the MNI152 template (an average of 152 brains, among the
#: smoothest real volumes) 0.09-0.15 at 1-3 mm; the same zero-padded 2x in k-space 0.011, by 1.33x
#: 0.024; linearly upsampled 2x 0.012-0.016; cubic 1e-4.
BAND_LIMIT_THRESHOLD = 0.03
READOUTS = ("R", "A", "S")
_OPPOSITE = {"R": "L", "A": "P", "S": "I"}


@dataclass
class NiftiOptions:
    """Every choice of a conversion (recorded in the manifest)."""

    voxel_mm: tuple[float, float, float] | None = None   # None: keep the file's voxel size
    readout: str = "S"
    margin_mm: float = 6.0
    threshold: float = 0.05
    blocks: tuple[int, int, int] | int = 1
    split_pattern: tuple[str, ...] | None = None
    coils: int = 8
    snr: float = 30.0
    maps: str = "true"
    calib: int = 24
    phase_amplitude: float = 1.0
    phase_correlation_mm: float | None = 30.0
    seed: int = 0
    allow_band_limited: bool = False


@dataclass
class Magnitude:
    """A magnitude volume in its file's voxel axes: ``volume`` (I, J, K) float64, ``voxel_mm``,
    ``axcodes`` (nibabel's, e.g. ('R', 'A', 'S')), ``dtype`` of the stored data."""

    volume: np.ndarray
    voxel_mm: tuple[float, float, float]
    axcodes: tuple[str, str, str]
    dtype: str


def read_magnitude(path: str | os.PathLike) -> Magnitude:
    """Read a 3D (or single-volume 4D) real NIfTI volume; one-line ValueError otherwise."""
    import nibabel as nib

    path = Path(path)
    if not str(path).endswith(NIFTI_SUFFIXES):
        raise ValueError(f"{path}: not a NIfTI file (.nii or .nii.gz); lossy formats (JPEG, PNG) are refused")
    try:
        img = nib.load(str(path))
    except Exception as err:  # nibabel raises several types for unreadable files
        raise ValueError(f"{path}: cannot read as NIfTI: {err}") from None
    dtype = np.dtype(img.get_data_dtype())
    if dtype.kind == "c" or dtype.names:
        raise ValueError(f"{path}: data type {dtype} is not a real magnitude volume")
    data = np.asarray(img.dataobj, dtype=np.float64)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"{path}: shape {data.shape}: expected a 3D volume (or 4D with one volume)")
    if not np.isfinite(data).all():
        raise ValueError(f"{path}: the volume contains NaN or Inf")
    if data.max() <= 0:
        raise ValueError(f"{path}: the volume has no positive value")
    if data.min() < 0:
        raise ValueError(f"{path}: the volume has negative values ({data.min():.3g}): not a magnitude image")
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    return Magnitude(data, zooms, tuple(nib.aff2axcodes(img.affine)), str(dtype))


def band_limit_ratios(volume: np.ndarray, voxel_mm: Sequence[float], target_mm: Sequence[float]) -> list[float]:
    """Per axis: mean spectral power in the outer quarter of the band kept at ``target_mm``
    ((0.75, 1] x its Nyquist) over that in (0.25, 0.5] x its Nyquist.

    A volume resolved at ``target_mm`` gives about 0.1 or more (edges and noise reach the band
    edge); one zero-padded in k-space or interpolated from coarser voxels gives near 0.
    """
    ratios = []
    for axis, (n, dx, v) in enumerate(zip(volume.shape, voxel_mm, target_mm)):
        spec = np.abs(fftc_np(volume, axes=(axis,))) ** 2
        profile = spec.mean(axis=tuple(a for a in range(volume.ndim) if a != axis))
        k = np.abs(np.arange(n) - n // 2)
        half = min(n, n * dx / v) / 2  # bins up to the target's Nyquist
        outer = profile[(k > 0.75 * half) & (k <= half)]
        mid = profile[(k > 0.25 * half) & (k <= 0.5 * half)]
        ratios.append(float(outer.mean() / mid.mean()) if outer.size and mid.size and mid.mean() > 0 else float("nan"))
    return ratios


def check_resolution(mag: Magnitude, target_mm: Sequence[float], path: str | os.PathLike,
                     allow: bool = False) -> list[float]:
    """Refuse (or with ``allow`` warn about) upsampling and band-limited volumes; the ratios."""
    for axis, (dx, v) in enumerate(zip(mag.voxel_mm, target_mm)):
        if v < dx * (1 - 1e-6):
            raise ValueError(f"{path}: --voxel-mm {v:g} along axis {axis} is finer than the file's {dx:g} mm: "
                             "upsampling invents no detail (a data crime); use >= the file's voxel size")
    ratios = band_limit_ratios(mag.volume, mag.voxel_mm, target_mm)
    low = [a for a, r in enumerate(ratios) if r < BAND_LIMIT_THRESHOLD]
    if low:
        message = (f"{path}: axes {low} have almost no spectral energy near the stated resolution "
                   f"(outer/mid band power {[round(ratios[a], 4) for a in low]} < {BAND_LIMIT_THRESHOLD}): the volume "
                   "looks zero-padded in k-space or upsampled, and k-space simulated from it would be a data crime")
        if not allow:
            raise ValueError(message + "; give a coarser --voxel-mm or --allow-band-limited")
        warnings.warn(message, stacklevel=2)
    return ratios


def resample(volume: np.ndarray, voxel_mm: Sequence[float], target_mm: Sequence[float]) -> tuple[np.ndarray, tuple]:
    """Crop the centred spectrum of each axis to ``round(n * dx / v)`` points (the field of view
    is kept); returns the magnitude volume and its exact voxel size (FOV / new size)."""
    out = volume.astype(np.complex128)
    actual = []
    for axis, (n, dx, v) in enumerate(zip(volume.shape, voxel_mm, target_mm)):
        m = max(1, int(round(n * dx / v)))
        if m < n:
            spec = fftc_np(out, axes=(axis,))
            start = n // 2 - m // 2
            spec = np.take(spec, np.arange(start, start + m), axis=axis)
            out = ifftc_np(spec, axes=(axis,)) * np.sqrt(m / n)  # orthonormal transforms: keep intensities
        actual.append(n * dx / min(m, n))
    return np.abs(out), tuple(float(a) for a in actual)


def grow_box(lo: int, hi: int, size: int, multiple: int) -> tuple[int, int]:
    """Extend [lo, hi) about its centre to a multiple of ``multiple``; may leave [0, size)."""
    extent = hi - lo
    want = -(-extent // multiple) * multiple
    lo -= (want - extent) // 2
    return lo, lo + want


def crop_box(volume: np.ndarray, threshold: float, margin: Sequence[int], grid: Sequence[int]) -> tuple[np.ndarray, list]:
    """The bounding box of ``volume > threshold * max`` plus ``margin`` voxels per axis, grown so
    that each axis divides by ``grid``; zero-filled where the box leaves the volume (a larger
    field of view). Returns the cropped volume and the box [(lo, hi)] in the volume's indices."""
    idx = np.argwhere(volume > threshold * volume.max())
    box = []
    for axis, n in enumerate(volume.shape):
        lo = max(0, int(idx[:, axis].min()) - margin[axis])
        hi = min(n, int(idx[:, axis].max()) + 1 + margin[axis])
        box.append(grow_box(lo, hi, n, grid[axis]))
    out = np.zeros([hi - lo for lo, hi in box])
    src = tuple(slice(max(lo, 0), min(hi, n)) for (lo, hi), n in zip(box, volume.shape))
    dst = tuple(slice(max(lo, 0) - lo, min(hi, n) - lo) for (lo, hi), n in zip(box, volume.shape))
    out[dst] = volume[src]
    return out, box


def axis_of(axcodes: Sequence[str], direction: str) -> int:
    """The file axis pointing along ``direction`` (R, A or S, either sense)."""
    for axis, code in enumerate(axcodes):
        if code in (direction, _OPPOSITE[direction]):
            return axis
    raise ValueError(f"orientation {tuple(axcodes)} has no {direction} axis")


def block_grid(blocks: tuple[int, int, int] | int, readout_axis: int) -> tuple[int, int, int]:
    """The block grid in file axes: a triple as given, one number K: K blocks along the readout."""
    if isinstance(blocks, int):
        grid = [1, 1, 1]
        grid[readout_axis] = blocks
        return tuple(grid)
    return tuple(int(b) for b in blocks)


def source_digest(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def nifti_inputs(path: str | os.PathLike) -> list[Path]:
    """``path`` itself, or every NIfTI file below the folder ``path`` (sorted)."""
    path = Path(path)
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and str(p).endswith(NIFTI_SUFFIXES))
    return [path]


def _stem(path: Path) -> str:
    name = path.name
    for suffix in NIFTI_SUFFIXES[::-1]:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def convert_volume(path: Path, file_index: int, dest: Path, opts: NiftiOptions, first_output: int,
                   progress: bool = False) -> dict:
    """Convert one NIfTI file into ``dest`` (blocks, splits); its manifest entry."""
    from melrecon.data.convert.common import finish_volume
    from melrecon.data.simulate import add_complex_noise, coil_maps, noise_std, smooth_phase

    mag = read_magnitude(path)
    target_mm = tuple(opts.voxel_mm) if opts.voxel_mm is not None else mag.voxel_mm
    ratios = check_resolution(mag, target_mm, path, opts.allow_band_limited)
    volume, voxel = resample(mag.volume, mag.voxel_mm, target_mm)
    readout_axis = axis_of(mag.axcodes, opts.readout)
    grid = block_grid(opts.blocks, readout_axis)
    margin = [int(np.ceil(opts.margin_mm / v)) for v in voxel]
    volume, box = crop_box(volume, opts.threshold, margin, grid)
    if any(n // g < 8 for n, g in zip(volume.shape, grid)):
        raise ValueError(f"{path}: blocks {grid} of the cropped {volume.shape} volume are under 8 voxels on a side")

    rng = np.random.default_rng(np.random.SeedSequence([opts.seed, file_index]))
    corr = None if not opts.phase_correlation_mm else opts.phase_correlation_mm / float(np.mean(voxel))
    image = volume * np.exp(1j * smooth_phase(volume.shape, rng, opts.phase_amplitude, corr))
    maps = coil_maps(volume.shape, opts.coils, rng, ring_axis=axis_of(mag.axcodes, "S"))
    sigma = noise_std(image, opts.snr) if opts.snr else 0.0

    order = [readout_axis, *(a for a in range(3) if a != readout_axis)]
    sizes = [n // g for n, g in zip(volume.shape, grid)]
    outputs = []
    for b, cell in enumerate(np.ndindex(*grid)):
        sl = tuple(slice(c * s, (c + 1) * s) for c, s in zip(cell, sizes))
        x = np.transpose(image[sl], order)
        s = np.transpose(maps[(slice(None), *sl)], [0, *(1 + a for a in order)])
        kspace = fftc_np(s * x[None], axes=(-2, -1))  # X (the readout) stays in image space
        if sigma:
            kspace = add_complex_noise(kspace, sigma, np.random.default_rng(np.random.SeedSequence([opts.seed, file_index, 1 + b])))
        n = first_output + b
        split = opts.split_pattern[n % len(opts.split_pattern)] if opts.split_pattern else ""
        name = f"{_stem(path)}_b{b:02d}.h5" if len(sizes) and np.prod(grid) > 1 else f"{_stem(path)}.h5"
        origin = [box[a][0] + c * sz for a, (c, sz) in enumerate(zip(cell, sizes))]
        attrs = {"voxel_size_mm": np.array([voxel[a] for a in order]), "readout": opts.readout,
                 "file_axes": np.array(order), "block_origin": np.array(origin), "noise_std": sigma,
                 "simulated": "magnitude image with simulated phase, coil maps and noise (melrecon.data.simulate)"}
        finish_volume(kspace, dest / split / name,
                      f"melrecon convert nifti {path.name} block={b} seed={opts.seed} (simulated k-space)",
                      maps=s if opts.maps == "true" else None, calib=opts.calib, progress=progress, extra_attrs=attrs)
        outputs.append({"file": str(Path(split) / name), "split": split or None, "block": b, "cell": list(cell),
                        "origin_voxel": origin, "shape_xyz": list(x.shape),
                        "noise_seed": [opts.seed, file_index, 1 + b]})
    return {"input": str(path), "sha256": source_digest(path), "input_shape": list(mag.volume.shape),
            "input_voxel_mm": list(mag.voxel_mm), "input_dtype": mag.dtype, "axcodes": list(mag.axcodes),
            "band_limit_ratios": ratios, "voxel_mm": list(voxel), "resampled_box": [list(b) for b in box],
            "readout_axis": readout_axis, "xyz_from_file_axes": order, "grid": list(grid),
            "noise_std": sigma, "phase_maps_seed": [opts.seed, file_index], "outputs": outputs}


def convert_nifti(inputs: Sequence[str | os.PathLike], out: str | os.PathLike, opts: NiftiOptions,
                  progress: bool = True) -> dict:
    """Convert ``inputs`` into the new folder ``out`` (atomically); returns the manifest."""
    from tqdm import tqdm

    out = Path(out)
    if opts.readout not in READOUTS:
        raise ValueError(f"--readout must be one of {READOUTS}, got {opts.readout!r}")
    if opts.maps not in ("true", "espirit"):
        raise ValueError(f"--maps must be true or espirit, got {opts.maps!r}")
    if opts.coils < 1:
        raise ValueError(f"--coils must be >= 1, got {opts.coils}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out}: output folder exists and is not empty; refusing to overwrite")
    paths = [Path(p) for p in inputs]
    if not paths:
        raise ValueError("no NIfTI inputs")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp{os.getpid()}_{secrets.token_hex(4)}"
    tmp.mkdir()
    manifest = {"tool": "melrecon convert nifti", "options": {k: v for k, v in asdict(opts).items()},
                "simulated": ("k-space simulated from magnitude images: smooth random phase, birdcage coil maps, "
                              "white noise; no real phase, coil sensitivities, noise correlation or field effects"),
                "inputs": []}
    try:
        count = 0
        for f, path in enumerate(tqdm(paths, desc="convert nifti", disable=not progress or len(paths) == 1)):
            entry = convert_volume(path, f, tmp, opts, count, progress=False)
            count += len(entry["outputs"])
            manifest["inputs"].append(entry)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, default=str))
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _triple(text: str, what: str, kind=float) -> tuple:
    parts = text.lower().replace("x", ",").split(",")
    try:
        values = tuple(kind(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} must be one number or three (AxBxC), got {text!r}") from None
    if len(values) not in (1, 3) or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"{what} must be one positive number or three (AxBxC), got {text!r}")
    return values


def build_parser(prog: str = "melrecon convert nifti") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.split("\n")[2:]))
    parser.add_argument("input", type=Path, help="a .nii/.nii.gz file or a folder of them")
    parser.add_argument("output", type=Path, help="new output folder (missing or empty)")
    parser.add_argument("--voxel-mm", type=lambda t: _triple(t, "--voxel-mm"),
                        help="voxel size: one number or three in the file's axis order (default: the file's)")
    parser.add_argument("--readout", choices=READOUTS, default="S", help="readout direction (file orientation)")
    parser.add_argument("--margin-mm", type=float, default=6.0, help="margin around the object's bounding box")
    parser.add_argument("--threshold", type=float, default=0.05, help="object: voxels above this fraction of the max")
    parser.add_argument("--blocks", type=lambda t: _triple(t, "--blocks", int), default=(1,),
                        help="K (blocks along the readout) or a grid KIxKJxKK in the file's axes")
    parser.add_argument("--split-pattern",
                        help="comma-separated splits cycled over the outputs, e.g. train,train,val,test "
                             "(default: no split folders)")
    parser.add_argument("--coils", type=int, default=8)
    parser.add_argument("--snr", type=float, default=30.0, help="mean object magnitude / noise std (0: no noise)")
    parser.add_argument("--maps", choices=("true", "espirit"), default="true",
                        help="store the simulated maps or ESPIRiT maps estimated from the k-space")
    parser.add_argument("--calib", type=int, default=24, help="ESPIRiT calibration width (--maps espirit)")
    parser.add_argument("--phase-amplitude", type=float, default=1.0, help="smooth phase: peak radians")
    parser.add_argument("--phase-correlation-mm", type=float, default=30.0,
                        help="smooth phase: correlation length of its random-field part (0: polynomial only)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--allow-band-limited", action="store_true",
                        help="warn instead of refusing a volume that looks zero-padded in k-space or upsampled")
    return parser


def options_from_args(args: argparse.Namespace) -> NiftiOptions:
    voxel = None if args.voxel_mm is None else (args.voxel_mm * 3 if len(args.voxel_mm) == 1 else args.voxel_mm)
    blocks = args.blocks[0] if len(args.blocks) == 1 else tuple(args.blocks)
    pattern = tuple(p.strip() for p in args.split_pattern.split(",")) if args.split_pattern else None
    if pattern and any(not p or "/" in p for p in pattern):
        raise ValueError(f"--split-pattern {args.split_pattern!r}: empty or path-like split names")
    return NiftiOptions(voxel_mm=voxel, readout=args.readout, margin_mm=args.margin_mm, threshold=args.threshold,
                        blocks=blocks, split_pattern=pattern, coils=args.coils, snr=args.snr, maps=args.maps,
                        calib=args.calib, phase_amplitude=args.phase_amplitude,
                        phase_correlation_mm=args.phase_correlation_mm or None, seed=args.seed,
                        allow_band_limited=args.allow_band_limited)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        opts = options_from_args(args)
        inputs = nifti_inputs(args.input)
        if not inputs or not inputs[0].exists():
            raise ValueError(f"no NIfTI input at {args.input}")
        manifest = convert_nifti(inputs, args.output, opts)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    n = sum(len(e["outputs"]) for e in manifest["inputs"])
    print(f"wrote {n} files from {len(inputs)} input(s) to {args.output} (manifest.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
