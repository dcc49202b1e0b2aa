"""The study's one door to :mod:`melrecon.reconstruct` and to :mod:`melrecon.metrics`.

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

from melrecon import metrics as _metrics
from melrecon.reconstruct import checkpoint as _checkpoint
from melrecon.reconstruct import stitch as _stitch

ScanResult = _stitch.ScanResult


def load_network(cfg: Any, ckpt_path: str | os.PathLike) -> nn.Module:
    """The network of ``cfg.model`` with the weights of a ReconModule checkpoint, in eval mode."""
    return _checkpoint.load_network(cfg, ckpt_path)


def eval_settings(cfg: Any, **overrides: Any) -> Any:
    """The evaluation data settings of a train config (a DataModule that touches no file);
    ``overrides`` (e.g. ``slab_size``) replace ``cfg.data`` keys."""
    return _checkpoint.data_settings(cfg, **overrides)


def reconstruct_file(net: nn.Module, settings: Any, path: str | os.PathLike,
                     device: torch.device | str = "cpu", batch_size: int = 1) -> ScanResult:
    """Apply ``net(x0, kspace, maps, mask)`` to every item of one file and stitch the scan.

    The file is undersampled with the evaluation mask (seeded by its name) of ``settings``;
    arrays come back in the file's units (see :class:`melrecon.reconstruct.ScanResult`).
    """
    dataset = _checkpoint.eval_dataset(settings, [path])
    try:
        return _stitch.reconstruct_scan(net, dataset, device, batch_size)
    finally:
        dataset.close()


def volume_metrics(pred: np.ndarray, target: np.ndarray, data_range: float) -> dict[str, float]:
    """fastMRI PSNR (dB), SSIM and NMSE of one volume (:func:`melrecon.metrics.volume_metrics`,
    the definitions validation and ``reconstruct`` use): magnitudes, ``data_range`` = the
    target volume's maximum, PSNR/NMSE over the volume, SSIM per 2D slice (last two axes)
    averaged (NaN if slices are smaller than the 7 x 7 window)."""
    # magnitudes taken in the arrays' precision first, as reconstruct's scan_metrics does
    return _metrics.volume_metrics(torch.from_numpy(np.abs(np.asarray(pred))),
                                   torch.from_numpy(np.abs(np.asarray(target))), float(data_range))
