"""Multi-coil Cartesian SENSE operator ``A = M F S`` for 3D slabs and 2D+time cine.

Axis layouts (3D slab, cine): DESIGN.md, "Conventions"; batch first, coils second. The
operator is a :class:`~melrecon.physics.operators.LinearOperator`: ``op(x)``, ``op.adjoint(k)``
(or ``op.H(k)``) and ``op.gram`` (``A^H A``, fused), which compose (``op.gram + lam``).

The image has the maps' shape without the coil axis; maps may be 1 along an image axis (cine
maps are shared by all frames) and the mask may be 1 along any k-space axis. Nothing else is
broadcast: an image or k-space whose shape disagrees raises ``ValueError`` naming both shapes.

The mask is applied as given in ``forward`` and in ``adjoint`` (so ``A^H A`` applies ``mask**2``;
identical for binary masks). All operations are plain torch ops, so autograd through
``forward`` gives ``adjoint`` and vice versa, on CPU and CUDA, complex64 and complex128.

Speed: when every Fourier-encoded axis has even length, the centred FFT is a plain FFT
between two checkerboard modulations, ``fftc(x) = (-1)^(N/2) s * fft(s * x)`` with
``s[n] = (-1)^n`` per axis (and the same for the inverse). The operator folds ``s`` into the
maps and ``(-1)^(N/2) s`` into the real mask once, at construction, so no shift copies are
made per application; odd sizes use :func:`fftc` / :func:`ifftc`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from melrecon.physics.fft import fftc, ifftc
from melrecon.physics.operators import LinearOperator


def _checkerboard(
    ndim: int, dims: tuple[int, ...], sizes: list[int], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """``prod_d (-1)^(n_d)`` over the axes ``dims``, shaped to broadcast against ``ndim`` axes."""
    sign = torch.ones((1,) * ndim, dtype=dtype, device=device)
    for d, n in zip(dims, sizes):
        shape = [1] * ndim
        shape[d] = n
        sign = sign * (1 - 2 * (torch.arange(n, device=device) % 2)).to(dtype).reshape(shape)
    return sign


class SenseOperator(LinearOperator):
    """SENSE forward model with its adjoint and normal operator.

    Args:
        maps: coil sensitivities, complex, shape (B or 1, C, *spatial).
        mask: sampling mask (real or bool), same ndim as the k-space (B, C, *image_spatial),
            each axis 1 or equal to the k-space axis.
        fft_dims: image axes that are Fourier encoded (negative indices, counted from the end).
        chunk: apply ``adjoint`` and ``normal`` in chunks of this many positions along the
            first image axis (the readout X of a 3D volume), which must not be Fourier
            encoded: the operator is separable along it, so the result is the same, and the
            coil-image temporaries (C times the image) are only a chunk's.  None: one piece.
    """

    def __init__(
        self,
        maps: torch.Tensor,
        mask: torch.Tensor,
        fft_dims: Sequence[int] = (-2, -1),
        chunk: int | None = None,
    ) -> None:
        if not torch.is_complex(maps):
            raise ValueError(f"maps must be complex, got dtype {maps.dtype} (shape {tuple(maps.shape)})")
        if maps.ndim < 3:
            raise ValueError(f"maps must have shape (B, C, *spatial), got {tuple(maps.shape)}")
        if mask.ndim != maps.ndim:
            raise ValueError(
                f"mask shape {tuple(mask.shape)} must have the k-space ndim {maps.ndim} "
                f"(maps shape {tuple(maps.shape)})"
            )
        if torch.is_complex(mask):
            raise ValueError(f"mask must be real or bool, got dtype {mask.dtype}")
        dims = tuple(int(d) for d in fft_dims)
        if any(d >= 0 for d in dims) or any(d < -(maps.ndim - 2) for d in dims):
            raise ValueError(
                f"fft_dims {dims} must be negative spatial axes of maps shape {tuple(maps.shape)}"
            )
        if chunk is not None:
            if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
                raise ValueError(f"chunk must be a positive integer or None, got {chunk!r}")
            if -(maps.ndim - 2) in dims:
                raise ValueError(
                    f"chunk: the first image axis of maps shape {tuple(maps.shape)} is Fourier encoded "
                    f"(fft_dims {dims}); chunks need an axis the operator is separable along"
                )
        self.chunk = chunk
        self.maps = maps
        self.mask = mask.to(device=maps.device, dtype=maps.real.dtype)
        self.fft_dims = dims
        sizes = [maps.shape[d] for d in dims]
        self._modulated = all(n % 2 == 0 and n > 1 for n in sizes)
        if self._modulated:
            sign = _checkerboard(maps.ndim, dims, sizes, maps.real.dtype, maps.device)
            self._maps_fft = maps * sign
            self._mask_fft = self.mask * sign * (-1) ** (sum(sizes) // 2 % 2)
        else:
            self._maps_fft, self._mask_fft = maps, self.mask

    def _fft(self, coil_images: torch.Tensor) -> torch.Tensor:
        """``F`` up to the modulation folded into ``_maps_fft`` / ``_mask_fft``."""
        if self._modulated:
            return torch.fft.fftn(coil_images, dim=self.fft_dims, norm="ortho")
        return fftc(coil_images, self.fft_dims)

    def _ifft(self, k: torch.Tensor) -> torch.Tensor:
        if self._modulated:
            return torch.fft.ifftn(k, dim=self.fft_dims, norm="ortho")
        return ifftc(k, self.fft_dims)

    # ----------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.maps.dtype

    @property
    def num_coils(self) -> int:
        return self.maps.shape[1]

    def _check(self, t: torch.Tensor, what: str) -> None:
        """Check an ``"image"`` (B, *spatial) or a ``"k-space"`` (B, C, *spatial) against the
        maps (dtype, shape) and the mask (broadcast), naming both shapes on failure."""
        mshape = self.maps.shape
        if t.dtype != self.maps.dtype:
            raise ValueError(
                f"{what} dtype {t.dtype} differs from maps dtype {self.maps.dtype} "
                f"({what} shape {tuple(t.shape)}, maps shape {tuple(mshape)})"
            )
        image = what == "image"
        kshape = (t.shape[0], self.num_coils, *t.shape[1:]) if image else tuple(t.shape)
        ok = len(kshape) == len(mshape) and kshape[1] == mshape[1] and mshape[0] in (1, kshape[0])
        ok = ok and all(m in (1, s) for m, s in zip(mshape[2:], kshape[2:]))
        if not ok:
            expected = "(B, *spatial) with each maps axis 1 or equal to the image axis" if image else (
                "(B, C, *spatial) with the maps' coil count")
            raise ValueError(f"{what} shape {tuple(t.shape)} does not match maps shape {tuple(mshape)}: expected {expected}")
        if self.mask.ndim != len(kshape) or any(m not in (1, k) for m, k in zip(self.mask.shape, kshape)):
            raise ValueError(
                f"mask shape {tuple(self.mask.shape)} does not broadcast to the k-space shape "
                f"{tuple(kshape)} of this {what}"
            )

    # ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``A x = M F S x``: image (B, *spatial) -> k-space (B, C, *spatial)."""
        self._check(x, "image")
        return self._mask_fft * self._fft(self._maps_fft * x.unsqueeze(1))

    def adjoint(self, k: torch.Tensor) -> torch.Tensor:
        """``A^H k = S^H F^H M k``: k-space (B, C, *spatial) -> image (B, *spatial)."""
        self._check(k, "k-space")
        return self._chunked(self._adjoint, k, k.shape[2], 2)

    def normal(self, x: torch.Tensor) -> torch.Tensor:
        """``A^H A x`` without materialising more than the coil images once (of a chunk)."""
        self._check(x, "image")
        return self._chunked(self._normal, x, x.shape[1], 1)

    def _adjoint(self, k: torch.Tensor, sl: slice) -> torch.Tensor:
        maps, mask = self._part(self._maps_fft, sl), self._part(self._mask_fft, sl)
        return (maps.conj() * self._ifft(mask * k)).sum(dim=1)

    def _normal(self, x: torch.Tensor, sl: slice) -> torch.Tensor:
        maps, mask = self._part(self._maps_fft, sl), self._part(self.mask, sl)
        coil_k = self._fft(maps * x.unsqueeze(1))
        coil_k = coil_k * (mask * mask)  # the modulation squares to one
        return (maps.conj() * self._ifft(coil_k)).sum(dim=1)

    @staticmethod
    def _part(t: torch.Tensor, sl: slice) -> torch.Tensor:
        """``t``'s piece along the first image axis (axis 2 of k-space), unless it broadcasts."""
        return t if t.shape[2] == 1 else t[:, :, sl]

    def _chunked(self, fn, t: torch.Tensor, n: int, axis: int) -> torch.Tensor:
        """``fn(t, slice)`` over chunks of the first image axis (at ``axis`` of ``t``), joined."""
        whole = slice(None)
        if self.chunk is None or self.chunk >= n:
            return fn(t, whole)
        parts = [fn(t.narrow(axis, a, min(self.chunk, n - a)), slice(a, a + self.chunk)) for a in range(0, n, self.chunk)]
        return torch.cat(parts, dim=1)
