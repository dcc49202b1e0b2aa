"""UnrolledNet: N x (regularizer, data consistency) with a selectable memory mode.

A thin MRI-specific user of :class:`melrecon.mel.InvertibleChain`: each unroll is one
invertible layer ``DC_n o R_n`` (a :class:`melrecon.mel.SequentialInvertible`), so anchors
and the MEL recompute work per unroll; the chain does the memory modes, anchors, drift
control, fallbacks and freezing.

Layouts (DESIGN.md; FFT always over the last two axes):
- slab: x0/image (B, X, Y, Z); kspace and maps (B, C, X, Y, Z); mask (B, 1, 1, Y, Z);
- cine: x0/image (B, T, X, Y); kspace (B, C, T, X, Y); maps (B, C, 1, X, Y); mask (B, 1, T, 1, Y).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from melrecon.mel.function import InvertibleChain, check_depth_and_memory
from melrecon.mel.shared_state import deduplicate_state_dict
from melrecon.mel.invertible import SequentialInvertible
from melrecon.models.dc import SenseData, dc_log_stats
from melrecon.physics.sense import SenseOperator


class UnrolledNet(nn.Module):
    """Unrolled reconstruction network.

    Args:
        regularizer: an invertible regularizer module (e.g. ResidualCNN); the template of
            every unroll.
        dc: a DC layer (ProximalDC or GradientStepDC); template of every unroll.
        num_unrolls: N >= 1.
        share_weights: one regularizer and one DC shared by all unrolls (MoDL), or N
            independent copies, each re-initialised (``reset_parameters``) independently.
        memory: "standard" | "checkpoint" | "mel".
        anchor_every: MEL anchors: None/"inf" (pure MEL), integer k, or "auto".
        drift_tol: MEL drift tolerance (relative).
        auto_start: first spacing of the "auto" controller.
        fft_dims: Fourier-encoded image axes.

    ``memory="mel"`` requires an invertible regularizer with a Lipschitz bound < 1
    (``regularizer.lipschitz``), otherwise ValueError.
    """

    def __init__(
        self,
        regularizer: nn.Module,
        dc: nn.Module,
        num_unrolls: int = 5,
        share_weights: bool = True,
        memory: str = "mel",
        anchor_every: Any = "auto",
        drift_tol: float = 1e-5,
        auto_start: int = 4,
        fft_dims: Sequence[int] = (-2, -1),
    ) -> None:
        super().__init__()
        check_depth_and_memory(num_unrolls, memory)
        if memory == "mel":
            c = getattr(regularizer, "lipschitz", None)
            if not callable(getattr(regularizer, "inverse", None)):
                raise ValueError(f"memory='mel' needs an invertible regularizer; {type(regularizer).__name__} has no inverse()")
            if c is None or not c < 1:
                raise ValueError(
                    f"regularizer.lipschitz must be a bound c < 1 for memory='mel' (the fixed-point "
                    f"inverse needs Lip(R) < 1), got {c!r}"
                )
            if not callable(getattr(dc, "inverse", None)):
                raise ValueError(f"memory='mel' needs an invertible dc; {type(dc).__name__} has no inverse()")
        self.num_unrolls = num_unrolls
        self.share_weights = bool(share_weights)
        self.memory = memory
        self.fft_dims = tuple(fft_dims)
        if self.share_weights:
            self.regularizers = nn.ModuleList([regularizer])
            self.dcs = nn.ModuleList([dc])
            unrolls = [SequentialInvertible(regularizer, dc)] * num_unrolls
        else:
            regs, dcs = [regularizer], [dc]
            for _ in range(num_unrolls - 1):
                r, d = copy.deepcopy(regularizer), copy.deepcopy(dc)
                for m in (r, d):
                    if callable(getattr(m, "reset_parameters", None)):
                        m.reset_parameters()
                regs.append(r)
                dcs.append(d)
            self.regularizers = nn.ModuleList(regs)
            self.dcs = nn.ModuleList(dcs)
            unrolls = [SequentialInvertible(r, d) for r, d in zip(regs, dcs)]
        self.chain = InvertibleChain(
            unrolls, memory=memory, anchor_every=anchor_every, drift_tol=drift_tol, auto_start=auto_start
        )
        deduplicate_state_dict(self)  # shared weights: one checkpoint entry, any number of unrolls

    def forward(self, x0: Tensor, kspace: Tensor, maps: Tensor, mask: Tensor) -> Tensor:
        """Reconstruct: x0 (B, *image) complex, kspace (B, C, ...), maps, mask -> image like x0."""
        if not torch.is_complex(x0):
            raise ValueError(f"x0 must be complex, got dtype {x0.dtype} (shape {tuple(x0.shape)})")
        op = SenseOperator(maps, mask, self.fft_dims)
        data = SenseData(op=op, kspace=kspace, aty=op.adjoint(kspace))
        if x0.shape != data.aty.shape:
            raise ValueError(f"x0 shape {tuple(x0.shape)} differs from the image shape {tuple(data.aty.shape)} of kspace/maps")
        for d in self.dcs:
            if hasattr(d, "stats"):
                d.stats.clear()
        return self.chain(x0, data)

    @torch.no_grad()
    def log_stats(self) -> dict[str, float]:
        """Scalars for the logger: learned DC weight and the last step's MEL statistics."""
        lams = torch.stack([d.lam.detach().float().reshape(()) for d in self.dcs if hasattr(d, "lam")])
        s = self.chain.stats
        out = {
            "dc/lam": float(lams.mean()),
            "mel/drift": float(s.drift),
            "mel/anchors": float(s.anchors),
            "mel/anchor_every": float(s.anchor_every),
            "mel/inv_iters": float(s.inv_iters),
            "mel/inv_residual": float(s.inv_residual),
            "mel/fallbacks": float(s.fallbacks),
        }
        if len(lams) > 1:
            out["dc/lam_min"] = float(lams.min())
            out["dc/lam_max"] = float(lams.max())
        out.update(dc_log_stats(self.dcs))
        return out
