"""An orthonormal wavelet transform over chosen image axes (PyWavelets underneath).

Why not SigPy's ``Wavelet`` linop: it transforms *every* array axis unless told otherwise and lets
PyWavelets pick the depth from the shortest axis, which gives 0-1 levels on small 3D or cine
arrays (a plain image-domain L1 under a wavelet name). Here the axes are explicit (image axes,
never batch or coil), the number of levels is fixed by the image sizes (:func:`wavelet_levels`),
and each axis is zero-padded to a multiple of ``2**levels`` so that PyWavelets' periodised
transform is exactly orthonormal: ``W^H W = I`` always, and ``W W^H = I`` when no padding was needed
(then the prox of ``lam ||W x||_1`` is exactly ``W^H soft(W x, lam)``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pywt

MIN_COARSE = 4  # coarsest band keeps at least this many samples along every transformed axis
MAX_LEVELS = 4


def wavelet_levels(sizes: Sequence[int], max_levels: int = MAX_LEVELS, min_coarse: int = MIN_COARSE) -> int:
    """Levels the sizes allow: the largest L <= ``max_levels`` with ``n / 2**L >= min_coarse`` on
    every axis (2 for 20x48x40, 3 for 48x48, 4 for a 230x180 slice); 0 only for axes shorter
    than ``2 * min_coarse``."""
    smallest = min(int(n) for n in sizes)
    level = 0
    while level < max_levels and smallest / 2 ** (level + 1) >= min_coarse:
        level += 1
    return level


class ImageWavelet:
    """Orthonormal multi-level wavelet transform of arrays of shape ``shape`` over ``axes``.

    Args:
        shape: full array shape (e.g. (B, X, Y, Z)); axes not in ``axes`` are left alone.
        axes: the transformed axes (negative or positive indices); axes of length 1 are skipped.
        wave_name: a PyWavelets wavelet name (``db4``: Daubechies, 4 vanishing moments).
        levels: decomposition levels; None: :func:`wavelet_levels` of the axes' sizes.
    """

    def __init__(self, shape: Sequence[int], axes: Sequence[int], wave_name: str = "db4",
                 levels: int | None = None) -> None:
        self.shape = tuple(int(s) for s in shape)
        nd = len(self.shape)
        given = [a % nd for a in axes]
        if not given or len(set(given)) != len(given):
            raise ValueError(f"wavelet axes must be distinct axes of shape {self.shape}, got {tuple(axes)}")
        # an axis of length 1 (a 2D slice stored as a volume with one z position) is left alone
        self.axes = tuple(sorted(a for a in given if self.shape[a] > 1)) or tuple(given[:1])
        sizes = [self.shape[a] for a in self.axes]
        self.levels = wavelet_levels(sizes) if levels is None else int(levels)
        if self.levels < 0:
            raise ValueError(f"wavelet levels must be >= 0, got {levels}")
        self.wave_name = wave_name
        step = 2 ** self.levels
        self.padded = tuple(-(-n // step) * step if a in self.axes else n for a, n in enumerate(self.shape))
        self.exact = self.padded == self.shape  # W W^H = I too (no padding)
        self._slices = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Coefficients of ``x`` (shape ``shape``) as one array of shape ``padded``."""
        if x.shape != self.shape:
            raise ValueError(f"wavelet input shape {x.shape} differs from the transform's {self.shape}")
        if not self.exact:
            x = np.pad(x, [(0, p - n) for n, p in zip(self.shape, self.padded)])
        if self.levels == 0:
            return x.copy()
        with warnings.catch_warnings():  # periodisation is exact below pywt's conservative max level
            warnings.simplefilter("ignore", UserWarning)
            coeffs = pywt.wavedecn(x, self.wave_name, mode="periodization", level=self.levels, axes=self.axes)
        arr, self._slices = pywt.coeffs_to_array(coeffs, axes=self.axes)
        return arr

    def adjoint(self, c: np.ndarray) -> np.ndarray:
        """``W^H c``: the inverse transform, cropped back to ``shape``."""
        if self.levels == 0:
            x = c
        else:
            if self._slices is None:
                self.forward(np.zeros(self.shape, dtype=c.dtype))
            coeffs = pywt.array_to_coeffs(c, self._slices, output_format="wavedecn")
            x = pywt.waverecn(coeffs, self.wave_name, mode="periodization", axes=self.axes)
        return x[tuple(slice(0, n) for n in self.shape)]
