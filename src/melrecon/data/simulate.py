"""Simulated acquisition: from an image to fully-sampled multi-coil k-space (numpy, seeded).

The pieces every simulated dataset shares, public so that a user can bring any image in:

- :func:`polynomial_phase` and :func:`smooth_phase`: a smooth random phase for a magnitude image
  (real MR images are complex; a network trained on real-valued targets learns a wrong prior);
- :func:`coil_maps`: birdcage coil sensitivities around the object, sum_c |S_c|^2 = 1;
- :func:`noise_std` and :func:`add_noise`: complex white Gaussian noise at a stated SNR;
- :func:`simulate_kspace`: k = F(S x) + n and the target S^H F^H k in the melrecon layout.

SNR convention (the synthetic datasets' since their first release): noise std per real/imag pair
``sigma = mean(|x| over the object) / snr``, the object being the voxels above 10 % of the maximum
magnitude. The FFT is orthonormal and the maps have unit sum of squares, so the target's noise
has the same std ``sigma`` as each coil's k-space and image.

What simulated k-space lacks, compared with measured data: the true phase (flow, susceptibility,
B0 and B1 inhomogeneity), true coil sensitivities and coil noise correlation, field drift,
relaxation during the readout, and k-space that extends beyond the image's resolution.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.ndimage import gaussian_filter

from melrecon.data.npfft import fftc_np, ifftc_np, sense_combine_np

#: Voxels above this fraction of the maximum magnitude are "the object" for the SNR.
OBJECT_FRACTION = 0.1


def normalized_grid(shape: tuple[int, ...]) -> list[np.ndarray]:
    """Normalised coordinates in [-1, 1) along each axis (pixel centres), as an open mesh."""
    axes = [(np.arange(n) - n / 2 + 0.5) / (n / 2) for n in shape]
    return np.meshgrid(*axes, indexing="ij", sparse=True)


def smooth_field(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Zero-mean, unit-std Gaussian random field with correlation length ``sigma`` pixels."""
    f = gaussian_filter(rng.standard_normal(shape), sigma=sigma, mode="wrap")
    return (f - f.mean()) / (f.std() + 1e-12)


def polynomial_phase(rng: np.random.Generator, grid: list[np.ndarray], amplitude: float) -> np.ndarray:
    """Random low-order polynomial phase (degree <= 2) in radians, peak about ``amplitude``.

    ``grid``: :func:`normalized_grid` of the image. Draws a constant, then per axis a linear and
    the quadratic terms, from ``rng`` in that order (the synthetic phantoms depend on it).
    """
    phase = rng.uniform(-np.pi, np.pi) * np.ones(())
    for i, g in enumerate(grid):
        phase = phase + rng.normal(0, amplitude / 2) * g
        for h in grid[i:]:
            phase = phase + rng.normal(0, amplitude / 4) * g * h
    return phase


def smooth_phase(shape: Sequence[int], rng: np.random.Generator, amplitude: float = 1.0,
                 correlation: float | None = None) -> np.ndarray:
    """A smooth random phase map (radians) of ``shape``.

    Args:
        shape: image shape.
        rng: the generator (seeded by the caller).
        amplitude: peak of the polynomial part, radians (:func:`polynomial_phase`).
        correlation: if given, adds a Gaussian random field of this correlation length
            (voxels) and std ``amplitude / 4``: local phase variation such as susceptibility
            gives. None: polynomial only.

    Returns:
        float64 array of ``shape``.
    """
    shape = tuple(int(s) for s in shape)
    phase = polynomial_phase(rng, normalized_grid(shape), amplitude) * np.ones(shape)
    if correlation:
        phase = phase + (amplitude / 4) * smooth_field(rng, shape, float(correlation))
    return phase


def coil_maps(shape: Sequence[int], coils: int, rng: np.random.Generator, ring_axis: int = 0,
              radius: tuple[float, float] = (1.2, 1.8)) -> np.ndarray:
    """Birdcage coil maps (C, *shape), complex128, sum_c |S_c|^2 = 1 at every voxel.

    Coils sit on rings around ``ring_axis`` (for a head: the superior-inferior axis), 8 per
    ring (:func:`melrecon.physics.coils.birdcage_maps`); the coil radius relative to the field
    of view is drawn uniformly from ``radius``.
    """
    from melrecon.physics.coils import birdcage_maps

    shape = tuple(int(s) for s in shape)
    order = [ring_axis, *(a for a in range(len(shape)) if a != ring_axis)]
    maps = birdcage_maps((coils, *(shape[a] for a in order)), r=rng.uniform(*radius)).numpy().astype(np.complex128)
    return np.moveaxis(maps, list(range(1, len(shape) + 1)), [1 + a for a in order])


def noise_std(image: np.ndarray, snr: float) -> float:
    """``mean(|image| on the object) / snr``; the object: voxels above 10 % of the maximum."""
    mag = np.abs(image)
    return float(mag[mag > OBJECT_FRACTION * mag.max()].mean() / snr)


def add_noise(kspace: np.ndarray, image: np.ndarray, snr: float | None, rng: np.random.Generator) -> np.ndarray:
    """Add complex Gaussian noise of std ``mean(|image| on the object) / snr`` (orthonormal FFT:
    the same std in the coil images and in the target). ``snr`` None, <= 0 or infinite: no noise."""
    if snr is None or snr <= 0 or not np.isfinite(snr):
        return kspace
    return add_complex_noise(kspace, noise_std(image, snr), rng)


def add_complex_noise(kspace: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """``kspace`` + complex white Gaussian noise of std ``sigma`` (sigma^2 / 2 per real/imag part)."""
    noise = rng.standard_normal(kspace.shape) + 1j * rng.standard_normal(kspace.shape)
    return kspace + noise * (sigma / np.sqrt(2))


def simulate_kspace(image: np.ndarray, maps: np.ndarray, snr: float | None, rng: np.random.Generator,
                    fft_axes: Sequence[int] = (-2, -1)) -> dict[str, np.ndarray]:
    """Fully-sampled multi-coil k-space of ``image`` and its target.

    Args:
        image: complex image (*spatial), e.g. (X, Y, Z) for a volume3d scan.
        maps: coil maps (C, *spatial).
        snr: mean object magnitude / noise std (None or 0: noiseless).
        rng: draws the noise.
        fft_axes: the axes transformed (negative, of the coil arrays); a volume3d scan leaves
            the readout X in image space (hybrid x-ky-kz), so (-2, -1).

    Returns:
        ``kspace`` = F(S x) + n and ``maps`` (C, *spatial), ``target`` = S^H F^H k (*spatial).
    """
    kspace = fftc_np(maps * image[None], axes=tuple(fft_axes))
    kspace = add_noise(kspace, image, snr, rng)
    target = sense_combine_np(ifftc_np(kspace, axes=tuple(fft_axes)), maps)
    return {"kspace": kspace, "maps": maps, "target": target}
