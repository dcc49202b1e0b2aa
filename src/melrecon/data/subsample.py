"""Per-item undersampling masks for the datasets, drawn from a seed.

Training draws a fresh seed per item from the generator the dataset passes (keyed by
(seed, epoch, index) when the training loader's :class:`melrecon.data.samplers.KeyedSampler`
gives the key, so a resumed run draws what the uninterrupted one drew; torch's global RNG
without one); validation and test derive the acceleration from the file name and the seed from the
file name (cine: and the slice) with a stable hash (CRC32, not Python's salted ``hash()``), so
every run, every worker and ``python -m melrecon.reconstruct`` see the same masks
(:class:`MaskSampler` is the one place that keys them).

Mask types:

- volume3d: ``"poisson"`` (variable-density Poisson disc on (Y, Z), SigPy's sampler via
  :func:`melrecon.physics.masks.poisson_disc`), or ``"lines"`` (variable-density random lines
  along Z, fully sampled along Y: the fastMRI-style 1D mask for 2D slice data).
- cine: ``"vd_kt"`` (variable-density random ky lines, new draw per frame) or
  ``"interleaved_kt"`` (uniform interleaved ky-t; the seed picks a cyclic shift in time).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import torch

from melrecon.physics.masks import interleaved_kt, poisson_disc, variable_density_kt

VOLUME_MASKS = ("poisson", "lines")
CINE_MASKS = ("vd_kt", "interleaved_kt")


def stable_seed(*parts: object) -> int:
    """A 31-bit seed from the text of ``parts`` (same in every process and every run)."""
    return zlib.crc32("|".join(map(str, parts)).encode()) & 0x7FFFFFFF


def check_mask_options(kind: str, mask_type: str, accelerations: Sequence[float], calib: int) -> None:
    """Raise ValueError naming the option at fault."""
    allowed = VOLUME_MASKS if kind == "volume3d" else CINE_MASKS
    if mask_type not in allowed:
        raise ValueError(f"mask_type {mask_type!r} is not valid for {kind} data; use one of {allowed}")
    if len(accelerations) == 0 or any(float(a) <= 1 for a in accelerations):
        raise ValueError(f"accelerations must be a non-empty list of values > 1, got {list(accelerations)}")
    if int(calib) < 0:
        raise ValueError(f"calib must be >= 0, got {calib}")


def _poisson_with_retry(shape: tuple[int, int], accel: float, calib: int, seed: int, tries: int = 8) -> torch.Tensor:
    """Poisson disc, moving to the next seed when the density search cannot reach ``accel``.

    On small grids some seeds give no slope within tolerance and
    :func:`melrecon.physics.masks.poisson_disc` raises; the fallback seed sequence is
    deterministic, so evaluation masks stay fixed per file.
    """
    errors = []
    for k in range(tries):
        seed_k = (seed + k) & 0x7FFFFFFF
        try:
            return poisson_disc(shape, accel, calib=calib, seed=seed_k).mask
        except ValueError as err:
            errors.append(str(err))
    raise ValueError(f"Poisson disc {shape} R={accel} calib={calib}: seeds {seed}..{seed + tries - 1} all failed: {errors[-1]}")


def volume_mask(shape_yz: tuple[int, int], accel: float, calib: int, mask_type: str, seed: int) -> torch.Tensor:
    """Mask for one 3D item, shape (1, 1, Y, Z) float32 (batched: (B, 1, 1, Y, Z))."""
    ny, nz = shape_yz
    if mask_type == "poisson":
        mask = _poisson_with_retry((ny, nz), accel, min(calib, ny, nz), seed)
    elif mask_type == "lines":
        lines = variable_density_kt(nz, 1, accel, calib=min(calib, nz), seed=seed).mask  # (1, Z)
        mask = lines.expand(ny, nz)
    else:
        raise ValueError(f"mask_type {mask_type!r} is not a volume mask; use one of {VOLUME_MASKS}")
    return mask.reshape(1, 1, ny, nz).contiguous()


def cine_mask(frames: int, ny: int, accel: float, calib: int, mask_type: str, seed: int) -> torch.Tensor:
    """Mask for one cine item, shape (1, T, 1, Y) float32 (batched: (B, 1, T, 1, Y))."""
    if mask_type == "vd_kt":
        mask = variable_density_kt(ny, frames, accel, calib=min(calib, ny), seed=seed).mask
    elif mask_type == "interleaved_kt":
        mask = interleaved_kt(ny, frames, accel, calib=min(calib, ny)).mask
        mask = torch.roll(mask, shifts=seed % max(frames, 1), dims=0)
    else:
        raise ValueError(f"mask_type {mask_type!r} is not a cine mask; use one of {CINE_MASKS}")
    return mask.reshape(1, frames, 1, ny).contiguous()


class MaskSampler:
    """Chooses acceleration and seed per item; the one place that keys evaluation masks.

    Args:
        accelerations: values to sample from (training) — one value means fixed.
        train: random per item if True; fixed per file name otherwise.
        mask_pool: in training, draw seeds from ``range(mask_pool)`` instead of 2^31 values,
            so that slow Poisson-disc masks come from the physics cache after the first epoch
            (dl-cs trained with a few masks per R). ``None``: unlimited.
        eval_acceleration: fixed acceleration for validation/test; default: picked per file
            from ``accelerations`` by the file's stable hash (all values are represented).
        mask_per_position: in evaluation, a mask of its own for every position of a file (cine
            slices) rather than one for the whole file (the slabs of a volume share one mask,
            as a 3D acquisition samples the whole volume with one ky-kz pattern).
    """

    def __init__(
        self,
        accelerations: Sequence[float],
        train: bool,
        mask_pool: int | None = None,
        eval_acceleration: float | None = None,
        mask_per_position: bool = False,
    ) -> None:
        self.accelerations = [float(a) for a in accelerations]
        self.train = train
        if mask_pool is not None and int(mask_pool) < 1:
            raise ValueError(f"mask_pool must be >= 1 or null, got {mask_pool}")
        self.mask_pool = None if mask_pool is None else int(mask_pool)
        self.eval_acceleration = None if eval_acceleration is None else float(eval_acceleration)
        self.mask_per_position = bool(mask_per_position)

    def __call__(self, file_name: str, position: int,
                 generator: torch.Generator | None = None) -> tuple[float, int]:
        """(acceleration, seed) of the item at ``position`` of ``file_name`` (a base name).

        Evaluation: the acceleration depends on the file only, so every item of a file is
        sampled at one R; the seed on the file, and on the position too with
        ``mask_per_position``. Training: both drawn from ``generator`` (torch's global RNG if None).
        """
        if self.train:
            i = int(torch.randint(len(self.accelerations), (), generator=generator).item())
            high = self.mask_pool if self.mask_pool is not None else 2**31 - 1
            return self.accelerations[i], int(torch.randint(high, (), generator=generator).item())
        accel = self.eval_acceleration
        if accel is None:
            accel = self.accelerations[stable_seed(file_name) % len(self.accelerations)]
        key = f"{file_name}#{int(position)}" if self.mask_per_position else file_name
        return accel, stable_seed(key)
