"""fastMRI multicoil h5 -> volume3d layout as a stack of 2D slices (the slice baseline).

fastMRI ``kspace`` is (slices, coils, H, W): H the (2x oversampled) frequency-encode direction,
W the phase-encode direction, both in k-space; slices are separate 2D acquisitions. The layout's
kspace is (C, X=slice, Y=H, Z=W): X is "image space" trivially, and slabs with S=1 are the 2D
problems. Use ``mask_type: lines`` (1D masks along W, as fastMRI) when training on these.
``readout_crop`` removes the readout oversampling (e.g. 640 -> 320).

Test and challenge files are undersampled and carry ``mask`` (W,) (1 where a phase-encode
column was acquired; attributes ``acceleration``, ``num_low_frequency``). They convert to a
prospective layout file: the mask stored as (Y=H, Z=W), no target, maps by ESPIRiT from the
fully-sampled centre columns (:func:`read_fastmri_undersampled`, :func:`convert_fastmri`).
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

from melrecon.data.convert.common import crop_readout, finish_volume


def read_fastmri(path: str | os.PathLike, readout_crop: int | None = None) -> np.ndarray:
    """k-space (C, X=slices, Y=H, Z=W) complex64 of one fully-sampled fastMRI multicoil file."""
    kspace, mask = read_fastmri_any(path, readout_crop)
    if mask is not None:
        raise ValueError(f"{path}: field 'mask': this is an undersampled test/challenge file; need fully sampled k-space")
    return kspace


def is_fastmri_undersampled(path: str | os.PathLike) -> bool:
    """True for a fastMRI test/challenge file (4-D complex ``kspace`` and a ``mask``, no melrecon
    ``kind`` attribute)."""
    try:
        with h5py.File(path, "r") as f:
            return ("kind" not in f.attrs and "mask" in f and "kspace" in f and f["kspace"].ndim == 4)
    except OSError:
        return False


def read_fastmri_any(path: str | os.PathLike, readout_crop: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """``(kspace (C, X=slices, Y=H, Z=W) complex64, mask (Y, Z) float32 or None)`` of a fastMRI
    multicoil file; the mask is the file's ``mask`` (W,) repeated along the readout H."""
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
        mask = None
        if "mask" in f:
            mask = np.asarray(f["mask"][()]).astype(np.float32).ravel()
            if mask.shape != (ds.shape[-1],) or not np.isin(mask, (0.0, 1.0)).all():
                raise ValueError(f"{path}: field 'mask': expected 0/1 values of shape ({ds.shape[-1]},) "
                                 f"(one per phase-encode column W), got {mask.shape}")
        kspace = ds[()]
    kspace = np.ascontiguousarray(kspace.transpose(1, 0, 2, 3))
    if readout_crop is not None:  # along H, fully sampled: the column mask is unchanged
        kspace = crop_readout(kspace, axis=2, size=int(readout_crop))
    if mask is not None:
        mask = np.ascontiguousarray(np.broadcast_to(mask, kspace.shape[2:]))
    return kspace.astype(np.complex64), mask


def convert_fastmri(
    path: str | os.PathLike, out: str | os.PathLike, maps: np.ndarray | None = None,
    calib: int = 24, progress: bool = True, readout_crop: int | None = None,
) -> Path:
    """Convert one file; ``maps`` (C, slices, H', W) skips ESPIRiT (per slice otherwise).

    A test/challenge file (with ``mask``) becomes a prospective file: mask stored, no target.
    """
    kspace, mask = read_fastmri_any(path, readout_crop)
    return finish_volume(kspace, out, f"fastMRI {Path(path).name} (melrecon.data.convert fastmri)",
                         maps=maps, calib=calib, progress=progress, mask=mask)
