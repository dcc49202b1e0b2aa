"""Networks and the training step of the memory benchmarks (benchmarks/memory.py, benchmarks/gpu/bench.py,
the ``memory_modes`` study).

The benchmarks time one training step of a network named by (family, layout, N, memory mode) on
a :func:`melrecon.physics.problems.random_sense_problem`; this module is what they share, so the
CPU table and the GPU figures measure the same networks. A new family is one more branch of
:func:`build_network` and one more entry of :data:`FAMILIES`. :func:`run_case` is one measured
step (memory, time, gradients) as benchmarks/memory.py and the study record it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
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
) -> nn.Module:
    """A network with ``forward(x0, kspace, maps, mask)`` for (family, layout, N, memory mode).

    Both families convolve in 3D: over (X, Y, Z) for slabs, (T, X, Y) for cine. ``width`` and
    ``depth`` are the CNN's hidden channels and convolutions; ``lam`` the DC's initial weight;
    ``lipschitz`` and ``anderson`` apply to MoDL's residual CNN (its fixed-point inverse), and
    ``anchor_every`` to MoDL only (reversible unrolls need no anchors). The global RNG is seeded
    with ``seed`` first, so every memory mode starts from the same weights. ``gamma_init``,
    ``gamma_decay``, ``state_precision`` and ``physics`` (``"proximal"``: CG direction,
    ``"gradient"``: ``A^H b - A^H A x``) apply to the reversible family.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    torch.manual_seed(seed)
    if family == "modl":
        reg = ResidualCNN(conv_dim=3, width=width, depth=depth, lipschitz=lipschitz, anderson=anderson)
        return UnrolledNet(reg, ProximalDC(lam_init=lam), num_unrolls, share_weights, memory, anchor_every, drift_tol)
    if family == "rev":
        r = ConvStack(4, 2, width, depth, conv_dim=3, out_scale=0.1)
        q = ConvStack(2, 2, width, depth, conv_dim=3, out_scale=0.1)
        dc = ProximalDC(lam_init=lam) if physics == "proximal" else None
        return ReversibleUnrolledNet(r, q, dc, num_unrolls, share_weights, memory, None, drift_tol, gamma_init=gamma_init,
                                     gamma_decay=gamma_decay, state_precision=state_precision)
    raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")


def training_step(net: nn.Module, problem: SenseProblem) -> Tensor:
    """Forward, mean-squared loss against the target, backward; returns the detached loss.

    Gradients accumulate into ``.grad``: zero them first for a step of its own.
    """
    out = net(problem.x0, problem.kspace, problem.maps, problem.mask)
    loss = (out - problem.target).abs().pow(2).mean()
    loss.backward()
    return loss.detach()


def grad_rel_err(grads: Sequence[Tensor], ref: Sequence[Tensor]) -> float:
    """The largest relative error ``||g - r|| / ||r||`` over pairs of parameter gradients
    (a zero reference counts as norm 1, so an untouched parameter gives an absolute error)."""
    return max(float((g - r).norm()) / (float(r.norm()) or 1.0) for g, r in zip(grads, ref, strict=True))


def run_case(
    family: str, kind: str, n: int, mode: str, problem: SenseProblem, opts: dict[str, Any], warmup: int
) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """One measured training step of :func:`build_network` ``(family, kind, n, mode, **opts)``.

    ``warmup`` identical steps come first (spectral-norm estimates and the ``auto`` anchor
    controller reach their steady state, and every mode computes the same function). Returns
    the row (``probe_peak_MB``: bytes autograd held for backward, :class:`MemoryProbe`;
    ``cuda_peak_MB`` on a GPU; ``time_s`` of the step; loss; the network's MEL statistics) and
    the parameter gradients of the measured step (for :func:`grad_rel_err` between modes).
    Shared by benchmarks/memory.py and the ``memory_modes`` study.
    """
    device = problem.x0.device
    net = build_network(family, kind, n, mode, **opts).to(device)
    if problem.x0.dtype == torch.complex128:
        net = net.double()
    net.train()
    for _ in range(warmup):
        net.zero_grad(set_to_none=True)
        training_step(net, problem)
    net.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with MemoryProbe(cuda=device.type == "cuda") as probe:
        loss = training_step(net, problem)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    stats = net.log_stats() if hasattr(net, "log_stats") else {}
    row = {
        "family": family,
        "kind": kind,
        "N": n,
        "mode": mode,
        "probe_peak_MB": probe.peak_bytes / 2**20,
        "cuda_peak_MB": (probe.cuda_peak_bytes / 2**20) if probe.cuda_peak_bytes is not None else float("nan"),
        "time_s": dt,
        "loss": float(loss),
        "drift": stats.get("mel/drift", float("nan")),
        "anchors": stats.get("mel/anchors", float("nan")),
        "anchor_every": stats.get("mel/anchor_every", float("nan")),
        "fallbacks": stats.get("mel/fallbacks", float("nan")),
        "inv_iters": stats.get("mel/inv_iters", float("nan")),
    }
    grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in net.parameters()]
    return row, grads
