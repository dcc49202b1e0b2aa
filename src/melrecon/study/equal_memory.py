"""Quality at equal memory: test PSNR against the memory of a training step, per network and mode.

The MEL paper's claim is about memory: within the memory that standard backpropagation needs to
train one network, MEL trains a bigger one, which reconstructs better. A study measures, for every
trained network, the memory of one training step in each memory mode at the network's size
(``<run>/study/memory.json``, :func:`melrecon.study.job.measure_memory_modes`; the modes give equal
gradients, so the one trained network stands for all of them) and sets it against the network's
test PSNR.

Memory is the CUDA allocator's peak where the step ran on a GPU, otherwise the bytes autograd held
(:class:`melrecon.mel.MemoryProbe`), the memory a GPU would need beyond weights and data.

The sentence (:func:`claim`) is derived from the data: for each budget ``M`` = the standard-mode
memory of a trained network (ascending), the best network (by the study's validation metric, never
by test scores) that standard backprop fits in ``M`` and the best that MEL fits in ``M``; the first
budget at which they differ gives the sentence, with the paired test-PSNR difference and its 95%
t interval. When MEL never fits a different network, the sentence says so.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from melrecon.study.results import MethodResult
from melrecon.study.stats import PairedDifference, paired_difference, summarize


@dataclass(frozen=True)
class MemoryPoint:
    """One (network, memory mode): the memory of a training step (MiB) and the network's test PSNR."""

    method: MethodResult
    mode: str
    mib: float
    basis: str  # "CUDA peak" or "autograd"


@dataclass(frozen=True)
class Budget:
    """At the memory of standard backprop for ``at``: the best network standard backprop fits
    (``standard``) and the best MEL fits (``mel``), both chosen on validation."""

    at: MethodResult
    mib: float
    standard: MethodResult
    mel: MethodResult
    diff: PairedDifference  # test PSNR, mel - standard


def step_mib(method: MethodResult, mode: str) -> tuple[float, str]:
    """Memory of a training step of ``method`` in ``mode`` (MiB) and its basis; NaN if not measured."""
    m = (method.info.get("memory_modes") or {}).get(mode) or {}
    cuda = m.get("cuda_step_mib")
    if cuda is not None and math.isfinite(float(cuda)):
        return float(cuda), "CUDA peak"
    probe = m.get("probe_step_mib")
    return (float(probe), "autograd") if probe is not None else (math.nan, "")


def memory_points(methods: Sequence[MethodResult], modes: Sequence[str]) -> list[MemoryPoint]:
    """Every measured (network, mode) pair, in method then mode order."""
    points = []
    for m in methods:
        if m.group != "network":
            continue
        for mode in modes:
            mib, basis = step_mib(m, mode)
            if math.isfinite(mib):
                points.append(MemoryPoint(m, mode, mib, basis))
    return points


def _val_key(method: MethodResult, higher_is_better: bool) -> float:
    v = method.info.get("val_monitor")
    if v is None or not math.isfinite(float(v)):
        return -math.inf
    return float(v) if higher_is_better else -float(v)


def budgets(methods: Sequence[MethodResult], volumes: Sequence[str], higher_is_better: bool = True) -> list[Budget]:
    """One :class:`Budget` per network with a measured standard and mel memory, ascending in memory."""
    nets = [m for m in methods if m.group == "network"
            and math.isfinite(step_mib(m, "standard")[0]) and math.isfinite(step_mib(m, "mel")[0])]
    out = []
    for at in sorted(nets, key=lambda m: step_mib(m, "standard")[0]):
        limit = step_mib(at, "standard")[0]
        fits_std = [m for m in nets if step_mib(m, "standard")[0] <= limit]
        fits_mel = [m for m in nets if step_mib(m, "mel")[0] <= limit]
        best_std = max(fits_std, key=lambda m: _val_key(m, higher_is_better))
        best_mel = max(fits_mel, key=lambda m: _val_key(m, higher_is_better))
        diff = paired_difference([best_mel.scores[v]["psnr"] for v in volumes],
                                 [best_std.scores[v]["psnr"] for v in volumes])
        out.append(Budget(at, limit, best_std, best_mel, diff))
    return out


def _interval(d: PairedDifference) -> str:
    if d.n < 2 or math.isnan(d.t_low):
        return f"{d.mean:+.2f} dB (n = {d.n}, no interval)"
    return f"{d.mean:+.2f} dB [{d.t_low:+.2f}, {d.t_high:+.2f}] (95% paired t, n = {d.n})"


def claim(found: Sequence[Budget], select_on: str = "psnr") -> str:
    """The study's one sentence on quality at equal memory (see the module doc)."""
    if not found:
        return "No network has both a standard and a MEL memory measurement: no equal-memory statement."
    for b in found:
        if b.mel is not b.standard:
            return (f"Within the memory of standard backprop at {b.at.label} ({b.mib:.3g} MiB per training step), "
                    f"MEL trains {b.mel.label} ({step_mib(b.mel, 'mel')[0]:.3g} MiB): {_interval(b.diff)} test PSNR "
                    f"over {b.standard.label}, the best network standard backprop fits in that memory "
                    f"(both chosen on validation {select_on.upper()}).")
    return ("At every measured budget (the standard-backprop memory of each trained network) the best network MEL "
            f"fits is one standard backprop fits too (chosen on validation {select_on.upper()}): at these sizes MEL "
            "buys no quality, only memory.")


def table(points: Sequence[MemoryPoint], found: Sequence[Budget], volumes: Sequence[str]) -> list[str]:
    """Markdown lines: every (network, mode) with its step memory and test PSNR, then the budgets."""
    lines = ["| network | memory mode | training-step memory MiB | basis | test PSNR dB (mean ± std) |",
             "|---|---|---|---|---|"]
    for p in points:
        s = summarize([p.method.scores[v]["psnr"] for v in volumes])
        lines.append(f"| {p.method.label} | {p.mode} | {p.mib:.3g} | {p.basis} | {s.fmt(2)} |")
    if found:
        lines += ["", "| budget: standard backprop at | MiB | best standard-trained in budget | best MEL-trained in "
                  "budget | Δ test PSNR (MEL - standard) dB [95% CI] |", "|---|---|---|---|---|"]
        for b in found:
            d = b.diff.fmt(2) if b.mel is not b.standard else "same network"
            lines.append(f"| {b.at.label} | {b.mib:.3g} | {b.standard.label} | {b.mel.label} | {d} |")
    return lines
