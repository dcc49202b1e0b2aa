"""fastMRI-style reconstruction metrics, computed per volume.

Definitions (fastMRI ``evaluate.py``, pinned by tests/test_metrics.py against an independent
NumPy/SciPy implementation of the skimage formulas):

- images are scored as **magnitudes** ``|x|``;
- the **data range** is the maximum of the target *volume* (not of a slice or a slab);
- **PSNR** and **NMSE** are computed over the whole volume:
  ``PSNR = 10 log10(max^2 / MSE)``, ``NMSE = ||t - p||^2 / ||t||^2``;
- **SSIM** is computed per 2D slice (3D: the (Y, Z) plane at each readout position X; cine:
  each frame; 2D: the image), 7x7 uniform window, K1 = 0.01, K2 = 0.03, with the sample
  covariance normalisation NP / (NP - 1) of skimage and of fastMRI's ``SSIMLoss``; the
  slice values are averaged.

torchmetrics' ``structural_similarity_index_measure`` omits the NP / (NP - 1) factor, so its
values differ from fastMRI's in the third decimal; :func:`ssim_slices` implements the exact
fastMRI formula with one ``conv2d`` and is checked against the reference. PSNR uses
torchmetrics' functional.

Validation items may be tiles of a volume (3D slabs; the last tile may be shorter) that arrive
in any order and on any rank. :class:`VolumeAccumulator` keeps streaming sums per file (sum of
squared error, target energy, element count, SSIM sum and slice count, data range), so the
per-volume values do not depend on the order of the tiles. Per-volume values are then
averaged with torchmetrics ``MeanMetric``, which sums across ranks; when a volume sampler keeps
all tiles of a file on one rank, every volume is counted exactly once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torchmetrics.functional.image import peak_signal_noise_ratio

SSIM_WIN = 7
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def as_slices(x: torch.Tensor) -> torch.Tensor:
    """View one item (no batch axis) of shape (*lead, H, W) as 2D slices (S, H, W).

    3D slab (X, Y, Z) -> X slices of (Y, Z); cine (T, X, Y) -> T frames; 2D (H, W) -> 1 slice.
    """
    if x.ndim < 2:
        raise ValueError(f"metrics: an image needs at least 2 axes (H, W), got shape {tuple(x.shape)}")
    return x.reshape(-1, x.shape[-2], x.shape[-1])


def ssim_slices(pred: torch.Tensor, target: torch.Tensor, data_range: float | torch.Tensor,
                win_size: int = SSIM_WIN, k1: float = SSIM_K1, k2: float = SSIM_K2) -> torch.Tensor:
    """SSIM of each 2D slice, the skimage/fastMRI formula.

    Args:
        pred, target: real tensors (S, H, W) (magnitudes), H and W >= ``win_size``.
        data_range: the data range L (fastMRI: the target volume max).
    Returns:
        (S,) float64 tensor, the mean SSIM over the valid (uncropped) window positions of each
        slice, with uniform ``win_size`` x ``win_size`` windows and sample covariances.
    """
    if pred.shape != target.shape or pred.ndim != 3:
        raise ValueError(f"ssim_slices: pred {tuple(pred.shape)} and target {tuple(target.shape)} "
                         "must both be (S, H, W)")
    if min(pred.shape[-2:]) < win_size:
        raise ValueError(f"ssim_slices: slices {tuple(pred.shape[-2:])} are smaller than the "
                         f"{win_size}x{win_size} SSIM window")
    x = pred.detach().to(torch.float64)[:, None]
    y = target.detach().to(torch.float64)[:, None]
    np_ = win_size * win_size
    kernel = torch.full((1, 1, win_size, win_size), 1.0 / np_, dtype=torch.float64, device=x.device)
    # 'valid' convolution == skimage's filter-then-crop of (win_size - 1) // 2 border pixels
    ux, uy = F.conv2d(x, kernel), F.conv2d(y, kernel)
    uxx, uyy, uxy = F.conv2d(x * x, kernel), F.conv2d(y * y, kernel), F.conv2d(x * y, kernel)
    cov_norm = np_ / (np_ - 1.0)  # unbiased (sample) covariance, as skimage and fastMRI
    vx = cov_norm * (uxx - ux * ux)
    vy = cov_norm * (uyy - uy * uy)
    vxy = cov_norm * (uxy - ux * uy)
    L = torch.as_tensor(data_range, dtype=torch.float64, device=x.device)
    c1, c2 = (k1 * L) ** 2, (k2 * L) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux ** 2 + uy ** 2 + c1) * (vx + vy + c2))
    return s.mean(dim=(1, 2, 3))


def volume_psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float) -> torch.Tensor:
    """PSNR of a whole volume (any shape, magnitudes) with the given data range, via torchmetrics."""
    return peak_signal_noise_ratio(pred.detach().double(), target.detach().double(), data_range=data_range)


def volume_nmse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """NMSE = ||target - pred||^2 / ||target||^2 of a whole volume."""
    t, p = target.detach().double(), pred.detach().double()
    return ((t - p) ** 2).sum() / (t ** 2).sum()


@dataclass
class _VolumeSums:
    """Streaming sums for one volume; adding tiles in any order gives the same result."""

    sse: float = 0.0
    energy: float = 0.0
    count: int = 0
    ssim_sum: float = 0.0
    ssim_count: int = 0
    data_range: float = 0.0
    tiles: int = 0
    slice_keys: set = field(default_factory=set)


class VolumeAccumulator:
    """Accumulate items (tiles of volumes) and return per-volume PSNR, NMSE and SSIM.

    ``update(pred, target, data_range, files, positions)`` takes a batch: complex or real
    images (B, *lead, H, W), data range (B,), file names (list of B str) and the tile
    positions (B,). ``compute()`` returns ``{file: {"psnr", "nmse", "ssim"}}``.
    A tile delivered twice (same file and position) raises, because it would be counted twice.
    """

    def __init__(self) -> None:
        self._vols: dict[str, _VolumeSums] = {}

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
        pm, tm = pred.abs().double(), target.abs().double()
        dr = torch.as_tensor(data_range).reshape(-1).double()
        for b, name in enumerate(files):
            v = self._vols.setdefault(str(name), _VolumeSums())
            if positions is not None:
                key = int(torch.as_tensor(positions).reshape(-1)[b])
                if key in v.slice_keys:
                    raise ValueError(f"metrics: item at position {key} of '{name}' was seen twice "
                                     "in one epoch (is the sampler padding or duplicating items?)")
                v.slice_keys.add(key)
            p, t = pm[b], tm[b]
            rng = float(dr[b] if dr.numel() > 1 else dr[0])
            if not rng > 0:
                raise ValueError(f"metrics: data range (batch 'max') of '{name}' is {rng}; it must be > 0")
            v.sse += float(((t - p) ** 2).sum())
            v.energy += float((t ** 2).sum())
            v.count += t.numel()
            s = ssim_slices(as_slices(p), as_slices(t), rng)
            v.ssim_sum += float(s.sum())
            v.ssim_count += s.numel()
            v.data_range = max(v.data_range, rng)
            v.tiles += 1

    def compute(self) -> dict[str, dict[str, float]]:
        out = {}
        for name, v in self._vols.items():
            mse = v.sse / max(v.count, 1)
            psnr = math.inf if mse == 0 else 10.0 * math.log10(v.data_range ** 2 / mse)
            out[name] = {
                "psnr": psnr,
                "nmse": v.sse / v.energy if v.energy > 0 else math.nan,
                "ssim": v.ssim_sum / max(v.ssim_count, 1),
            }
        return out
