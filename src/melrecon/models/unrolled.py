"""UnrolledNet (MoDL): N x (regularizer, data consistency) with a selectable memory mode.

Each unroll is one invertible layer ``DC_n o R_n`` (a :class:`melrecon.mel.SequentialInvertible`),
so anchors and the MEL recompute work per unroll. Everything else (options, weight sharing,
the chain and its memory modes, input checks, logging) is :class:`melrecon.models.base.UnrolledBase`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from melrecon.mel.invertible import SequentialInvertible
from melrecon.models.base import UnrolledBase


class UnrolledNet(UnrolledBase):
    """Unrolled reconstruction network (MoDL): ``x_n = DC_n(R_n(x_{n-1}))``.

    Args:
        regularizer: an invertible regularizer module (e.g. ResidualCNN); the template of
            every unroll.
        dc: a DC layer (ProximalDC or GradientStepDC); template of every unroll.
        num_unrolls, share_weights, memory, anchor_every, drift_tol, auto_start, fft_dims, dc_chunk:
            see :class:`~melrecon.models.base.UnrolledBase` (``share_weights``: one
            regularizer and one DC for all unrolls, as in MoDL).

    ``memory="mel"`` requires an invertible regularizer with a Lipschitz bound < 1
    (``regularizer.lipschitz``) and an invertible DC, otherwise ValueError.
    ``regularizers`` and ``dcs`` list the distinct modules (one each when shared).
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
        dc_chunk: int | None = None,
    ) -> None:
        super().__init__(num_unrolls, share_weights, memory, anchor_every, drift_tol, auto_start, fft_dims, dc_chunk)
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
        per_unroll = self.replicate(regularizer, dc)
        distinct = per_unroll[:1] if self.share_weights else per_unroll
        self.regularizers = nn.ModuleList(r for r, _ in distinct)
        self.dcs = nn.ModuleList(d for _, d in distinct)
        unrolls = [SequentialInvertible(r, d) for r, d in distinct]
        self.set_unrolls(unrolls * num_unrolls if self.share_weights else unrolls)
