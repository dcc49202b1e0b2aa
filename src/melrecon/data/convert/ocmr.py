"""OCMR cine (ISMRMRD HDF5, Siemens) -> cine layout.

Acquisitions carry ``idx.kspace_encode_step_1`` (ky), ``phase`` (cardiac frame), ``slice``,
``average`` (and ``set``/``repetition``/``contrast``, which must be single-valued here; the
first value is kept otherwise). As OCMR's ``read_ocmr.py`` does: averages are averaged, ky lines
are placed relative to the header's ky centre (partial Fourier is zero-filled), asymmetric
echoes are placed by ``center_sample``, and the 2x oversampled readout is cropped to the
``reconSpace`` matrix (inverse FFT, centre crop, FFT back). Output kspace (S, C, T, X, Y).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from melrecon.data.convert.common import crop_readout, finish_cine, read_ismrmrd


def read_ocmr(path: str | os.PathLike, progress: bool = True) -> np.ndarray:
    """k-space (S, C, T, X, Y) complex64 of one fully sampled OCMR file."""
    header, acqs = read_ismrmrd(path, progress)
    enc = header.encoding[0]
    for name in ("set", "repetition", "contrast"):
        values = {getattr(a.idx, name) for a in acqs}
        if len(values) > 1:
            warnings.warn(f"{path}: {len(values)} values of idx.{name}; keeping the first ({min(values)})", stacklevel=2)
            acqs = [a for a in acqs if getattr(a.idx, name) == min(values)]
    nc, nsamp = acqs[0].data.shape
    enc_x = int(enc.encodedSpace.matrixSize.x)
    enc_y = int(enc.encodedSpace.matrixSize.y)
    rec_x = int(enc.reconSpace.matrixSize.x)
    ky_center = getattr(enc.encodingLimits.kspace_encoding_step_1, "center", None)
    ky_off = enc_y // 2 - int(ky_center) if ky_center is not None else 0
    nt = max(a.idx.phase for a in acqs) + 1
    ns = max(a.idx.slice for a in acqs) + 1
    na = max(a.idx.average for a in acqs) + 1
    kspace = np.zeros((ns, nc, nt, enc_x, enc_y), np.complex128)
    counts = np.zeros((ns, 1, nt, 1, enc_y))
    for a in acqs:
        i = a.idx
        y = i.kspace_encode_step_1 + ky_off
        if not 0 <= y < enc_y:
            raise ValueError(f"{path}: field 'idx.kspace_encode_step_1': line {i.kspace_encode_step_1} outside {enc_y} lines")
        x0 = enc_x // 2 - int(a.center_sample) if a.center_sample else 0  # asymmetric echo
        n = a.data.shape[1]
        kspace[i.slice, :, i.phase, x0:x0 + n, y] += a.data
        counts[i.slice, 0, i.phase, 0, y] += 1
    kspace /= np.maximum(counts, 1)  # the average over `average` (and any repeated line)
    if na > 1 and counts.max() != na:
        warnings.warn(f"{path}: {na} averages but lines repeat up to {int(counts.max())} times", stacklevel=2)
    kspace = crop_readout(kspace, axis=3, size=rec_x)
    return kspace.astype(np.complex64)


def convert_ocmr(
    path: str | os.PathLike, out: str | os.PathLike, maps: np.ndarray | None = None,
    calib: int = 24, progress: bool = True,
) -> Path:
    """Convert one file; ``maps`` (S, C, X, Y) skips ESPIRiT (time-averaged per slice otherwise)."""
    kspace = read_ocmr(path, progress)
    return finish_cine(kspace, out, f"OCMR ISMRMRD {Path(path).name} (melrecon.data.convert ocmr)",
                       maps=maps, calib=calib, progress=progress)
