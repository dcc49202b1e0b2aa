"""Numpy twins of :mod:`melrecon.physics.fft` for offline data preparation.

Same convention: ``fftc = fftshift ∘ fftn(norm="ortho") ∘ ifftshift`` over the given axes (DC at
index ``N // 2``). Used by the synthetic generator, the converters and the cine crop of
:class:`melrecon.data.datasets.CineDataset`; tests use it as an implementation independent of
the torch operator they check.

Why not the torch functions: this code works on numpy arrays from h5py, and ``scipy.fft``
keeps the input precision (complex64 stays complex64: a 3D knee is 1.7 GB, not 3.4 GB, per
copy) and uses all cores. Torch's CPU FFT (MKL) is not bitwise pocketfft's: the same
transforms differ by about one unit in the last place (measured 2e-15 in complex128, 1e-6 in
complex64), so switching would change every generated synthetic dataset and cropped cine item
in the last bits, and with them the trained numbers the README reports.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.fft


def fftc_np(x: np.ndarray, axes: Sequence[int] = (-2, -1)) -> np.ndarray:
    """Centred orthonormal FFT over ``axes`` (image -> k-space)."""
    axes = tuple(axes)
    return np.fft.fftshift(scipy.fft.fftn(np.fft.ifftshift(x, axes=axes), axes=axes, norm="ortho", workers=-1), axes=axes)


def ifftc_np(k: np.ndarray, axes: Sequence[int] = (-2, -1)) -> np.ndarray:
    """Centred orthonormal inverse FFT over ``axes`` (k-space -> image)."""
    axes = tuple(axes)
    return np.fft.fftshift(scipy.fft.ifftn(np.fft.ifftshift(k, axes=axes), axes=axes, norm="ortho", workers=-1), axes=axes)


def sense_combine_np(coil_images: np.ndarray, maps: np.ndarray, coil_axis: int = 0) -> np.ndarray:
    """``sum_c conj(S_c) x_c`` over ``coil_axis`` (maps broadcast against the coil images)."""
    return np.sum(np.conj(maps) * coil_images, axis=coil_axis)
