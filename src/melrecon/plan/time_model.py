"""Relative time of one training step for a memory plan (mode, anchors, tile, dc_chunk).

Work is counted in two kinds of unit, each a forward evaluation over the whole image:

- ``cnn``: the unroll's CNN(s): ``2 V sum_l c_in c_out k^d`` multiply-adds (x B), times the tiled
  pass's halo overlap (``compute_factor``);
- ``dc``: the unroll's physics: a CG solve of ``cg_iters`` normal-operator applications (MoDL's
  proximal step; the reversible family's proximal direction) on C coil images:
  ``cg_iters * C * V * (10 log2 V_fft + 8)`` (two FFTs, maps and mask products) (x B).

A step of N unrolls costs (forward, then backward = 2 x forward for a CNN, one adjoint CG solve):

- ``standard``: N (cnn + dc) + N (2 cnn + dc);
- ``checkpoint``: + N (cnn + dc), the re-forward of every unroll in the backward pass;
- ``mel``: + the re-forward, + the inversion: MoDL ``inv_iters`` CNN evaluations (the
  fixed-point inverse) and one normal operator (the closed-form DC inverse); reversible: none
  (fused inversion and backward, the checkpoint cost); a segment that falls back adds one more
  forward pass of its unrolls;
- tiled CNNs recompute each tile in their backward pass: + 1 cnn per backward;
- ``dc_chunk``: the chunks' loop costs ~5% of the physics.

The two unit costs are constants of the counts above (``TimeCosts()``), or measured on this
machine by :func:`calibrate` (a short timed CNN forward and normal-operator application).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TimeCosts:
    """Seconds (or any common unit) per multiply-add of the CNN and per unit of the physics count."""

    cnn: float = 1.0
    dc: float = 1.0
    calibrated: bool = False


def cnn_units(volume: Sequence[int], width: int, depth: int, kernel_size: int, family: str,
              latent_channels: int = 2) -> float:
    """Multiply-adds of the unroll's CNN(s) over the whole image (per batch item)."""
    v, taps = math.prod(volume), kernel_size ** len(volume)
    stacks = ([2] + [width] * (depth - 1) + [2],) if family == "modl" else (
        [4] + [width] * (depth - 1) + [latent_channels], [latent_channels] + [width] * (depth - 1) + [2])
    return 2.0 * v * sum(c[i] * c[i + 1] * taps for c in stacks for i in range(depth))


def dc_units(volume: Sequence[int], coils: int, cg_iters: int = 10) -> float:
    """Physics count of one CG solve over the image (per batch item)."""
    v = math.prod(volume)
    v_fft = math.prod(volume[-2:])
    return cg_iters * coils * v * (10.0 * math.log2(max(v_fft, 2)) + 8.0)


def step_time(cnn: float, dc: float, n: int, memory: str, family: str, *, tiled: bool = False,
              compute_factor: float = 1.0, dc_chunk: bool = False, fallback: bool = False,
              inv_iters: int = 10, cg_iters: int = 10) -> float:
    """Relative time of one step (module docstring); ``cnn``, ``dc``: the two unit costs of one
    unroll (multiply-adds or physics count times :class:`TimeCosts`)."""
    c = cnn * compute_factor
    p = dc * (1.05 if dc_chunk else 1.0)
    t = n * (c + p) + n * (2 * c + p)
    if tiled:
        t += n * c  # tile-by-tile recompute in the backward pass
    if memory in ("checkpoint", "mel"):
        t += n * (c + p)
    if memory == "mel" and family == "modl":
        t += n * (inv_iters * c + p / cg_iters)
    if memory == "mel" and fallback:
        t += n * (c + p)
    return t


def calibrate(width: int, depth: int, kernel_size: int, family: str, coils: int, latent_channels: int = 2,
              device: str | torch.device = "cpu", size: int = 16, repeats: int = 3) -> TimeCosts:
    """Measure the two unit costs on this machine: the family's CNN(s) and one SENSE normal
    operator on a ``size``^3 problem (best of ``repeats`` after a warm-up), in seconds per unit."""
    from melrecon.models import ConvStack
    from melrecon.physics.problems import random_sense_problem

    dev = torch.device(device)
    vol = (size, size, size)
    prob = random_sense_problem("slab", vol, coils, torch.complex64, device=dev, seed=0)
    chans = [(2, 2)] if family == "modl" else [(4, latent_channels), (latent_channels, 2)]
    nets = [ConvStack(i, o, width, depth, kernel_size, conv_dim=3).to(dev) for i, o in chans]
    xs = [torch.randn(1, i, *vol, device=dev) for i, _ in chans]
    op = prob.op

    def best(fn) -> float:
        fn()
        out = math.inf
        for _ in range(repeats):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            fn()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            out = min(out, time.perf_counter() - t0)
        return out

    with torch.no_grad():
        t_cnn = best(lambda: [net(x) for net, x in zip(nets, xs)])
        t_dc = best(lambda: op.gram(prob.x0))
    return TimeCosts(cnn=t_cnn / cnn_units(vol, width, depth, kernel_size, family, latent_channels),
                     dc=t_dc / dc_units(vol, coils, cg_iters=1), calibrated=True)
