"""Classical reconstructions with the networks' interface, for the studies' baselines and
``melrecon reconstruct --method``.

Each baseline is a parameter-free ``torch.nn.Module`` with the networks' signature
``forward(x0, kspace, maps, mask) -> image like x0`` (DESIGN.md layouts), so a study applies it
to a test file exactly as it applies a trained network (:func:`melrecon.study.adapter.reconstruct_file`):
the same evaluation dataset, hence the same per-file mask, normalisation, stitching and
data range.

- :class:`ZeroFilled`: ``A^H y`` (what the networks start from).
- :class:`CGSense`: Tikhonov-regularised SENSE, ``(A^H A + lam I) x = A^H y`` by conjugate gradient
  to relative residual ``tol`` (:func:`melrecon.physics.cg.cg_sense`).
- :class:`L1Wavelet`: ``min_x 1/2 ||A x - y||^2 + lam ||W x||_1``, ``W`` an orthonormal Daubechies
  wavelet over the *image* axes only ((x, y, z) for volumes, (x, y) of every frame for cine) with
  the levels the sizes allow, cycle-spun, by FISTA (:func:`melrecon.physics.cs.fista_l1_wavelet`).
- :class:`TotalVariation`: ``min_x 1/2 ||A x - y||^2 + lam sum_a |D_a x|`` (anisotropic TV over
  (x, y, z) for volumes, (t, x, y) for cine) by ADMM (:func:`melrecon.physics.cs.admm_tv`).

Every iterative baseline runs to its stated criterion (``tol``) with an iteration cap
(``max_iter``) and records each solve in ``solves`` (iterations, converged), which the study
reports. The compressed-sensing solvers start from ``init_iters`` CG-SENSE iterations (the
start does not change the minimiser; it saves iterations).

``backend: bart`` runs the same three problems through BART's ``pics`` where ``bart`` is installed
(:mod:`melrecon.physics.bart`).

Images are in the dataset's normalised units (targets O(1), data range 1), so one ``lam``
grid serves every file; a study picks ``lam`` on the validation split.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from melrecon.physics import bart as _bart
from melrecon.physics.cg import cg_sense
from melrecon.physics.cs import SolveResult, admm_tv, fista_l1_wavelet
from melrecon.physics.sense import SenseOperator

KINDS = ("volume3d", "cine")
METHODS = ("zero_filled", "cg_sense", "l1_wavelet", "tv")
BACKENDS = ("melrecon", "bart")


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"baseline kind must be one of {KINDS}, got {kind!r}")
    return kind


def image_axes(kind: str, with_time: bool) -> tuple[int, ...]:
    """Axes of the image (B, X, Y, Z) or (B, T, X, Y) a regulariser acts on: every spatial axis,
    and time for cine when ``with_time``."""
    return (1, 2, 3) if kind == "volume3d" or with_time else (2, 3)


class ZeroFilled(nn.Module):
    """``A^H y``: the zero-filled, coil-combined image."""

    solves: list[dict[str, Any]]

    def __init__(self) -> None:
        super().__init__()
        self.solves = []

    def forward(self, x0: Tensor, kspace: Tensor, maps: Tensor, mask: Tensor) -> Tensor:
        return x0


class _Iterative(nn.Module):
    """Shared options and the record of solves (``solves``: one dict per forward call)."""

    def __init__(self, kind: str, lam: float, tol: float, max_iter: int, backend: str = "melrecon") -> None:
        super().__init__()
        if lam < 0 or max_iter < 1 or tol <= 0:
            raise ValueError(f"{type(self).__name__}: lam must be >= 0, max_iter >= 1 and tol > 0, "
                             f"got {lam}, {max_iter}, {tol}")
        if backend not in BACKENDS:
            raise ValueError(f"{type(self).__name__}: backend must be one of {BACKENDS}, got {backend!r}")
        self.kind, self.lam, self.tol, self.max_iter = _check_kind(kind), float(lam), float(tol), int(max_iter)
        self.backend = backend
        self.solves: list[dict[str, Any]] = []

    def record(self, res: SolveResult) -> Tensor:
        converged = None if res.converged is None else bool(res.converged)  # None: backend cannot tell
        self.solves.append({"iterations": int(res.iterations), "converged": converged})
        return res.x

    def forward(self, x0: Tensor, kspace: Tensor, maps: Tensor, mask: Tensor) -> Tensor:
        if self.backend == "bart":
            return self.record(_bart.pics(self.bart_method, self.kind, kspace, maps, mask, self.lam,
                                          self.max_iter, **self.bart_options()))
        return self.record(self.solve(SenseOperator(maps, mask), kspace, x0))

    bart_method = ""

    def bart_options(self) -> dict[str, Any]:
        return {}

    def solve(self, op: SenseOperator, kspace: Tensor, x0: Tensor) -> SolveResult:
        raise NotImplementedError


class CGSense(_Iterative):
    """CG-SENSE with Tikhonov weight ``lam`` (>= 0), run to relative residual ``tol`` (at most
    ``max_iter`` iterations)."""

    bart_method = "cg_sense"

    def __init__(self, lam: float = 0.0, max_iter: int = 200, tol: float = 1e-5, kind: str = "volume3d",
                 backend: str = "melrecon") -> None:
        super().__init__(kind, lam, tol, max_iter, backend)

    def solve(self, op: SenseOperator, kspace: Tensor, x0: Tensor) -> SolveResult:
        res = cg_sense(op, kspace, self.lam, self.tol, self.max_iter)
        return SolveResult(res.x, res.iterations, res.converged)


class _CompressedSensing(_Iterative):
    def __init__(self, kind: str, lam: float, max_iter: int, tol: float, init_iters: int,
                 backend: str) -> None:
        super().__init__(kind, lam, tol, max_iter, backend)
        if init_iters < 0:
            raise ValueError(f"{type(self).__name__}: init_iters must be >= 0, got {init_iters}")
        self.init_iters = int(init_iters)

    def start(self, op: SenseOperator, kspace: Tensor, x0: Tensor) -> Tensor:
        """The SENSE least-squares image after ``init_iters`` CG iterations (``x0`` when 0)."""
        return cg_sense(op, kspace, 0.0, 0.0, self.init_iters).x if self.init_iters else x0


class L1Wavelet(_CompressedSensing):
    """L1-wavelet compressed sensing (see the module doc); ``wave_name`` a PyWavelets name,
    ``levels`` None for what the image sizes allow, ``spins`` shifts averaged (cycle spinning; 1: none)."""

    bart_method = "l1_wavelet"

    def __init__(self, kind: str, lam: float, max_iter: int = 1000, tol: float = 1e-4, init_iters: int = 20,
                 wave_name: str = "db4", levels: int | None = None, spins: int = 8,
                 backend: str = "melrecon") -> None:
        super().__init__(kind, lam, max_iter, tol, init_iters, backend)
        self.wave_name, self.levels, self.spins = wave_name, levels, int(spins)

    def solve(self, op: SenseOperator, kspace: Tensor, x0: Tensor) -> SolveResult:
        return fista_l1_wavelet(op, kspace, self.lam, image_axes(self.kind, False), self.start(op, kspace, x0),
                                wave_name=self.wave_name, levels=self.levels, spins=self.spins,
                                tol=self.tol, max_iter=self.max_iter)


class TotalVariation(_CompressedSensing):
    """Total-variation compressed sensing: over (x, y, z) for volumes, (t, x, y) for cine."""

    bart_method = "tv"

    def __init__(self, kind: str, lam: float, max_iter: int = 500, tol: float = 1e-3, init_iters: int = 20,
                 backend: str = "melrecon") -> None:
        super().__init__(kind, lam, max_iter, tol, init_iters, backend)

    def solve(self, op: SenseOperator, kspace: Tensor, x0: Tensor) -> SolveResult:
        return admm_tv(op, kspace, self.lam, image_axes(self.kind, True), self.start(op, kspace, x0),
                       tol=self.tol, max_iter=self.max_iter)


def build_baseline(method: str, kind: str, lam: float | None = None, **options: Any) -> nn.Module:
    """The baseline ``method`` (``zero_filled`` | ``cg_sense`` | ``l1_wavelet`` | ``tv``) for
    ``kind`` data with regularisation weight ``lam`` and solver ``options``."""
    _check_kind(kind)
    if method == "zero_filled":
        return ZeroFilled()
    if method == "cg_sense":
        return CGSense(lam or 0.0, kind=kind, **options)
    if method == "l1_wavelet":
        return L1Wavelet(kind, float(lam), **options)
    if method == "tv":
        return TotalVariation(kind, float(lam), **options)
    raise ValueError(f"unknown baseline method {method!r}; use one of {', '.join(METHODS)}")
