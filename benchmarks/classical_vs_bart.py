"""melrecon's classical baselines against BART's ``pics`` on one multi-coil 2D slice, each tuned.

    python benchmarks/classical_vs_bart.py PATH [--calib 20] [--accel 4] [--crop 0.8] [--out results.json]

PATH is a BART ``.cfl``/``.hdr`` pair (given without extension) holding one multi-coil slice,
dims (kx, ky, 1, C) or (1, ky, kz, C) (BART's order; the first non-singleton axis is treated as the
fully sampled readout of the benchmark, the second is undersampled). A fully sampled slice is used as it is. An undersampled one
(zeros in k-space, e.g. BART's workshop brain) has no ground truth, so the script makes a
semi-real fully sampled slice from it (what RESULTS.md reports): BART's ESPIRiT maps of the real
scan (``ecalib -m1``) times a reference image (BART ``pics -l1 -r 0.005`` of the real scan,
normalised to max 1), Fourier transformed, plus complex Gaussian noise (std ``--noise`` x max).
Real coils and anatomy, a known truth; the reference was made with a wavelet prior, which may
favour L1-wavelet a little (stated in RESULTS.md).

Then, for both tools: 1D variable-density ky undersampling at ``--accel`` with ``--calib`` fully
sampled centre lines (seeded); each tool's own ESPIRiT maps from the undersampled data (melrecon
``espirit_maps``, BART ``ecalib``, both at ``--crop``), and also BART's maps for both (solver-only
comparison); CG-SENSE, L1-wavelet and TV tuned by :func:`melrecon.study.baseline_runs.refine_lam` on
PSNR (decades 1e-4..1e-1, then x sqrt(10) steps); PSNR/SSIM against the truth's magnitude
(melrecon.metrics, data range = the truth's maximum). Needs ``bart`` on the PATH.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from melrecon.data.cfl import read_cfl, write_cfl
from melrecon.data.npfft import fftc_np, ifftc_np
from melrecon.metrics import volume_metrics
from melrecon.physics import bart as bart_backend
from melrecon.physics.coils import espirit_maps
from melrecon.study.baseline_runs import refine_lam
from melrecon.study.baselines import build_baseline

GRID = [1e-4, 1e-3, 1e-2, 1e-1]
METHODS = ("cg_sense", "l1_wavelet", "tv")


def bart(*args: str) -> None:
    subprocess.run(["bart", *args], check=True, capture_output=True)


def semi_real_slice(ksp: np.ndarray, noise: float, seed: int, tmp: Path) -> tuple[np.ndarray, np.ndarray]:
    """(full k-space (C, kx, ky), truth (kx, ky)) from an undersampled real slice (see the module doc)."""
    write_cfl(tmp / "real", ksp[:, :, :, None].transpose(1, 2, 3, 0))
    bart("ecalib", "-m1", str(tmp / "real"), str(tmp / "real_maps"))
    bart("pics", "-l1", "-r", "0.005", "-i", "100", str(tmp / "real"), str(tmp / "real_maps"), str(tmp / "real_img"))
    maps = read_cfl(tmp / "real_maps").reshape(ksp.shape[1], ksp.shape[2], -1).transpose(2, 0, 1)
    truth = read_cfl(tmp / "real_img").reshape(ksp.shape[1], ksp.shape[2])
    truth = truth / np.abs(truth).max()
    rng = np.random.default_rng(seed)
    full = fftc_np(maps * truth, axes=(-2, -1))
    full = full + noise * (rng.standard_normal(full.shape) + 1j * rng.standard_normal(full.shape)) / np.sqrt(2)
    return full.astype(np.complex64), truth.astype(np.complex64)


def ky_mask(ny: int, accel: float, calib: int, seed: int) -> np.ndarray:
    """1D variable-density random ky mask: ``calib`` centre lines plus random lines (density
    falling with distance from the centre), ``ny / accel`` lines in all."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(ny, bool)
    c = ny // 2
    mask[c - calib // 2: c - calib // 2 + calib] = True
    dist = np.abs(np.arange(ny) - c) / (ny / 2)
    prob = (1 - dist) ** 2 + 1e-3
    prob[mask] = 0
    extra = int(round(ny / accel)) - calib
    mask[rng.choice(ny, extra, replace=False, p=prob / prob.sum())] = True
    return mask


def bart_maps(ksp_under: np.ndarray, calib: int, crop: float, tmp: Path) -> np.ndarray:
    write_cfl(tmp / "under", ksp_under[:, :, :, None].transpose(1, 2, 3, 0))
    bart("ecalib", "-m1", "-r", str(calib), "-c", str(crop), str(tmp / "under"), str(tmp / "under_maps"))
    return read_cfl(tmp / "under_maps").reshape(*ksp_under.shape[1:], -1).transpose(2, 0, 1)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("path", help="BART .cfl/.hdr pair without extension, dims (kx, ky, 1, C) or (1, ky, kz, C)")
    ap.add_argument("--accel", type=float, default=4.0)
    ap.add_argument("--calib", type=int, default=20)
    ap.add_argument("--crop", type=float, default=0.8)
    ap.add_argument("--noise", type=float, default=0.005, help="noise std of the semi-real slice (x max)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--runs", default="melrecon,bart,melrecon+bart_maps",
                    help="comma-separated: melrecon (its own ESPIRiT maps), bart (pics with ecalib maps), "
                         "melrecon+bart_maps (melrecon's solvers on BART's maps)")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS))
    ap.add_argument("--bart-iters", type=int, default=300, help="pics -i for BART's solves")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    if not bart_backend.available():
        raise SystemExit("classical_vs_bart: needs the bart executable on the PATH (apt-get install bart)")
    raw = read_cfl(args.path)
    if raw.ndim != 4 or (raw.shape[0] != 1 and raw.shape[2] != 1):
        raise SystemExit(f"{args.path}: expected dims (kx, ky, 1, C) or (1, ky, kz, C), got {raw.shape}")
    ksp = raw.reshape(-1, *raw.shape[1:]) if raw.shape[2] == 1 else raw[0]
    ksp = (ksp[:, :, 0, :] if raw.shape[2] == 1 else ksp).transpose(2, 0, 1)  # (C, n1, n2)
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        sampled = np.abs(ksp).sum(0) > 0
        if sampled.all():
            full = ksp.astype(np.complex64)
            truth = None
        else:
            full, truth = semi_real_slice(ksp, args.noise, args.seed, tmp)
        mask = ky_mask(full.shape[-1], args.accel, args.calib, args.seed)
        under = full * mask[None, None, :]
        maps_bart = bart_maps(under, args.calib, args.crop, tmp)
    wanted = args.runs.split(",")
    maps_ours = espirit_maps(under, calib_width=args.calib, crop=args.crop).numpy() if "melrecon" in wanted else None
    if truth is None:  # fully sampled input: truth = SENSE combination with BART's maps of the full data
        truth = np.sum(np.conj(maps_bart) * ifftc_np(full, axes=(-2, -1)), 0)
        truth = truth / np.abs(truth).max()
        full, under = full / np.abs(truth).max(), under / np.abs(truth).max()
    target = torch.from_numpy(np.abs(truth)[None])
    # our volume3d layout with a 2D slice: image (1, X, Y, 1), hybrid k-space (1, C, X, ky, 1)
    kspace = torch.from_numpy(ifftc_np(under, axes=(1,))[None, ..., None].astype(np.complex64))
    mask_t = torch.from_numpy(mask.astype(np.float32)).reshape(1, 1, 1, -1, 1)
    results: dict = {"shape": list(full.shape), "accel": args.accel, "calib": args.calib, "crop": args.crop,
                     "lines": int(mask.sum()), "noise": args.noise, "methods": {}}
    runs = [("melrecon", "melrecon", maps_ours), ("bart", "bart", maps_bart), ("melrecon+bart_maps", "melrecon", maps_bart)]
    runs = [r for r in runs if r[0] in wanted]
    for label, backend, maps in runs:
        maps_t = torch.from_numpy(maps[None, ..., None].astype(np.complex64))
        x0 = (maps_t.conj() * torch.from_numpy(ifftc_np(ifftc_np(under, axes=(1,)), axes=(2,))[None, ..., None]
                                               .astype(np.complex64))).sum(1)
        zf = volume_metrics(x0.abs()[..., 0], target, 1.0)["psnr"]
        results["methods"].setdefault("zero_filled", {})[label] = {"psnr": zf}
        for method in args.methods.split(","):
            recons, solves, times = {}, {}, {}

            def score(lam: float, method: str = method) -> float:
                options = {"max_iter": args.bart_iters} if backend == "bart" else {}
                model = build_baseline(method, "volume3d", lam, backend=backend, **options)
                t0 = time.perf_counter()
                recons[lam] = model(x0, kspace, maps_t, mask_t)[..., 0]
                times[lam], solves[lam] = time.perf_counter() - t0, model.solves[-1]
                return volume_metrics(recons[lam].abs(), target, 1.0)["psnr"]

            lam, scores, interior = refine_lam(score, GRID)
            m = volume_metrics(recons[lam].abs(), target, 1.0)
            results["methods"].setdefault(method, {})[label] = {
                "lam": lam, "psnr": m["psnr"], "ssim": m["ssim"], "interior": interior, "grid": scores,
                "solve": solves[lam], "time_s": times[lam]}
            print(f"{method:11s} {label:20s} lam {lam:<8.3g} PSNR {m['psnr']:.2f} dB  SSIM {m['ssim']:.4f}  "
                  f"interior {interior}  {solves[lam]}  {times[lam]:.1f}s", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1, default=str))
    return results


if __name__ == "__main__":
    main()
