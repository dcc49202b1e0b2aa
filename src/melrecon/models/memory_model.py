"""Memory model of one training step of a MoDL unrolled network (UnrolledNet: N x (residual
CNN, proximal DC)), with or without tiling of the CNN (:mod:`melrecon.mel.tiled`).

Sizes (bytes; b = bytes of one real number: 4 for complex64 data, 8 for complex128):

- ``I = B * V * 2b``: one complex image (V voxels), or the CNN's 2-channel real view of it;
- ``A = B * W * E * b``: one hidden activation of the CNN (W channels) over the region it is
  evaluated on: E = V untiled, E = voxels of the largest tile grown by the halo
  ``depth * (kernel // 2)`` when tiled;
- ``Wt = b * sum_l c_in c_out k^d``: the conv weights (each call saves its own copy of the
  spectrally scaled weights);
- ``G = (depth - 1) A + Wt``: the CNN graph: every ReLU output (the conv inputs are those
  same tensors; the first conv's input is the unroll's input, counted as a state);
- ``C * I``: one coil image set (C coils).

What autograd holds (what :class:`melrecon.mel.memory.MemoryProbe` counts), per phase of
the step; the peak is the largest phase:

- one unroll's stored graph: untiled ``G + 2I`` (the CNN graph, and the DC solve's input
  and output); tiled ``2I`` (the tiled CNN keeps its input only, which is the unroll's
  input, a state counted elsewhere);
- the backward pass of a tiled CNN holds the output gradient and the input gradient (2I,
  volume-sized) plus one tile's graph G (with E = the tile);
- the loss ``|out - target|^2``: ``1.5 I`` (the complex residual, its magnitude);
- ``standard``: x0 and N stored unrolls (+ loss) at the end of the forward pass; tiled,
  the peak comes in the backward pass of the last CNN: x0, N - 1 unroll graphs, the last
  CNN's input, its output/input gradients (no input gradient when N = 1: x0 needs none)
  and one tile graph;
- ``checkpoint``: N anchors (every unroll's input) + the graph of one unroll while it is
  backpropagated;
- ``mel`` (pure MEL, no anchors but the input): output and x0, the gradient, the
  recomputed unroll input (N > 1) + one unroll's graph.

These terms are exact for the probe (tested at small sizes, ``tests/test_memory_model.py``).
The full estimate (``peak_bytes``) adds what the probe cannot see, from reading the code;
these terms are estimates until measured on a GPU:

- data held for the whole step: maps, their FFT-modulated copy (when both FFT axes are
  even, see :class:`melrecon.physics.sense.SenseOperator`), k-space (3 C I), A^H b and the
  target (2I);
- workspace of a CG solve (forward solve and adjoint solve in the backward): 7 I (CG
  vectors and their updates) + 2 C I (the normal operator's coil images: maps times image,
  its FFT, masked copy and inverse FFT, two alive at a time; with ``dc_chunk`` a chunk's
  share of them, plus one image for joining the chunks);
- workspace of a CNN backward: the incoming gradient of the unroll (I) + 2 A (the
  gradient entering and leaving a conv/ReLU pair); of a no-grad CNN evaluation (forward
  in the memory-saving modes, fixed-point inverse): 4 I + 2 A;
- parameters, gradients and two Adam moments: 4 x parameter bytes;
- not included: the CUDA context, cuDNN/cuFFT workspaces and allocator fragmentation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from melrecon.mel.tiled import TileSpec, tile_grid

MODES = ("standard", "checkpoint", "mel")


@dataclass(frozen=True)
class Phase:
    """One moment of the step: bytes held for backward (probe-visible) and workspace."""

    name: str
    held: int
    workspace: int


@dataclass(frozen=True)
class PeakPrediction:
    """Predicted memory of one training step (module docstring for the terms).

    probe_bytes: peak of the bytes autograd holds (what MemoryProbe measures).
    peak_bytes: estimated device peak: persistent data and parameters + the largest
        phase's held bytes plus its workspace.
    terms: the sizes the phases are made of (I, A, Wt, data, params, ...), bytes.
    phases: the phases compared.  tiles: number of tiles (1 = untiled).
    ext_shape: the largest evaluated region (tile + halo) per spatial axis.
    compute_factor: CNN voxels evaluated per volume voxel in one tiled pass (halo overlap).
    """

    probe_bytes: int
    peak_bytes: int
    terms: dict[str, int]
    phases: list[Phase] = field(default_factory=list)
    tiles: int = 1
    ext_shape: tuple[int, ...] = ()
    compute_factor: float = 1.0

    def summary(self) -> str:
        gb = 1e9
        worst = max(self.phases, key=lambda p: p.held + p.workspace)
        return (
            f"peak {self.peak_bytes / gb:.2f} GB (autograd-held {self.probe_bytes / gb:.2f} GB; largest phase "
            f"'{worst.name}'; data+params {self.terms['persistent'] / gb:.2f} GB); tiles {self.tiles}, "
            f"tile+halo {self.ext_shape}, CNN compute x{self.compute_factor:.2f}"
        )


def _positive_int(name: str, v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return v


def predict_peak(
    volume: Sequence[int],
    coils: int,
    width: int,
    depth: int,
    num_unrolls: int,
    memory: str,
    tile: TileSpec = None,
    real_bytes: int = 4,
    batch: int = 1,
    kernel_size: int = 3,
    fft_even: bool | None = None,
    dc_chunk: int | None = None,
) -> PeakPrediction:
    """Predict the memory of one MoDL training step (module docstring).

    Args:
        volume: the image's spatial shape the CNN convolves, e.g. (X, Y, Z) = (320, 256, 320).
        coils: C.  width: CNN channels W.  depth: convs per CNN (>= 2).  kernel_size: odd k.
        num_unrolls: N.  memory: "standard" | "checkpoint" | "mel" (pure MEL).
        tile: CNN tile (as :func:`melrecon.mel.tiled.tiled_forward`); None = untiled.
        real_bytes: b, 4 (complex64) or 8 (complex128).  batch: B.
        fft_even: whether both FFT axes (the last two) are even (the SENSE operator then
            keeps a modulated copy of the maps); None = from ``volume``.
        dc_chunk: the model's ``dc_chunk`` (SENSE normal operator over this many positions of
            the first axis at a time): the CG's coil-image workspace shrinks to a chunk's,
            plus one image for joining the chunks.  None: whole image.
    """
    spatial = tuple(_positive_int("volume entries", int(s)) for s in volume)
    if not 1 <= len(spatial) <= 3:
        raise ValueError(f"volume must have 1 to 3 spatial axes, got {tuple(volume)}")
    for name, v in (("coils", coils), ("width", width), ("num_unrolls", num_unrolls), ("batch", batch)):
        _positive_int(name, v)
    if _positive_int("depth", depth) < 2:
        raise ValueError(f"depth must be >= 2, got {depth}")
    if _positive_int("kernel_size", kernel_size) % 2 == 0:
        raise ValueError(f"kernel_size must be odd, got {kernel_size}")
    if memory not in MODES:
        raise ValueError(f"memory must be one of {MODES}, got {memory!r}")
    if real_bytes not in (2, 4, 8):
        raise ValueError(f"real_bytes must be 2, 4 or 8, got {real_bytes!r}")
    b, n, d = real_bytes, num_unrolls, len(spatial)
    voxels = math.prod(spatial)
    halo = (depth * (kernel_size // 2),) * d
    grid = tile_grid(spatial, tile, halo)
    tiled = len(grid) > 1
    ext_sizes = [math.prod(t.ext_shape) for t in grid]
    ext = max(grid, key=lambda t: math.prod(t.ext_shape)).ext_shape if tiled else spatial
    evaluated = max(ext_sizes) if tiled else voxels

    img = batch * voxels * 2 * b
    act = batch * width * evaluated * b
    chans = [2] + [width] * (depth - 1) + [2]
    n_weights = sum(chans[i] * chans[i + 1] * kernel_size**d for i in range(depth))
    n_params = n_weights + sum(chans[1:]) + 1  # + biases + the DC weight
    wt = n_weights * b
    cnn_graph = (depth - 1) * act + wt
    coil = coils * img
    if fft_even is None:
        fft_even = len(spatial) >= 2 and all(s % 2 == 0 for s in spatial[-2:])
    data = (3 if fft_even else 2) * coil + 2 * img
    params = 4 * n_params * b
    if dc_chunk is not None and _positive_int("dc_chunk", dc_chunk) < spatial[0]:
        ws_cg = 8 * img + 2 * coil * dc_chunk // spatial[0]
    else:
        ws_cg = 7 * img + 2 * coil
    ws_cnn_bwd = img + 2 * act
    ws_cnn_eval = 4 * img + 2 * act
    loss = 3 * img // 2

    unroll = 2 * img + (0 if tiled else cnn_graph)  # one unroll's stored graph
    tile_bwd = 2 * img + cnn_graph  # tiled CNN backward: output and input gradients + one tile graph
    phases: list[Phase] = []
    if memory == "standard":
        phases.append(Phase("forward end (all unrolls stored, loss)", img + n * unroll + loss, 0))
        phases.append(Phase("backward: last DC solve", img + n * unroll, ws_cg + img))
        if tiled:
            first_gx = 0 if n == 1 else img  # x0 needs no gradient
            held = img + (n - 1) * unroll + tile_bwd - img + first_gx
            phases.append(Phase("backward: last CNN, one tile", held, 2 * act))
        else:
            phases.append(Phase("backward: last CNN", img + (n - 1) * unroll + cnn_graph, ws_cnn_bwd))
    elif memory == "checkpoint":
        phases.append(Phase("forward end (anchors, loss)", n * img + loss, 0))
        phases.append(Phase("forward: CNN without graph", n * img, ws_cnn_eval))
        phases.append(Phase("backward: DC solve of one unroll", n * img + unroll, ws_cg + img))
        if tiled:
            phases.append(Phase("backward: CNN, one tile", n * img + tile_bwd, 2 * act + img))
        else:
            phases.append(Phase("backward: CNN", n * img + cnn_graph, ws_cnn_bwd))
    else:  # mel
        base = 3 * img + (img if n > 1 else 0)  # output, x0, gradient, recomputed input
        phases.append(Phase("forward end (output, x0, loss)", 2 * img + loss, 0))
        phases.append(Phase("forward: CNN without graph", 2 * img, ws_cnn_eval))
        phases.append(Phase("backward: inversion", 4 * img, max(ws_cg, ws_cnn_eval)))
        phases.append(Phase("backward: DC solve of one unroll", base + unroll, ws_cg))
        if tiled:
            phases.append(Phase("backward: CNN, one tile", base + tile_bwd, 2 * act))
        else:
            phases.append(Phase("backward: CNN", base + cnn_graph, ws_cnn_bwd - img))
    probe = max(p.held for p in phases)
    persistent = data + params
    peak = persistent + max(p.held + p.workspace for p in phases)
    terms = {"image": img, "activation": act, "weights": wt, "cnn_graph": cnn_graph, "coil_images": coil,
             "data": data, "params_and_optimizer": params, "persistent": persistent}
    return PeakPrediction(
        probe_bytes=probe,
        peak_bytes=peak,
        terms=terms,
        phases=phases,
        tiles=len(grid),
        ext_shape=tuple(ext),
        compute_factor=sum(ext_sizes) / voxels if tiled else 1.0,
    )


def choose_tile(budget_bytes: float, volume: Sequence[int], **kwargs) -> tuple[tuple[int, ...] | None, PeakPrediction]:
    """The first tile, halving (rounding up) the tile's longest axis from the whole volume,
    whose predicted ``peak_bytes`` is within ``budget_bytes``: ``(None, prediction)`` when the
    untiled step fits.  Raises ValueError when halving stops lowering the prediction before it
    fits (the volume-sized terms alone exceed the budget).  ``kwargs``: the other arguments of
    :func:`predict_peak`."""
    tile = tuple(int(s) for s in volume)
    pred = predict_peak(volume, tile=None, **kwargs)
    while pred.peak_bytes > budget_bytes:
        axis = max(range(len(tile)), key=lambda a: tile[a])
        if tile[axis] == 1:
            break
        tile = tuple(-(-t // 2) if a == axis else t for a, t in enumerate(tile))
        nxt = predict_peak(volume, tile=tile, **kwargs)
        if nxt.peak_bytes >= pred.peak_bytes and nxt.peak_bytes > budget_bytes:
            pred = nxt
            break  # the tile no longer sets the peak
        pred = nxt
    if pred.peak_bytes > budget_bytes:
        raise ValueError(
            f"no tile keeps the predicted peak of volume {tuple(volume)} within {budget_bytes / 1e9:.2f} GB: "
            f"the smallest prediction is {pred.peak_bytes / 1e9:.2f} GB (largest phase: volume-sized data, "
            "images and DC workspace)"
        )
    return (None if pred.tiles == 1 else tile), pred


def main(argv: Sequence[str] | None = None) -> tuple[tuple[int, ...] | None, PeakPrediction]:
    """Print the prediction per memory mode and tile, and the tile chosen for a budget."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m melrecon.models.memory_model", description=main.__doc__)
    ap.add_argument("--volume", nargs="+", type=int, default=[320, 256, 320])
    ap.add_argument("--coils", type=int, default=8)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--depth", type=int, default=5)
    ap.add_argument("--unrolls", type=int, default=10)
    ap.add_argument("--memory", default="mel", choices=MODES)
    ap.add_argument("--real-bytes", type=int, default=4, help="4: complex64, 8: complex128")
    ap.add_argument("--budget-gb", type=float, default=20.0)
    ap.add_argument("--dc-chunk", type=int, default=None, help="model.dc_chunk (readout positions per SENSE chunk)")
    args = ap.parse_args(argv)
    kw = dict(coils=args.coils, width=args.width, depth=args.depth, num_unrolls=args.unrolls,
              real_bytes=args.real_bytes, dc_chunk=args.dc_chunk)
    print(f"volume {tuple(args.volume)}, {args.coils} coils, CNN {args.depth} x {args.width}, N = {args.unrolls}, "
          f"{args.real_bytes}-byte reals")
    tile: tuple[int, ...] | None = tuple(args.volume)
    for _ in range(4):
        for mode in MODES:
            pred = predict_peak(args.volume, memory=mode, tile=tile, **kw)
            print(f"  {mode:10} tile {str(tile):18} {pred.summary()}")
        axis = max(range(len(tile)), key=lambda a: tile[a])
        tile = tuple(-(-t // 2) if a == axis else t for a, t in enumerate(tile))
    chosen, pred = choose_tile(args.budget_gb * 1e9, args.volume, memory=args.memory, **kw)
    print(f"memory={args.memory}, budget {args.budget_gb:g} GB: tile {chosen}: {pred.summary()}")
    for ph in pred.phases:
        print(f"    {ph.name:36} held {ph.held / 1e9:6.2f} GB + workspace {ph.workspace / 1e9:6.2f} GB")
    return chosen, pred


if __name__ == "__main__":
    main()
