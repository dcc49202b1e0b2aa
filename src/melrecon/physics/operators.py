"""Linear operators that compose: ``A.H``, ``A.gram``, ``A @ B``, ``A + B``, ``c * A``, ``A + c``.

The operator algebra of mrpro and SigPy, reduced to what reconstruction needs. An operator
maps a tensor to a tensor (``A(x)``) and knows its adjoint (``A.adjoint(y)``, or the operator
``A.H``); sums, scalar multiples and products of operators are operators. A scalar on either
side of ``+`` or ``-`` is that multiple of the identity, so a data-consistency layer writes
``op.gram + lam`` for ``A^H A + lam I`` and hands it to conjugate gradient as it is.

Scalars are Python numbers or 0-dim tensors (e.g. a learned weight cast to the image dtype);
they multiply as ``c * x``. Nothing is materialised: every operator is applied on the fly.
"""

from __future__ import annotations

from numbers import Number
from typing import Union

from torch import Tensor

Scalar = Union[Number, Tensor]


def _is_scalar(c: object) -> bool:
    return isinstance(c, Number) or (isinstance(c, Tensor) and c.ndim == 0)


def _conj(c: Scalar) -> Scalar:
    if isinstance(c, Tensor):
        return c.conj()
    return c.conjugate()


class LinearOperator:
    """Base class: subclasses implement ``forward`` and ``adjoint``; ``normal`` (A^H A) may be
    overridden by a fused version."""

    def forward(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def adjoint(self, y: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def normal(self, x: Tensor) -> Tensor:
        """``A^H A x``."""
        return self.adjoint(self.forward(x))

    def __call__(self, x: Tensor) -> Tensor:
        return self.forward(x)

    @property
    def H(self) -> LinearOperator:
        """The adjoint operator ``A^H``."""
        return AdjointOperator(self)

    @property
    def gram(self) -> LinearOperator:
        """The normal operator ``A^H A`` (Hermitian), applied by ``normal``."""
        return GramOperator(self)

    # ---------------------------------------------------------------- algebra
    def __matmul__(self, other: LinearOperator) -> LinearOperator:
        if isinstance(other, LinearOperator):
            return ProductOperator(self, other)
        return NotImplemented

    def __add__(self, other: LinearOperator | Scalar) -> LinearOperator:
        if isinstance(other, LinearOperator):
            return SumOperator(self, other)
        if _is_scalar(other):
            return SumOperator(self, ScaledIdentity(other))
        return NotImplemented

    __radd__ = __add__  # addition commutes, in floating point too

    def __mul__(self, c: Scalar) -> LinearOperator:
        if _is_scalar(c):
            return ScaledOperator(c, self)
        return NotImplemented

    __rmul__ = __mul__

    def __neg__(self) -> LinearOperator:
        return ScaledOperator(-1, self)

    def __sub__(self, other: LinearOperator | Scalar) -> LinearOperator:
        return self + (-other)

    def __rsub__(self, other: Scalar) -> LinearOperator:
        return (-self) + other


class AdjointOperator(LinearOperator):
    """``A^H`` of an operator ``A``."""

    def __init__(self, op: LinearOperator) -> None:
        self.op = op

    def forward(self, x: Tensor) -> Tensor:
        return self.op.adjoint(x)

    def adjoint(self, y: Tensor) -> Tensor:
        return self.op.forward(y)

    @property
    def H(self) -> LinearOperator:
        return self.op


class GramOperator(LinearOperator):
    """``A^H A`` of an operator ``A`` (its own adjoint), applied by ``A.normal``."""

    def __init__(self, op: LinearOperator) -> None:
        self.op = op

    def forward(self, x: Tensor) -> Tensor:
        return self.op.normal(x)

    adjoint = forward


class ScaledIdentity(LinearOperator):
    """``c I``."""

    def __init__(self, c: Scalar) -> None:
        self.c = c

    def forward(self, x: Tensor) -> Tensor:
        return self.c * x

    def adjoint(self, y: Tensor) -> Tensor:
        return _conj(self.c) * y


class ScaledOperator(LinearOperator):
    """``c A``."""

    def __init__(self, c: Scalar, op: LinearOperator) -> None:
        self.c, self.op = c, op

    def forward(self, x: Tensor) -> Tensor:
        return self.c * self.op.forward(x)

    def adjoint(self, y: Tensor) -> Tensor:
        return _conj(self.c) * self.op.adjoint(y)


class SumOperator(LinearOperator):
    """``A + B`` (same input and output spaces)."""

    def __init__(self, a: LinearOperator, b: LinearOperator) -> None:
        self.a, self.b = a, b

    def forward(self, x: Tensor) -> Tensor:
        return self.a.forward(x) + self.b.forward(x)

    def adjoint(self, y: Tensor) -> Tensor:
        return self.a.adjoint(y) + self.b.adjoint(y)


class ProductOperator(LinearOperator):
    """``A @ B``: apply B, then A."""

    def __init__(self, a: LinearOperator, b: LinearOperator) -> None:
        self.a, self.b = a, b

    def forward(self, x: Tensor) -> Tensor:
        return self.a.forward(self.b.forward(x))

    def adjoint(self, y: Tensor) -> Tensor:
        return self.b.adjoint(self.a.adjoint(y))


__all__ = [
    "AdjointOperator",
    "GramOperator",
    "LinearOperator",
    "ProductOperator",
    "ScaledIdentity",
    "ScaledOperator",
    "SumOperator",
]
