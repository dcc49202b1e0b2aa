"""Random SENSE reconstruction problems, for tests and benchmarks (no data files needed).

A problem holds the undersampled k-space of a smooth random image, in the axis layouts of
DESIGN.md ("Conventions"): ``layout="slab"`` for 3D slabs, ``layout="cine"`` for 2D+time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from melrecon.physics.sense import SenseOperator

LAYOUTS = ("slab", "cine")


class SenseProblem(NamedTuple):
    """x0 = A^H b (B, *image), k-space b (B, C, ...), maps, mask and the target image.

    Unpacks in the order a network is called with, ``net(*problem[:4])``.
    """

    x0: Tensor
    kspace: Tensor
    maps: Tensor
    mask: Tensor
    target: Tensor

    @property
    def op(self) -> SenseOperator:
        """The SENSE operator A of this problem."""
        return SenseOperator(self.maps, self.mask)


def random_sense_problem(
    layout: str,
    sizes: Sequence[int],
    coils: int = 3,
    dtype: torch.dtype = torch.complex64,
    device: str | torch.device = "cpu",
    seed: int = 0,
    sampled: float = 0.35,
    batch: int = 1,
) -> SenseProblem:
    """A random problem: normalised maps, a random mask with a sampled centre, a smooth target.

    Args:
        layout: ``"slab"`` or ``"cine"``; the shapes of image, k-space, maps and mask are
            those of DESIGN.md ("Conventions").
        sizes: the three image axes after the batch axis: (X, Y, Z) or (T, X, Y).
        coils: number of coils C.
        dtype: complex64 or complex128.
        seed: seeds a private generator (the global RNG is left alone).
        sampled: fraction of the phase-encode positions kept at random; the two central
            positions of every phase-encode axis are always kept.
        batch: B.

    Maps are normalised, ``sum_c |S_c|^2 = 1``, so that ``||A|| <= 1``; the target is
    low-pass filtered complex noise.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if len(sizes) != 3:
        raise ValueError(f"sizes must have 3 entries for layout {layout!r}, got {tuple(sizes)}")
    g = torch.Generator().manual_seed(seed)
    s0, s1, s2 = (int(s) for s in sizes)
    rdt = torch.float64 if dtype == torch.complex128 else torch.float32
    if layout == "slab":
        maps = torch.randn(batch, coils, s0, s1, s2, dtype=dtype, generator=g)
        mask = (torch.rand(batch, 1, 1, s1, s2, generator=g) < sampled).to(rdt)
        mask[..., s1 // 2 - 1 : s1 // 2 + 1, s2 // 2 - 1 : s2 // 2 + 1] = 1
    else:
        maps = torch.randn(batch, coils, 1, s1, s2, dtype=dtype, generator=g)
        mask = (torch.rand(batch, 1, s0, 1, s2, generator=g) < sampled).to(rdt)
        mask[..., s2 // 2 - 1 : s2 // 2 + 1] = 1
    maps = maps / maps.abs().pow(2).sum(dim=1, keepdim=True).sqrt()
    target = torch.randn(batch, s0, s1, s2, dtype=dtype, generator=g)
    target = torch.fft.ifftn(torch.fft.fftn(target, dim=(-3, -2, -1)) * _lowpass((s0, s1, s2), rdt), dim=(-3, -2, -1))
    maps, mask, target = maps.to(device), mask.to(device), target.to(device)
    op = SenseOperator(maps, mask)
    kspace = op(target)
    return SenseProblem(op.H(kspace), kspace, maps, mask, target)


def _lowpass(shape: Sequence[int], dtype: torch.dtype) -> Tensor:
    """Gaussian low-pass weights (standard deviation 0.15 cycles per sample) on the FFT grid."""
    grids = torch.meshgrid(*[torch.fft.fftfreq(n, dtype=dtype) for n in shape], indexing="ij")
    r2 = sum(gr**2 for gr in grids)
    return torch.exp(-r2 / (2 * 0.15**2))
