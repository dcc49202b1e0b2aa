"""mridata.org Stanford 3D FSE knees (ISMRMRD HDF5) -> volume3d layout.

On disk each acquisition holds one readout line ``data`` (C, kx) at ``idx.kspace_encode_step_1``
(ky) and ``idx.slice``. The slice axis is stored in *image* space with alternating sign
(dl-cs ``data_prep.py::ismrmrd_to_np``): multiply slice n by (-1)^n and apply a centred FFT
along it to obtain kz. The readout kx is then inverse transformed (hybrid x-ky-kz space), so the
layout's kspace is (C, X, Y=ky, Z=kz) — dl-cs's [coils, kz, ky, kx] array, transposed.
The ky count comes from the largest index present (the header's maximum is off by one in some
tools).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from melrecon.data.convert.common import axis_size, finish_volume, read_ismrmrd
from melrecon.data.npfft import fftc_np, ifftc_np


def read_mridata(path: str | os.PathLike, progress: bool = True) -> np.ndarray:
    """Hybrid k-space (C, X, Y, Z) complex64 of one mridata ISMRMRD file."""
    header, acqs = read_ismrmrd(path, progress)
    limits = header.encoding[0].encodingLimits if header.encoding else None
    ky = np.array([a.idx.kspace_encode_step_1 for a in acqs])
    sl = np.array([a.idx.slice for a in acqs])
    nc, nx = acqs[0].data.shape
    if any(a.data.shape != (nc, nx) for a in acqs):
        raise ValueError(f"{path}: field '/dataset/data': acquisitions differ in coils/samples")
    ny = axis_size(limits, "kspace_encoding_step_1", int(ky.max()), path)
    nz = axis_size(limits, "slice", int(sl.max()), path)
    raw = np.zeros((nc, nz, ny, nx), np.complex64)  # (coil, z [image space], ky, kx)
    for a, y, z in zip(acqs, ky, sl):
        raw[:, z, y, :] = a.data
    chop = ((-1.0) ** np.arange(nz)).astype(np.float32)  # float32: keep complex64 (GB-sized arrays)
    kspace = fftc_np(raw * chop[None, :, None, None], axes=(1,))  # z -> kz
    kspace = ifftc_np(kspace, axes=(3,))  # kx -> x (readout fully sampled)
    return np.ascontiguousarray(kspace.transpose(0, 3, 2, 1)).astype(np.complex64)  # (C, X, ky, kz)


def convert_mridata(
    path: str | os.PathLike, out: str | os.PathLike, maps: np.ndarray | None = None,
    calib: int = 24, progress: bool = True,
) -> Path:
    """Convert one file; ``maps`` (C, X, Y, Z) skips ESPIRiT (per readout position otherwise)."""
    kspace = read_mridata(path, progress)
    return finish_volume(kspace, out, f"mridata.org ISMRMRD {Path(path).name} (melrecon.data.convert mridata)",
                         maps=maps, calib=calib, progress=progress)
