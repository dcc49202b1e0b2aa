"""One scan through the network: every item of a one-file evaluation dataset, stitched back
into the scan in the source file's units, and scored with :mod:`melrecon.metrics`."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from melrecon.data.batch import ReconBatch
from melrecon.metrics import volume_metrics

METRIC_KEYS = ("psnr", "ssim", "nmse", "psnr_zf", "ssim_zf", "nmse_zf")


@dataclass
class ScanResult:
    """A reconstructed scan in the source file's units, arrays as written to the output file
    (shapes: :mod:`melrecon.reconstruct`). A prospective file (stored mask) has
    ``mask_stored`` set, ``acceleration_requested`` NaN, and, without a target, a NaN
    ``target`` and no ``metrics``."""

    reconstruction: np.ndarray
    zero_filled: np.ndarray
    target: np.ndarray
    mask: np.ndarray
    data_range: float
    acceleration: float
    acceleration_requested: float
    metrics: dict[str, float] = field(default_factory=dict)
    mask_stored: bool = False
    has_target: bool = True


def _batches(dataset: Any, batch_size: int) -> list[list[int]]:
    """Item indices in order, grouped into batches of equal image shape (a volume's last slab
    may be shorter than the others and cannot be stacked with them)."""
    def shape_key(i: int) -> int:
        if hasattr(dataset, "tiles"):
            _, start, stop = dataset.tiles[i]
            return stop - start
        return 0

    groups: list[list[int]] = []
    for i in range(len(dataset)):
        if groups and len(groups[-1]) < batch_size and shape_key(groups[-1][0]) == shape_key(i):
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


@torch.no_grad()
def run_network(net: nn.Module, dataset: Any, device: torch.device | str = "cpu",
                batch_size: int = 1) -> Iterator[tuple[ReconBatch, torch.Tensor]]:
    """Yield ``(batch, prediction)`` over every item of ``dataset`` in order, the prediction
    on the CPU with the batch's ``x0`` shape (in the dataset's normalised units)."""
    net.eval()
    loader = DataLoader(dataset, batch_sampler=_batches(dataset, batch_size), num_workers=0)
    for batch in loader:
        args = (batch.x0, batch.kspace, batch.maps, batch.mask)
        yield batch, net(*(a.to(device) for a in args)).cpu()


def reconstruct_scan(net: nn.Module, dataset: Any, device: torch.device | str = "cpu",
                     batch_size: int = 1) -> ScanResult:
    """Run the network over every item of a one-file evaluation dataset and stitch the scan.

    volume3d: the slab starting at ``batch.position`` goes to readout positions
    ``position .. position + S - 1``; cine: item ``s`` is slice ``s``. Every position must be
    covered exactly once (checked). The dataset divides items by the file's ``max``
    (``normalize``); outputs are multiplied back into the file's units.
    """
    if len(dataset.infos) != 1:
        raise ValueError(f"reconstruct_scan: expected a dataset over one file, got {len(dataset.infos)}")
    info = dataset.infos[0]
    scale = info.max if dataset.normalize else 1.0
    volume = info.kind == "volume3d"
    n_pos = info.positions
    recon = zf = target = None
    covered = np.zeros(n_pos, dtype=np.int64)
    masks: dict[int, np.ndarray] = {}
    data_range = 0.0
    for batch, pred in run_network(net, dataset, device, batch_size):
        for b in range(pred.shape[0]):
            pos = int(batch.position[b])
            p, x0, t = pred[b], batch.x0[b], batch.target[b]
            if recon is None:
                # volume: (X, Y, Z) from a slab (S, Y, Z); cine: (S, T, X', Y') from (T, X', Y')
                full = (n_pos, *p.shape[1:]) if volume else (n_pos, *p.shape)
                recon, zf, target = (np.zeros(full, dtype=np.complex64) for _ in range(3))
            sel = slice(pos, pos + p.shape[0]) if volume else pos
            recon[sel], zf[sel], target[sel] = (a.numpy() * scale for a in (p, x0, t))
            covered[sel] += 1
            m = batch.mask[b]
            masks[pos] = (m.reshape(m.shape[-2:]) if volume else m.reshape(m.shape[1], m.shape[-1])).numpy()
            data_range = max(data_range, float(batch.max[b]) * scale)
    if recon is None or not (covered == 1).all():
        raise RuntimeError(f"{info.path}: stitching covered positions {covered.tolist()} (expected each once)")
    if volume:
        mask = masks[0]
        if any(not np.array_equal(m, mask) for m in masks.values()):
            raise RuntimeError(f"{info.path}: slabs of one volume got different masks")
    else:
        mask = np.stack([masks[s] for s in range(n_pos)])
        if not info.has_slice_axis:  # keep the file's layout: (T, X, Y) series, (T, Y) mask
            recon, zf, target, mask = recon[0], zf[0], target[0], mask[0]
    # the R the dataset asked of its mask sampler for these items (one per file in evaluation);
    # a stored mask was acquired, not requested
    name = Path(info.path).name
    accel_req = math.nan if info.has_mask else float(np.mean([dataset.masks(name, pos)[0] for pos in sorted(masks)]))
    res = ScanResult(
        reconstruction=recon, zero_filled=zf, target=target, mask=mask.astype(np.float32),
        data_range=data_range, acceleration=float(mask.size / max(mask.sum(), 1.0)),
        acceleration_requested=accel_req, mask_stored=info.has_mask, has_target=info.has_target,
    )
    if info.has_target:  # no metrics without a target (prospective data)
        res.metrics = scan_metrics(res.reconstruction, res.zero_filled, res.target, res.data_range)
    return res


def scan_metrics(recon: np.ndarray, zero_filled: np.ndarray, target: np.ndarray,
                 data_range: float) -> dict[str, float]:
    """fastMRI PSNR / SSIM / NMSE of a whole scan, reconstruction and zero-filled input.

    Arrays are complex (any layout whose last two axes are one 2D slice); magnitudes are
    scored with the given data range (the target volume's maximum) by
    :func:`melrecon.metrics.volume_metrics` (SSIM NaN for slices smaller than its window).
    """
    t = torch.from_numpy(np.abs(target))
    out: dict[str, float] = {}
    for suffix, arr in (("", recon), ("_zf", zero_filled)):
        for k, v in volume_metrics(torch.from_numpy(np.abs(arr)), t, data_range).items():
            out[f"{k}{suffix}"] = v
    return {k: out[k] for k in METRIC_KEYS}
