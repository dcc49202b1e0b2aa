"""Training losses on complex images: L1, MSE, SSIM, or a weighted mix."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

_KNOWN = ("l1", "mse", "ssim")


def _ssim_loss(pred: torch.Tensor, target: torch.Tensor, data_range: torch.Tensor, win: int = 7) -> torch.Tensor:
    """1 - mean SSIM of the magnitudes, per 2D slice, differentiable (fastMRI ``SSIMLoss`` formula).

    pred, target: complex or real (B, *lead, H, W); data_range: (B,) per item.
    """
    B = pred.shape[0]
    p = pred.abs().reshape(B, -1, *pred.shape[-2:]).float()
    t = target.abs().reshape(B, -1, *target.shape[-2:]).float()
    S = p.shape[1]
    p, t = p.reshape(B * S, 1, *p.shape[-2:]), t.reshape(B * S, 1, *t.shape[-2:])
    L = data_range.reshape(B, 1).float().expand(B, S).reshape(B * S, 1, 1, 1)
    k = torch.full((1, 1, win, win), 1.0 / win**2, device=p.device, dtype=p.dtype)
    cov = win**2 / (win**2 - 1.0)
    ux, uy = F.conv2d(p, k), F.conv2d(t, k)
    vx = cov * (F.conv2d(p * p, k) - ux * ux)
    vy = cov * (F.conv2d(t * t, k) - uy * uy)
    vxy = cov * (F.conv2d(p * t, k) - ux * uy)
    c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    return 1.0 - s.mean()


class ReconLoss(nn.Module):
    """Weighted sum of losses between a complex reconstruction and its target.

    Args:
        l1: weight of mean |pred - target| (complex modulus of the difference).
        mse: weight of mean |pred - target|^2.
        ssim: weight of 1 - SSIM of the magnitudes (7x7 window, data range = batch ``max``).
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
            terms["ssim"] = _ssim_loss(pred, target, data_range)
        total = sum(self.weights[k] * v for k, v in terms.items())
        return {"loss": total, **terms}
