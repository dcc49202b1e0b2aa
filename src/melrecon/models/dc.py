"""Data-consistency (DC) layers with their inverses, for the MEL contract.

Both layers read ``data``: a :class:`SenseData` (SENSE operator ``A``, ``A^H b`` and the CG
log of the call), built once per network call by :class:`melrecon.models.base.UnrolledBase`.

- :class:`ProximalDC` (MoDL): ``y = (A^H A + lam I)^{-1} (A^H b + lam z)``, solved by CG
  to a tolerance, with an implicit backward (a second CG solve with the same matrix; no
  autograd through the iterations) and the closed-form inverse
  ``z = ((A^H A + lam I) y - A^H b) / lam``.
- :class:`GradientStepDC`: ``y = x - a A^H (A x - b)`` with ``0 < a < a_max``; its inverse
  solves ``(I - a A^H A) x = y - a A^H b`` by CG (positive definite when a ||A||^2 < 1,
  which holds for ``a_max <= 1`` and maps normalised so that ``sum_c |S_c|^2 <= 1``).

The learned weight is kept positive: ``lam = softplus(raw)`` (default) or ``exp(raw)``;
the gradient step ``a = a_max * sigmoid(raw)``.

Every CG solve of the proximal step (forward and implicit backward) is recorded in the call's
``data.cg`` (:class:`melrecon.physics.cg.CGLog`): the network logs it, and the closed-form
inverse reports ``converged=False`` after an unconverged solve, since it inverts the *exact*
proximal step. For the same reason a CG residual r in the forward solve becomes an input
error r / lam, so the default CG tolerance is tight (1e-7 in single, 1e-13 in double
precision). Gradients with respect to the data (k-space, maps) are not computed by these
layers.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from melrecon.mel.invertible import InvertibleLayer, InvertResult
from melrecon.physics.cg import CGLog, conjugate_gradient
from melrecon.physics.sense import SenseOperator


@dataclass
class SenseData:
    """Per-call context of the DC layers: the operator, ``A^H b`` (image shape) and the log of
    the call's CG solves (forward and backward)."""

    op: SenseOperator
    aty: Tensor
    cg: CGLog = field(default_factory=CGLog)

    @classmethod
    def from_kspace(cls, op: SenseOperator, kspace: Tensor) -> SenseData:
        """The context of k-space ``b`` (B, C, ...) under ``op``: ``A^H b`` and an empty log."""
        return cls(op, op.H(kspace))


def cg_tolerance(dtype: torch.dtype) -> float:
    """Default CG tolerance for a (complex) dtype: tight, see module docstring."""
    real = dtype.to_real() if dtype.is_complex else dtype
    return 1e-13 if real == torch.float64 else 1e-7


def _positive(raw: Tensor, kind: str) -> Tensor:
    return F.softplus(raw) if kind == "softplus" else torch.exp(raw)


def inverse_positive(value: float, kind: str = "softplus") -> float:
    """The raw parameter whose ``softplus`` (or ``exp``) is ``value`` (> 0)."""
    if not value > 0:
        raise ValueError(f"a positive value is required, got {value!r}")
    if kind == "softplus":
        # softplus^{-1}(v) = log(expm1(v)), stable for large v
        return value + math.log(-math.expm1(-value))
    return math.log(value)


class DataConsistency(InvertibleLayer):
    """A DC layer: ``forward(x, data)`` and ``inverse(y, data)`` with ``data`` a
    :class:`SenseData`, and ``learned()``: its learned scalars by name, for logging."""

    def learned(self) -> dict[str, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError


class _ProxSolve(torch.autograd.Function):
    """y = (A^H A + lam I)^{-1}(aty + lam z) by CG, with implicit (adjoint-solve) backward.

    For M = A^H A + lam I (Hermitian), dy = M^{-1}(lam dz + dlam (z - y)), hence
    grad_z = lam M^{-1} g and grad_lam = Re <M^{-1} g, z - y> (lam real, scalar).
    Both solves are recorded in ``log``.
    """

    @staticmethod
    def forward(ctx, z: Tensor, lam: Tensor, op: SenseOperator, aty: Tensor, tol: float, max_iter: int, log: CGLog):
        lam_c = lam.detach().to(z.dtype)
        res = log.record(conjugate_gradient(op.gram + lam_c, aty + lam_c * z, x0=z, tol=tol, max_iter=max_iter))
        ctx.save_for_backward(z, res.x, lam)
        ctx.op, ctx.tol, ctx.max_iter, ctx.log = op, tol, max_iter, log
        return res.x

    @staticmethod
    @torch.autograd.function.once_differentiable  # the adjoint solve is not itself differentiated
    def backward(ctx, g: Tensor):
        z, y, lam = ctx.saved_tensors
        lam_c = lam.detach().to(g.dtype)
        w = ctx.log.record(conjugate_gradient(ctx.op.gram + lam_c, g, tol=ctx.tol, max_iter=ctx.max_iter)).x
        grad_z = lam_c * w if ctx.needs_input_grad[0] else None
        grad_lam = None
        if ctx.needs_input_grad[1]:
            grad_lam = torch.real(torch.sum(w.conj() * (z - y))).to(lam.dtype).reshape(lam.shape)
        return grad_z, grad_lam, None, None, None, None, None


class ProximalDC(DataConsistency):
    """MoDL proximal data consistency (see module docstring).

    Args:
        lam_init: initial lam (> 0); the MEL paper uses 0.05.
        learn_lam: whether lam is a learned parameter.
        positivity: "softplus" or "exp" parametrisation of lam.
        cg_tol: CG relative tolerance (None: by dtype).  cg_max_iter: CG cap.

    Shapes: z, y complex with the image layout of ``data.op``.
    """

    def __init__(
        self,
        lam_init: float = 0.05,
        learn_lam: bool = True,
        positivity: str = "softplus",
        cg_tol: float | None = None,
        cg_max_iter: int = 100,
    ) -> None:
        super().__init__()
        if not (isinstance(lam_init, (int, float)) and lam_init > 0):
            raise ValueError(f"dc.lam_init must be > 0, got {lam_init!r}")
        if positivity not in ("softplus", "exp"):
            raise ValueError(f"dc.positivity must be 'softplus' or 'exp', got {positivity!r}")
        if cg_tol is not None and not cg_tol > 0:
            raise ValueError(f"dc.cg_tol must be positive or None, got {cg_tol!r}")
        if cg_max_iter < 1:
            raise ValueError(f"dc.cg_max_iter must be >= 1, got {cg_max_iter!r}")
        self.lam_init = float(lam_init)
        self.positivity = positivity
        self.cg_tol = cg_tol
        self.cg_max_iter = int(cg_max_iter)
        raw = torch.tensor(inverse_positive(self.lam_init, positivity))
        self.raw_lam = nn.Parameter(raw, requires_grad=learn_lam)
        self._warned = False

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.raw_lam.fill_(inverse_positive(self.lam_init, self.positivity))

    @property
    def lam(self) -> Tensor:
        """The positive weight lam (0-dim real tensor, differentiable in raw_lam)."""
        return _positive(self.raw_lam, self.positivity)

    def learned(self) -> dict[str, Tensor]:
        return {"lam": self.lam}

    def _tol(self, dtype: torch.dtype) -> float:
        return self.cg_tol if self.cg_tol is not None else cg_tolerance(dtype)

    def forward(self, z: Tensor, data: SenseData) -> Tensor:
        y = _ProxSolve.apply(z, self.lam, data.op, data.aty, self._tol(z.dtype), self.cg_max_iter, data.cg)
        if not data.cg.converged and not self._warned:
            self._warned = True
            warnings.warn(
                f"ProximalDC: CG stopped at dc.cg_max_iter={self.cg_max_iter} with relative residual "
                f"{data.cg.residual:.3g} > dc.cg_tol={self._tol(z.dtype):.3g} "
                f"(lam={float(self.lam):.3g}); raise model.dc.cg_max_iter (logged as dc/cg_converged)",
                stacklevel=2,
            )
        return y

    def inverse(self, y: Tensor, data: SenseData) -> InvertResult:
        with torch.no_grad():
            lam = self.lam.to(y.dtype)
            z = ((data.op.gram + lam)(y) - data.aty) / lam
        # the closed form inverts the exact solve: after an unconverged CG in this call the
        # engine must recompute from an anchor instead
        return InvertResult(z, 0.0, 0, data.cg.converged)


class GradientStepDC(DataConsistency):
    """Gradient-step data consistency ``y = x - a A^H(A x - b)`` (see module docstring).

    Args:
        step_init: initial step a, in (0, step_max).  step_max: upper bound of a (<= 1).
        learn_step: whether a is learned.
        inv_tol: CG tolerance of the inverse (None: by dtype).  inv_max_iter: CG cap.
    """

    def __init__(
        self,
        step_init: float = 0.5,
        step_max: float = 0.99,
        learn_step: bool = True,
        inv_tol: float | None = None,
        inv_max_iter: int = 100,
    ) -> None:
        super().__init__()
        if not (0 < step_max <= 1):
            raise ValueError(f"dc.step_max must be in (0, 1], got {step_max!r}")
        if not (0 < step_init < step_max):
            raise ValueError(f"dc.step_init must be in (0, step_max={step_max}), got {step_init!r}")
        if inv_tol is not None and not inv_tol > 0:
            raise ValueError(f"dc.inv_tol must be positive or None, got {inv_tol!r}")
        self.step_init = float(step_init)
        self.step_max = float(step_max)
        self.inv_tol = inv_tol
        self.inv_max_iter = int(inv_max_iter)
        p = self.step_init / self.step_max
        self.raw_step = nn.Parameter(torch.tensor(math.log(p / (1 - p))), requires_grad=learn_step)

    def reset_parameters(self) -> None:
        p = self.step_init / self.step_max
        with torch.no_grad():
            self.raw_step.fill_(math.log(p / (1 - p)))

    @property
    def step(self) -> Tensor:
        """The step size a in (0, step_max) (0-dim real tensor, differentiable in raw_step)."""
        return self.step_max * torch.sigmoid(self.raw_step)

    def learned(self) -> dict[str, Tensor]:
        return {"step": self.step}

    def forward(self, x: Tensor, data: SenseData) -> Tensor:
        a = self.step.to(x.dtype)
        return x - a * (data.op.gram(x) - data.aty)

    def inverse(self, y: Tensor, data: SenseData) -> InvertResult:
        tol = self.inv_tol if self.inv_tol is not None else cg_tolerance(y.dtype)
        with torch.no_grad():
            a = self.step.to(y.dtype)
            res = conjugate_gradient(1 - a * data.op.gram, y - a * data.aty, x0=y, tol=tol, max_iter=self.inv_max_iter)
        final = float(res.residuals[-1].max())
        return InvertResult(res.x, final, res.iterations, res.converged)
