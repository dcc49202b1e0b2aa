"""Where a ``mel`` chain stores copies of its state (anchors), and the ``"auto"`` controller.

``anchor_every``: ``None`` or ``float("inf")`` = pure MEL (no anchor but the chain input), an
integer k >= 1 = an anchor every k layers, ``"auto"`` = the spacing is chosen by a controller.

The ``"auto"`` controller assumes that the drift of a segment grows geometrically with its
length L, ``drift ~ eps * rho**L`` (eps = unit roundoff of the state dtype). After each
backward pass it estimates rho from the worst measured segment and sets the spacing to the
largest L with predicted drift below ``drift_tol / 4`` (at most doubling per step, at least 1,
shrinking when the tolerance was exceeded).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch


def parse_anchor_every(anchor_every: Any) -> float | str:
    """``anchor_every`` as ``math.inf``, a positive int or ``"auto"``; ValueError otherwise."""
    if anchor_every is None:
        return math.inf
    if isinstance(anchor_every, str):
        s = anchor_every.strip().lower()
        if s == "auto":
            return "auto"
        if s in ("inf", "infinity", "none", "null"):
            return math.inf
        try:
            anchor_every = int(s)
        except ValueError:
            raise ValueError(
                f"anchor_every must be a positive integer, 'auto' or None/inf, got {anchor_every!r}"
            ) from None
    if isinstance(anchor_every, bool):
        raise ValueError(f"anchor_every must be a positive integer, 'auto' or None/inf, got {anchor_every!r}")
    if isinstance(anchor_every, float) and math.isinf(anchor_every) and anchor_every > 0:
        return math.inf
    if isinstance(anchor_every, (int, float)) and float(anchor_every).is_integer() and anchor_every >= 1:
        return int(anchor_every)
    raise ValueError(f"anchor_every must be a positive integer, 'auto' or None/inf, got {anchor_every!r}")


class AnchorController:
    """The anchor spacing of a chain: fixed by ``anchor_every``, or adapted (``"auto"``).

    Args:
        anchor_every: as accepted by :func:`parse_anchor_every`.
        auto_start: first spacing tried by the ``"auto"`` controller (>= 1).
    """

    def __init__(self, anchor_every: Any = "auto", auto_start: int = 4) -> None:
        if int(auto_start) < 1:
            raise ValueError(f"auto_start must be >= 1, got {auto_start!r}")
        self.anchor_every = parse_anchor_every(anchor_every)
        self.spacing: float = float(auto_start) if self.anchor_every == "auto" else self.anchor_every

    @property
    def adaptive(self) -> bool:
        return self.anchor_every == "auto"

    def positions(self, n: int) -> list[int]:
        """Layer indices whose input a ``mel`` forward pass stores (always 0)."""
        k = self.spacing
        if math.isinf(k) or k >= n:
            return [0]
        return list(range(0, n, int(k)))

    def update(
        self, segment_drifts: Sequence[tuple[int, float]], n_layers: int, dtype: torch.dtype, drift_tol: float
    ) -> None:
        """After a backward pass: adapt the spacing to the measured (length, drift) pairs."""
        if not self.adaptive or not segment_drifts:
            return
        k_old = self.spacing
        eps = torch.finfo(dtype.to_real() if dtype.is_complex else dtype).eps
        target = drift_tol / 4
        worst_rho = 0.0
        exceeded = False
        for length, drift in segment_drifts:
            if drift > drift_tol:
                exceeded = True
            if length >= 1 and math.isfinite(drift):
                rho = (max(drift, eps) / eps) ** (1.0 / length)
                worst_rho = max(worst_rho, rho)
            elif not math.isfinite(drift):
                worst_rho = math.inf
        if math.isinf(worst_rho):
            k_new = 1.0
        elif worst_rho <= 1.0 + 1e-12:
            k_new = 2 * k_old
        else:
            k_new = math.floor(math.log(target / eps) / math.log(worst_rho))
            k_new = min(k_new, 2 * k_old)
        if exceeded:
            k_new = min(k_new, k_old - 1)
        k_new = max(1.0, float(k_new))
        # a spacing >= the chain length means "input anchor only"; keep it finite so that
        # drift is still measured and the controller can come back
        self.spacing = float(min(k_new, max(n_layers, 1)))
