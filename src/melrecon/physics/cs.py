"""Compressed-sensing solvers for the classical baselines, run to a stated convergence criterion.

Both solve ``min_x 1/2 ||A x - y||^2 + lam R(x)`` for a SENSE operator ``A`` (any
:class:`~melrecon.physics.operators.LinearOperator` with ``.H`` and ``.gram``), batched over axis 0:

- :func:`fista_l1_wavelet`: ``R = ||W x||_1`` with an orthonormal wavelet over the image axes
  (:class:`~melrecon.physics.wavelets.ImageWavelet`), by FISTA with step ``1 / ||A^H A||``
  (power iteration). ``spins`` > 1: cycle spinning, the soft-thresholding averaged over that many
  circular shifts (a proximal average, so FISTA still converges; BART ``pics`` instead draws one
  random shift per iteration), which removes the blocky artefacts of a decimated transform.
- :func:`admm_tv`: ``R = sum_axes |D_a x|`` (anisotropic TV, circular differences) by ADMM with
  the splitting ``z = D x``, the x-update by warm-started CG and residual balancing of the penalty
  ``rho`` (Boyd et al. 2011, sec. 3.4.1), the solver BART ``pics`` uses for TV.

Stopping criterion (stated, tested): FISTA stops when the relative image change of one iteration,
``||x_k - x_{k-1}|| / ||x_k||``, is below ``tol`` for every batch item; ADMM when its relative primal
and dual residuals (``||Dx - z|| / max(||Dx||, ||z||)`` and ``rho ||D^H (z_k - z_{k-1})|| / ||rho D^H u||``)
are both below ``tol``. ``max_iter`` caps the iterations; :class:`SolveResult` says whether the
criterion was met and after how many iterations.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from melrecon.physics.cg import conjugate_gradient
from melrecon.physics.operators import LinearOperator
from melrecon.physics.wavelets import ImageWavelet


class SolveResult(NamedTuple):
    """One solve: image ``x`` (like the start), iterations run, whether the criterion was met."""

    x: Tensor
    iterations: int
    converged: bool


def _norms(t: Tensor, batch_dim: int = 0) -> Tensor:
    return t.abs().pow(2).transpose(0, batch_dim).reshape(t.shape[batch_dim], -1).sum(1).sqrt()


def _bshape(t: Tensor) -> tuple[int, ...]:
    return (-1,) + (1,) * (t.ndim - 1)


def operator_norm(op: LinearOperator, like: Tensor, iters: int = 20, seed: int = 0) -> float:
    """Largest eigenvalue of ``A^H A`` (power iteration on a random start shaped like ``like``)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(like.shape, dtype=like.dtype, generator=g).to(like.device)
    val = 1.0
    for _ in range(iters):
        x = op.gram(x)
        val = float(_norms(x).max())
        x = x / max(val, 1e-30)
    return val


def soft_threshold(x: Tensor, thresh: float) -> Tensor:
    """Complex soft-thresholding: shrink magnitudes by ``thresh``, keep phases."""
    mag = x.abs()
    return x * (mag - thresh).clamp_min(0) / mag.clamp_min(1e-30)


def fista_l1_wavelet(op: LinearOperator, kspace: Tensor, lam: float, axes: Sequence[int], x0: Tensor,
                     wave_name: str = "db4", levels: int | None = None, spins: int = 8,
                     tol: float = 1e-4, max_iter: int = 1000, seed: int = 0) -> SolveResult:
    """L1-wavelet reconstruction by FISTA (see the module doc); ``axes`` are the image axes of ``x0``.

    ``spins`` > 1: cycle spinning as a proximal average. The prox step averages the wavelet
    soft-thresholding at ``spins`` fixed circular shifts (no shift and ``spins - 1`` seeded random
    ones, each below ``2**levels``). An average of proximal maps is the proximal map of a convex
    function (the proximal average), so this is FISTA on a fixed convex, shift-robust problem and
    converges like it; ``spins = 1`` is the plain decimated transform.
    """
    wav = ImageWavelet(x0.shape, axes, wave_name=wave_name, levels=levels)
    step = 1.0 / max(operator_norm(op, x0), 1e-12)
    aty = op.H(kspace)
    rng = np.random.default_rng(seed)
    spins = 1 if wav.levels == 0 else max(int(spins), 1)
    shifts = [[0] * len(wav.axes)] + [[int(s) for s in rng.integers(0, 2 ** wav.levels, len(wav.axes))]
                                      for _ in range(spins - 1)]

    def prox_one(v: np.ndarray, shift: list[int]) -> np.ndarray:
        v = np.roll(v, shift, wav.axes)
        c = torch.from_numpy(wav.forward(v))
        return np.roll(wav.adjoint(soft_threshold(c, lam * step).numpy()), [-s for s in shift], wav.axes)

    def prox(v: Tensor) -> Tensor:
        arr = v.detach().cpu().numpy()
        out = sum(prox_one(arr, s) for s in shifts) / len(shifts)
        return torch.from_numpy(np.ascontiguousarray(out)).to(v.device, v.dtype)

    x, z, t = x0.clone(), x0.clone(), 1.0
    it, converged = 0, False
    while it < max_iter and not converged:
        x_new = prox(z - step * (op.gram(z) - aty))
        t_new = (1 + (1 + 4 * t * t) ** 0.5) / 2
        z = x_new + ((t - 1) / t_new) * (x_new - x)
        change = _norms(x_new - x) / _norms(x_new).clamp_min(1e-30)
        x, t, it = x_new, t_new, it + 1
        converged = bool((change < tol).all())
    return SolveResult(x, it, converged)


def finite_differences(x: Tensor, axes: Sequence[int]) -> Tensor:
    """``D x``: circular forward differences along ``axes``, stacked on a new leading axis."""
    return torch.stack([torch.roll(x, -1, a) - x for a in axes])


def finite_differences_adjoint(d: Tensor, axes: Sequence[int]) -> Tensor:
    """``D^H d`` for :func:`finite_differences`."""
    return sum(torch.roll(d[i], 1, a) - d[i] for i, a in enumerate(axes))


def admm_tv(op: LinearOperator, kspace: Tensor, lam: float, axes: Sequence[int], x0: Tensor,
            rho: float | None = None, tol: float = 1e-3, max_iter: int = 500, cg_iters: int = 10,
            balance: float = 10.0) -> SolveResult:
    """Anisotropic-TV reconstruction by ADMM (see the module doc); ``axes`` are the image axes of ``x0``."""
    axes = tuple(int(a) % x0.ndim for a in axes)
    D = lambda v: finite_differences(v, axes)  # noqa: E731
    DH = lambda d: finite_differences_adjoint(d, axes)  # noqa: E731
    aty = op.H(kspace)
    rho = float(rho if rho is not None else max(10.0 * lam, 1e-6))
    x = x0.clone()
    z = D(x)
    u = torch.zeros_like(z)
    it, converged = 0, False
    while it < max_iter and not converged:
        r_rho = rho
        x = conjugate_gradient(lambda v: op.gram(v) + r_rho * DH(D(v)), aty + rho * DH(z - u), x0=x,
                               tol=1e-6, max_iter=cg_iters).x
        dx = D(x)
        z_old = z
        z = soft_threshold(dx + u, lam / rho)
        u = u + dx - z
        it += 1
        primal = _norms(dx - z, 1)
        dual = rho * _norms(DH(z - z_old))
        eps_pri = tol * torch.maximum(_norms(dx, 1), _norms(z, 1)).clamp_min(1e-30)
        eps_dual = tol * (rho * _norms(DH(u))).clamp_min(1e-30)
        converged = bool(((primal < eps_pri) & (dual < eps_dual)).all())
        # residual balancing: keep the two residuals' relative sizes within `balance` of each other
        p_rel, d_rel = float((primal / eps_pri).max()), float((dual / eps_dual).max())
        if p_rel > balance * d_rel:
            rho, u = rho * 2.0, u / 2.0
        elif d_rel > balance * p_rel:
            rho, u = rho / 2.0, u * 2.0
    return SolveResult(x, it, converged)
