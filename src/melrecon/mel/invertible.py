"""The InvertibleLayer contract and generic inversion helpers (no MRI here).

A *state* is either one tensor or a tuple of tensors (a two-stream state, as in
reversible/coupling layers).  A layer maps a state ``x`` to ``y = f(x; data, params)``:

``forward(x, data) -> y``
    Differentiable.  Used for the forward pass and, during a MEL backward pass, to rebuild
    the autograd graph of this one layer.  ``data`` is opaque per-step context shared by
    every layer of a chain (for MRI: the SENSE operator and A^H b); the engine never
    differentiates with respect to it.  The output has the same structure as the input
    (tensor -> tensor, tuple of k tensors -> tuple of k tensors).

``inverse(y, data) -> InvertResult``
    Called under ``torch.no_grad()``.  Recomputes ``x`` from ``y``: in closed form, or
    iteratively to a tolerance with an iteration cap.  Returns
    ``InvertResult(x, residual, iterations, converged)`` where ``residual`` is the relative
    residual the layer achieved (``||f(x) - y|| / ||y||`` or the layer's own equivalent;
    0.0 for a closed form), ``iterations`` the number of iterations it used (0 for a closed
    form) and ``converged`` whether it met its tolerance.  A layer that returns
    ``converged=False`` makes the engine fall back to a forward recompute from the nearest
    stored anchor (with one warning); it must never pretend to have converged.

Optional fused hook (RevNet-style layers):

``inverse_and_backward(y, grad_y, data) -> FusedResult``
    A layer whose inversion naturally rebuilds the graph it needs for its backward pass
    (additive coupling: ``x2 = y2 - G(y1)`` computes ``G(y1)``, which the backward pass
    needs again) may provide this method.  It is called by the engine *with grad enabled*
    and must return ``FusedResult(x, grad_x, param_grads, residual, iterations, converged)``:

    - ``x``: the recomputed input (detached, same structure as ``y``);
    - ``grad_x``: the gradient of the loss with respect to ``x`` (same structure; ``None``
      entries are read as zeros);
    - ``param_grads``: a sequence of ``(parameter, gradient or None)`` pairs for the
      layer's parameters that require grad (the engine sums gradients of parameters that
      are shared between layers by identity);
    - ``residual``, ``iterations``, ``converged``: as in ``InvertResult``.

    When a layer does not provide it, the engine does ``inverse`` (no grad), then re-runs
    ``forward`` on the detached, grad-requiring ``x`` and calls ``torch.autograd.grad``
    with respect to ``x`` and the layer's parameters.  The engine still uses plain
    ``forward``/``inverse`` for layers whose input is a stored anchor and to measure drift,
    so a layer with the fused hook must implement ``inverse`` too.

Layers are ``torch.nn.Module``s; their parameters are found with ``layer.parameters()``.
Anything that changes the layer's function between the forward pass and the recompute
(spectral-norm power iterations, dropout masks, batch-norm running statistics) is frozen
for the duration of a step by :mod:`melrecon.mel.freeze`; layers with their own step-level
state should expose ``refresh_()`` (advance it once per training step, under no-grad) and
must not change that state inside ``forward``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Union

import torch
from torch import Tensor, nn

State = Union[Tensor, tuple[Tensor, ...]]


class InvertResult(NamedTuple):
    """Result of ``InvertibleLayer.inverse``.

    x: the recomputed input state.  residual: relative residual (float, 0.0 for closed
    forms).  iterations: iterations used (0 for closed forms).  converged: whether the
    layer met its own tolerance.
    """

    x: State
    residual: float = 0.0
    iterations: int = 0
    converged: bool = True


class FusedResult(NamedTuple):
    """Result of the optional ``InvertibleLayer.inverse_and_backward`` hook (see module doc)."""

    x: State
    grad_x: Any  # State with possible None entries
    param_grads: Sequence[tuple[nn.Parameter, Tensor | None]]
    residual: float = 0.0
    iterations: int = 0
    converged: bool = True


class InvertibleLayer(nn.Module):
    """Base class of the contract (see module docstring).  Subclasses implement
    ``forward`` and ``inverse``; ``inverse_and_backward`` is optional."""

    def forward(self, x: State, data: Any) -> State:  # pragma: no cover - abstract
        raise NotImplementedError

    def inverse(self, y: State, data: Any) -> InvertResult:  # pragma: no cover - abstract
        raise NotImplementedError


def has_fused_backward(layer: nn.Module) -> bool:
    """Whether ``layer`` provides the optional ``inverse_and_backward`` hook."""
    return callable(getattr(layer, "inverse_and_backward", None))


class SequentialInvertible(InvertibleLayer):
    """Composition of invertible layers, applied in order; inverted in reverse order.

    ``residual`` of the inverse is the largest residual of the parts, ``iterations`` their
    sum, ``converged`` the conjunction.  Used to make one unroll (CNN then DC) one layer of
    a chain, so that anchors and the MEL recompute work per unroll.
    """

    def __init__(self, *layers: nn.Module) -> None:
        super().__init__()
        if not layers:
            raise ValueError("SequentialInvertible needs at least one layer")
        self.parts = nn.ModuleList(layers)

    def forward(self, x: State, data: Any) -> State:
        for part in self.parts:
            x = part(x, data)
        return x

    def inverse(self, y: State, data: Any) -> InvertResult:
        residual, iterations, converged = 0.0, 0, True
        for part in reversed(self.parts):
            res = part.inverse(y, data)
            y = res.x
            residual = max(residual, float(res.residual))
            iterations += int(res.iterations)
            converged = converged and bool(res.converged)
            if not converged:
                break
        return InvertResult(y, residual, iterations, converged)


# --------------------------------------------------------------------------- state helpers


def as_tuple(x: State) -> tuple[Tensor, ...]:
    """A state as a tuple of tensors."""
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def like(template: State, parts: Sequence[Tensor]) -> State:
    """Rebuild a state with the structure of ``template`` from a sequence of tensors."""
    return tuple(parts) if isinstance(template, (tuple, list)) else parts[0]


def state_norm(x: State) -> Tensor:
    """Euclidean norm of the whole state (all parts, complex entries by modulus)."""
    return torch.sqrt(sum(torch.sum(torch.abs(t) ** 2) for t in as_tuple(x)))


def relative_error(a: State, b: State) -> float:
    """``||a - b|| / ||b||`` over the whole state (0 when both are zero)."""
    num = state_norm(tuple(p - q for p, q in zip(as_tuple(a), as_tuple(b))))
    den = state_norm(b)
    if float(den) == 0.0:
        return float(num)
    return float(num / den)


def default_tolerance(dtype: torch.dtype) -> float:
    """Default relative tolerance of iterative inverses for a (real or complex) dtype:
    a few hundred ulps, i.e. 1e-6 in single and 1e-12 in double precision."""
    real = torch.empty((), dtype=dtype).real.dtype if dtype.is_complex else dtype
    if real == torch.float64:
        return 1e-12
    if real == torch.float32:
        return 1e-6
    return 1e-3


# --------------------------------------------------------------------------- fixed point


class FixedPointResult(NamedTuple):
    x: Tensor
    residual: float
    iterations: int
    converged: bool


def invert_residual_map(
    residual_fn: Callable[[Tensor], Tensor],
    y: Tensor,
    tol: float,
    max_iter: int,
    anderson: int = 0,
) -> FixedPointResult:
    """Solve ``x + R(x) = y`` for x by the fixed-point iteration ``x <- y - R(x)``.

    Converges at rate Lip(R) when Lip(R) < 1.  Stops when the relative residual
    ``||x + R(x) - y|| / ||y||`` is at most ``tol`` or after ``max_iter`` evaluations of R.
    ``anderson`` > 0 enables Anderson acceleration with that memory (type II, on the
    real view of complex tensors); 0 is the plain iteration.

    y: any shape, real or complex.  Returns the solution, its relative residual, the number
    of R evaluations and whether ``tol`` was met.
    """
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    ynorm = float(state_norm(y))
    scale = ynorm if ynorm > 0 else 1.0
    x = y
    hist_x: list[Tensor] = []  # Anderson: past g(x) values and residuals
    hist_f: list[Tensor] = []
    res = float("inf")
    for it in range(1, max_iter + 1):
        gx = y - residual_fn(x)  # fixed-point map g(x); residual f = g(x) - x
        f = gx - x
        res = float(state_norm(f)) / scale
        if res <= tol:
            return FixedPointResult(x, res, it, True)
        if anderson > 0:
            hist_x.append(gx)
            hist_f.append(f)
            if len(hist_x) > anderson + 1:
                hist_x.pop(0)
                hist_f.pop(0)
            x = _anderson_step(hist_x, hist_f)
        else:
            x = gx
    # out of iterations: x is one update past the last iterate checked, and ``res`` is that
    # iterate's residual (x's own is at most Lip(R) * res for the plain iteration; Anderson
    # gives no such bound); the tolerance was not met, and the caller is told so
    return FixedPointResult(x, res, max_iter, False)


def _anderson_step(gs: list[Tensor], fs: list[Tensor]) -> Tensor:
    """Anderson (type II) mixing: x = sum_i a_i g_i with sum a_i = 1 minimising
    ||sum a_i f_i||, solved through differences of the residuals in real arithmetic."""
    if len(fs) == 1:
        return gs[-1]
    real = lambda t: torch.view_as_real(t).reshape(-1) if t.is_complex() else t.reshape(-1)  # noqa: E731
    df = torch.stack([real(fs[i + 1] - fs[i]) for i in range(len(fs) - 1)], dim=1)
    dg = [gs[i + 1] - gs[i] for i in range(len(gs) - 1)]
    # least-squares gamma = argmin ||f_last - dF gamma|| (small normal equations, regularised)
    gram = df.T @ df
    gram = gram + 1e-10 * torch.trace(gram) / gram.shape[0] * torch.eye(
        gram.shape[0], dtype=gram.dtype, device=gram.device
    )
    gamma = torch.linalg.solve(gram, df.T @ real(fs[-1]))
    x = gs[-1]
    for j, d in enumerate(dg):
        x = x - gamma[j].to(x.real.dtype if x.is_complex() else x.dtype) * d
    return x
