"""Physical consistency of a layout file: values that pass the shape checks but cannot be right.

:func:`check_values` reads a file block by block (one block of readout positions for volume3d,
one slice for cine; memory stays at one block) and checks, in this order, naming the first
field at fault:

- every field is readable and finite;
- ``kspace`` is not all zero and its magnitude is plausible: the energy ||k||^2 must lie
  within float32's range with margin (1e-30 .. 1e30), because the operators, CG residual norms
  and losses work in float32 (a k-space scaled by 1e30 overflows them);
- ``maps`` are not all zero and have unit sum of squares over coils, sum_c |S_c|^2 = 1, at
  every pixel where they are non-zero (ESPIRiT and birdcage maps both satisfy it; the SENSE
  operator's norm bound and the target definition rely on it);
- ``target`` equals S^H F^H k (F: centred orthonormal FFT over the last two axes, as
  :mod:`melrecon.data.npfft`) to a relative error of :data:`TARGET_RTOL` (a target from
  another file, or k-space rescaled without its target, is far off);
- the ``max`` attribute equals max |target| to a relative :data:`MAX_RTOL` (it is the metric
  data range and the per-file normalisation).

A prospectively undersampled file (it stores a ``mask``: k-space holds only the acquired
samples, ``target`` is optional) cannot satisfy target = S^H F^H k, so that check is skipped
for it; without a target, ``max`` must equal the maximum of the zero-filled image S^H F^H k
(what :func:`melrecon.data.h5.write_scan` stores).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import h5py
import numpy as np

from melrecon.data.npfft import ifftc_np

#: relative L2 error allowed between ``target`` and S^H F^H k (complex64 storage and FFT
#: rounding give ~1e-7; any real mismatch is orders of magnitude larger)
TARGET_RTOL = 1e-3
#: relative error allowed between the ``max`` attribute and max |target|
MAX_RTOL = 1e-3
#: allowed |sum_c |S_c|^2 - 1| where the maps are non-zero (above MAPS_ZERO)
MAPS_ATOL = 1e-2
MAPS_ZERO = 1e-6
#: range of ||k||^2 (float32 holds 1.2e-38 .. 3.4e38; the margin covers sums and products)
KSPACE_ENERGY = (1e-30, 1e30)
#: bytes of k-space per block read (volume3d): bounds memory for large volumes
BLOCK_BYTES = 64 * 2**20


def _blocks(f: h5py.File, axes: str) -> Iterator[tuple[str, tuple, tuple, tuple]]:
    """(label, kspace index, maps index, target index) per block (``()``: the whole field)."""
    shape = f["kspace"].shape
    if axes == "coil,x,y,z":
        c, nx, ny, nz = shape
        step = max(1, BLOCK_BYTES // (8 * c * ny * nz))
        for i in range(0, nx, step):
            sl = slice(i, min(i + step, nx))
            yield f"readout positions {sl.start}..{sl.stop - 1}", (slice(None), sl), (slice(None), sl), (sl,)
    elif axes == "slice,coil,time,x,y":
        for s in range(shape[0]):
            yield f"slice {s}", (s,), (s,), (s,)
    else:  # coil,time,x,y
        yield "the series", (), (), ()


def _read(ds: h5py.Dataset, index: tuple, path: str | os.PathLike, name: str) -> np.ndarray:
    from melrecon.data.h5 import LayoutError

    try:
        block = ds[index] if index else ds[()]
    except (OSError, RuntimeError) as err:
        raise LayoutError(path, name, f"cannot read data (truncated or corrupt file?): {err}") from None
    if not np.isfinite(block).all():
        raise LayoutError(path, name, "contains NaN or Inf")
    return block


def check_values(f: h5py.File, path: str | os.PathLike, axes: str, vmax: float) -> None:
    """Read every value of the open file ``f`` and check it (see the module docstring).

    Args:
        f: the open file (its layout already checked by :func:`melrecon.data.h5.read_info`).
        path: the file's path, for the messages.
        axes: the file's ``axes`` attribute.
        vmax: the file's ``max`` attribute.

    Raises:
        LayoutError: naming ``path`` and the field (``kspace``, ``maps``, ``target``, ``max``).
    """
    from melrecon.data.h5 import LayoutError

    k_energy = 0.0
    maps_nonzero = 0
    maps_worst = (0.0, "")  # largest |sum |S|^2 - 1| over non-zero pixels, where
    diff_energy = ref_energy = 0.0
    worst_block = (0.0, "")  # largest relative target error of one block, where
    t_max = 0.0
    cine = axes != "coil,x,y,z"
    prospective = "mask" in f  # undersampled k-space: no target = S^H F^H k relation to check
    has_target = "target" in f
    if prospective:
        _read(f["mask"], (), path, "mask")
    for label, ki, mi, ti in _blocks(f, axes):
        k = _read(f["kspace"], ki, path, "kspace")
        m = _read(f["maps"], mi, path, "maps")
        t = _read(f["target"], ti, path, "target") if has_target else None
        if cine:  # maps (C, X, Y) serve every frame of the k-space (C, T, X, Y)
            m = m[:, None]
        k_energy += float(np.sum(np.abs(k.astype(np.complex128)) ** 2))
        ssq = np.sum(np.abs(m.astype(np.complex128)) ** 2, axis=0)
        nz = ssq > MAPS_ZERO
        maps_nonzero += int(nz.sum())
        if nz.any():
            dev = float(np.abs(ssq[nz] - 1.0).max())
            if dev > maps_worst[0]:
                maps_worst = (dev, label)
        ref = np.sum(np.conj(m) * ifftc_np(k, axes=(-2, -1)), axis=0)
        if t is None or prospective:  # max of the target, or of the zero-filled image without one
            t_max = max(t_max, float(np.abs(t if t is not None else ref).max()))
            continue
        d = float(np.sum(np.abs((t - ref).astype(np.complex128)) ** 2))
        r = float(np.sum(np.abs(ref.astype(np.complex128)) ** 2))
        diff_energy += d
        ref_energy += r
        if d > 0 and (r == 0 or d / r > worst_block[0]):
            worst_block = (np.inf if r == 0 else d / r, label)
        t_max = max(t_max, float(np.abs(t).max()))

    if k_energy == 0:
        raise LayoutError(path, "kspace", "all zero (no signal was stored)")
    lo, hi = KSPACE_ENERGY
    if not lo <= k_energy <= hi:
        raise LayoutError(path, "kspace", f"implausible magnitude: ||k||^2 = {k_energy:.3g}, outside "
                          f"[{lo:g}, {hi:g}] (float32 operators and losses over/underflow); rescale the file")
    if maps_nonzero == 0:
        raise LayoutError(path, "maps", "all zero (no coil sensitivity anywhere)")
    if maps_worst[0] > MAPS_ATOL:
        raise LayoutError(path, "maps", f"sum over coils of |S|^2 is off 1 by {maps_worst[0]:.3g} at non-zero "
                          f"pixels (in {maps_worst[1]}); maps must be normalised to unit sum of squares")
    rel = float(np.sqrt(diff_energy / ref_energy)) if ref_energy > 0 else np.inf
    if has_target and not prospective and not rel <= TARGET_RTOL:
        raise LayoutError(path, "target", f"differs from S^H F^H k (coil combination of the k-space) by "
                          f"{rel:.3g} relative L2 error (tolerance {TARGET_RTOL:g}; worst in {worst_block[1]}): "
                          "a target from another file, or k-space rescaled without its target?")
    if not abs(vmax - t_max) <= MAX_RTOL * t_max:
        what = "max |target|" if has_target else "max |S^H F^H k| (zero-filled; the file has no target)"
        raise LayoutError(path, "max", f"attribute is {vmax:.6g} but {what} is {t_max:.6g} "
                          f"(relative tolerance {MAX_RTOL:g})")
