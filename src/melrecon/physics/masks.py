"""Undersampling masks: variable-density Poisson disc on (ky, kz) and ky-t patterns for cine.

Every generator is deterministic for its arguments, returns the mask with the acceleration it
actually achieved (``R = grid points / sampled points``, calibration region and corners
included), and raises ``ValueError`` when the request is impossible.

Poisson-disc sampling uses SigPy's ``sigpy.mri.poisson``, the field's reference
implementation (Bridson sampling with a radius growing with |k|, bisection on the density
slope until R is within 2% of the request). It takes seconds at 256x320, so results are cached
in memory and on disk (``$MELRECON_CACHE_DIR`` or ``~/.cache/melrecon/masks``), keyed by all
arguments: data-loader workers and later runs never regenerate a mask.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch


class MaskResult(NamedTuple):
    """A 0/1 float32 mask and the acceleration it achieves."""

    mask: torch.Tensor
    acceleration: float


def _pair(v: int | tuple[int, int], name: str) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    t = tuple(int(a) for a in v)
    if len(t) != 2:
        raise ValueError(f"{name} must be an int or a pair, got {v!r}")
    return t  # type: ignore[return-value]


def _accel(mask: np.ndarray) -> float:
    """Achieved acceleration: grid points / sampled points (float64 arithmetic)."""
    return float(mask.size) / float(mask.sum(dtype=np.float64))


def _check_accel(accel: float) -> None:
    if not np.isfinite(accel) or accel <= 1:
        raise ValueError(f"accel must be > 1, got {accel}")


def _cache_dir() -> Path | None:
    root = os.environ.get("MELRECON_CACHE_DIR")
    path = Path(root) if root else Path.home() / ".cache" / "melrecon"
    try:
        (path / "masks").mkdir(parents=True, exist_ok=True)
    except OSError:
        return None  # read-only home: fall back to the in-memory cache only
    return path / "masks"


def _poisson_search(
    shape: tuple[int, int], accel: float, calib: tuple[int, int], seed: int, abs_tol: float, max_steps: int = 64
) -> np.ndarray:
    """SigPy's variable-density Poisson-disc search, with a cap on the bisection.

    Same radius law and the same numba sampler (``sigpy.mri.samp._poisson``) as
    ``sigpy.mri.poisson(..., crop_corner=True)``, so masks equal SigPy's wherever SigPy
    terminates. SigPy bisects ``while slope_min < slope_max`` on floats; when no slope reaches
    the tolerance (small grids, coarse steps in R) the interval stops shrinking and its loop
    never ends (seen on 16x16, R=4, 4x4 box, seeds 1 and 24). The cap turns that into a
    ``ValueError``.
    """
    from sigpy.mri.samp import _poisson  # lazy: numba JIT costs ~1 s on first use

    ny, nz = shape
    y, x = np.mgrid[:ny, :nz].astype(float)
    x = np.maximum(abs(x - nz / 2) - calib[1] / 2, 0)
    x /= max(x.max(), 1e-12)
    y = np.maximum(abs(y - ny / 2) - calib[0] / 2, 0)
    y /= max(y.max(), 1e-12)
    r = np.sqrt(x**2 + y**2)
    lo, hi = 0.0, float(max(ny, nz))
    best, best_err = None, np.inf
    for _ in range(max_steps):
        if not lo < hi:
            break
        slope = (lo + hi) / 2
        rx = np.clip((1 + r * slope) * nz / max(ny, nz), 1, None)
        ry = np.clip((1 + r * slope) * ny / max(ny, nz), 1, None)
        mask = _poisson(nz, ny, 30, rx, ry, calib, seed) * (r < 1)
        actual = ny * nz / max(float(mask.sum()), 1.0)
        if abs(actual - accel) < best_err:
            best, best_err = mask, abs(actual - accel)
        if best_err < abs_tol:
            break
        if actual < accel:
            lo = slope
        else:
            hi = slope
    if best is None or best_err >= abs_tol:
        raise ValueError(
            f"cannot reach acceleration {accel} on a {shape} grid with a {calib} calibration box "
            f"and seed {seed} (closest R differs by {best_err:.3g}); try another seed or R"
        )
    return best.reshape(shape)


@lru_cache(maxsize=256)
def _poisson_cached(
    shape: tuple[int, int], accel: float, calib: tuple[int, int], seed: int, tol: float
) -> np.ndarray:
    key = hashlib.sha1(repr(("poisson-v2", shape, accel, calib, seed, tol)).encode()).hexdigest()[:20]
    cache = _cache_dir()
    path = cache / f"poisson_{key}.npy" if cache else None
    if path is not None and path.exists():
        try:
            return np.load(path)
        except (OSError, ValueError):
            pass  # a corrupt cache entry is regenerated below
    mask = _poisson_search(shape, accel, calib, seed, tol * accel)
    mask = (np.abs(mask) > 0).astype(np.float32)
    if path is not None:
        # write-then-rename so that concurrent workers never read a half-written file
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npy.tmp")
        with os.fdopen(fd, "wb") as fh:
            np.save(fh, mask)
        os.replace(tmp, path)
    return mask


def poisson_disc(
    shape: tuple[int, int],
    accel: float,
    calib: int | tuple[int, int] = 24,
    seed: int = 0,
    tol: float = 0.02,
) -> MaskResult:
    """Variable-density Poisson-disc mask on the (ky, kz) plane.

    Args:
        shape: (ny, nz) grid size.
        accel: requested acceleration R > 1.
        calib: fully sampled centred calibration box, (cy, cz) or one int for both.
        seed: random seed; the same arguments always give the same mask.
        tol: relative tolerance on the achieved R.

    Returns:
        ``MaskResult(mask (ny, nz) float32 0/1, achieved R)``.
    """
    ny, nz = _pair(shape, "shape")
    cy, cz = _pair(calib, "calib")
    _check_accel(accel)
    if cy < 0 or cz < 0 or cy > ny or cz > nz:
        raise ValueError(f"calibration box {(cy, cz)} does not fit the grid {(ny, nz)}")
    if ny < 2 or nz < 2:
        raise ValueError(f"Poisson-disc grid must be at least 2x2, got {(ny, nz)}")
    if accel > ny * nz / max(cy * cz, 1):
        raise ValueError(
            f"accel {accel} unreachable: the {(cy, cz)} calibration box alone samples "
            f"1/{ny * nz / max(cy * cz, 1):.2f} of the {(ny, nz)} grid"
        )
    mask = _poisson_cached((ny, nz), float(accel), (cy, cz), int(seed), float(tol))
    return MaskResult(torch.from_numpy(mask.copy()), _accel(mask))


def _kt_checks(ny: int, nt: int, accel: float, calib: int) -> None:
    _check_accel(accel)
    if ny < 2 or nt < 1:
        raise ValueError(f"ky-t grid needs ny >= 2 and nt >= 1, got ny={ny}, nt={nt}")
    if calib < 0 or calib > ny:
        raise ValueError(f"calibration width {calib} does not fit ny={ny}")
    if calib > 0 and accel > ny / calib:
        raise ValueError(
            f"accel {accel} unreachable with {calib} calibration lines of {ny} (max R = {ny / calib:.2f})"
        )


def _calib_slice(ny: int, calib: int) -> slice:
    start = ny // 2 - calib // 2  # centred on the DC line ny // 2
    return slice(start, start + calib)


def variable_density_kt(
    ny: int, nt: int, accel: float, calib: int = 8, seed: int = 0, power: float = 2.0
) -> MaskResult:
    """Variable-density random ky lines, a different draw for every frame.

    Each frame samples the ``calib`` central lines plus ``round(ny / accel) - calib`` lines drawn
    without replacement with density ``(1 - |ky| / ky_max) ** power`` (denser near the centre).

    Returns:
        ``MaskResult(mask (nt, ny) float32 0/1, achieved R)``.
    """
    _kt_checks(ny, nt, accel, calib)
    n_lines = max(int(round(ny / accel)), calib, 1)
    rng = np.random.default_rng(seed)
    ky = np.arange(ny) - ny // 2
    density = (1.0 - np.abs(ky) / (np.abs(ky).max() + 1)) ** power
    cal = _calib_slice(ny, calib)
    density[cal] = 0.0
    candidates = np.flatnonzero(density > 0)
    p = density[candidates] / density[candidates].sum()
    mask = np.zeros((nt, ny), np.float32)
    mask[:, cal] = 1.0
    extra = min(n_lines - calib, candidates.size)
    for t in range(nt):  # per frame: a few hundred lines at most, cheap
        mask[t, rng.choice(candidates, size=extra, replace=False, p=p)] = 1.0
    return MaskResult(torch.from_numpy(mask), _accel(mask))


def interleaved_kt(ny: int, nt: int, accel: float, calib: int = 8) -> MaskResult:
    """Uniform interleaved ky-t sampling: every s-th line, shifted by one line per frame.

    The spacing ``s >= accel`` is the integer whose pattern, with the ``calib`` central lines
    added, gives the overall acceleration closest to ``accel`` (the calibration lines count).

    Returns:
        ``MaskResult(mask (nt, ny) float32 0/1, achieved R)``.
    """
    _kt_checks(ny, nt, accel, calib)
    cal = _calib_slice(ny, calib)
    t = np.arange(nt)[:, None]
    ky = np.arange(ny)[None, :]
    best: np.ndarray | None = None
    for s in range(max(int(np.floor(accel)), 1), ny + 1):
        mask = ((ky - ny // 2 + t) % s == 0).astype(np.float32)
        mask[:, cal] = 1.0
        if best is None or abs(mask.size / mask.sum() - accel) < abs(best.size / best.sum() - accel):
            best = mask
        if mask.size / mask.sum() > accel:
            break
    assert best is not None
    return MaskResult(torch.from_numpy(best), _accel(best))
