"""BART's ``pics`` as an optional backend for the classical baselines (``bart`` on the PATH, e.g.
Debian's ``apt-get install bart``).

The three problems of :mod:`melrecon.study.baselines` are handed to ``bart pics`` in BART's
dimension order (``mri.h``: READ 0, PHS1 1, PHS2 2, COIL 3, TIME 10) through ``.cfl`` files
(:mod:`melrecon.data.cfl`), with the sampling pattern given explicitly (``-p``) and BART's data
scaling switched off (``-w 1``) so that ``lam`` means the same data units as ours:

- volume3d: our hybrid (C, X, ky, kz) k-space is Fourier transformed along the readout to the
  full 3D k-space (exact: the readout is fully sampled); regularisers act on dims 0-2 (flags 7).
- cine: (C, T, X, ky) goes to (X, Y, 1, C, ..., T) with T on BART's TIME dim 10; the FFT acts on
  (x, y) only, exactly like our operator; wavelets on flags 3 (x, y), TV on 1027 (x, y, t).

Methods: ``cg_sense`` = ``pics -l2 -r lam`` (CG), ``l1_wavelet`` = ``pics -R W:flags:0:lam``
(FISTA, random cycle spinning), ``tv`` = ``pics -R T:flags:0:lam`` (ADMM). BART stops after ``-i``
iterations (its own criteria are internal), so a BART solve records ``converged = None`` (unknown).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from melrecon.data.cfl import read_cfl, write_cfl
from melrecon.data.npfft import fftc_np
from melrecon.physics.cs import SolveResult

TIME_DIM = 10
_FLAGS = {("volume3d", "l1_wavelet"): 7, ("volume3d", "tv"): 7, ("cine", "l1_wavelet"): 3, ("cine", "tv"): 3 | 1 << TIME_DIM}


def available() -> bool:
    """Whether a ``bart`` executable is on the PATH."""
    return shutil.which("bart") is not None


def _bart_layout(kind: str, kspace: np.ndarray, maps: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, ...]:
    """One item (C, ...) in our layout -> (kspace, maps, pattern) in BART's dims."""
    if kind == "volume3d":  # (C, X, ky, kz) hybrid -> (kx, ky, kz, C)
        ksp = fftc_np(kspace, axes=(1,)).transpose(1, 2, 3, 0)
        sens = maps.transpose(1, 2, 3, 0)
        pat = np.broadcast_to(mask.reshape(1, *mask.shape[-2:]), ksp.shape[:3])[..., None]
        return ksp, sens, pat
    coils, frames, nx, ny = kspace.shape  # cine: (C, T, X, Y) -> (X, Y, 1, C, 1 x 6, T)
    ksp = kspace.transpose(2, 3, 0, 1).reshape(nx, ny, 1, coils, *([1] * (TIME_DIM - 4)), frames)
    sens = maps[:, 0].transpose(1, 2, 0)[:, :, None, :]
    pat = np.broadcast_to(mask.reshape(frames, 1, ny), (frames, nx, ny)).transpose(1, 2, 0)
    pat = pat.reshape(nx, ny, 1, 1, *([1] * (TIME_DIM - 4)), frames)
    return ksp, sens, pat


def _from_bart(kind: str, img: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if kind == "volume3d":
        return img.reshape(shape)
    frames, nx, ny = shape
    return np.moveaxis(img.reshape(nx, ny, frames), -1, 0)


def pics_args(method: str, kind: str, lam: float, max_iter: int) -> list[str]:
    """The ``bart pics`` options of one baseline."""
    if method == "cg_sense":
        reg = ["-l2", "-r", f"{lam:g}"]
    elif method in ("l1_wavelet", "tv"):
        reg = ["-R", f"{'W' if method == 'l1_wavelet' else 'T'}:{_FLAGS[kind, method]}:0:{lam:g}"]
    else:
        raise ValueError(f"bart backend: no pics problem for method {method!r}")
    return ["pics", "-w", "1", "-i", str(int(max_iter)), "-d", "1", *reg]


def pics(method: str, kind: str, kspace: Tensor, maps: Tensor, mask: Tensor, lam: float,
         max_iter: int) -> SolveResult:
    """Reconstruct a batch (our layouts) with ``bart pics``; one call per item."""
    if not available():
        raise RuntimeError("backend 'bart' needs the bart executable on the PATH (Debian: apt-get install bart)")
    out = []
    with tempfile.TemporaryDirectory(prefix="melrecon_bart_") as tmp:
        tmp_path = Path(tmp)
        for b in range(kspace.shape[0]):
            arrays = [t[min(b, t.shape[0] - 1)].detach().cpu().numpy() for t in (kspace, maps, mask)]
            ksp, sens, pat = _bart_layout(kind, *arrays)
            for name, arr in (("ksp", ksp), ("sens", sens), ("pat", pat)):
                write_cfl(tmp_path / name, arr)
            cmd = ["bart", *pics_args(method, kind, lam, max_iter), "-p", str(tmp_path / "pat"),
                   str(tmp_path / "ksp"), str(tmp_path / "sens"), str(tmp_path / "img")]
            run = subprocess.run(cmd, capture_output=True, text=True)
            if run.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed: {run.stderr.strip().splitlines()[-1:]}")
            shape = tuple(kspace.shape[2:])
            out.append(_from_bart(kind, read_cfl(tmp_path / "img"), shape))
    x = torch.from_numpy(np.stack(out).astype(np.complex64)).to(kspace.device)
    return SolveResult(x, int(max_iter), None)  # type: ignore[arg-type]
