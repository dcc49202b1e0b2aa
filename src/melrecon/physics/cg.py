"""Batched conjugate gradient for Hermitian positive-definite systems (CG-SENSE, MoDL DC).

Solves ``N x = b`` for every batch item independently, where ``N`` is e.g. ``op.gram + lam``
(``A^H A + lam I``, :mod:`melrecon.physics.operators`) or any shape-preserving callable. Items
stop updating once their relative residual ``|r| / |b|`` falls below ``tol``; the solver
returns when all items have converged or ``max_iter`` is reached, and says what it did
(:class:`CGResult`). :class:`CGLog` sums what several solves did (e.g. the forward and
implicit-backward solves of one training step).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from melrecon.physics.operators import LinearOperator


class CGResult(NamedTuple):
    """Solution and convergence record.

    Attributes:
        x: the solution, shape of ``rhs``.
        residuals: relative residual norms ``|b - N x_k| / |b|``, shape (iterations + 1, B).
        iterations: iterations run.
        converged: whether every batch item reached ``tol``.
    """

    x: torch.Tensor
    residuals: torch.Tensor
    iterations: int
    converged: bool


@dataclass
class CGLog:
    """What a group of CG solves did: their number, total iterations, whether every one
    reached its tolerance, and the worst final relative residual."""

    solves: int = 0
    iterations: int = 0
    converged: bool = True
    residual: float = 0.0

    def record(self, res: CGResult) -> CGResult:
        """Add one solve's result; returns it unchanged."""
        self.solves += 1
        self.iterations += res.iterations
        self.converged = self.converged and res.converged
        self.residual = max(self.residual, float(res.residuals[-1].max()))
        return res


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Real part of <a, b> per batch item (axis 0): shape (B,)."""
    return (a.conj() * b).real.reshape(a.shape[0], -1).sum(dim=1)


def conjugate_gradient(
    normal_op: Callable[[torch.Tensor], torch.Tensor],
    rhs: torch.Tensor,
    x0: torch.Tensor | None = None,
    tol: float = 1e-6,
    max_iter: int = 50,
) -> CGResult:
    """Conjugate gradient on ``normal_op(x) = rhs``, batched over axis 0.

    Args:
        normal_op: Hermitian positive-definite linear map, shape-preserving (an operator
            such as ``op.gram + lam``, or any callable).
        rhs: right-hand side, shape (B, ...), real or complex.
        x0: initial guess (default: zeros).
        tol: relative residual at which an item stops.
        max_iter: iteration cap.
    """
    if max_iter < 0:
        raise ValueError(f"max_iter must be >= 0, got {max_iter}")
    if tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    if x0 is not None and x0.shape != rhs.shape:
        raise ValueError(f"x0 shape {tuple(x0.shape)} differs from rhs shape {tuple(rhs.shape)}")
    bshape = (-1,) + (1,) * (rhs.ndim - 1)
    x = torch.zeros_like(rhs) if x0 is None else x0.clone()
    r = rhs - normal_op(x) if x0 is not None else rhs.clone()
    p = r.clone()
    rr = _dot(r, r)
    b_norm = _dot(rhs, rhs).sqrt().clamp_min(torch.finfo(rr.dtype).tiny)
    history = [rr.sqrt() / b_norm]
    active = history[0] > tol
    it = 0
    while it < max_iter and bool(active.any()):
        ap = normal_op(p)
        pap = _dot(p, ap)
        alpha = torch.where(active, rr / torch.where(active, pap, torch.ones_like(pap)), torch.zeros_like(rr))
        x = x + alpha.reshape(bshape) * p
        r = r - alpha.reshape(bshape) * ap
        rr_new = _dot(r, r)
        beta = torch.where(active, rr_new / torch.where(active, rr, torch.ones_like(rr)), torch.zeros_like(rr))
        p = torch.where(active.reshape(bshape), r + beta.reshape(bshape) * p, p)
        rr = torch.where(active, rr_new, rr)
        it += 1
        history.append(rr.sqrt() / b_norm)
        active = active & (history[-1] > tol)
    residuals = torch.stack(history)
    return CGResult(x=x, residuals=residuals, iterations=it, converged=not bool(active.any()))


def cg_sense(
    op: LinearOperator, kspace: torch.Tensor, lam: float = 0.0, tol: float = 1e-6, max_iter: int = 50
) -> CGResult:
    """CG-SENSE (the non-learned baseline): solve ``(A^H A + lam I) x = A^H y`` from x = 0 for
    a SENSE operator ``op`` and k-space ``y``; ``lam`` >= 0 is a Tikhonov weight."""
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    return conjugate_gradient(op.gram + lam, op.H(kspace), tol=tol, max_iter=max_iter)
