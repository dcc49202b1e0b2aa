"""Coil sensitivities: simulation, ESPIRiT estimation, SENSE combination and RSS.

Simulated maps come from SigPy's ``birdcage_maps`` (normalised so that sum_c |S_c|^2 = 1 at
every pixel, which makes ``A^H A = I`` under full sampling with the orthonormal FFT), and
ESPIRiT from SigPy's ``EspiritCalib``: both are the field's references (notes: sigpy vs true
maps min |cos| 0.99985), so we wrap them rather than re-derive them. They run on the CPU once
per scan, at data-generation or conversion time, never in the training loop.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def birdcage_maps(
    shape: Sequence[int], r: float = 1.5, nzz: int = 8, dtype: torch.dtype = torch.complex64
) -> torch.Tensor:
    """Simulated birdcage coil maps, normalised to sum_c |S_c|^2 = 1 at every pixel.

    Args:
        shape: (C, Y, X) for 2D or (C, Z, Y, X) for 3D (coils arranged in rings of ``nzz``
            along the first spatial axis).
        r: coil radius relative to the field of view.
        nzz: coils per ring (3D only).

    Returns:
        Maps of shape ``shape`` and dtype ``dtype``.
    """
    import sigpy.mri

    shape = tuple(int(s) for s in shape)
    if len(shape) not in (3, 4) or min(shape) < 1:
        raise ValueError(f"birdcage shape must be (C, Y, X) or (C, Z, Y, X), got {shape}")
    if len(shape) == 4 and shape[0] % nzz and shape[0] > nzz:
        raise ValueError(f"3D birdcage with {shape[0]} coils needs a multiple of nzz={nzz} coils")
    maps = sigpy.mri.birdcage_maps(shape, r=r, nzz=min(nzz, shape[0]), dtype=np.complex128)
    # SigPy normalises by the RSS; recompute it here so the invariant holds to float precision
    maps = maps / np.sqrt(np.sum(np.abs(maps) ** 2, axis=0, keepdims=True))
    return torch.from_numpy(maps).to(dtype)


def espirit_maps(
    kspace: torch.Tensor | np.ndarray,
    calib_width: int = 24,
    thresh: float = 0.02,
    kernel_width: int = 6,
    crop: float = 0.8,
    max_iter: int = 100,
) -> torch.Tensor:
    """ESPIRiT coil sensitivities from k-space with a fully sampled centre.

    Args:
        kspace: multi-coil k-space (C, *spatial), spatial 2D or 3D, centred (DC at N // 2).
        calib_width: width of the calibration region used.
        thresh, kernel_width, crop, max_iter: ESPIRiT parameters (SigPy's meaning). ``crop``
            0.8 (BART ``ecalib``'s default): on a real 8-coil brain slice (R = 4, 12-24
            calibration lines) it keeps every object pixel, as ``ecalib`` does; 0.95 dropped up
            to 401 of 22146 with 12 lines (benchmarks/RESULTS.md).

    Returns:
        complex64 maps (C, *spatial), zero outside the support where ``crop`` removes them;
        defined up to a per-pixel common phase.
    """
    from sigpy.mri.app import EspiritCalib

    ksp = kspace.detach().cpu().numpy() if isinstance(kspace, torch.Tensor) else np.asarray(kspace)
    if ksp.ndim not in (3, 4) or not np.iscomplexobj(ksp):
        raise ValueError(f"ESPIRiT needs complex k-space (C, *spatial) with 2 or 3 spatial axes, got {ksp.shape} {ksp.dtype}")
    if any(s < calib_width for s in ksp.shape[1:]):
        raise ValueError(f"calib_width {calib_width} exceeds the k-space grid {ksp.shape[1:]}")
    maps = EspiritCalib(
        ksp.astype(np.complex64),
        calib_width=calib_width,
        thresh=thresh,
        kernel_width=kernel_width,
        crop=crop,
        max_iter=max_iter,
        show_pbar=False,
    ).run()
    return torch.from_numpy(np.asarray(maps)).to(torch.complex64)


OBJECT_THRESHOLD = 0.1  # object pixels: RSS above this fraction of its maximum


def uncovered_object(maps: np.ndarray, coil_images: np.ndarray, coil_axis: int = 0,
                     threshold: float = OBJECT_THRESHOLD) -> tuple[int, int]:
    """(object pixels where every map is zero, object pixels): the object is where the RSS of
    ``coil_images`` exceeds ``threshold`` x its maximum; ``maps`` broadcast against the images."""
    rss_img = np.sqrt(np.sum(np.abs(coil_images) ** 2, axis=coil_axis))
    obj = rss_img > threshold * rss_img.max()
    support = np.broadcast_to(np.sum(np.abs(maps) ** 2, axis=coil_axis) > 0, obj.shape)
    return int(np.count_nonzero(obj & ~support)), int(np.count_nonzero(obj))


def sense_combine(coil_images: torch.Tensor, maps: torch.Tensor, coil_dim: int = 1) -> torch.Tensor:
    """SENSE coil combination ``sum_c conj(S_c) x_c`` (the coil axis is removed)."""
    if coil_images.shape[coil_dim] != maps.shape[coil_dim]:
        raise ValueError(
            f"coil images shape {tuple(coil_images.shape)} and maps shape {tuple(maps.shape)} "
            f"differ in coil count along axis {coil_dim}"
        )
    return (maps.conj() * coil_images).sum(dim=coil_dim)


def rss(coil_images: torch.Tensor, coil_dim: int = 1) -> torch.Tensor:
    """Root-sum-of-squares magnitude over the coil axis."""
    return coil_images.abs().pow(2).sum(dim=coil_dim).sqrt()
