"""CNN regularizers on complex images: one conv stack, and the residual CNN ``y = x + R(x)``.

- :class:`ConvLayout`: complex image (B, *spatial) <-> real channels (B', 2, *conv_spatial),
  (real, imag) on the channel axis (an isometry, so Lipschitz constants carry over). The CNN
  convolves the last ``conv_dim`` axes and folds the leading spatial axes into the batch:
  ``conv_dim=3`` convolves (X, Y, Z) of a slab or (T, X, Y) of a cine series jointly;
  ``conv_dim=2`` convolves the last two axes slice by slice (slab) or frame by frame (cine).
- :class:`ConvStack`: conv, ReLU, ..., conv (default 5 convs, 64 channels, kernel 3, as in the
  MEL paper) of :class:`BoundedConv` layers, optionally with a Lipschitz bound. It is ``R`` of
  :class:`ResidualCNN` and the two CNNs of the reversible unrolls.
- :class:`ResidualCNN`: ``y = x + R(x)`` with ``R`` a 2 -> 2 channel ConvStack on the image,
  invertible when Lip(R) < 1 (the MoDL family's regularizer).

Lipschitz bound (``lipschitz=c``, needed by MEL): every conv is spectrally normalised to
operator norm at most ``c**(1/depth)``, so Lip(R) <= c (ReLU is 1-Lipschitz, the product
of the per-conv bounds is c).  The operator norm of each conv (zero padding, the actual
linear map, not the reshaped weight matrix) is estimated with conv / transposed conv on a
probe of the input's spatial shape, each axis capped at
``probe_cap``; the estimate is exact for inputs no larger than the probe and slightly low
for larger ones (measured for random kernels at the default cap of 32: 0.2-0.35% below the
norm at 96x96 in 2D, 0.3-0.4% below the norm at 48^3 in 3D).  Lip(R) <= product of the
per-conv norms is a loose bound, and the MEL engine checks every inversion's convergence
and falls back if one fails, so this small underestimate cannot corrupt a gradient.  The
estimate is held fixed during a training step (the scale ``min(1, bound/sigma)`` is a
constant in the graph, so forward, inversion and recompute see one function) and advanced
by one power iteration per step by ``refresh_()``, which :class:`melrecon.mel.InvertibleChain`
calls at the start of every training step.  The first forward call (or a new input shape)
starts the estimate with a short Lanczos run (accurate to ~1e-5 where power iteration
would need hundreds of steps: the top of a conv's spectrum is dense).

Inverse of the residual CNN: the fixed-point iteration ``x <- y - R(x)`` (rate Lip(R) <= c),
stopped at a relative residual ``inv_tol`` (default by dtype: 1e-6 single, 1e-12 double) or
after ``inv_max_iter`` evaluations; optional Anderson acceleration (``anderson`` = memory).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from melrecon.mel.invertible import InvertibleLayer, InvertResult, default_tolerance, invert_residual_map
from melrecon.mel.tiled import TileSpec, check_tile_spec, tiled_forward


class BoundedConv(nn.Module):
    """Conv (2D or 3D, stride 1, zero 'same' padding) with an optional operator-norm bound.

    Args:
        conv_dim: 2 or 3.  in_channels, out_channels, kernel_size (odd): as nn.ConvNd.
        bound: upper bound on the operator norm of the linear part, or None (no bound).
        probe_cap: largest probe size per axis for the power iteration.
        init_iters: Lanczos steps on first use / new shape.  step_iters: per refresh_().
    """

    def __init__(
        self,
        conv_dim: int,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        bias: bool = True,
        bound: float | None = None,
        probe_cap: int = 32,
        init_iters: int = 30,
        step_iters: int = 1,
    ) -> None:
        super().__init__()
        if conv_dim not in (2, 3):
            raise ValueError(f"conv_dim must be 2 or 3, got {conv_dim!r}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size!r}")
        if bound is not None and not bound > 0:
            raise ValueError(f"bound must be positive or None, got {bound!r}")
        self.conv_dim = conv_dim
        self.padding = kernel_size // 2
        self.bound = bound
        self.probe_cap = int(probe_cap)
        self.init_iters = int(init_iters)
        self.step_iters = int(step_iters)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *([kernel_size] * conv_dim)))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        # u is not saved: its shape follows the data, and it is rebuilt on first use. sigma is
        # saved (0 = not estimated yet), so a loaded network computes exactly the function it
        # computed when it was saved, until the next training step refreshes the estimate.
        self.register_buffer("u", torch.zeros(0), persistent=False)  # (1, in, *probe_shape)
        self.register_buffer("sigma", torch.zeros(()))
        self._keep_loaded_sigma = False
        self._tiling = False  # inside tiling_scope: the probe shape is the volume's, not the tile's
        self.reset_parameters()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[override]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.u = torch.zeros(0, dtype=self.weight.dtype, device=self.weight.device)
        self._keep_loaded_sigma = bool(self.sigma > 0)

    def reset_parameters(self) -> None:
        """nn.ConvNd's default initialisation; forgets the power-iteration state."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight[0].numel()
            bnd = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.bias, -bnd, bnd)
        self.u = torch.zeros(0, dtype=self.weight.dtype, device=self.weight.device)
        self.sigma = torch.zeros((), dtype=self.weight.dtype, device=self.weight.device)
        self._keep_loaded_sigma = False

    # -------------------------------------------------------------- linear part and adjoint
    def _conv(self, x: Tensor, w: Tensor) -> Tensor:
        f = F.conv3d if self.conv_dim == 3 else F.conv2d
        return f(x, w, None, padding=self.padding)

    def _conv_t(self, y: Tensor, w: Tensor) -> Tensor:
        f = F.conv_transpose3d if self.conv_dim == 3 else F.conv_transpose2d
        return f(y, w, None, padding=self.padding)

    @torch.no_grad()
    def power_iteration(self, iters: int) -> Tensor:
        """Advance the power iteration on W^T W by ``iters`` steps; returns sigma."""
        w = self.weight.detach()
        u = self.u
        for _ in range(iters):
            v = u / u.norm().clamp_min(1e-30)
            wv = self._conv(v, w)
            self.sigma = wv.norm()
            u = self._conv_t(wv, w)
        self.u = u
        return self.sigma

    @torch.no_grad()
    def _init_probe(self, spatial: tuple[int, ...]) -> None:
        """Start the estimate for a probe of this spatial shape: ``init_iters`` Lanczos steps
        on W^T W (the top of a conv's spectrum is dense, so plain power iteration would
        need hundreds of steps for the same accuracy); u is set to the top Ritz vector."""
        shape = (1, self.weight.shape[1], *[min(s, self.probe_cap) for s in spatial])
        gen = torch.Generator().manual_seed(0)  # deterministic, leaves the global RNG alone
        q = torch.randn(shape, generator=gen, dtype=self.weight.dtype).to(self.weight.device)
        w = self.weight.detach()
        op = lambda v: self._conv_t(self._conv(v, w), w)  # noqa: E731
        q = q / q.norm()
        basis, alphas, betas = [q], [], []
        for j in range(max(1, self.init_iters)):
            z = op(basis[j])
            alphas.append(torch.sum(basis[j] * z))
            for _ in range(2):  # full re-orthogonalisation, twice ("twice is enough")
                for b in basis:
                    z = z - torch.sum(b * z) * b
            beta = z.norm()
            if float(beta) <= 1e-10 * float(alphas[0].abs().clamp_min(1e-30)) or j == self.init_iters - 1:
                break
            betas.append(beta)
            basis.append(z / beta)
        k = len(alphas)
        t = torch.diag(torch.stack(alphas))
        if k > 1:
            off = torch.stack(betas[: k - 1])
            t = t + torch.diag(off, 1) + torch.diag(off, -1)
        evals, evecs = torch.linalg.eigh(t.double())
        coeff = evecs[:, -1].to(w.dtype)
        self.u = sum(c * b for c, b in zip(coeff, basis[:k]))
        loaded = self.sigma.to(w.dtype) if self._keep_loaded_sigma else None
        self.sigma = evals[-1].clamp_min(0).sqrt().to(w.dtype)
        self.power_iteration(1)  # sigma = ||W v|| for the unit Ritz vector v (consistent update)
        if loaded is not None:  # a loaded network keeps the scale it was saved with
            self.sigma, self._keep_loaded_sigma = loaded, False

    def refresh_(self) -> None:
        """One step-level update of the norm estimate (called once per training step)."""
        if self.bound is not None and self.u.numel() > 0:
            if self.u.dtype != self.weight.dtype or self.u.device != self.weight.device:
                self.u = self.u.to(self.weight)
            self.power_iteration(self.step_iters)

    def scale(self) -> Tensor:
        """The constant factor applied to the weight: min(1, bound / sigma)."""
        if self.bound is None:
            return torch.ones((), dtype=self.weight.dtype, device=self.weight.device)
        return torch.clamp(self.bound / self.sigma.clamp_min(1e-30), max=1.0)

    def effective_weight(self) -> Tensor:
        return self.weight if self.bound is None else self.weight * self.scale().detach()

    def _ensure_probe(self, spatial: tuple[int, ...]) -> None:
        """Start the norm estimate if there is none for inputs of this spatial shape."""
        probe = tuple(min(s, self.probe_cap) for s in spatial)
        if (
            self.u.numel() == 0
            or tuple(self.u.shape[2:]) != probe
            or self.u.dtype != self.weight.dtype
            or self.u.device != self.weight.device
        ):
            self._init_probe(spatial)

    def receptive_halo(self) -> tuple[int, ...]:
        """Voxels of context per spatial axis (kernel_size // 2), for melrecon.mel.tiled."""
        return (self.padding,) * self.conv_dim

    @contextmanager
    def tiling_scope(self, spatial: tuple[int, ...]) -> Iterator[None]:
        """Within: calls on tiles of a volume of this spatial shape use the volume's norm
        estimate (a tile's own probe shape would start another estimate: another function)."""
        if self.bound is not None:
            self._ensure_probe(tuple(spatial))
        before, self._tiling = self._tiling, True
        try:
            yield
        finally:
            self._tiling = before

    def forward(self, x: Tensor) -> Tensor:
        if self.bound is not None and not self._tiling:
            self._ensure_probe(tuple(x.shape[2:]))
        out = self._conv(x, self.effective_weight())
        if self.bias is not None:
            out = out + self.bias.view(1, -1, *([1] * self.conv_dim))
        return out


class ConvLayout:
    """Complex images <-> real CNN channels for a CNN over the last ``conv_dim`` axes.

    Channel layout: ``(B * prod(leading spatial axes), 2, *conv_spatial)`` real, channels
    (real, imag); the image is (B, *spatial) with at least ``conv_dim`` spatial axes.
    """

    def __init__(self, conv_dim: int) -> None:
        self.conv_dim = conv_dim

    def check(self, x: Tensor) -> None:
        """Raise ValueError unless ``x`` is a complex image with enough spatial axes."""
        if not torch.is_complex(x):
            raise ValueError(f"regularizer input must be complex, got dtype {x.dtype}")
        if x.ndim < 1 + self.conv_dim:
            raise ValueError(
                f"image shape {tuple(x.shape)} has fewer than conv_dim={self.conv_dim} "
                "spatial axes after the batch axis"
            )

    def to_channels(self, x: Tensor) -> Tensor:
        """Complex image (B, *spatial) -> real (B', 2, *conv_spatial)."""
        x = x.reshape(-1, *x.shape[x.ndim - self.conv_dim:])
        t = torch.view_as_real(x).movedim(-1, 1)
        # Under autocast, 3D: a contiguous channels-first copy. The view is strided per channel,
        # and the CPU bf16 conv3d weight gradient was reported wrong for such inputs (torch 2.13;
        # not reproduced at the test sizes). Only under autocast: in full precision the copy
        # would be one more image held by autograd per CNN call (the memory model counts the
        # view's storage once), and 2D convs take another kernel path for a copy (not bitwise).
        if self.conv_dim == 3 and torch.is_autocast_enabled(t.device.type):
            return t.contiguous()
        return t

    @staticmethod
    def from_channels(t: Tensor, image_shape: Sequence[int]) -> Tensor:
        """Real (B', 2, *conv_spatial) -> complex image of ``image_shape``."""
        return torch.view_as_complex(t.movedim(1, -1).contiguous()).reshape(image_shape)

    def latent_shape(self, image_shape: Sequence[int], channels: int) -> tuple[int, ...]:
        """Shape of a ``channels``-channel tensor in the CNN layout for this image shape."""
        lead = math.prod(image_shape[: len(image_shape) - self.conv_dim])
        return (lead, channels, *image_shape[len(image_shape) - self.conv_dim:])


class ConvStack(nn.Module):
    """CNN ``in_channels -> out_channels``: ``depth`` convs with ReLU between them.

    Args:
        in_channels, out_channels: real channels of input and output.
        width: hidden channels.  depth: number of convs (>= 1).  kernel_size: odd.
        conv_dim: 2 or 3 (the convolved axes; see :class:`ConvLayout`).
        out_scale: if given, the last conv's weights are scaled by it and its bias zeroed
            at (re-)initialisation, so a fresh network starts close to what surrounds the CNN
            (the reversible unrolls start near their physics part); None keeps nn.ConvNd's
            initialisation.
        lipschitz: bound c on the Lipschitz constant of the whole stack (each conv
            spectrally normalised to ``c**(1/depth)``), or None for plain convs.
        bias: conv biases.  probe_cap: cap per axis of the spectral-norm probe.
        tile: evaluate the stack in spatial tiles of this size (one entry per convolved
            axis, None = do not cut that axis; an int = every axis), with the halo of its
            receptive field and a tile-by-tile recompute backward
            (:func:`melrecon.mel.tiled.tiled_forward`): the same output and gradients, with
            one tile's graph instead of the whole volume's.  None: untiled.  A setting, not
            state: it is not saved with the weights and can be changed at any time
            (``stack.tile = ...``), e.g. to run a slab-trained network on a whole volume.

    No normalisation or dropout: nothing changes between the forward pass and a recompute.
    Input/output: (B, C, *spatial) real with ``len(spatial) == conv_dim``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        width: int = 64,
        depth: int = 5,
        kernel_size: int = 3,
        conv_dim: int = 3,
        out_scale: float | None = None,
        lipschitz: float | None = None,
        bias: bool = True,
        probe_cap: int = 32,
        tile: TileSpec = None,
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"regularizer.depth must be >= 1, got {depth!r}")
        if width < 1:
            raise ValueError(f"regularizer.width must be >= 1, got {width!r}")
        if lipschitz is not None and not lipschitz > 0:
            raise ValueError(f"regularizer.lipschitz must be positive or None, got {lipschitz!r}")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.conv_dim = conv_dim
        self.lipschitz = lipschitz
        self.out_scale = None if out_scale is None else float(out_scale)
        per_conv = None if lipschitz is None else lipschitz ** (1.0 / depth)
        chans = [in_channels] + [width] * (depth - 1) + [out_channels]
        self.convs = nn.ModuleList(
            BoundedConv(conv_dim, chans[i], chans[i + 1], kernel_size, bias, per_conv, probe_cap)
            for i in range(depth)
        )
        self.halo = tuple(sum(r) for r in zip(*(c.receptive_halo() for c in self.convs)))
        self.tile = tile
        self._scale_last()

    @property
    def tile(self) -> TileSpec:
        """Tile size of the tiled evaluation (None: untiled); see the class docstring."""
        return self._tile

    @tile.setter
    def tile(self, tile: TileSpec) -> None:
        if isinstance(tile, Sequence) and not isinstance(tile, str):
            tile = tuple(tile)  # also accepts Hydra's ListConfig
            if len(tile) != self.conv_dim:
                raise ValueError(
                    f"regularizer.tile {list(tile)} needs one entry per convolved axis (conv_dim={self.conv_dim})"
                )
        check_tile_spec(tile)
        self._tile = tile

    def _scale_last(self) -> None:
        if self.out_scale is None:
            return
        with torch.no_grad():
            self.convs[-1].weight.mul_(self.out_scale)
            if self.convs[-1].bias is not None:
                self.convs[-1].bias.zero_()

    def reset_parameters(self) -> None:
        for c in self.convs:
            c.reset_parameters()
        self._scale_last()

    def _run(self, t: Tensor) -> Tensor:
        """The untiled stack (what every tile evaluates)."""
        for i, conv in enumerate(self.convs):
            t = conv(t)
            if i < len(self.convs) - 1:
                t = F.relu(t)
        return t

    def forward(self, t: Tensor) -> Tensor:
        if self._tile is None:
            return self._run(t)
        return tiled_forward(self, t, self._tile, self.halo, fn=self._run)

    def extra_repr(self) -> str:
        return "" if self._tile is None else f"tile={self._tile}, halo={self.halo}"


def set_tile(net: nn.Module, tile: TileSpec) -> int:
    """Set the tile of every :class:`ConvStack` in ``net`` (e.g. a loaded network, to run it
    on whole volumes); returns how many stacks were set.  Raises ValueError for a bad tile."""
    stacks = [m for m in net.modules() if isinstance(m, ConvStack)]
    for s in stacks:
        s.tile = tile
    return len(stacks)


class ResidualCNN(InvertibleLayer):
    """``y = x + R(x)`` on complex images, R a 2 -> 2 channel :class:`ConvStack`; invertible
    by fixed point when Lip(R) < 1.

    Args:
        conv_dim: 3 (slabs, cine) or 2 (slice-by-slice / frame-by-frame).
        width: hidden channels.  depth: number of convs (>= 2).  kernel_size: odd.
        lipschitz: bound c on Lip(R) (spectral normalisation), or None for a plain CNN
            (then ``memory="mel"`` is refused by UnrolledNet).
        probe_cap: cap per axis of the power-iteration probe.
        inv_tol: relative residual of the inverse (None: by dtype).  inv_max_iter: cap.
        anderson: Anderson memory for the inverse (0 = plain fixed point).
        bias: conv biases.
        tile: tiled evaluation of R (see :class:`ConvStack`), in the forward pass, its
            backward and the fixed-point inverse; None: untiled.

    Shapes: x complex (B, *spatial) with at least ``conv_dim`` spatial axes; output same.
    """

    def __init__(
        self,
        conv_dim: int = 3,
        width: int = 64,
        depth: int = 5,
        kernel_size: int = 3,
        lipschitz: float | None = 0.9,
        probe_cap: int = 32,
        inv_tol: float | None = None,
        inv_max_iter: int = 100,
        anderson: int = 0,
        bias: bool = True,
        tile: TileSpec = None,
    ) -> None:
        super().__init__()
        if depth < 2:
            raise ValueError(f"regularizer.depth must be >= 2, got {depth!r}")
        if inv_tol is not None and not inv_tol > 0:
            raise ValueError(f"regularizer.inv_tol must be positive or None, got {inv_tol!r}")
        if inv_max_iter < 1:
            raise ValueError(f"regularizer.inv_max_iter must be >= 1, got {inv_max_iter!r}")
        if anderson < 0:
            raise ValueError(f"regularizer.anderson must be >= 0, got {anderson!r}")
        self.cnn = ConvStack(2, 2, width, depth, kernel_size, conv_dim, None, lipschitz, bias, probe_cap, tile)
        self.layout = ConvLayout(conv_dim)
        self.inv_tol = inv_tol
        self.inv_max_iter = inv_max_iter
        self.anderson = anderson

    @property
    def lipschitz(self) -> float | None:
        """The bound c on Lip(R) (None: unbounded)."""
        return self.cnn.lipschitz

    def reset_parameters(self) -> None:
        self.cnn.reset_parameters()

    def residual(self, x: Tensor) -> Tensor:
        """R(x): complex in, complex out (same shape)."""
        self.layout.check(x)
        return self.layout.from_channels(self.cnn(self.layout.to_channels(x)), x.shape)

    # ------------------------------------------------------------------ contract
    def forward(self, x: Tensor, data: Any = None) -> Tensor:
        return x + self.residual(x)

    def inverse(self, y: Tensor, data: Any = None) -> InvertResult:
        tol = self.inv_tol if self.inv_tol is not None else default_tolerance(y.dtype)
        with torch.no_grad():
            r = invert_residual_map(self.residual, y, tol, self.inv_max_iter, self.anderson)
        return InvertResult(r.x, r.residual, r.iterations, r.converged)
