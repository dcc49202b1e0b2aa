"""Tiled evaluation of local convolution stacks: exact output, backward recomputed tile by tile.

A module ``f`` on ``(N, C, *spatial)`` tensors is *local with halo r* (one r_a per spatial
axis) when every output voxel depends only on input voxels at most r_a away along every
axis, and ``f`` zero-pads where its input ends: stacks of stride-1 'same' convolutions
(any dilation) with pointwise layers between them.  For a conv of kernel k and dilation d
the reach is d (k - 1) / 2 per side; through a stack the reaches add, so

    r_a = sum over the convs of ceil(d_a (k_a - 1) / 2)

(an upper bound for any wiring of the convs, e.g. skip connections; a larger halo only
costs compute, never exactness).

*Exactness.*  Cut the volume into tiles T.  Evaluate ``f`` on E = T grown by r on every
side and cut at the volume's border, then keep the T part.  Where E ends at the volume's
border, f zero-pads exactly as on the whole volume.  Where E ends inside the volume (a
cut), the zeros f pads there are wrong, but the error moves inwards by at most one layer's
reach per layer, i.e. by less than r in total, so it never reaches T.  Hence
``f(x)[T] = f(x[E])[T - E.start]`` up to rounding.

*Backward.*  :class:`_TiledFunction` saves only its input.  Its backward pass rebuilds the
graph of one tile at a time (with autograd, from the saved input), backpropagates that
tile's slice of the output gradient, adds the tile's input gradient into the E region of
the input gradient (neighbouring E regions overlap: their contributions add) and sums the
parameter gradients, which it returns through its parameter inputs (as
the MEL backward (:mod:`melrecon.mel.backward`) does).  Memory: the input, the output gradient
and the input gradient (volume-sized) plus one tile's graph, instead of the whole volume's
graph.  Compute: one extra forward pass, and the halo overlap (a factor
``prod_a (t_a + 2 r_a) / t_a`` on interior tiles).

*What tiling needs from the module* (checked by :func:`receptive_halo` and at call time):

- convolutions: ``nn.Conv1d/2d/3d`` with stride 1, zero padding mode, padding ``'same'``
  or d (k - 1) / 2; modules with a ``receptive_halo() -> tuple[int, ...]`` method (e.g.
  :class:`melrecon.models.regularizers.BoundedConv`) declare their own reach;
- pointwise layers (activations, ``Identity``), batch norm in eval mode, dropout in eval
  mode (or p = 0); containers are searched recursively;
- refused, naming the layer: pooling, upsampling, pixel shuffles, attention, transformers,
  linear layers (they act along a spatial axis), instance/group/layer norm (statistics
  over the spatial axes), batch norm in training mode (statistics of the whole volume),
  dropout in training mode (one mask per tile is not the whole volume's mask), transposed
  and strided convolutions, non-zero padding modes.  Unknown leaf layers are refused when
  the halo is computed automatically (pass ``halo=`` to vouch for them).
- Functional operations inside a custom ``forward`` cannot be inspected: a module that
  pools or normalises with ``torch.nn.functional`` is the caller's responsibility.

*Shape-dependent state.*  Modules whose function depends on the input's spatial shape
beyond the convolution (BoundedConv sizes its spectral-norm probe from the input) expose
``tiling_scope(spatial) -> ContextManager``; every tile loop (forward and backward) runs
inside the scopes of all submodules with the *whole volume's* spatial shape, so every
tile computes with the whole volume's function.  PyTorch's own
``torch.nn.utils.parametrizations.spectral_norm`` advances its power iteration on every
weight access in training mode: a tiled call advances it once (as an untiled call does)
and then holds it still for every tile and for the backward recompute (inside
:class:`melrecon.mel.freeze.StepFreezer` it is already held still).  Parameters are read
from the module at call time, so computed weights (spectral norm, frozen scales) are
recomputed per tile from the real parameters, which receive the gradients.

Use :func:`tiled_forward` (functional; leaves the module's state dict untouched) or the
drop-in wrapper :class:`TiledModule`; a module that tiles its own ``forward`` passes its
untiled body as ``fn`` (:class:`melrecon.models.regularizers.ConvStack` does, so its
``tile`` option changes neither its parameters nor its state dict).  Tiles are visited in a fixed (C) order, so the
result is deterministic.  Under ``torch.no_grad()`` (or when nothing requires grad) the
tiles are just evaluated in a loop.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import product
from typing import Union

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.dropout import _DropoutNd
from torch.nn.utils import parametrize

from melrecon.mel import memory as _memory
from melrecon.mel.freeze import _is_torch_spectral_norm
from melrecon.mel.backward import _autocast_like, _autocast_state

TileSpec = Union[int, Sequence[Union[int, None]], None]

__all__ = [
    "NonLocalModuleError",
    "Tile",
    "TiledModule",
    "check_tile_spec",
    "receptive_halo",
    "tile_grid",
    "tiled_forward",
]


class NonLocalModuleError(ValueError):
    """A module cannot be evaluated tile by tile (the message names the layer and why)."""


# ----------------------------------------------------------------------------- layer analysis

# pointwise layers: each output voxel depends on the same input voxel only
_POINTWISE = (
    nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU,
    nn.GELU, nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid,
    nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid, nn.Threshold, nn.Hardshrink,
    nn.Softshrink,
)  # fmt: skip

# known non-local layers and why they cannot be tiled
_NONLOCAL: tuple[tuple[tuple[type, ...], str], ...] = (
    ((nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd,
      nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._LPPoolNd, nn.modules.pooling._MaxUnpoolNd,
      nn.FractionalMaxPool2d, nn.FractionalMaxPool3d), "pooling changes the grid"),
    ((nn.Upsample, nn.PixelShuffle, nn.PixelUnshuffle), "upsampling changes the grid"),
    ((nn.MultiheadAttention, nn.Transformer, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer,
      nn.TransformerEncoder, nn.TransformerDecoder), "attention is global"),
    ((nn.Linear, nn.Bilinear, nn.Flatten, nn.Unflatten, nn.Softmax, nn.LogSoftmax, nn.Softmin),
     "it acts along a spatial axis"),
    ((nn.modules.instancenorm._InstanceNorm, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm),
     "its statistics span the spatial axes"),
)  # fmt: skip


def _conv_halo(name: str, conv: _ConvNd) -> tuple[int, ...]:
    """Reach of one torch convolution per spatial axis, after checking it is 'same' and stride 1."""
    kind = type(conv).__name__
    if conv.transposed:
        raise NonLocalModuleError(f"layer '{name}' ({kind}): transposed convolutions cannot be tiled")
    if any(s != 1 for s in conv.stride):
        raise NonLocalModuleError(f"layer '{name}' ({kind}): stride {tuple(conv.stride)} != 1 changes the grid")
    if conv.padding_mode != "zeros":
        raise NonLocalModuleError(
            f"layer '{name}' ({kind}): padding_mode={conv.padding_mode!r}; tiling supports zero padding only"
        )
    spans = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
    if conv.padding != "same":
        pads = tuple(conv.padding)  # 'valid' is stored as zeros
        if any(2 * p != s for p, s in zip(pads, spans)):
            raise NonLocalModuleError(
                f"layer '{name}' ({kind}): padding {pads} is not 'same' for kernel {tuple(conv.kernel_size)} "
                f"and dilation {tuple(conv.dilation)} (needs dilation*(kernel-1)/2 = "
                f"{tuple(s / 2 for s in spans)}): the output would change shape"
            )
    return tuple(math.ceil(s / 2) for s in spans)  # 'same' pads an odd span asymmetrically


def _add(a: tuple[int, ...], b: tuple[int, ...], where: str) -> tuple[int, ...]:
    if not a:
        return tuple(b)
    if not b:
        return tuple(a)
    if len(a) != len(b):
        raise NonLocalModuleError(
            f"layer '{where}' convolves {len(b)} spatial axes, other layers {len(a)}: one module, one spatial rank"
        )
    return tuple(x + y for x, y in zip(a, b))


def _children(m: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    # parametrisations act on weights, not on the data: not layers of the network
    return ((n, c) for n, c in m.named_children() if not (n == "parametrizations" and parametrize.is_parametrized(m)))


def _analyse(m: nn.Module, name: str, strict: bool) -> tuple[int, ...]:
    label = name or "<root>"
    declared = getattr(m, "receptive_halo", None)
    if callable(declared):
        return tuple(int(r) for r in declared())
    if isinstance(m, _ConvNd):
        return _conv_halo(label, m)
    for kinds, why in _NONLOCAL:
        if isinstance(m, kinds):
            raise NonLocalModuleError(f"layer '{label}' ({type(m).__name__}) cannot be tiled: {why}")
    if isinstance(m, (*_POINTWISE, _BatchNorm, _DropoutNd)):
        return ()  # mode-dependent cases (batch norm/dropout in training) are checked per call
    kids = list(_children(m))
    if not kids:
        if not strict:
            return ()
        raise NonLocalModuleError(
            f"layer '{label}' ({type(m).__name__}): unknown layer, cannot tell whether it is local; give it a "
            "receptive_halo() method or pass halo= explicitly"
        )
    halo: tuple[int, ...] = ()
    for n, c in kids:
        halo = _add(halo, _analyse(c, f"{name}.{n}" if name else n, strict), f"{name}.{n}" if name else n)
    return halo


def receptive_halo(module: nn.Module) -> tuple[int, ...]:
    """Halo per spatial axis of a local module: the sum over its convolutions of
    ``ceil(dilation * (kernel - 1) / 2)`` (module docstring).  ``()`` for a module without
    convolutions (pointwise: halo 0 on every axis).

    Raises :class:`NonLocalModuleError` (a ``ValueError``) naming the first layer that
    cannot be tiled, including unknown leaf layers.
    """
    return _analyse(module, "", strict=True)


def check_call_modes(module: nn.Module) -> None:
    """Refuse layers that are local in eval mode but not in their current (training) mode,
    and known non-local layers (even when the halo was given explicitly)."""
    _analyse(module, "", strict=False)
    for name, m in module.named_modules():
        label = name or "<root>"
        if isinstance(m, _BatchNorm) and (m.training or not m.track_running_stats):
            raise NonLocalModuleError(
                f"layer '{label}' ({type(m).__name__}) in training mode (or without running statistics) "
                "normalises with statistics of the whole volume: it cannot be tiled (use eval mode)"
            )
        if isinstance(m, _DropoutNd) and m.training and m.p > 0:
            raise NonLocalModuleError(
                f"layer '{label}' ({type(m).__name__}, p={m.p}) in training mode draws a random mask per tile, "
                "not the whole volume's mask, and again in the backward recompute: it cannot be tiled"
            )


# ----------------------------------------------------------------------------- tile grid


@dataclass(frozen=True)
class Tile:
    """One tile, as slices over the spatial axes.

    out: the tile's voxels in the volume.  ext: the tile grown by the halo, cut at the
    volume's border (the region the module is evaluated on).  crop: the tile's voxels
    within ``ext``.
    """

    out: tuple[slice, ...]
    ext: tuple[slice, ...]
    crop: tuple[slice, ...]

    @property
    def ext_shape(self) -> tuple[int, ...]:
        return tuple(s.stop - s.start for s in self.ext)


def _is_size(t: object) -> bool:
    return isinstance(t, int) and not isinstance(t, bool) and t >= 1


def check_tile_spec(tile: TileSpec) -> None:
    """Raise ValueError unless ``tile`` is None, a positive int or a sequence of them/None."""
    ok = tile is None or _is_size(tile) or (
        isinstance(tile, Sequence) and not isinstance(tile, str) and len(tile) > 0
        and all(t is None or _is_size(t) for t in tile)
    )
    if not ok:
        raise ValueError(
            f"tile must be None, a positive integer, or a sequence of positive integers/None (one per spatial "
            f"axis), got {tile!r}"
        )


def _normalise_tile(tile: TileSpec, spatial: Sequence[int]) -> tuple[int, ...]:
    """Per-axis tile size; None (whole or per axis) = that axis is not cut."""
    check_tile_spec(tile)
    nd = len(spatial)
    if tile is None:
        return tuple(int(s) for s in spatial)
    sizes = [tile] * nd if isinstance(tile, int) else list(tile)
    if len(sizes) != nd:
        raise ValueError(f"tile {tuple(sizes)} has {len(sizes)} entries for {nd} spatial axes {tuple(spatial)}")
    return tuple(int(s) if t is None else min(int(t), int(s)) for t, s in zip(sizes, spatial))


def _normalise_halo(halo: Sequence[int], nd: int) -> tuple[int, ...]:
    halo = tuple(int(r) for r in halo)
    if not halo:
        return (0,) * nd
    if len(halo) != nd:
        raise ValueError(f"halo {halo} has {len(halo)} entries for {nd} spatial axes")
    if any(r < 0 for r in halo):
        raise ValueError(f"halo entries must be >= 0, got {halo}")
    return halo


def tile_grid(spatial: Sequence[int], tile: TileSpec, halo: Sequence[int]) -> list[Tile]:
    """Tiles covering ``spatial`` in C order: along axis a, starts 0, t_a, 2 t_a, ... (the
    last tile may be shorter); each grown by ``halo[a]`` on both sides, cut at the border."""
    nd = len(spatial)
    sizes = _normalise_tile(tile, spatial)
    halo = _normalise_halo(halo, nd)
    per_axis = []
    for s, t, r in zip(spatial, sizes, halo):
        axis = []
        for a in range(0, s, t):
            b = min(a + t, s)
            lo, hi = max(0, a - r), min(s, b + r)
            axis.append((slice(a, b), slice(lo, hi), slice(a - lo, b - lo)))
        per_axis.append(axis)
    return [Tile(*(tuple(parts) for parts in zip(*combo))) for combo in product(*per_axis)]


# ----------------------------------------------------------------------------- scopes


@contextlib.contextmanager
def _tiling_scope(module: nn.Module, spatial: tuple[int, ...]) -> Iterator[None]:
    """Enter every submodule's ``tiling_scope(spatial)`` and hold torch spectral norms still."""
    with contextlib.ExitStack() as stack:
        for m in module.modules():
            scope = getattr(m, "tiling_scope", None)
            if callable(scope):
                stack.enter_context(scope(spatial))
        sn = [m for m in module.modules() if _is_torch_spectral_norm(m)]
        modes = [m.training for m in sn]
        for m in sn:
            m.eval()
        try:
            yield
        finally:
            for m, mode in zip(sn, modes):
                m.train(mode)


def _advance_spectral_norms(module: nn.Module) -> None:
    """One power iteration per torch spectral norm in training mode: what one untiled call
    of the module does (each parametrised weight is read once per call)."""
    with torch.no_grad():
        for m in module.modules():
            if parametrize.is_parametrized(m):
                for pname, plist in m.parametrizations.items():
                    if any(_is_torch_spectral_norm(p) and p.training for p in plist):
                        getattr(m, pname)


# ----------------------------------------------------------------------------- evaluation


def _index(region: tuple[slice, ...]) -> tuple[slice, ...]:
    return (slice(None), slice(None), *region)


def _evaluate(net: nn.Module, fn: Callable[[Tensor], Tensor], x: Tensor, tiles: list[Tile]) -> Tensor:
    """Tile-by-tile forward pass of ``fn`` (no graph is kept); returns the whole output."""
    out: Tensor | None = None
    for tile in tiles:
        xs = x[_index(tile.ext)]
        y = fn(xs)
        if y.ndim != x.ndim or tuple(y.shape[2:]) != tuple(xs.shape[2:]) or y.shape[0] != x.shape[0]:
            raise NonLocalModuleError(
                f"{type(net).__name__} mapped a tile of shape {tuple(xs.shape)} to {tuple(y.shape)}: tiling needs a "
                "module that keeps the batch and spatial shape (N, C, *spatial) -> (N, C', *spatial)"
            )
        if out is None:
            out = y.new_empty((x.shape[0], y.shape[1], *x.shape[2:]))
        out[_index(tile.out)] = y[_index(tile.crop)]
    assert out is not None
    return out


class _TiledFunction(torch.autograd.Function):
    """Tiled forward (no graph) and tile-by-tile recompute backward.

    Inputs: (net, fn, tiles, spatial, x, *params).  ``fn`` evaluates ``net`` on one tile.
    The parameters are passed only so that autograd routes their gradients; the module
    reads its own parameters.
    """

    @staticmethod
    def forward(
        ctx, net: nn.Module, fn: Callable[[Tensor], Tensor], tiles: list[Tile], spatial: tuple[int, ...],
        x: Tensor, *params: Tensor,
    ):  # fmt: skip
        with _tiling_scope(net, spatial):
            out = _evaluate(net, fn, x, tiles)
        ctx.net, ctx.fn, ctx.tiles, ctx.spatial, ctx.params = net, fn, tiles, spatial, params
        ctx.autocast = _autocast_state(x.device.type)
        ctx.save_for_backward(x)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable  # the per-tile VJPs build no graph for a double backward
    def backward(ctx, g: Tensor):
        (x,) = ctx.saved_tensors
        net: nn.Module = ctx.net
        need_x = ctx.needs_input_grad[4]
        params = [p for p, need in zip(ctx.params, ctx.needs_input_grad[5:]) if need]
        gx = torch.zeros_like(x) if need_x else None
        acc: list[Tensor | None] = [None] * len(params)
        flags = [p.requires_grad for p in params]
        token = _memory.hold([g] + ([gx] if gx is not None else []))
        try:
            for p in params:  # the parameters of the forward call get gradients even if a flag changed since
                p.requires_grad_(True)
            with _tiling_scope(net, ctx.spatial), _autocast_like(ctx.autocast):
                for tile in ctx.tiles:
                    xs = x[_index(tile.ext)].detach().requires_grad_(need_x)
                    with torch.enable_grad():
                        y = ctx.fn(xs)[_index(tile.crop)]
                    inputs = ([xs] if need_x else []) + params
                    if not inputs or not y.requires_grad:
                        continue
                    grads = torch.autograd.grad(y, inputs, g[_index(tile.out)], allow_unused=True)
                    del y
                    if need_x and grads[0] is not None:
                        gx[_index(tile.ext)] += grads[0]
                    for i, gp in enumerate(grads[int(need_x):]):
                        if gp is not None:
                            acc[i] = gp if acc[i] is None else acc[i] + gp
        finally:
            token.release()
            for p, f in zip(params, flags):
                p.requires_grad_(f)
        it = iter(acc)
        grads_p = [next(it) if need else None for need in ctx.needs_input_grad[5:]]
        return (None, None, None, None, gx, *grads_p)


def tiled_forward(
    net: nn.Module,
    x: Tensor,
    tile: TileSpec,
    halo: Sequence[int] | None = None,
    fn: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """``net(x)`` evaluated tile by tile (module docstring); exact for local modules.

    Args:
        net: a local module mapping (N, C, *spatial) to (N, C', *spatial).
        x: the input, (N, C, *spatial), 1 to 3 spatial axes.
        tile: tile size: an int (every axis), a sequence with one entry per spatial axis
            (None = do not cut that axis), or None (no tiling: a plain call).  A tile at
            least as large as the volume is a plain call too.
        halo: voxels of context per spatial axis; None = :func:`receptive_halo` of ``net``.
        fn: what evaluates ``net`` on one tile (default ``net`` itself).  A module that tiles
            its own ``forward`` passes its untiled body here (e.g.
            :class:`melrecon.models.regularizers.ConvStack`); ``net`` still names the
            parameters that get gradients and the submodules whose scopes apply.

    Returns the output, with a graph whose backward recomputes one tile at a time when
    grad is enabled and ``x`` or a parameter of ``net`` requires grad.
    """
    if x.ndim < 3:
        raise ValueError(f"tiled_forward: input must be (N, C, *spatial), got shape {tuple(x.shape)}")
    spatial = tuple(int(s) for s in x.shape[2:])
    h = receptive_halo(net) if halo is None else halo
    tiles = tile_grid(spatial, tile, h)
    fn = net if fn is None else fn
    if len(tiles) == 1:
        return fn(x)
    check_call_modes(net)
    _advance_spectral_norms(net)
    params = [p for p in net.parameters() if p.requires_grad]
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or bool(params))
    if not needs_grad:
        with _tiling_scope(net, spatial):
            return _evaluate(net, fn, x, tiles)
    return _TiledFunction.apply(net, fn, tiles, spatial, x, *params)


class TiledModule(nn.Module):
    """Drop-in wrapper: ``TiledModule(net, tile, halo)(x) == net(x)``, evaluated in tiles.

    Args:
        net: the local module (see :func:`tiled_forward`); registered as ``self.net``.
        tile: int, per-axis sequence (None entries = whole axis), or None (plain call).
        halo: per-axis halo, or None to compute it from ``net`` (:func:`receptive_halo`,
            once, at construction; raises :class:`NonLocalModuleError` for non-local nets).
    """

    def __init__(self, net: nn.Module, tile: TileSpec = None, halo: Sequence[int] | None = None) -> None:
        super().__init__()
        self.net = net
        self.tile = tile
        self.halo = receptive_halo(net) if halo is None else tuple(int(r) for r in halo)
        check_tile_spec(tile)  # fail at construction, not at the first call

    def forward(self, x: Tensor) -> Tensor:
        return tiled_forward(self.net, x, self.tile, self.halo)

    def extra_repr(self) -> str:
        return f"tile={self.tile}, halo={self.halo}"
