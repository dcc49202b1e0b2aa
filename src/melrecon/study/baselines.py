"""Classical reconstructions with the networks' interface, for the studies' baselines.

Each baseline is a parameter-free ``torch.nn.Module`` with the networks' signature
``forward(x0, kspace, maps, mask) -> image like x0`` (DESIGN.md layouts), so a study applies it
to a test file exactly as it applies a trained network (:func:`melrecon.study.adapter.reconstruct_file`):
the same evaluation dataset, hence the same per-file mask, normalisation, stitching and
data range.

- :class:`ZeroFilled`: ``A^H y`` (what the networks start from).
- :class:`CGSense`: Tikhonov-regularised SENSE, ``(A^H A + lam I) x = A^H y`` by our
  conjugate gradient (:func:`melrecon.physics.cg.cg_sense`), ``max_iter`` iterations at most.
- :class:`L1Wavelet`: ``min_x 1/2 ||A x - y||^2 + lam ||W x||_1`` with SigPy's Daubechies
  wavelets. volume3d: SigPy's own ``sigpy.mri.app.L1WaveletRecon`` on the 3D k-space of the
  item (the readout is fully sampled, so transforming it back to kx is exact and the 3D problem
  equals ours); cine: the same objective over (t, x, y) (see below).
- :class:`TotalVariation`: ``min_x 1/2 ||A x - y||^2 + lam ||grad x||_1`` (anisotropic TV).
  volume3d: ``sigpy.mri.app.TotalVariationRecon`` over (x, y, z). Cine: that app cannot be
  used as is, because its SENSE operator Fourier-transforms *every* image axis, time
  included, while cine data are Fourier encoded in (x, y) only, with a different ky mask per
  frame. The cine objective is therefore posed with SigPy's operators (maps shared by the
  frames, FFT over (x, y), the k-t mask) and TV over (t, x, y), and solved by the same solver
  the app uses (``sigpy.app.LinearLeastSquares``: primal-dual hybrid gradient for TV,
  accelerated proximal gradient for wavelets).

Both compressed-sensing solvers start from the least-squares (SENSE) solution after
``init_iters`` conjugate-gradient iterations rather than from zero: with SigPy's step sizes
the primal-dual solver moves slowly (its step is 1 / ||[A; G]||^2, and ||G||^2 is about 4 per
differenced axis against ||A||^2 <= 1), so from zero it stops far from the minimiser within a
practical iteration count (tiny synthetic cine, 200 iterations: 18.6 dB from zero, 20.3 dB
from the SENSE start, CG-SENSE alone 19.4 dB). The start does not change the minimiser.

Images are in the dataset's normalised units (targets O(1), data range 1), so one ``lam``
grid serves every file; a study picks ``lam`` on the validation split.
"""

from __future__ import annotations

import numpy as np
import sigpy as sp
import sigpy.mri
import torch
from torch import Tensor, nn

from melrecon.data.npfft import fftc_np
from melrecon.physics.cg import cg_sense
from melrecon.physics.sense import SenseOperator

KINDS = ("volume3d", "cine")


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"baseline kind must be one of {KINDS}, got {kind!r}")
    return kind


class ZeroFilled(nn.Module):
    """``A^H y``: the zero-filled, coil-combined image."""

    def forward(self, x0: Tensor, kspace: Tensor, maps: Tensor, mask: Tensor) -> Tensor:
        return x0


class CGSense(nn.Module):
    """CG-SENSE with Tikhonov weight ``lam`` (>= 0), stopped at relative residual ``tol`` or
    after ``max_iter`` iterations (early stopping is itself a regulariser at lam = 0)."""

    def __init__(self, lam: float = 0.0, max_iter: int = 30, tol: float = 1e-6) -> None:
        super().__init__()
        if lam < 0 or max_iter < 1:
            raise ValueError(f"CGSense: lam must be >= 0 and max_iter >= 1, got {lam}, {max_iter}")
        self.lam, self.max_iter, self.tol = float(lam), int(max_iter), float(tol)

    def forward(self, x0: Tensor, kspace: Tensor, maps: Tensor, mask: Tensor) -> Tensor:
        return cg_sense(SenseOperator(maps, mask), kspace, self.lam, self.tol, self.max_iter).x


def cine_sense_linop(maps: np.ndarray, mask: np.ndarray, frames: int) -> sp.linop.Linop:
    """SigPy operator of one cine item: image (T, X, Y) -> k-space (C, T, X, Y).

    ``A = M F_xy S``: maps (C, 1, X, Y) shared by all frames, centred orthonormal FFT over
    (x, y) (SigPy's convention, the same as ours), k-t mask (1, T, 1, Y).
    """
    coils, _, nx, ny = maps.shape
    S = sp.linop.Multiply((frames, nx, ny), maps)
    F = sp.linop.FFT(S.oshape, axes=(-2, -1))
    M = sp.linop.Multiply(F.oshape, mask)
    return M * F * S


class _SigPyBaseline(nn.Module):
    """Shared loop: one SigPy problem per batch item, numpy complex64 in and out."""

    def __init__(self, kind: str, lam: float, max_iter: int = 100, init_iters: int = 20) -> None:
        super().__init__()
        if lam < 0 or max_iter < 1 or init_iters < 0:
            raise ValueError(f"{type(self).__name__}: lam must be >= 0, max_iter >= 1 and init_iters >= 0, "
                             f"got {lam}, {max_iter}, {init_iters}")
        self.kind, self.lam, self.max_iter = _check_kind(kind), float(lam), int(max_iter)
        self.init_iters = int(init_iters)

    def start(self, A: sp.linop.Linop | None, y: np.ndarray, maps: np.ndarray,
              weights: np.ndarray | None = None) -> np.ndarray | None:
        """The SENSE least-squares solution after ``init_iters`` CG iterations (None: start at 0)."""
        if self.init_iters == 0:
            return None
        if A is None:  # volume3d: SigPy's SENSE app on the 3D k-space
            return sigpy.mri.app.SenseRecon(y, maps, weights=weights, max_iter=self.init_iters, show_pbar=False).run()
        return sp.app.LinearLeastSquares(A, y, max_iter=self.init_iters, show_pbar=False).run()

    def forward(self, x0: Tensor, kspace: Tensor, maps: Tensor, mask: Tensor) -> Tensor:
        out = [self.solve_item(*(t[b].detach().cpu().numpy() for t in (kspace, maps, mask)))
               for b in range(x0.shape[0])]
        return torch.from_numpy(np.stack(out).astype(np.complex64)).to(x0.device)

    def solve_item(self, kspace: np.ndarray, maps: np.ndarray, mask: np.ndarray) -> np.ndarray:
        raise NotImplementedError


def _volume_problem(kspace: np.ndarray, maps: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hybrid (C, X, ky, kz) k-space -> full 3D k-space (C, kx, ky, kz) (readout fully sampled)
    and the mask (1, ky, kz) broadcast over coils and kx."""
    return fftc_np(kspace, axes=(1,)).astype(np.complex64), mask.reshape(1, *mask.shape[-2:])


class L1Wavelet(_SigPyBaseline):
    """L1-wavelet compressed sensing (see the module doc), ``wave_name`` a PyWavelets name."""

    def __init__(self, kind: str, lam: float, max_iter: int = 100, init_iters: int = 20,
                 wave_name: str = "db4") -> None:
        super().__init__(kind, lam, max_iter, init_iters)
        self.wave_name = wave_name

    def solve_item(self, kspace: np.ndarray, maps: np.ndarray, mask: np.ndarray) -> np.ndarray:
        if self.kind == "volume3d":
            y, weights = _volume_problem(kspace, maps, mask)
            app = sigpy.mri.app.L1WaveletRecon(y, maps, self.lam, weights=weights, wave_name=self.wave_name,
                                               x=self.start(None, y, maps, weights), max_iter=self.max_iter,
                                               show_pbar=False)
            return app.run()
        A = cine_sense_linop(maps, mask, kspace.shape[1])
        W = sp.linop.Wavelet(A.ishape, wave_name=self.wave_name)
        proxg = sp.prox.UnitaryTransform(sp.prox.L1Reg(W.oshape, self.lam), W)
        return sp.app.LinearLeastSquares(A, kspace, x=self.start(A, kspace, maps), proxg=proxg,
                                         max_iter=self.max_iter, show_pbar=False).run()


class TotalVariation(_SigPyBaseline):
    """Total-variation compressed sensing: over (x, y, z) for volumes, (t, x, y) for cine."""

    def solve_item(self, kspace: np.ndarray, maps: np.ndarray, mask: np.ndarray) -> np.ndarray:
        if self.kind == "volume3d":
            y, weights = _volume_problem(kspace, maps, mask)
            app = sigpy.mri.app.TotalVariationRecon(y, maps, self.lam, weights=weights,
                                                    x=self.start(None, y, maps, weights), max_iter=self.max_iter,
                                                    show_pbar=False)
            return app.run()
        A = cine_sense_linop(maps, mask, kspace.shape[1])
        G = sp.linop.FiniteDifference(A.ishape, axes=(0, 1, 2))
        proxg = sp.prox.L1Reg(G.oshape, self.lam)
        return sp.app.LinearLeastSquares(A, kspace, x=self.start(A, kspace, maps), proxg=proxg, G=G,
                                         max_iter=self.max_iter, show_pbar=False).run()


#: Baseline name in a study config -> constructor of (kind, **options without the lam grid).
def build_baseline(method: str, kind: str, lam: float | None = None, **options) -> nn.Module:
    """The baseline ``method`` (``zero_filled`` | ``cg_sense`` | ``l1_wavelet`` | ``tv``) for
    ``kind`` data with regularisation weight ``lam`` and solver ``options``."""
    _check_kind(kind)
    if method == "zero_filled":
        return ZeroFilled()
    if method == "cg_sense":
        return CGSense(lam or 0.0, **options)
    if method == "l1_wavelet":
        return L1Wavelet(kind, float(lam), **options)
    if method == "tv":
        return TotalVariation(kind, float(lam), **options)
    raise ValueError(f"unknown baseline method {method!r}; use zero_filled, cg_sense, l1_wavelet or tv")


METHODS = ("zero_filled", "cg_sense", "l1_wavelet", "tv")
