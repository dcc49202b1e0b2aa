"""Training losses on complex images: L1, MSE, SSIM, or a weighted mix."""

from __future__ import annotations

import torch
import torch.nn as nn

from melrecon.metrics import ssim_loss

_KNOWN = ("l1", "mse", "ssim")


class ReconLoss(nn.Module):
    """Weighted sum of losses between a complex reconstruction and its target.

    Args:
        l1: weight of mean |pred - target| (complex modulus of the difference).
        mse: weight of mean |pred - target|^2.
        ssim: weight of 1 - SSIM of the magnitudes (:func:`melrecon.metrics.ssim_loss`: the
            metric's formula, 7x7 window, data range = batch ``max``).
    At least one weight must be positive.
    """

    def __init__(self, l1: float = 1.0, mse: float = 0.0, ssim: float = 0.0) -> None:
        super().__init__()
        self.weights = {"l1": float(l1), "mse": float(mse), "ssim": float(ssim)}
        for k, w in self.weights.items():
            if w < 0:
                raise ValueError(f"module.loss.{k}: weight must be >= 0, got {w}")
        if not any(w > 0 for w in self.weights.values()):
            raise ValueError(f"module.loss: give at least one positive weight among {_KNOWN}")

    def forward(self, pred: torch.Tensor, target: torch.Tensor, data_range: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return {'loss': total, 'l1': ..., ...} for the terms with positive weight."""
        terms: dict[str, torch.Tensor] = {}
        diff = pred - target
        if self.weights["l1"] > 0:
            terms["l1"] = diff.abs().mean()
        if self.weights["mse"] > 0:
            terms["mse"] = (diff.abs() ** 2).mean()
        if self.weights["ssim"] > 0:
            terms["ssim"] = ssim_loss(pred, target, data_range)
        total = sum(self.weights[k] * v for k, v in terms.items())
        return {"loss": total, **terms}
