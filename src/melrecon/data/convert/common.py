"""Shared steps of the converters: coil maps (ESPIRiT or given), target, writing.

Converters first bring a scan to the layout's k-space (volume3d: (C, X, Y, Z) hybrid x-ky-kz;
cine: (S, C, T, X, Y)) and then call :func:`finish_volume` / :func:`finish_cine`, which
estimate maps by ESPIRiT (per readout position for 3D, from the time-averaged k-space per slice
for cine) unless known maps are given, compute target = S^H F^H k and write the file.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from tqdm import tqdm

from melrecon.data.h5 import write_scan
from melrecon.data.npfft import ifftc_np
from melrecon.physics.coils import espirit_maps, uncovered_object


def _espirit(kspace: np.ndarray, calib: int) -> np.ndarray:
    """ESPIRiT maps of one 2D multi-coil k-space (C, A, B); calib shrunk to fit small grids."""
    width = int(min(calib, *kspace.shape[1:]))
    return espirit_maps(kspace.astype(np.complex64), calib_width=width).numpy()


def maps_cover_warning(path: str | os.PathLike, maps: np.ndarray, coil_images: np.ndarray, coil_axis: int) -> str | None:
    """A one-line warning naming ``path`` when the maps are zero on part of the RSS object
    (ESPIRiT's crop removed it: every reconstruction would lose it), else None."""
    lost, total = uncovered_object(maps, coil_images, coil_axis)
    if lost == 0:
        return None
    return (f"{path}: field 'maps': the coil maps are zero on {lost} of {total} object pixels (RSS > 10% of "
            "its maximum); reconstructions will lose them: re-estimate the maps with a smaller ESPIRiT crop")


def _warn_uncovered(out: str | os.PathLike, maps: np.ndarray, coil_images: np.ndarray, coil_axis: int) -> None:
    msg = maps_cover_warning(out, maps, coil_images, coil_axis)
    if msg:
        warnings.warn(msg, stacklevel=3)


def _check_maps(maps: np.ndarray | None, shape: tuple[int, ...], what: str) -> np.ndarray | None:
    if maps is None:
        return None
    maps = np.asarray(maps)
    if maps.shape != shape:
        raise ValueError(f"known maps for {what} have shape {maps.shape}, expected {shape}")
    return maps.astype(np.complex64)


def calibration_width(mask: np.ndarray) -> int:
    """Side of the largest fully-sampled square centred on the k-space centre (index N // 2)
    of a 2D mask (Y, Z): the calibration region ESPIRiT may use in undersampled data."""
    mask = np.asarray(mask) > 0
    cy, cz = (n // 2 for n in mask.shape)
    width = 0
    for k in range(1, min(mask.shape) + 1):
        y0, z0 = cy - k // 2, cz - k // 2
        if y0 < 0 or z0 < 0 or not mask[y0:y0 + k, z0:z0 + k].all():
            break
        width = k
    return width


def finish_volume(
    kspace: np.ndarray, out: str | os.PathLike, source: str, maps: np.ndarray | None = None,
    calib: int = 24, progress: bool = True, extra_attrs: dict | None = None, mask: np.ndarray | None = None,
) -> Path:
    """Maps (ESPIRiT per readout position unless ``maps`` given), target, write a volume3d file.

    Args:
        kspace: (C, X, Y, Z) hybrid k-space (X in image space).
        out: destination file.
        source: provenance text.
        maps: known maps (C, X, Y, Z) — skips ESPIRiT (tests, or maps computed elsewhere).
        calib: ESPIRiT calibration width.
        mask: (Y, Z) sampling mask of prospectively undersampled k-space: the file stores it
            and no target; ESPIRiT uses at most the fully-sampled centre
            (:func:`calibration_width`).
    """
    kspace = np.asarray(kspace, dtype=np.complex64)
    maps = _check_maps(maps, kspace.shape, str(out))
    if mask is not None:
        acs = calibration_width(mask)
        if maps is None and acs <= 6:  # ESPIRiT's kernel is 6 wide: the region must be wider
            raise ValueError(f"{out}: field 'mask': the fully-sampled centre is {acs} wide; ESPIRiT needs a "
                             "calibration region wider than its 6-point kernel (or give --maps)")
        calib = min(calib, acs)
    if maps is None:
        maps = np.empty_like(kspace)
        for x in tqdm(range(kspace.shape[1]), desc=f"ESPIRiT {Path(out).name}", disable=not progress, leave=False):
            maps[:, x] = _espirit(kspace[:, x], calib)
    if mask is not None:  # prospective: nothing to compare with
        return write_scan(out, kspace, maps, None, kind="volume3d", source=source, extra_attrs=extra_attrs,
                          mask=mask)
    coil_images = ifftc_np(kspace, axes=(-2, -1))
    _warn_uncovered(out, maps, coil_images, 0)
    target = np.sum(np.conj(maps) * coil_images, axis=0)
    return write_scan(out, kspace, maps, target, kind="volume3d", source=source, extra_attrs=extra_attrs)


def finish_cine(
    kspace: np.ndarray, out: str | os.PathLike, source: str, maps: np.ndarray | None = None,
    calib: int = 24, progress: bool = True, extra_attrs: dict | None = None,
) -> Path:
    """Maps (ESPIRiT on time-averaged k-space per slice unless given), target, write a cine file.

    Args:
        kspace: (S, C, T, X, Y) k-space.
        maps: known maps (S, C, X, Y).
    """
    kspace = np.asarray(kspace, dtype=np.complex64)
    s, c, _, x, y = kspace.shape
    maps = _check_maps(maps, (s, c, x, y), str(out))
    if maps is None:
        maps = np.stack([
            _espirit(kspace[i].mean(axis=1), calib)  # time average: fully sampled, highest SNR
            for i in tqdm(range(s), desc=f"ESPIRiT {Path(out).name}", disable=not progress, leave=False)
        ])
    coil_images = ifftc_np(kspace, axes=(-2, -1))
    _warn_uncovered(out, maps[:, :, None], coil_images, 1)
    target = np.sum(np.conj(maps[:, :, None]) * coil_images, axis=1)
    return write_scan(out, kspace, maps, target, kind="cine", source=source, extra_attrs=extra_attrs)


def crop_readout(kspace: np.ndarray, axis: int, size: int) -> np.ndarray:
    """Remove readout oversampling: inverse FFT along ``axis``, centre crop to ``size``, FFT back."""
    from melrecon.data.npfft import fftc_np

    n = kspace.shape[axis]
    if size > n:
        raise ValueError(f"readout crop {size} exceeds the readout length {n}")
    if size == n:
        return kspace
    img = ifftc_np(kspace, axes=(axis,))
    start = n // 2 - size // 2
    img = np.take(img, np.arange(start, start + size), axis=axis)
    return fftc_np(img, axes=(axis,))


def read_ismrmrd(path: str | os.PathLike, progress: bool = True):
    """Header and acquisitions (noise scans skipped) of an ISMRMRD HDF5 file.

    Returns:
        ``(header, acquisitions)`` with the parsed ``ismrmrd.xsd`` header and a list of
        ``ismrmrd.Acquisition``.
    """
    import ismrmrd

    try:
        ds = ismrmrd.Dataset(str(path), "/dataset", create_if_needed=False)
    except Exception as err:  # ismrmrd raises several types for missing / non-ISMRMRD files
        raise ValueError(f"{path}: field '/dataset': cannot open as ISMRMRD: {err}") from None
    try:
        header = ismrmrd.xsd.CreateFromDocument(ds.read_xml_header())
        n = ds.number_of_acquisitions()
        acqs = []
        for i in tqdm(range(n), desc=f"read {Path(path).name}", disable=not progress, leave=False):
            acq = ds.read_acquisition(i)
            if acq.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT):
                continue
            acqs.append(acq)
    finally:
        ds.close()
    if not acqs:
        raise ValueError(f"{path}: field '/dataset/data': no imaging acquisitions")
    return header, acqs


def axis_size(limits, name: str, present_max: int, path: str | os.PathLike) -> int:
    """Size of an encoding axis from the largest index present (+1), checked against the header.

    Header ``encodingLimits.<name>.maximum`` is off by one in some tools (dl-cs and MRAugment use
    it as the count, mridata-recon adds 1); the indices actually present are the ground truth.
    A disagreement beyond that off-by-one is warned about.
    """
    import warnings

    limit = getattr(limits, name, None) if limits is not None else None
    header_max = getattr(limit, "maximum", None) if limit is not None else None
    size = int(present_max) + 1
    if header_max is not None and int(header_max) + 1 != size and int(header_max) != size:
        warnings.warn(
            f"{path}: encodingLimits.{name}.maximum={header_max} but the largest index present is "
            f"{present_max}; using {size}",
            stacklevel=2,
        )
    return size
