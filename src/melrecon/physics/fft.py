"""Centred, orthonormal n-D FFTs (the fastMRI / SigPy / BART ``fft -u`` convention).

``fftc = fftshift ∘ fftn(norm="ortho") ∘ ifftshift`` over the chosen dims, so the k-space
centre (DC) sits at index ``N // 2`` on every transformed axis, for odd and even ``N``, and
``ifftc`` is the exact inverse and adjoint of ``fftc``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Dims = int | Sequence[int]


def _as_dims(x: torch.Tensor, dims: Dims) -> tuple[int, ...]:
    dims_t = (dims,) if isinstance(dims, int) else tuple(dims)
    if not dims_t:
        raise ValueError("fft dims must name at least one axis")
    norm = tuple(d % x.ndim if -x.ndim <= d < x.ndim else None for d in dims_t)
    if None in norm:
        raise ValueError(f"fft dims {dims_t} out of range for a tensor of shape {tuple(x.shape)}")
    if len(set(norm)) != len(norm):
        raise ValueError(f"fft dims {dims_t} repeat an axis")
    return norm  # type: ignore[return-value]


def fftc(x: torch.Tensor, dims: Dims = (-2, -1)) -> torch.Tensor:
    """Centred orthonormal forward FFT of image ``x`` over ``dims`` (image -> k-space)."""
    d = _as_dims(x, dims)
    x = torch.fft.ifftshift(x, dim=d)
    x = torch.fft.fftn(x, dim=d, norm="ortho")
    return torch.fft.fftshift(x, dim=d)


def ifftc(k: torch.Tensor, dims: Dims = (-2, -1)) -> torch.Tensor:
    """Centred orthonormal inverse FFT of k-space ``k`` over ``dims`` (k-space -> image)."""
    d = _as_dims(k, dims)
    k = torch.fft.ifftshift(k, dim=d)
    k = torch.fft.ifftn(k, dim=d, norm="ortho")
    return torch.fft.fftshift(k, dim=d)
