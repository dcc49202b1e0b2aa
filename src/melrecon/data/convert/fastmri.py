"""fastMRI multicoil h5 -> volume3d layout as a stack of 2D slices (the slice baseline).

fastMRI ``kspace`` is (slices, coils, H, W): H the (2x oversampled) frequency-encode direction,
W the phase-encode direction, both in k-space; slices are separate 2D acquisitions. The layout's
kspace is (C, X=slice, Y=H, Z=W): X is "image space" trivially, and slabs with S=1 are the 2D
problems. Use ``mask_type: lines`` (1D masks along W, as fastMRI) when training on these.
``readout_crop`` removes the readout oversampling (e.g. 640 -> 320).
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

from melrecon.data.convert.common import crop_readout, finish_volume


def read_fastmri(path: str | os.PathLike, readout_crop: int | None = None) -> np.ndarray:
    """k-space (C, X=slices, Y=H, Z=W) complex64 of one fastMRI multicoil file."""
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise ValueError(f"{path}: field 'file': cannot open as HDF5: {err}") from None
    with f:
        if "kspace" not in f:
            raise ValueError(f"{path}: field 'kspace': missing (not a fastMRI file?)")
        ds = f["kspace"]
        if ds.ndim != 4 or not np.issubdtype(ds.dtype, np.complexfloating):
            raise ValueError(f"{path}: field 'kspace': expected complex (slices, coils, H, W), got {ds.shape} {ds.dtype}")
        if "mask" in f:
            raise ValueError(f"{path}: field 'mask': this is an undersampled test/challenge file; need fully sampled k-space")
        kspace = ds[()]
    kspace = np.ascontiguousarray(kspace.transpose(1, 0, 2, 3))
    if readout_crop is not None:
        kspace = crop_readout(kspace, axis=2, size=int(readout_crop))
    return kspace.astype(np.complex64)


def convert_fastmri(
    path: str | os.PathLike, out: str | os.PathLike, maps: np.ndarray | None = None,
    calib: int = 24, progress: bool = True, readout_crop: int | None = None,
) -> Path:
    """Convert one file; ``maps`` (C, slices, H', W) skips ESPIRiT (per slice otherwise)."""
    kspace = read_fastmri(path, readout_crop)
    return finish_volume(kspace, out, f"fastMRI {Path(path).name} (melrecon.data.convert fastmri)",
                         maps=maps, calib=calib, progress=progress)
