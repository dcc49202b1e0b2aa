"""The ``checkpoint`` and ``mel`` backward passes of an :class:`~melrecon.mel.chain.InvertibleChain`.

:class:`ChainRun` is one call of a chain: its forward pass stores only the anchors (copies of
the state at the anchor positions, every layer for ``checkpoint``), and its backward pass walks
the segments between anchors in reverse. A ``mel`` segment a < b is backpropagated by
inversion: invert layer b-1 (recompute its input from its output), rebuild that one layer's
graph, backpropagate through it, accumulate the parameter gradients (shared parameters are
summed), go on down to layer a. Layer a is inverted too although x_a is stored: the relative
difference between the inverted and the stored x_a is the segment's *drift*, an upper estimate
of the error of every recomputed input in it. A one-layer segment backpropagates at its stored
anchor and needs no inversion, so with anchors at every layer only the topmost segment is
inverted (to keep measuring drift).

If the drift exceeds ``drift_tol``, or an inversion reports ``converged=False``, the segment's
gradients are discarded and the segment is redone exactly, with bounded memory: a forward
pass from the anchor stores every ``s = ceil(sqrt(L))``-th state of the segment's ``L``
layers (sub-anchors), then each sub-segment, last first, is recomputed from its sub-anchor
and backpropagated as in ``checkpoint`` mode (two-level checkpointing: at most about
``2 sqrt(L)`` states held at once instead of ``L``, for one extra forward pass of the
segment). A non-converged inversion and a drift redo with a fixed spacing warn once per
chain; redos chosen by the ``"auto"`` controller are counted but do not warn. The stats
count the redos (``fallbacks``) and the sub-anchor spacing used (``fallback_spacing``).

Same kernels in the forward pass and the recompute: inversion is exact only if a layer gives
bitwise the same output for the same input both times. On CUDA the run therefore executes
its forward pass and its backward pass under ``torch.backends.cudnn.flags(benchmark=False,
deterministic=True)`` (:func:`same_kernels`): with ``cudnn.benchmark`` on, cuDNN may time and
pick a different convolution algorithm for the recompute (different rounding); with it off
and deterministic kernels, the choice is a fixed function of the shapes. ``standard`` mode,
which recomputes nothing, keeps the user's setting.

``_MELFunction`` is the ``torch.autograd.Function`` that hands a run to autograd; it knows
nothing of segments and calls the run's two public methods.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from melrecon.mel import memory as _memory
from melrecon.mel.anchors import AnchorController
from melrecon.mel.freeze import StepFreezer
from melrecon.mel.invertible import InvertResult, State, as_tuple, has_fused_backward, like, relative_error


@dataclass
class ChainStats:
    """What the last forward/backward step did (for logging).

    drift: largest relative drift measured at an anchor in the last backward pass (0 when
    none was measured).  anchors: states stored besides the chain input (N-1 for
    checkpoint, 0 for pure MEL).  anchor_every: spacing used by the last forward pass
    (inf for pure MEL).  inv_iters: total inversion iterations of the last backward pass.
    inv_residual: largest inversion residual.  fallbacks: segments recomputed by a forward
    pass in the last backward pass (non-convergence or drift).  total_fallbacks: since
    construction.  fallback_spacing: sub-anchor spacing ``ceil(sqrt(L))`` of the longest
    segment redone in the last backward pass (0: none redone).
    """

    drift: float = 0.0
    anchors: int = 0
    anchor_every: float = math.inf
    inv_iters: int = 0
    inv_residual: float = 0.0
    fallbacks: int = 0
    total_fallbacks: int = 0
    fallback_spacing: int = 0
    segment_drifts: list[tuple[int, float]] = field(default_factory=list)

    def count(self, res: Any) -> None:
        """Add an inversion's iterations and residual (an InvertResult or FusedResult)."""
        self.inv_iters += int(res.iterations)
        self.inv_residual = max(self.inv_residual, float(res.residual))


def same_kernels(device: torch.device) -> contextlib.AbstractContextManager:
    """cuDNN with fixed, deterministic algorithms (CUDA only; module docstring): a forward
    pass and its recompute then round identically. No-op on other devices."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    cudnn = torch.backends.cudnn
    return cudnn.flags(enabled=cudnn.enabled, benchmark=False, deterministic=True, allow_tf32=cudnn.allow_tf32)


def layer_params(layers: Sequence[nn.Module]) -> tuple[list[nn.Parameter], list[list[nn.Parameter]]]:
    """The distinct parameters that require grad, and each layer's own list of them."""
    unique: dict[int, nn.Parameter] = {}
    per_layer = []
    for layer in layers:
        ps = [p for p in layer.parameters() if p.requires_grad]
        per_layer.append(ps)
        for p in ps:
            unique.setdefault(id(p), p)
    return list(unique.values()), per_layer


class ChainRun:
    """One ``checkpoint`` or ``mel`` call of a chain (module docstring).

    Args:
        layers: the chain's layers.  freezer: their step freezer.  memory: ``"checkpoint"``
        or ``"mel"``.  anchors: the chain's anchor controller (positions now; updated after
        the backward pass).  drift_tol: relative drift above which a segment is redone.
        warn_once: ``(key, message)`` -> warns once per chain.  total_fallbacks: the chain's
        running count, carried into this run's stats.
    """

    def __init__(
        self,
        layers: Sequence[nn.Module],
        freezer: StepFreezer,
        memory: str,
        anchors: AnchorController,
        drift_tol: float,
        warn_once: Callable[[str, str], None],
        total_fallbacks: int = 0,
    ) -> None:
        self.layers = layers
        self.freezer = freezer
        self.memory = memory
        self.controller = anchors
        self.drift_tol = drift_tol
        self.warn_once = warn_once
        n = len(layers)
        self.positions = list(range(n)) if memory == "checkpoint" else anchors.positions(n)
        spacing = anchors.spacing if memory == "mel" else 1.0
        self.stats = ChainStats(anchors=len(self.positions) - 1, anchor_every=spacing, total_fallbacks=total_fallbacks)
        # the parameters autograd routes gradients to are those of this call, even if a
        # requires_grad flag changes before backward
        self.params, self.per_layer = layer_params(layers)

    # ------------------------------------------------------------------ forward
    def forward(self, x: State, data: Any) -> tuple[State, list[Tensor]]:
        """Apply the layers; returns the output and the anchors (flat list of state parts)."""
        pos_set = set(self.positions)
        anchors: list[Tensor] = []
        with self.freezer.active():
            for n, layer in enumerate(self.layers):
                if n in pos_set:
                    anchors.extend(as_tuple(x))
                x = layer(x, data)
        return x, anchors

    # ------------------------------------------------------------------ backward
    def backward(self, out: State | None, anchors: dict[int, State], g: State, data: Any, dtype: torch.dtype):
        """Backpropagate ``g`` (gradient at the chain output ``out``; ``out`` is None in
        checkpoint mode) through every segment. Returns (input gradient parts, one gradient
        or None per parameter of ``self.params``); statistics go to ``self.stats``."""
        n_layers = len(self.layers)
        stats = self.stats
        acc: dict[int, Tensor] = {}
        bounds = self.positions + [n_layers]
        for i in range(len(self.positions) - 1, -1, -1):
            a, b = bounds[i], bounds[i + 1]
            x_a = anchors[a]
            if self.memory == "checkpoint" or (b - a == 1 and i < len(self.positions) - 1):
                # a one-layer segment needs no inversion; with anchors at every layer the
                # drift is measured on the topmost segment only (enough for the controller)
                g = self._exact_segment(a, b, x_a, g, data, acc)
                continue
            x_b = out if b == n_layers else anchors[b]
            seg_acc: dict[int, Tensor] = {}
            g_new, ok, drift, where = self._mel_segment(a, b, x_b, x_a, g, data, seg_acc)
            stats.segment_drifts.append((b - a, drift))
            if ok and drift <= self.drift_tol:
                stats.drift = max(stats.drift, drift)
                g = g_new
            else:
                stats.fallbacks += 1
                stats.total_fallbacks += 1
                if not ok:
                    self.warn_once(
                        "inverse",
                        f"MEL: inversion of layer {where} did not converge (residual "
                        f"{stats.inv_residual:.3g}); recomputing layers {a}..{b - 1} from the anchor at "
                        f"layer {a} by a forward pass with sub-anchors every {_sub_spacing(b - a)} layers "
                        f"(gradient stays exact; memory grows to ~2 sqrt({b - a}) states, time by a forward pass)",
                    )
                else:
                    stats.drift = max(stats.drift, drift)
                    if not self.controller.adaptive:
                        self.warn_once(
                            "drift",
                            f"MEL: drift {drift:.3g} of layers {a}..{b - 1} exceeds drift_tol="
                            f"{self.drift_tol:g}; recomputed them from the anchor at layer {a} with "
                            f"sub-anchors every {_sub_spacing(b - a)} layers (~2 sqrt({b - a}) states held). "
                            "Use more anchors (smaller anchor_every, or 'auto').",
                        )
                seg_acc = {}
                stats.fallback_spacing = max(stats.fallback_spacing, _sub_spacing(b - a))
                g = self._exact_segment(a, b, x_a, g, data, seg_acc)
            for k, v in seg_acc.items():
                acc[k] = v if k not in acc else acc[k] + v
        if self.memory == "mel":
            self.controller.update(stats.segment_drifts, n_layers, dtype, self.drift_tol)
        return as_tuple(g), [acc.get(id(p)) for p in self.params]

    # ------------------------------------------------------------------ one layer
    def _vjp(self, n: int, x: State, g: State, data: Any) -> tuple[State, list[Tensor | None]]:
        """Rebuild layer n's graph at input x and backpropagate g: (grad_x, param grads)."""
        params = self.per_layer[n]
        xs = tuple(t.detach().requires_grad_(t.is_floating_point() or t.is_complex()) for t in as_tuple(x))
        with torch.enable_grad(), self.freezer.active(recompute=True):
            y = self.layers[n](like(x, xs), data)
        pairs = [(yy, gg) for yy, gg in zip(as_tuple(y), as_tuple(g)) if yy.requires_grad and gg is not None]
        inputs = [t for t in xs if t.requires_grad] + list(params)
        if pairs and inputs:
            grads = torch.autograd.grad([p[0] for p in pairs], inputs, [p[1] for p in pairs], allow_unused=True)
        else:
            grads = (None,) * len(inputs)
        gi = iter(grads[: len(inputs) - len(params)])
        gx = tuple((next(gi) if t.requires_grad else None) for t in xs)
        gx = tuple(torch.zeros_like(t) if gg is None else gg for t, gg in zip(xs, gx))
        return like(x, gx), list(grads[len(inputs) - len(params):])

    def _invert(self, n: int, y: State, data: Any) -> InvertResult:
        """Invert layer n and count its iterations and residual in the stats."""
        with torch.no_grad(), self.freezer.active(recompute=True):
            res = self.layers[n].inverse(y, data)
        self.stats.count(res)
        return res

    # ------------------------------------------------------------------ segments
    def _exact_segment(self, a: int, b: int, x_a: State, g_b: State, data: Any, acc: dict[int, Tensor]) -> State:
        """Backprop layers b-1..a with states recomputed from the anchor x_a, holding at most
        about ``2 sqrt(b - a)`` of them: sub-anchors every ``ceil(sqrt(b - a))`` layers from
        one forward pass, then each sub-segment recomputed from its sub-anchor (module doc)."""
        step = _sub_spacing(b - a)
        starts = list(range(a, b, step))
        subs = {a: x_a}
        if len(starts) > 1:
            x = x_a
            with torch.no_grad(), self.freezer.active(recompute=True):
                for n in range(a, starts[-1]):
                    x = self.layers[n](x, data)
                    if n + 1 in starts:
                        subs[n + 1] = x
        token = _memory.hold([t for p in starts[1:] for t in as_tuple(subs[p])])
        g = g_b
        try:
            for p in reversed(starts):
                g = self._checkpoint_segment(p, min(p + step, b), subs.pop(p), g, data, acc)
        finally:
            token.release()
        return g

    def _checkpoint_segment(self, a: int, b: int, x_a: State, g_b: State, data: Any, acc: dict[int, Tensor]) -> State:
        """Backprop layers b-1..a with all their inputs recomputed from x_a (checkpoint path)."""
        states = [x_a]
        with torch.no_grad(), self.freezer.active(recompute=True):
            for n in range(a, b - 1):
                states.append(self.layers[n](states[-1], data))
        token = _memory.hold([t for s in states[1:] for t in as_tuple(s)])
        g = g_b
        try:
            for n in range(b - 1, a - 1, -1):
                g, pgs = self._vjp(n, states[n - a], g, data)
                states[n - a] = None  # backpropagated: let it go
                _accumulate(acc, zip(self.per_layer[n], pgs))
        finally:
            token.release()
        return g

    def _mel_segment(
        self, a: int, b: int, x_b: State, x_a: State, g_b: State, data: Any, acc: dict[int, Tensor]
    ) -> tuple[State, bool, float, int]:
        """Backprop layers b-1..a by inversion. Returns (grad at a, ok, drift, failing layer)."""
        x_next, g = x_b, g_b
        for n in range(b - 1, a, -1):
            layer = self.layers[n]
            token = _memory.hold([t for t in as_tuple(g) if t is not None])
            try:
                if has_fused_backward(layer):
                    with torch.enable_grad(), self.freezer.active(recompute=True), _memory.hold(as_tuple(x_next)):
                        res = layer.inverse_and_backward(x_next, g, data)
                    self.stats.count(res)
                    if not res.converged:
                        return g, False, math.inf, n
                    _accumulate(acc, ((p, gp) for p, gp in res.param_grads if p.requires_grad))
                    x_next = res.x
                    gx = tuple(
                        torch.zeros_like(t) if gg is None else gg
                        for t, gg in zip(as_tuple(res.x), as_tuple(res.grad_x))
                    )
                    g = like(res.x, gx)
                else:
                    with _memory.hold(as_tuple(x_next)):
                        res = self._invert(n, x_next, data)
                    if not res.converged:
                        return g, False, math.inf, n
                    x_next = res.x  # the previous state is no longer needed: let it go
                    del res
                    g, pgs = self._vjp(n, x_next, g, data)
                    _accumulate(acc, zip(self.per_layer[n], pgs))
            finally:
                token.release()
        # layer a: measure drift against the stored anchor, then backprop at the anchor
        with _memory.hold([t for t in as_tuple(g) if t is not None]):
            with _memory.hold(as_tuple(x_next)):
                res = self._invert(a, x_next, data)
                if not res.converged:
                    return g, False, math.inf, a
                with _memory.hold(as_tuple(res.x)):
                    drift = relative_error(res.x, x_a)
            del res, x_next
            g, pgs = self._vjp(a, x_a, g, data)
        _accumulate(acc, zip(self.per_layer[a], pgs))
        return g, True, drift, a


def _sub_spacing(length: int) -> int:
    """Sub-anchor spacing of a redone segment of ``length`` layers: ``ceil(sqrt(length))``."""
    return max(1, math.ceil(math.sqrt(length)))


def _accumulate(acc: dict[int, Tensor], pairs) -> None:
    """Sum gradients into ``acc`` by parameter identity (shared parameters add up)."""
    for p, g in pairs:
        if g is None:
            continue
        acc[id(p)] = g if id(p) not in acc else acc[id(p)] + g


def _autocast_state(device_type: str) -> tuple[str, bool, torch.dtype | None]:
    """Autocast state of the forward pass, replayed during the recompute (as checkpoint does)."""
    try:
        return device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
    except (TypeError, RuntimeError, AttributeError):  # device types without autocast support
        return device_type, False, None


def _autocast_like(state: tuple[str, bool, torch.dtype | None]):
    device_type, enabled, dtype = state
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype, enabled=True)


class _MELFunction(torch.autograd.Function):
    """autograd.Function behind the ``checkpoint`` and ``mel`` modes: hands a :class:`ChainRun`
    to autograd.

    Inputs: (run, data, is_tuple, n_state, *state_parts, *params).  The parameters are
    passed only so that autograd routes their gradients; the layers read them directly.
    """

    @staticmethod
    def forward(ctx, run: ChainRun, data: Any, is_tuple: bool, n_state: int, *tensors: Tensor):
        parts = tensors[:n_state]
        with same_kernels(parts[0].device):
            x, anchors = run.forward(tuple(parts) if is_tuple else parts[0], data)
        out = tuple(t.clone() if any(t is p for p in tensors) else t for t in as_tuple(x))
        ctx.run, ctx.data, ctx.is_tuple, ctx.n_state = run, data, is_tuple, n_state
        ctx.autocast = _autocast_state(parts[0].device.type)
        ctx.keep_output = run.memory == "mel"
        if ctx.keep_output:
            ctx.save_for_backward(*out, *anchors)
        else:
            ctx.save_for_backward(*anchors)
        ctx.dtype = out[0].dtype
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable  # the per-layer VJPs build no graph: refuse double backward
    def backward(ctx, *grad_out: Tensor | None):
        run: ChainRun = ctx.run
        n_state, is_tuple = ctx.n_state, ctx.is_tuple
        saved = ctx.saved_tensors
        mk = (lambda ts: tuple(ts) if is_tuple else ts[0])  # noqa: E731
        if ctx.keep_output:
            out, rest = mk(saved[:n_state]), saved[n_state:]
        else:
            out, rest = None, saved
        anchors = {p: mk(rest[i * n_state:(i + 1) * n_state]) for i, p in enumerate(run.positions)}
        template = out if out is not None else anchors[run.positions[-1]]
        g: State = mk([torch.zeros_like(t) if gg is None else gg for t, gg in zip(as_tuple(template), grad_out)])
        flags = [p.requires_grad for p in run.params]
        try:
            # parameters of the forward call get their gradients even if a flag changed since
            for p in run.params:
                p.requires_grad_(True)
            with _autocast_like(ctx.autocast), same_kernels(template[0].device if is_tuple else template.device):
                grads_x, grads_p = run.backward(out, anchors, g, ctx.data, ctx.dtype)
        finally:
            for p, f in zip(run.params, flags):
                p.requires_grad_(f)
        return (None, None, None, None, *grads_x, *grads_p)
