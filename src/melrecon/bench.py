"""Networks and the training step of the memory benchmarks (benchmarks/memory.py, benchmarks/gpu/bench.py,
the ``memory_modes`` study).

The benchmarks time one training step of a network named by (family, layout, N, memory mode) on
a :func:`melrecon.physics.problems.random_sense_problem`; this module is what they share, so the
CPU table and the GPU figures measure the same networks. A new family is one more branch of
:func:`build_network` and one more entry of :data:`FAMILIES`. :func:`measure_step` is one
measured training step of any network (warm-up, bytes autograd held, CUDA peak, time,
gradients), used by :func:`run_case` (benchmarks/memory.py, the study), benchmarks/gpu/bench.py
and benchmarks/whole_volume.py.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from melrecon.mel.memory import MemoryProbe
from melrecon.models import ConvStack, ProximalDC, ResidualCNN, ReversibleUnrolledNet, UnrolledNet
from melrecon.physics.problems import LAYOUTS, SenseProblem

#: "modl": MoDL (UnrolledNet: residual CNN + proximal DC); "rev": reversible unrolls
#: (ReversibleUnrolledNet: closed-form inverse, pure MEL, no anchors).
FAMILIES = ("modl", "rev")


def build_network(
    family: str,
    layout: str,
    num_unrolls: int,
    memory: str,
    *,
    width: int = 8,
    depth: int = 5,
    lam: float = 0.05,
    anchor_every: Any = "auto",
    drift_tol: float = 1e-5,
    share_weights: bool = True,
    lipschitz: float = 0.9,
    anderson: int = 0,
    seed: int = 0,
    gamma_init: float = 1.0,
    gamma_decay: float = 1.0,
    state_precision: str = "fixed",
    physics: str = "proximal",
    tile: Sequence[int | None] | None = None,
    dc_chunk: int | None = None,
    latent_channels: int = 2,
) -> nn.Module:
    """A network with ``forward(x0, kspace, maps, mask)`` for (family, layout, N, memory mode).

    Both families convolve in 3D: over (X, Y, Z) for slabs, (T, X, Y) for cine. ``width`` and
    ``depth`` are the CNN's hidden channels and convolutions; ``lam`` the DC's initial weight;
    ``lipschitz`` and ``anderson`` apply to MoDL's residual CNN (its fixed-point inverse);
    ``anchor_every`` to both, except that ``"auto"`` means none for the reversible family (its
    unrolls need no anchors). The global RNG is seeded
    with ``seed`` first, so every memory mode starts from the same weights. ``gamma_init``,
    ``gamma_decay``, ``state_precision`` and ``physics`` (``"proximal"``: CG direction,
    ``"gradient"``: ``A^H b - A^H A x``) apply to the reversible family, and ``latent_channels``
    (K, the latent stream's channels). ``tile`` (the CNNs' tile, as ``model.regularizer.tile``)
    and ``dc_chunk`` (``model.dc_chunk``) apply to both.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    torch.manual_seed(seed)
    if family == "modl":
        reg = ResidualCNN(conv_dim=3, width=width, depth=depth, lipschitz=lipschitz, anderson=anderson, tile=tile)
        return UnrolledNet(reg, ProximalDC(lam_init=lam), num_unrolls, share_weights, memory, anchor_every, drift_tol,
                           dc_chunk=dc_chunk)
    if family == "rev":
        k = latent_channels
        r = ConvStack(4, k, width, depth, conv_dim=3, out_scale=0.1, tile=tile)
        q = ConvStack(k, 2, width, depth, conv_dim=3, out_scale=0.1, tile=tile)
        dc = ProximalDC(lam_init=lam) if physics == "proximal" else None
        anchors = None if anchor_every == "auto" else anchor_every  # none needed: closed-form inverse
        return ReversibleUnrolledNet(r, q, dc, num_unrolls, share_weights, memory, anchors, drift_tol, gamma_init=gamma_init,
                                     gamma_decay=gamma_decay, state_precision=state_precision, dc_chunk=dc_chunk)
    raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")


def training_step(net: nn.Module, problem: SenseProblem, autocast: torch.dtype | None = None) -> Tensor:
    """Forward, mean-squared loss against the target, backward; returns the detached loss.

    ``autocast``: run forward and loss under ``torch.autocast`` of this dtype (as Lightning's
    ``bf16-mixed`` does); None: full precision. Gradients accumulate into ``.grad``: zero them
    first for a step of its own.
    """
    with torch.autocast(problem.x0.device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        out = net(problem.x0, problem.kspace, problem.maps, problem.mask)
        loss = (out - problem.target).abs().pow(2).mean()
    loss.backward()
    return loss.detach()


def grad_rel_err(grads: Sequence[Tensor], ref: Sequence[Tensor]) -> float:
    """The largest relative error ``||g - r|| / ||r||`` over pairs of parameter gradients
    (a zero reference counts as norm 1, so an untouched parameter gives an absolute error)."""
    return max(float((g - r).norm()) / (float(r.norm()) or 1.0) for g, r in zip(grads, ref, strict=True))


@dataclass
class StepMeasure:
    """One measured training step (:func:`measure_step`).

    Attributes:
        probe_peak_bytes: peak bytes autograd held for backward (:class:`MemoryProbe`).
        cuda_peak_bytes: ``max_memory_allocated`` during the step minus the allocation at its
            start (MemoryProbe) on a GPU, else None.
        cuda_max_alloc_bytes: ``max_memory_allocated`` during the step (absolute), else None.
        time_s: wall time of the step (synchronised on a GPU).
        loss: the step's loss.
        grads: parameter gradients of the step (zeros for a parameter without one).
        stats: the network's ``log_stats()`` after the step (``mel/drift``, ``mel/anchors``, ...).
    """

    probe_peak_bytes: int
    cuda_peak_bytes: int | None
    cuda_max_alloc_bytes: int | None
    time_s: float
    loss: float
    grads: list[Tensor]
    stats: dict[str, float]


def measure_step(net: nn.Module, problem: SenseProblem, warmup: int = 1,
                 autocast: torch.dtype | None = None) -> StepMeasure:
    """``warmup`` training steps (spectral-norm estimates and the ``auto`` anchor controller reach
    their steady state), then one measured step; gradients are zeroed before each step.
    ``autocast``: as :func:`training_step`."""
    device = problem.x0.device
    net.train()
    for _ in range(warmup):
        net.zero_grad(set_to_none=True)
        training_step(net, problem, autocast)
    net.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    with MemoryProbe(cuda=device.type == "cuda") as probe:  # resets the CUDA peak statistics on entry
        loss = training_step(net, problem, autocast)
    max_alloc = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        max_alloc = torch.cuda.max_memory_allocated(device)  # before the gradient copies below
    dt = time.perf_counter() - t0
    grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in net.parameters()]
    stats = net.log_stats() if hasattr(net, "log_stats") else {}
    return StepMeasure(probe.peak_bytes, probe.cuda_peak_bytes, max_alloc, dt, float(loss), grads, stats)


def network_for(problem: SenseProblem, family: str, kind: str, n: int, mode: str, **opts: Any) -> nn.Module:
    """:func:`build_network` on the problem's device, in float64 for a complex128 problem."""
    net = build_network(family, kind, n, mode, **opts).to(problem.x0.device)
    return net.double() if problem.x0.dtype == torch.complex128 else net


def run_case(
    family: str, kind: str, n: int, mode: str, problem: SenseProblem, opts: dict[str, Any], warmup: int
) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """One measured training step (:func:`measure_step`) of :func:`build_network` ``(family, kind, n, mode, **opts)``.

    Returns the row (``probe_peak_MB``: bytes autograd held for backward; ``cuda_peak_MB`` on a
    GPU; ``time_s`` of the step; loss; the network's MEL statistics) and the parameter gradients
    of the measured step (for :func:`grad_rel_err` between modes). Shared by
    benchmarks/memory.py and the ``memory_modes`` study.
    """
    m = measure_step(network_for(problem, family, kind, n, mode, **opts), problem, warmup)
    nan = float("nan")
    row = {
        "family": family,
        "kind": kind,
        "N": n,
        "mode": mode,
        "probe_peak_MB": m.probe_peak_bytes / 2**20,
        "cuda_peak_MB": m.cuda_peak_bytes / 2**20 if m.cuda_peak_bytes is not None else nan,
        "time_s": m.time_s,
        "loss": m.loss,
        "drift": m.stats.get("mel/drift", nan),
        "anchors": m.stats.get("mel/anchors", nan),
        "anchor_every": m.stats.get("mel/anchor_every", nan),
        "fallbacks": m.stats.get("mel/fallbacks", nan),
        "inv_iters": m.stats.get("mel/inv_iters", nan),
    }
    return row, m.grads
