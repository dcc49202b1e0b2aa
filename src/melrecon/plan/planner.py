"""``model.memory=auto``: the fastest memory plan whose predicted peak fits a budget.

A plan is a memory mode (``standard``, ``checkpoint``, ``mel`` with anchors every k unrolls), a
CNN tile and a ``dc_chunk``. Every candidate is scored by the memory model
(:func:`melrecon.models.memory_model.predict_peak`: the estimated device peak) and the time
model (:mod:`melrecon.plan.time_model`: relative step time); the fastest that fits wins.
MoDL's ``mel`` candidates are predicted as if their segments fell back (its fixed-point inverse
may drift past ``drift_tol``; the worst case must fit too); the reversible family inverts
exactly and needs no anchors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from melrecon.models.memory_model import PeakPrediction, halve_longest, predict_peak
from melrecon.plan import time_model
from melrecon.plan.time_model import TimeCosts

GIB = float(2**30)
#: budget when no GPU is used and ``trainer.memory_budget_gb`` is not set (GB)
CPU_DEFAULT_BUDGET_GB = 16.0
#: what ``trainer.memory_budget_gb: null`` leaves of a GPU's free memory at start-up
GPU_MARGIN = 0.9
GPU_MARGIN_GB = 1.0


@dataclass(frozen=True)
class NetworkSpec:
    """What the memory and time models need to know of a run (sizes, not weights).

    volume: the image axes the CNN convolves ((X, Y, Z) of a slab or volume, (T, X, Y) of a cine).
    precision: "32", "64" or "bf16-mixed".  Others: as :func:`predict_peak`.
    """

    family: str
    volume: tuple[int, ...]
    coils: int
    width: int
    depth: int
    num_unrolls: int
    batch: int = 1
    kernel_size: int = 3
    share_weights: bool = True
    precision: str = "32"
    latent_channels: int = 2
    state_precision: str = "fixed"


@dataclass(frozen=True)
class Plan:
    """One candidate: memory mode, ``anchor_every`` (mel), CNN tile, ``dc_chunk``."""

    memory: str
    anchor_every: int | None = None
    tile: tuple[int, ...] | None = None
    dc_chunk: int | None = None

    def label(self) -> str:
        mode = self.memory if self.memory != "mel" else f"mel k={self.anchor_every or 'inf'}"
        return f"{mode}, tile {'none' if self.tile is None else 'x'.join(map(str, self.tile))}, " \
               f"dc_chunk {self.dc_chunk or 'none'}"


@dataclass(frozen=True)
class ScoredPlan:
    plan: Plan
    prediction: PeakPrediction
    relative_time: float
    fits: bool = False

    @property
    def peak_gib(self) -> float:
        return self.prediction.peak_bytes / GIB


@dataclass
class PlanTable:
    """Every candidate scored, the budget, and the choice (None when nothing fits)."""

    spec: NetworkSpec
    budget_bytes: float
    rows: list[ScoredPlan] = field(default_factory=list)
    chosen: ScoredPlan | None = None
    costs: TimeCosts = TimeCosts()

    def format(self) -> str:
        lines = [f"memory plan: {self.spec.family}, volume {self.spec.volume} x batch {self.spec.batch}, "
                 f"{self.spec.coils} coils, CNN {self.spec.depth} x {self.spec.width}, N = {self.spec.num_unrolls}, "
                 f"precision {self.spec.precision}; budget {self.budget_bytes / GIB:.2f} GiB; time "
                 f"{'calibrated on this machine' if self.costs.calibrated else 'from operation counts'}",
                 f"  {'plan':44} {'peak GiB':>9} {'autograd GiB':>12} {'rel. time':>9}  fits"]
        for r in self.rows:
            mark = "  <- chosen" if r is self.chosen else ""
            lines.append(f"  {r.plan.label():44} {r.peak_gib:9.3f} {r.prediction.probe_bytes / GIB:12.3f} "
                         f"{r.relative_time:9.2f}  {'yes' if r.fits else 'no '}{mark}")
        return "\n".join(lines)

    def refusal(self) -> str:
        """One line: nothing fits; the smallest peak any plan reaches and what to change."""
        best = min(self.rows, key=lambda r: r.prediction.peak_bytes)
        return (f"model.memory=auto: no plan fits trainer.memory_budget_gb={self.budget_bytes / 1e9:.3g} "
                f"({self.budget_bytes / GIB:.2f} GiB): the smallest predicted peak is {best.peak_gib:.2f} GiB "
                f"({best.plan.label()}); raise the budget, or lower data.batch_size (now {self.spec.batch}), "
                f"the input size (data.slab_size / crop), model.regularizer.width (now {self.spec.width}) "
                f"or the tile (model.regularizer.tile)")

    def log_values(self) -> dict[str, float]:
        """The choice as ``plan/*`` scalars for the loggers."""
        c = self.chosen
        assert c is not None
        return {"plan/predicted_peak_gib": c.peak_gib, "plan/predicted_autograd_gib": c.prediction.probe_bytes / GIB,
                "plan/relative_time": c.relative_time, "plan/budget_gib": self.budget_bytes / GIB,
                "plan/memory_" + c.plan.memory: 1.0,
                "plan/anchor_every": float(c.plan.anchor_every or math.inf) if c.plan.memory == "mel" else 0.0,
                "plan/tiles": float(c.prediction.tiles), "plan/dc_chunk": float(c.plan.dc_chunk or 0),
                "plan/candidates": float(len(self.rows))}


def halved_tiles(volume: Sequence[int], levels: int = 4) -> list[tuple[int, ...]]:
    """Tiles halving (rounding up) the longest axis of the volume, ``levels`` times."""
    tile, out = tuple(volume), []
    for _ in range(levels):
        if max(tile) <= 1:
            break
        tile = halve_longest(tile)
        out.append(tile)
    return out


def candidates(spec: NetworkSpec) -> list[Plan]:
    """The plans the planner compares (module docstring)."""
    n = spec.num_unrolls
    modes: list[tuple[str, int | None]] = [("standard", None), ("checkpoint", None)]
    if spec.family == "rev":
        modes.append(("mel", None))
    elif spec.precision != "bf16-mixed":  # MoDL's fixed-point inverse is refused under 16-bit precision
        ks = sorted({k for k in (2, 4, 8) if k < n} | {n})
        modes += [("mel", None if k >= n else k) for k in ks]
    tiles: list[tuple[int, ...] | None] = [None, *halved_tiles(spec.volume)]
    chunks: list[int | None] = [None]
    if spec.volume[0] >= 32:
        chunks.append(max(1, spec.volume[0] // 8))
    return [Plan(m, k, t, c) for m, k in modes for t in tiles for c in chunks]


def score(spec: NetworkSpec, plan: Plan, costs: TimeCosts = TimeCosts()) -> ScoredPlan:
    """The plan's predicted peak and relative time (not yet compared with a budget)."""
    fallback = plan.memory == "mel" and spec.family == "modl"
    b = 8 if spec.precision == "64" else 4
    pred = predict_peak(spec.volume, spec.coils, spec.width, spec.depth, spec.num_unrolls, plan.memory,
                        tile=plan.tile, real_bytes=b, batch=spec.batch, kernel_size=spec.kernel_size,
                        dc_chunk=plan.dc_chunk, family=spec.family, anchor_every=plan.anchor_every,
                        fallback=fallback, share_weights=spec.share_weights, precision=spec.precision,
                        latent_channels=spec.latent_channels, state_precision=spec.state_precision)
    cnn = costs.cnn * time_model.cnn_units(spec.volume, spec.width, spec.depth, spec.kernel_size, spec.family,
                                           spec.latent_channels)
    dc = costs.dc * time_model.dc_units(spec.volume, spec.coils)
    t = time_model.step_time(cnn, dc, spec.num_unrolls, plan.memory, spec.family, tiled=pred.tiles > 1,
                             compute_factor=pred.compute_factor, dc_chunk=plan.dc_chunk is not None,
                             fallback=fallback)
    return ScoredPlan(plan, pred, t * spec.batch)


def plan_table(spec: NetworkSpec, budget_bytes: float, costs: TimeCosts = TimeCosts()) -> PlanTable:
    """Score every candidate; choose the fastest whose predicted peak is within the budget
    (ties: the smaller peak). ``chosen`` is None when none fits."""
    rows = [score(spec, p, costs) for p in candidates(spec)]
    ref = min(r.relative_time for r in rows)
    rows = [replace(r, relative_time=r.relative_time / ref, fits=r.prediction.peak_bytes <= budget_bytes) for r in rows]
    # a tile or chunk that does not lower the peak is only slower: keep the table short
    rows = [r for r in rows if not _dominated(r, rows)]
    rows.sort(key=lambda r: (r.relative_time, r.prediction.peak_bytes))
    fitting = [r for r in rows if r.fits]
    return PlanTable(spec, budget_bytes, rows, fitting[0] if fitting else None, costs)


def _dominated(r: ScoredPlan, rows: Sequence[ScoredPlan]) -> bool:
    """Another plan is at least as fast and strictly lower in peak, or faster at the same peak."""
    for o in rows:
        if o is r:
            continue
        if o.relative_time <= r.relative_time and o.prediction.peak_bytes < r.prediction.peak_bytes:
            return True
        if o.relative_time < r.relative_time and o.prediction.peak_bytes <= r.prediction.peak_bytes:
            return True
    return False


def default_budget_bytes(accelerator: str) -> float:
    """``trainer.memory_budget_gb: null``: on a GPU the free memory at start-up less 10% and
    1 GB (CUDA context, cuDNN/cuFFT workspaces, fragmentation); otherwise
    :data:`CPU_DEFAULT_BUDGET_GB`."""
    import torch

    if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        return max(0.0, free * GPU_MARGIN - GPU_MARGIN_GB * 1e9)
    return CPU_DEFAULT_BUDGET_GB * 1e9


def precision_name(precision: Any) -> str:
    """Lightning's precision setting as the models' name: "32", "64" or "bf16-mixed"."""
    p = str(precision)
    if p.startswith("bf16"):
        return "bf16-mixed"
    if p.startswith("64"):
        return "64"
    if p.startswith("16"):
        raise ValueError(f"model.memory=auto plans 32, 64 and bf16-mixed precision, got trainer.precision={p}")
    return "32"
