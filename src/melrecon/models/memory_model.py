"""Memory model of one training step of an unrolled network: both families (MoDL:
``UnrolledNet``, N x (residual CNN, proximal DC); reversible: ``ReversibleUnrolledNet``, N additive
couplings on (image, latent)), every memory mode of the chain engine (``standard``,
``checkpoint``, ``mel`` with anchors every k unrolls, and MEL segments that fall back to the
sub-anchored recompute), tiled or untiled CNNs (:mod:`melrecon.mel.tiled`), ``dc_chunk``,
precision (32 or bf16-mixed), batch size and shared or per-unroll weights.

Sizes (bytes; b = bytes of one real number: 4 for complex64 data, 8 for complex128):

- ``I = B * V * 2b``: one complex image (V voxels), or the CNN's 2-channel real view of it;
- ``A = B * W * E * b``: one hidden activation of the CNN (W channels) over the region it is
  evaluated on: E = V untiled, E = voxels of the largest tile grown by the halo
  ``depth * (kernel // 2)`` when tiled;
- ``Wt = b * sum_l c_in c_out k^d``: the conv weights (MoDL: each call saves its own copy of the
  spectrally scaled weights; reversible: plain convs, one copy per set of weights);
- ``G = (depth - 1) A + Wt``: the MoDL CNN graph: every ReLU output (the conv inputs are those
  same tensors; the first conv's input is the unroll's input, counted as a state);
- ``S``: one chain state: MoDL ``I``; reversible ``B * V * (2 + K) * s`` with K latent channels
  and s = 8 for float64 streams (``state_precision`` fixed or double), b for ``input``;
- ``C * I``: one coil image set (C coils).

What autograd holds (what :class:`melrecon.mel.memory.MemoryProbe` counts) is the largest of the
step's phases (:func:`chain_phases`, a replay of :class:`melrecon.mel.backward.ChainRun` in
these units):

- stored states: ``standard`` every unroll's graph; ``checkpoint`` every unroll's input;
  ``mel`` the output and one anchor every k unrolls (the input is the first);
- a MEL segment, walked backwards by inversion, holds the incoming gradient (S), the recomputed
  input (S) and one unroll's graph; at its first layer the anchor replaces the recomputed input;
  the reversible family's fused inverse-and-backward holds no more than that first layer;
- a segment that falls back (drift above ``drift_tol``) holds ``ceil(L / s) - 1`` sub-anchors,
  ``s = ceil(sqrt L)``, plus up to ``s - 1`` states of the sub-segment it recomputes;
- one unroll's graph: MoDL untiled ``G + 2I`` (the CNN graph, and the DC solve's input and
  output), tiled ``2I`` (the tiled CNN keeps its input only) and, in its CNN's backward pass,
  the output and input gradients (2I) plus one tile's graph; reversible untiled
  ``2 (depth - 1) A + (5 + 1.5 K) I`` (R and Q's ReLU outputs; the casts, the concatenated CNN
  input, the DC solve's input and output, the latent updates) plus its weights, tiled
  ``(5 + 1.5 K) I``, with the tile's graph and the CNN's volume-sized gradients in its backward;
- the loss ``|out - target|^2``: ``1.5 I``.

Exact for the probe (tested against it at small sizes, ``tests/test_memory_model.py``, up to the
0-dim tensors graphs save: a few bytes each): every term above for float32/float64, both
families, slabs, whole volumes and cine, untiled and MoDL tiled. Estimates (within 10% of the
probe in the tests): the reversible family's tiled backward (its two CNNs' gradients), the
``double``/``input`` state precisions' unroll graph, and bf16-mixed, whose casts the model
counts as ``depth * I`` per phase and ``1.3 I`` per stored unroll (MoDL), ``0.5 I`` per phase
and a quarter of the CNN graph per stored unroll (reversible) (the CPU probe measured 0.3 to 3.7 I and -0.1 to 0.5 I; CUDA autocast also halves
conv activations, which the model does not count, so it over-predicts there).

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
- parameters, gradients and two Adam moments: 4 x parameter bytes (x N with per-unroll weights);
- not included: the CUDA context, cuDNN/cuFFT workspaces and allocator fragmentation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from melrecon.mel.tiled import TileSpec, tile_grid

MODES = ("standard", "checkpoint", "mel")
FAMILIES = ("modl", "rev")
PRECISIONS = ("32", "64", "bf16-mixed")
#: the terms of :attr:`PeakPrediction.terms` that are exact for the probe; the others are estimates
EXACT_TERMS = ("image", "activation", "weights", "cnn_graph", "state", "unroll_graph")


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
    exact: per term, True when it is exact for the probe, False for an estimate.
    phases: the phases compared.  tiles: number of tiles (1 = untiled).
    ext_shape: the largest evaluated region (tile + halo) per spatial axis.
    compute_factor: CNN voxels evaluated per volume voxel in one tiled pass (halo overlap).
    probe_exact: whether every term ``probe_bytes`` is made of is exact for the probe.
    """

    probe_bytes: int
    peak_bytes: int
    terms: dict[str, int]
    phases: list[Phase] = field(default_factory=list)
    tiles: int = 1
    ext_shape: tuple[int, ...] = ()
    compute_factor: float = 1.0
    exact: dict[str, bool] = field(default_factory=dict)
    probe_exact: bool = True

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


@dataclass(frozen=True)
class UnrollTerms:
    """One family's unroll in bytes (the units of :func:`chain_phases`).

    state: S, one chain state.  graph: one unroll's graph kept by ``standard`` (beyond its input
    state).  vjp: the phases of one unroll's rebuilt graph in the backward pass, (name, held
    beyond the input state, workspace).  shared_saved: bytes every graph shares once (weights
    saved by reference).  x0_held: bytes ``standard`` keeps besides the unrolls (the input).
    fused: the family inverts and backpropagates in one pass (no recomputed input held beside
    the graph).  nograd_ws: workspace of a no-grad unroll (forward, inversion).  bwd_ws:
    workspace of the backward through a stored unroll in ``standard``.
    """

    state: int
    graph: int
    vjp: tuple[tuple[str, int, int], ...]
    shared_saved: int
    x0_held: int
    fused: bool
    nograd_ws: int
    last_bwd: tuple[tuple[str, int, int], ...]


def chain_phases(u: UnrollTerms, n: int, memory: str, anchor_every: int | None, fallback: bool,
                 loss: int, per_stored: int = 0) -> list[Phase]:
    """The phases of one step of an N-unroll chain (a replay of ``ChainRun`` in bytes).

    anchor_every: ``mel`` anchor spacing k (None: pure MEL, the input only).  fallback: every
    MEL segment of two or more layers (and the top one) misses ``drift_tol`` and is recomputed
    from its anchor with sub-anchors.  per_stored: bytes added per stored unroll graph (bf16
    casts).
    """
    s, out = u.state, []
    if memory == "standard":
        graphs = n * (u.graph + per_stored) + u.shared_saved
        out.append(Phase("forward end (all unrolls stored, loss)", u.x0_held + graphs + loss, 0))
        for name, held, ws in u.last_bwd:
            out.append(Phase(f"backward: last unroll, {name}", u.x0_held + graphs - u.graph - per_stored + held, ws))
        return out
    if memory == "checkpoint":
        positions = list(range(n))
    else:
        k = anchor_every if anchor_every is not None and anchor_every < n else n
        positions = list(range(0, n, k))
    stored = len(positions) * s + (s if memory == "mel" else 0)  # anchors (+ the output, mel)
    out.append(Phase("forward end (anchors, loss)", stored + loss, 0))
    out.append(Phase("forward: unroll without graph", stored, u.nograd_ws))

    def vjp(where: str, extra: int, grad_held: bool) -> None:
        # the incoming gradient: held for the probe in a MEL segment, workspace elsewhere
        for name, held, ws in u.vjp:
            out.append(Phase(f"backward{where}: {name}", stored + extra + held + u.shared_saved,
                             ws + (0 if grad_held else s)))

    bounds = positions + [n]
    for i in range(len(positions)):
        length = bounds[i + 1] - bounds[i]
        if memory == "checkpoint" or (length == 1 and i < len(positions) - 1):
            vjp(" (one-unroll segment)", 0, False)
            continue
        # MEL segment: intermediate layers hold the gradient and the recomputed input
        if length > 1:
            vjp(" (MEL, by inversion)", s if u.fused else 2 * s, True)
            out.append(Phase("backward: inversion", stored + 2 * s, u.nograd_ws))
        vjp(" (MEL, at the anchor)", s, True)
        out.append(Phase("backward: drift check", stored + 3 * s, 0))
        if fallback:
            sub = max(1, math.ceil(math.sqrt(length)))
            subs = len(range(0, length, sub)) - 1
            vjp(" (fallback recompute)", (subs + min(sub, length) - 1) * s, False)
    return out


def _modl_terms(img: int, act: int, cnn_graph: int, tiled: bool, ws_cg: int, ws_cnn_bwd: int,
                ws_cnn_eval: int, n: int) -> UnrollTerms:
    unroll = 2 * img + (0 if tiled else cnn_graph)
    if tiled:
        cnn = ("CNN, one tile", 2 * img + cnn_graph, 2 * act)
        # the last CNN's input gradient; none when N = 1 (x0 needs none)
        last_cnn = ("CNN, one tile", img + cnn_graph + (img if n > 1 else 0), 2 * act)
    else:
        cnn = ("CNN", cnn_graph, ws_cnn_bwd - img)
        last_cnn = ("CNN", cnn_graph, ws_cnn_bwd)
    return UnrollTerms(
        state=img, graph=unroll, vjp=(("DC solve of one unroll", unroll, ws_cg), cnn), shared_saved=0,
        x0_held=img, fused=False, nograd_ws=max(ws_cg, ws_cnn_eval),
        last_bwd=(("DC solve", unroll, ws_cg + img), last_cnn))


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
    *,
    family: str = "modl",
    anchor_every: int | None = None,
    fallback: bool = False,
    share_weights: bool = True,
    precision: str = "32",
    latent_channels: int = 2,
    state_precision: str = "fixed",
) -> PeakPrediction:
    """Predict the memory of one training step (module docstring).

    Args:
        volume: the image's spatial shape the CNN convolves (3D CNNs): (X, Y, Z) of a slab or
            whole volume, (T, X, Y) of a cine, e.g. (320, 256, 320).
        coils: C.  width: CNN channels W.  depth: convs per CNN (>= 2).  kernel_size: odd k.
        num_unrolls: N.  memory: "standard" | "checkpoint" | "mel".
        tile: CNN tile (as :func:`melrecon.mel.tiled.tiled_forward`); None = untiled.
        real_bytes: b, 4 (complex64) or 8 (complex128).  batch: B.
        fft_even: whether both FFT axes (the last two) are even (the SENSE operator then
            keeps a modulated copy of the maps); None = from ``volume``.
        dc_chunk: the model's ``dc_chunk`` (SENSE normal operator over this many positions of
            the first axis at a time): the CG's coil-image workspace shrinks to a chunk's,
            plus one image for joining the chunks.  None: whole image.
        family: "modl" | "rev".  anchor_every: ``mel`` anchor spacing k (None: pure MEL).
        fallback: predict the MEL segments falling back to the sub-anchored recompute (the
            worst case of a drifting inverse).  share_weights: one set of CNN weights (True)
            or one per unroll.  precision: "32", "64" (then ``real_bytes`` 8) or "bf16-mixed".
        latent_channels: K, reversible family.  state_precision: reversible family's streams
            ("fixed" | "double" | "input").
    """
    spatial = tuple(_positive_int("volume entries", int(s)) for s in volume)
    if not 1 <= len(spatial) <= 3:
        raise ValueError(f"volume must have 1 to 3 spatial axes, got {tuple(volume)}")
    for name, v in (("coils", coils), ("width", width), ("num_unrolls", num_unrolls), ("batch", batch),
                    ("latent_channels", latent_channels)):
        _positive_int(name, v)
    if _positive_int("depth", depth) < 2:
        raise ValueError(f"depth must be >= 2, got {depth}")
    if _positive_int("kernel_size", kernel_size) % 2 == 0:
        raise ValueError(f"kernel_size must be odd, got {kernel_size}")
    if memory not in MODES:
        raise ValueError(f"memory must be one of {MODES}, got {memory!r}")
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if anchor_every is not None:
        _positive_int("anchor_every", anchor_every)
    if real_bytes not in (2, 4, 8):
        raise ValueError(f"real_bytes must be 2, 4 or 8, got {real_bytes!r}")
    if state_precision not in ("fixed", "double", "input"):
        raise ValueError(f"state_precision must be fixed, double or input, got {state_precision!r}")
    b, n, d, k_lat = real_bytes, num_unrolls, len(spatial), latent_channels
    voxels = math.prod(spatial)
    halo = (depth * (kernel_size // 2),) * d
    grid = tile_grid(spatial, tile, halo)
    tiled = len(grid) > 1
    ext_sizes = [math.prod(t.ext_shape) for t in grid]
    ext = max(grid, key=lambda t: math.prod(t.ext_shape)).ext_shape if tiled else spatial
    evaluated = max(ext_sizes) if tiled else voxels

    img = batch * voxels * 2 * b
    act = batch * width * evaluated * b
    taps = kernel_size**d
    if family == "modl":
        chans = [2] + [width] * (depth - 1) + [2]
        n_weights = sum(chans[i] * chans[i + 1] * taps for i in range(depth))
        n_params = n_weights + sum(chans[1:]) + 1  # + biases + the DC weight
    else:
        chans_r = [4] + [width] * (depth - 1) + [k_lat]
        chans_q = [k_lat] + [width] * (depth - 1) + [2]
        n_weights = sum(c[i] * c[i + 1] * taps for c in (chans_r, chans_q) for i in range(depth))
        n_params = n_weights + sum(chans_r[1:]) + sum(chans_q[1:]) + 3  # + biases, lam, eta, gamma
    if not share_weights:
        n_params *= n
    wt = n_weights * b
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

    if family == "modl":
        cnn_graph = (depth - 1) * act + wt
        u = _modl_terms(img, act, cnn_graph, tiled, ws_cg, ws_cnn_bwd, ws_cnn_eval, n)
        state = img
    else:
        sb = 8 if state_precision in ("fixed", "double") else b
        state = batch * voxels * (2 + k_lat) * sb
        cnn_graph = 2 * (depth - 1) * act  # R's and Q's ReLU outputs
        other = (5 * img + 3 * k_lat * img // 2)  # casts, CNN inputs, DC input/output, latent updates
        saved_wt = wt if share_weights else 0  # shared plain convs: one saved copy of the weights
        per_unroll_wt = 0 if share_weights else wt
        graph = other + per_unroll_wt + (0 if tiled else cnn_graph)
        if tiled:  # the CNN being backpropagated: its volume-sized gradients (up to 4 channels) + one tile graph
            cnn = ("CNNs, one tile", graph + img + cnn_graph // 2, 2 * act)
        else:
            cnn = ("CNNs", graph, ws_cnn_bwd)
        u = UnrollTerms(state=state, graph=graph, vjp=(cnn,), shared_saved=saved_wt, x0_held=0, fused=True,
                        nograd_ws=max(ws_cg, ws_cnn_eval), last_bwd=(cnn,))
    # bf16-mixed: autocast's casts (estimates from the CPU probe: MoDL's spectrally scaled convs
    # and their inputs ~ depth I per phase and 1.3 I per stored unroll; reversible 0.5 I per phase
    # and a quarter of the CNN graph per stored unroll)
    bf16 = precision == "bf16-mixed"
    per_stored = (13 * img // 10 if family == "modl" else cnn_graph // 4) if bf16 else 0
    per_phase = (depth * img if family == "modl" else img // 2) if bf16 else 0
    phases = chain_phases(u, n, memory, anchor_every if memory == "mel" else None, fallback and memory == "mel",
                          loss, per_stored)
    if per_phase:
        phases = [Phase(p.name, p.held + per_phase, p.workspace) for p in phases]
    probe = max(p.held for p in phases)
    persistent = data + params
    peak = persistent + max(p.held + p.workspace for p in phases)
    terms = {"image": img, "activation": act, "weights": wt, "cnn_graph": cnn_graph, "state": state,
             "unroll_graph": u.graph, "coil_images": coil, "data": data, "params_and_optimizer": params,
             "persistent": persistent}
    exact = {name: name in EXACT_TERMS for name in terms}
    probe_exact = precision != "bf16-mixed" and (family == "modl" or (not tiled and state_precision == "fixed"))
    if not probe_exact:
        exact["unroll_graph"] = False
    return PeakPrediction(
        probe_bytes=probe,
        peak_bytes=peak,
        terms=terms,
        phases=phases,
        tiles=len(grid),
        ext_shape=tuple(ext),
        compute_factor=sum(ext_sizes) / voxels if tiled else 1.0,
        exact=exact,
        probe_exact=probe_exact,
    )


def halve_longest(tile: Sequence[int]) -> tuple[int, ...]:
    """The tile with its longest axis halved, rounding up (the first longest axis on ties)."""
    axis = max(range(len(tile)), key=lambda a: tile[a])
    return tuple(-(-int(t) // 2) if a == axis else int(t) for a, t in enumerate(tile))


def choose_tile(budget_bytes: float, volume: Sequence[int], **kwargs) -> tuple[tuple[int, ...] | None, PeakPrediction]:
    """The first tile, halving (rounding up) the tile's longest axis from the whole volume,
    whose predicted ``peak_bytes`` is within ``budget_bytes``: ``(None, prediction)`` when the
    untiled step fits.  Raises ValueError when halving stops lowering the prediction before it
    fits (the volume-sized terms alone exceed the budget).  ``kwargs``: the other arguments of
    :func:`predict_peak`."""
    tile = tuple(int(s) for s in volume)
    pred = predict_peak(volume, tile=None, **kwargs)
    while pred.peak_bytes > budget_bytes:
        if max(tile) == 1:
            break
        tile = halve_longest(tile)
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
        tile = halve_longest(tile)
    chosen, pred = choose_tile(args.budget_gb * 1e9, args.volume, memory=args.memory, **kw)
    print(f"memory={args.memory}, budget {args.budget_gb:g} GB: tile {chosen}: {pred.summary()}")
    for ph in pred.phases:
        print(f"    {ph.name:36} held {ph.held / 1e9:6.2f} GB + workspace {ph.workspace / 1e9:6.2f} GB")
    return chosen, pred


if __name__ == "__main__":
    main()
