"""Reconstruction metrics with the fastMRI definitions: one implementation for training,
validation, ``python -m melrecon.reconstruct`` and any later evaluation.

Definitions (fastMRI ``fastmri/evaluate.py``; pinned by tests/test_metrics.py against an
independent NumPy/SciPy implementation of the skimage formulas):

- images are scored as **magnitudes** ``|x|``;
- the **data range** L is the maximum of the target *volume* (not of a slice or a slab);
- **PSNR** and **NMSE** are computed over the whole volume:
  ``PSNR = 10 log10(L^2 / MSE)``, ``NMSE = ||t - p||^2 / ||t||^2``;
- **SSIM** is computed per 2D slice (3D: the (Y, Z) plane at each readout position X; cine:
  each frame; 2D: the image), 7x7 uniform window, K1 = 0.01, K2 = 0.03, with the sample
  covariance normalisation NP / (NP - 1) of skimage and of fastMRI's ``SSIMLoss``; the slice
  values are averaged.

torchmetrics' ``structural_similarity_index_measure`` omits the NP / (NP - 1) factor, so its
values differ from fastMRI's in the third decimal; :func:`ssim_map` implements the exact
formula with ``conv2d``, differentiable, so the SSIM loss (:func:`ssim_loss`) and the SSIM
metric (:func:`ssim_slices`, float64) are the same computation.

Validation items may be tiles of a volume (3D slabs; the last tile may be shorter) that
arrive in any order and on any rank. :class:`VolumeSums` keeps streaming sums per volume
(squared error, target energy, element count, SSIM sum and slice count, data range), so the
per-volume values do not depend on how the volume was cut; :class:`VolumeAccumulator` keeps
one per file. :func:`volume_metrics` scores one whole volume with the same sums.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

SSIM_WIN = 7
SSIM_K1 = 0.01
SSIM_K2 = 0.03
METRICS = ("psnr", "ssim", "nmse")


def as_slices(x: torch.Tensor) -> torch.Tensor:
    """View one item (no batch axis) of shape (*lead, H, W) as 2D slices (S, H, W).

    3D slab (X, Y, Z) -> X slices of (Y, Z); cine (T, X, Y) -> T frames; 2D (H, W) -> 1 slice.
    """
    if x.ndim < 2:
        raise ValueError(f"metrics: an image needs at least 2 axes (H, W), got shape {tuple(x.shape)}")
    return x.reshape(-1, x.shape[-2], x.shape[-1])


def ssim_map(pred: torch.Tensor, target: torch.Tensor, data_range: float | torch.Tensor,
             win_size: int = SSIM_WIN, k1: float = SSIM_K1, k2: float = SSIM_K2) -> torch.Tensor:
    """The SSIM map of each 2D slice (skimage/fastMRI formula), differentiable.

    Args:
        pred, target: real tensors (N, H, W) (magnitudes), H and W >= ``win_size``; the
            computation runs in their dtype.
        data_range: L, a number or a tensor of shape (N,) (one per slice).
    Returns:
        (N, H - win_size + 1, W - win_size + 1): SSIM at every valid (uncropped) window
        position, uniform ``win_size`` x ``win_size`` windows, sample covariances.
    """
    if min(pred.shape[-2:]) < win_size:
        raise ValueError(f"ssim: slices {tuple(pred.shape[-2:])} are smaller than the "
                         f"{win_size}x{win_size} SSIM window")
    x, y = pred[:, None], target[:, None]
    np_ = win_size * win_size
    kernel = torch.full((1, 1, win_size, win_size), 1.0 / np_, dtype=x.dtype, device=x.device)
    # 'valid' convolution == skimage's filter-then-crop of (win_size - 1) // 2 border pixels
    ux, uy = F.conv2d(x, kernel), F.conv2d(y, kernel)
    uxx, uyy, uxy = F.conv2d(x * x, kernel), F.conv2d(y * y, kernel), F.conv2d(x * y, kernel)
    cov_norm = np_ / (np_ - 1.0)  # unbiased (sample) covariance, as skimage and fastMRI
    vx = cov_norm * (uxx - ux * ux)
    vy = cov_norm * (uyy - uy * uy)
    vxy = cov_norm * (uxy - ux * uy)
    L = torch.as_tensor(data_range, dtype=x.dtype, device=x.device)
    if L.ndim:
        L = L.reshape(-1, 1, 1, 1)
    c1, c2 = (k1 * L) ** 2, (k2 * L) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux ** 2 + uy ** 2 + c1) * (vx + vy + c2))
    return s[:, 0]


def ssim_slices(pred: torch.Tensor, target: torch.Tensor, data_range: float | torch.Tensor) -> torch.Tensor:
    """The SSIM metric of each 2D slice: (S, H, W) magnitudes -> (S,) float64 (no gradient)."""
    if pred.shape != target.shape or pred.ndim != 3:
        raise ValueError(f"ssim_slices: pred {tuple(pred.shape)} and target {tuple(target.shape)} "
                         "must both be (S, H, W)")
    s = ssim_map(pred.detach().to(torch.float64), target.detach().to(torch.float64), data_range)
    return s.mean(dim=(1, 2))


def ssim_loss(pred: torch.Tensor, target: torch.Tensor, data_range: torch.Tensor) -> torch.Tensor:
    """1 - mean SSIM of the magnitudes over every 2D slice of a batch, differentiable.

    pred, target: complex or real (B, *lead, H, W); data_range: (B,), one L per item (fastMRI
    ``SSIMLoss``). Computed in float32 (the training precision).
    """
    B = pred.shape[0]
    p = pred.abs().reshape(B, -1, *pred.shape[-2:]).float()
    t = target.abs().reshape(B, -1, *target.shape[-2:]).float()
    S = p.shape[1]
    L = data_range.reshape(B, 1).float().expand(B, S).reshape(B * S)
    return 1.0 - ssim_map(p.reshape(B * S, *p.shape[-2:]), t.reshape(B * S, *t.shape[-2:]), L).mean()


@dataclass
class VolumeSums:
    """Streaming sums for the fastMRI metrics of one volume; parts may be added in any order.

    Slices smaller than the SSIM window add nothing to the SSIM sums (``ssim`` is then NaN).
    """

    sse: float = 0.0
    energy: float = 0.0
    count: int = 0
    ssim_sum: float = 0.0
    ssim_count: int = 0
    data_range: float = 0.0

    def add(self, pred: torch.Tensor, target: torch.Tensor, data_range: float) -> None:
        """Add a part of the volume: magnitudes (*lead, H, W) in float64, L of the volume."""
        self.sse += float(((target - pred) ** 2).sum())
        self.energy += float((target ** 2).sum())
        self.count += target.numel()
        if min(target.shape[-2:]) >= SSIM_WIN:
            s = ssim_slices(as_slices(pred), as_slices(target), data_range)
            self.ssim_sum += float(s.sum())
            self.ssim_count += s.numel()
        self.data_range = max(self.data_range, data_range)

    @property
    def psnr(self) -> float:
        mse = self.sse / max(self.count, 1)
        return math.inf if mse == 0 else 10.0 * math.log10(self.data_range ** 2 / mse)

    @property
    def nmse(self) -> float:
        return self.sse / self.energy if self.energy > 0 else math.nan

    @property
    def ssim(self) -> float:
        return self.ssim_sum / self.ssim_count if self.ssim_count else math.nan

    def as_dict(self) -> dict[str, float]:
        return {m: getattr(self, m) for m in METRICS}


def magnitude(x: torch.Tensor) -> torch.Tensor:
    """|x| in float64, detached: what the metrics score."""
    return x.detach().abs().double()


def volume_metrics(pred: torch.Tensor, target: torch.Tensor, data_range: float) -> dict[str, float]:
    """``{"psnr", "ssim", "nmse"}`` of one whole volume (complex or real, (*lead, H, W)).

    SSIM is NaN when the slices are smaller than the 7 x 7 window.
    """
    if pred.shape != target.shape:
        raise ValueError(f"metrics: prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    if not data_range > 0:
        raise ValueError(f"metrics: data range {data_range}; it must be > 0")
    sums = VolumeSums()
    sums.add(magnitude(pred), magnitude(target), float(data_range))
    return sums.as_dict()


@dataclass
class _Volume:
    sums: VolumeSums = field(default_factory=VolumeSums)
    positions: set[int] = field(default_factory=set)


class VolumeAccumulator:
    """Accumulate items (tiles of volumes) and return per-volume PSNR, NMSE and SSIM.

    ``update(pred, target, data_range, files, positions)`` takes a batch: complex or real
    images (B, *lead, H, W), data range (B,), file names (list of B str) and the tile
    positions (B,). ``compute()`` returns ``{file: {"psnr", "nmse", "ssim"}}``.
    A tile delivered twice (same file and position) raises, because it would be counted twice;
    so do slices smaller than the SSIM window (validation would log NaN every epoch).
    """

    def __init__(self) -> None:
        self._vols: dict[str, _Volume] = {}

    def reset(self) -> None:
        self._vols = {}

    def __len__(self) -> int:
        return len(self._vols)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor, data_range: torch.Tensor,
               files: list[str], positions: torch.Tensor | None = None) -> None:
        if pred.shape != target.shape:
            raise ValueError(f"metrics: prediction {tuple(pred.shape)} and target "
                             f"{tuple(target.shape)} differ in shape")
        if len(files) != pred.shape[0]:
            raise ValueError(f"metrics: {len(files)} file names for a batch of {pred.shape[0]}")
        if min(pred.shape[-2:]) < SSIM_WIN:
            raise ValueError(f"metrics: slices {tuple(pred.shape[-2:])} are smaller than the "
                             f"{SSIM_WIN}x{SSIM_WIN} SSIM window")
        pm, tm = magnitude(pred), magnitude(target)
        dr = torch.as_tensor(data_range).reshape(-1).double()
        finite = torch.isfinite(pm.reshape(len(files), -1)).all(1) & torch.isfinite(tm.reshape(len(files), -1)).all(1)
        if not finite.all():
            bad = [str(f) for f, ok in zip(files, finite.tolist()) if not ok]
            raise ValueError(f"metrics: non-finite prediction or target for {bad}: the volume would silently "
                             "drop out of the per-volume means")
        for b, name in enumerate(files):
            v = self._vols.setdefault(str(name), _Volume())
            if positions is not None:
                key = int(torch.as_tensor(positions).reshape(-1)[b])
                if key in v.positions:
                    raise ValueError(f"metrics: item at position {key} of '{name}' was seen twice "
                                     "in one epoch (is the sampler padding or duplicating items?)")
                v.positions.add(key)
            rng = float(dr[b] if dr.numel() > 1 else dr[0])
            if not rng > 0:
                raise ValueError(f"metrics: data range (batch 'max') of '{name}' is {rng}; it must be > 0")
            v.sums.add(pm[b], tm[b], rng)

    def compute(self) -> dict[str, dict[str, float]]:
        """Per-volume metrics; a NaN metric (e.g. NMSE of an all-zero target) is an error
        naming the volume. PSNR is +inf for an exact reconstruction, and kept so."""
        out = {name: v.sums.as_dict() for name, v in self._vols.items()}
        for name, vals in out.items():
            bad = [m for m, x in vals.items() if math.isnan(x)]
            if bad:
                raise ValueError(f"metrics: {', '.join(bad)} of '{name}' is NaN (all-zero target?): "
                                 "the volume would silently drop out of the means")
        return out


__all__ = ["SSIM_WIN", "SSIM_K1", "SSIM_K2", "METRICS", "as_slices", "ssim_map", "ssim_slices", "ssim_loss",
           "VolumeSums", "magnitude", "volume_metrics", "VolumeAccumulator"]
