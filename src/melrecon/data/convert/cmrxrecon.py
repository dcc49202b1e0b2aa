"""CMRxRecon cine (MATLAB v7.3 .mat, i.e. HDF5) -> cine layout.

MATLAB stores ``kspace_full`` as (kx, ky, coil, slice, t); HDF5 is row-major, so h5py returns
the axes reversed, (t, slice, coil, ky, kx), as a compound dtype with fields ``real`` and
``imag``. Later editions name the variable ``kspace`` with the same axis order. The challenge's
``ifft2c`` is ``ifftshift(ifft2(fftshift(k)))`` (ortho), which differs from ours for odd sizes,
so k-space is re-expressed in the project convention through the image it defines:
k' = fftc(their_ifft2c(k)). Output kspace (S, C, T, X=kx, Y=ky).
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

from melrecon.data.convert.common import finish_cine
from melrecon.data.npfft import fftc_np

KEYS = ("kspace_full", "kspace")


def _their_ifft2c(k: np.ndarray) -> np.ndarray:
    """CMRxRecon ``loadFun.ifft2c`` over the last two axes (ortho, swapped shift order)."""
    axes = (-2, -1)
    return np.fft.ifftshift(np.fft.ifftn(np.fft.fftshift(k, axes=axes), axes=axes, norm="ortho"), axes=axes)


def read_cmrxrecon(path: str | os.PathLike, key: str | None = None) -> np.ndarray:
    """k-space (S, C, T, X, Y) complex64 of one fully sampled CMRxRecon file."""
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise ValueError(f"{path}: field 'file': cannot open as MATLAB v7.3 / HDF5: {err}") from None
    with f:
        names = [key] if key else [k for k in KEYS if k in f]
        if not names or names[0] not in f:
            raise ValueError(f"{path}: field '{key or KEYS[0]}': missing (keys: {list(f.keys())})")
        ds = f[names[0]]
        if ds.dtype.names is None or not {"real", "imag"} <= set(ds.dtype.names):
            raise ValueError(f"{path}: field '{names[0]}': expected a real/imag compound dtype, got {ds.dtype}")
        if ds.ndim != 5:
            raise ValueError(f"{path}: field '{names[0]}': expected 5 axes (t, slice, coil, ky, kx), got {ds.shape}")
        raw = ds[()]
    k = raw["real"].astype(np.complex64) + 1j * raw["imag"].astype(np.complex64)  # (t, s, c, ky, kx)
    k = k.transpose(1, 2, 0, 4, 3)  # (s, c, t, kx, ky)
    return fftc_np(_their_ifft2c(k)).astype(np.complex64)


def convert_cmrxrecon(
    path: str | os.PathLike, out: str | os.PathLike, maps: np.ndarray | None = None,
    calib: int = 24, progress: bool = True, key: str | None = None,
) -> Path:
    """Convert one file; ``maps`` (S, C, X, Y) skips ESPIRiT (time-averaged per slice otherwise)."""
    kspace = read_cmrxrecon(path, key)
    return finish_cine(kspace, out, f"CMRxRecon {Path(path).name} (melrecon.data.convert cmrxrecon)",
                       maps=maps, calib=calib, progress=progress)
