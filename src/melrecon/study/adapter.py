"""The study's one door to :mod:`melrecon.reconstruct` and to the fastMRI metrics.

Everything a study scores goes through these four functions: trained networks and classical
baselines alike are applied to a test file by :func:`reconstruct_file` (the evaluation dataset
of :mod:`melrecon.reconstruct`, so masks, tiling, stitching and data range are exactly those of
``python -m melrecon.reconstruct`` and of validation), and every volume is scored by
:func:`volume_metrics`. When the reconstruction or metric code moves, only this file changes.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from torch import nn

from melrecon import reconstruct as _reconstruct
from melrecon.lit import metrics as _metrics

ScanResult = _reconstruct.ScanResult
METRICS = ("psnr", "ssim", "nmse")


def load_network(cfg: Any, ckpt_path: str | os.PathLike) -> nn.Module:
    """The network of ``cfg.model`` with the weights of a ReconModule checkpoint, in eval mode."""
    return _reconstruct.load_network(cfg, ckpt_path)


def eval_settings(cfg: Any, **overrides: Any) -> Any:
    """The evaluation data settings of a train config (a DataModule that touches no file);
    ``overrides`` (e.g. ``slab_size``) replace ``cfg.data`` keys."""
    return _reconstruct.data_settings(cfg, **overrides)


def reconstruct_file(net: nn.Module, settings: Any, path: str | os.PathLike,
                     device: torch.device | str = "cpu", batch_size: int = 1) -> ScanResult:
    """Apply ``net(x0, kspace, maps, mask)`` to every item of one file and stitch the scan.

    The file is undersampled with the evaluation mask (seeded by its name) of ``settings``;
    arrays come back in the file's units (see :class:`melrecon.reconstruct.ScanResult`).
    """
    dataset = _reconstruct.eval_dataset(settings, [path])
    try:
        return _reconstruct.reconstruct_scan(net, dataset, device, batch_size)
    finally:
        dataset.close()


def volume_metrics(pred: np.ndarray, target: np.ndarray, data_range: float) -> dict[str, float]:
    """fastMRI PSNR (dB), SSIM and NMSE of one volume: magnitudes, data range = the target
    volume's maximum, PSNR/NMSE over the volume, SSIM per 2D slice (last two axes) averaged
    (NaN if slices are smaller than the 7 x 7 window)."""
    p = torch.from_numpy(np.abs(np.asarray(pred)))
    t = torch.from_numpy(np.abs(np.asarray(target)))
    if p.shape != t.shape:
        raise ValueError(f"volume_metrics: prediction {tuple(p.shape)} and target {tuple(t.shape)} differ in shape")
    ssim = (float(_metrics.ssim_slices(_metrics.as_slices(p), _metrics.as_slices(t), data_range).mean())
            if min(t.shape[-2:]) >= _metrics.SSIM_WIN else float("nan"))
    return {"psnr": float(_metrics.volume_psnr(p, t, data_range)), "ssim": ssim,
            "nmse": float(_metrics.volume_nmse(p, t))}
