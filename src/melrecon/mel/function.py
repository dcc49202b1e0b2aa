"""The MEL backward over a chain of invertible layers, and the three memory modes.

:class:`InvertibleChain` applies a list of layers honouring the
:mod:`melrecon.mel.invertible` contract and chooses how the backward pass is made:

``standard``
    Ordinary autograd: every activation of every layer is stored.
``checkpoint``
    The input of every layer is stored (no activations); the backward pass re-runs each
    layer's forward to rebuild its graph.  Same arithmetic as ``standard``.
``mel``
    Only the chain's input and output are stored, plus *anchors*: copies of the state every
    ``anchor_every`` layers.  The backward pass walks the layers in reverse: invert the
    layer (recompute its input from its output), rebuild that one layer's graph,
    backpropagate through it, accumulate the parameter gradients (shared parameters are
    summed), go on.  ``anchor_every``: ``None`` or ``float("inf")`` = pure MEL (no anchor
    but the input), an integer k >= 1 = anchor every k layers, ``"auto"`` = the spacing is
    chosen by a controller (below).

Drift and fallbacks (``mel`` only).  Between two anchors a < b the backward pass inverts
layers b-1, ..., a+1 and finally also inverts layer a, although x_a is stored: the relative
difference between the inverted and the stored x_a is the *drift* of that segment, an upper
estimate of the error of every recomputed input in it (errors grow as inversion proceeds).
A one-layer segment backpropagates at its stored anchor and needs no inversion, so with
anchors at every layer only the topmost segment is inverted (to keep measuring drift).
If the drift exceeds ``drift_tol``, or any inversion in the segment reports
``converged=False``, the segment's gradients are discarded and the segment is redone
exactly: its states are recomputed by a forward pass from the anchor (memory: the segment's
states, at most ``anchor_every`` of them; the whole chain for pure MEL) and backpropagated
as in ``checkpoint`` mode.  So the returned gradient never rests on inputs worse than
``drift_tol``.  A non-converged inversion and a drift redo with a fixed spacing warn once
per chain; redos chosen by the ``"auto"`` controller are counted but do not warn.

The ``"auto"`` controller assumes drift grows geometrically with the segment length L,
``drift ~ eps * rho**L`` (eps = unit roundoff of the state dtype); after each backward pass
it estimates rho from the worst measured segment and sets the spacing to the largest L with
predicted drift below ``drift_tol / 4`` (at most doubling per step, at least 1, shrinking
when the tolerance was exceeded).  Its current spacing is ``chain.anchor_spacing``.

Freezing: every mode runs the layers inside a :class:`melrecon.mel.freeze.StepFreezer`, so
spectral-norm power iterations advance once per call of ``forward`` (a training step),
dropout masks are fixed for the step, and batch-norm statistics are updated once.

Gradients never flow into ``data`` in ``checkpoint``/``mel`` modes (``data`` tensors that
require grad raise ``ValueError``); they do flow into the chain input and the parameters.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from melrecon.mel import memory as _memory
from melrecon.mel.freeze import StepFreezer
from melrecon.mel.invertible import State, as_tuple, has_fused_backward, like, relative_error

MEMORY_MODES = ("standard", "checkpoint", "mel")


def check_depth_and_memory(num_unrolls: Any, memory: Any) -> None:
    """Validate the two options every unrolled network takes, naming the one at fault."""
    if isinstance(num_unrolls, bool) or not isinstance(num_unrolls, int) or num_unrolls < 1:
        raise ValueError(f"num_unrolls must be an integer >= 1, got {num_unrolls!r}")
    if memory not in MEMORY_MODES:
        raise ValueError(f"memory must be one of {MEMORY_MODES}, got {memory!r}")


@dataclass
class ChainStats:
    """What the last forward/backward step did (for logging).

    drift: largest relative drift measured at an anchor in the last backward pass (0 when
    none was measured).  anchors: states stored besides the chain input (N-1 for
    checkpoint, 0 for pure MEL).  anchor_every: spacing used by the last forward pass
    (inf for pure MEL).  inv_iters: total inversion iterations of the last backward pass.
    inv_residual: largest inversion residual.  fallbacks: segments recomputed by a forward
    pass in the last backward pass (non-convergence or drift).  total_fallbacks: since
    construction.
    """

    drift: float = 0.0
    anchors: int = 0
    anchor_every: float = math.inf
    inv_iters: int = 0
    inv_residual: float = 0.0
    fallbacks: int = 0
    total_fallbacks: int = 0
    segment_drifts: list[tuple[int, float]] = field(default_factory=list)


def _check_data(data: Any) -> None:
    """Raise if ``data`` visibly carries tensors that require grad (not supported here)."""

    def tensors(obj: Any, depth: int = 0):
        if isinstance(obj, Tensor):
            yield obj
        elif depth < 2 and isinstance(obj, dict):
            for v in obj.values():
                yield from tensors(v, depth + 1)
        elif depth < 2 and isinstance(obj, (list, tuple)):
            for v in obj:
                yield from tensors(v, depth + 1)
        elif depth < 2 and hasattr(obj, "__dict__") and not isinstance(obj, nn.Module):
            for v in vars(obj).values():
                yield from tensors(v, depth + 1)

    for t in tensors(data):
        if t.requires_grad:
            raise ValueError(
                "data: a tensor passed as chain data requires grad; gradients with respect to "
                "data are not supported in memory='checkpoint'/'mel' (detach it or use "
                "memory='standard')"
            )


def _parse_anchor_every(anchor_every: Any) -> float | str:
    if anchor_every is None:
        return math.inf
    if isinstance(anchor_every, str):
        s = anchor_every.strip().lower()
        if s == "auto":
            return "auto"
        if s in ("inf", "infinity", "none", "null"):
            return math.inf
        try:
            anchor_every = int(s)
        except ValueError:
            raise ValueError(
                f"anchor_every must be a positive integer, 'auto' or None/inf, got {anchor_every!r}"
            ) from None
    if isinstance(anchor_every, bool):
        raise ValueError(f"anchor_every must be a positive integer, 'auto' or None/inf, got {anchor_every!r}")
    if isinstance(anchor_every, float) and math.isinf(anchor_every) and anchor_every > 0:
        return math.inf
    if isinstance(anchor_every, (int, float)) and float(anchor_every).is_integer() and anchor_every >= 1:
        return int(anchor_every)
    raise ValueError(f"anchor_every must be a positive integer, 'auto' or None/inf, got {anchor_every!r}")


class InvertibleChain(nn.Module):
    """A chain of invertible layers with a selectable memory mode (see module docstring).

    Args:
        layers: the layers, applied in order.  The same module may appear several times
            (shared weights); its parameter gradients are summed.
        memory: ``"standard" | "checkpoint" | "mel"``.
        anchor_every: ``mel`` only: None/inf (pure), integer k >= 1, or ``"auto"``.
        drift_tol: ``mel`` only: relative drift above which a segment is recomputed.
        auto_start: first spacing tried by the ``"auto"`` controller.
    """

    def __init__(
        self,
        layers: Sequence[nn.Module],
        memory: str = "mel",
        anchor_every: Any = "auto",
        drift_tol: float = 1e-5,
        auto_start: int = 4,
    ) -> None:
        super().__init__()
        if memory not in MEMORY_MODES:
            raise ValueError(f"memory must be one of {MEMORY_MODES}, got {memory!r}")
        if len(layers) < 1:
            raise ValueError("layers: a chain needs at least one layer")
        if not (isinstance(drift_tol, (int, float)) and drift_tol > 0):
            raise ValueError(f"drift_tol must be a positive number, got {drift_tol!r}")
        if int(auto_start) < 1:
            raise ValueError(f"auto_start must be >= 1, got {auto_start!r}")
        if memory == "mel":
            for i, layer in enumerate(layers):
                if not callable(getattr(layer, "inverse", None)):
                    raise ValueError(f"layers[{i}] ({type(layer).__name__}) has no inverse(); memory='mel' needs one")
        self.layers = nn.ModuleList(layers)
        self.memory = memory
        self.anchor_every = _parse_anchor_every(anchor_every)
        self.drift_tol = float(drift_tol)
        self.anchor_spacing: float = float(auto_start) if self.anchor_every == "auto" else self.anchor_every
        self.stats = ChainStats(anchor_every=self.anchor_spacing)
        self._freezer = StepFreezer(list(self.layers))
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ parameters
    def _layer_params(self) -> tuple[list[nn.Parameter], list[list[nn.Parameter]]]:
        unique: dict[int, nn.Parameter] = {}
        per_layer = []
        for layer in self.layers:
            ps = [p for p in layer.parameters() if p.requires_grad]
            per_layer.append(ps)
            for p in ps:
                unique.setdefault(id(p), p)
        return list(unique.values()), per_layer

    def anchor_positions(self, n: int) -> list[int]:
        """Layer indices whose input is stored in the next forward pass (always 0)."""
        if self.memory == "checkpoint":
            return list(range(n))
        k = self.anchor_spacing
        if math.isinf(k) or k >= n:
            return [0]
        return list(range(0, n, int(k)))

    # ------------------------------------------------------------------ forward
    def forward(self, x: State, data: Any = None) -> State:
        """Apply the layers to ``x`` (a tensor or tuple of tensors) with ``data``."""
        self._freezer.begin()
        params, _ = self._layer_params()
        needs_grad = torch.is_grad_enabled() and (
            any(t.requires_grad for t in as_tuple(x)) or any(p.requires_grad for p in params)
        )
        if self.memory == "standard" or not needs_grad:
            with self._freezer.active():
                for layer in self.layers:
                    x = layer(x, data)
            if self.memory == "standard":
                self.stats = ChainStats(anchor_every=0.0, total_fallbacks=self.stats.total_fallbacks)
            return x
        _check_data(data)
        parts = as_tuple(x)
        out = _MELFunction.apply(self, data, isinstance(x, (tuple, list)), len(parts), *parts, *params)
        return like(x, out) if isinstance(x, (tuple, list)) else out[0]

    # ------------------------------------------------------------------ helpers
    def _warn_once(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(msg, RuntimeWarning, stacklevel=3)

    def _vjp(
        self, n: int, x: State, g: State, data: Any, params: list[nn.Parameter]
    ) -> tuple[State, list[Tensor | None]]:
        """Rebuild layer n's graph at input x and backpropagate g: (grad_x, param grads)."""
        layer = self.layers[n]
        xs = tuple(t.detach().requires_grad_(t.is_floating_point() or t.is_complex()) for t in as_tuple(x))
        with torch.enable_grad(), self._freezer.active(recompute=True):
            y = layer(like(x, xs), data)
        pairs = [(yy, gg) for yy, gg in zip(as_tuple(y), as_tuple(g)) if yy.requires_grad and gg is not None]
        inputs = [t for t in xs if t.requires_grad] + list(params)
        if pairs and inputs:
            grads = torch.autograd.grad(
                [p[0] for p in pairs], inputs, [p[1] for p in pairs], allow_unused=True
            )
        else:
            grads = (None,) * len(inputs)
        gi = iter(grads[: len(inputs) - len(params)])
        gx = tuple(
            (next(gi) if t.requires_grad else None) for t in xs
        )
        gx = tuple(torch.zeros_like(t) if gg is None else gg for t, gg in zip(xs, gx))
        return like(x, gx), list(grads[len(inputs) - len(params):])

    def _invert(self, n: int, y: State, data: Any, stats: ChainStats):
        """Invert layer n and record its iterations and residual in ``stats``."""
        with torch.no_grad(), self._freezer.active(recompute=True):
            res = self.layers[n].inverse(y, data)
        stats.inv_iters += int(res.iterations)
        stats.inv_residual = max(stats.inv_residual, float(res.residual))
        return res

    def _forward_states(self, a: int, b: int, x_a: State, data: Any) -> list[State]:
        """States x_a, ..., x_{b-1} recomputed by a forward pass from the anchor x_a."""
        states = [x_a]
        with torch.no_grad(), self._freezer.active(recompute=True):
            for n in range(a, b - 1):
                states.append(self.layers[n](states[-1], data))
        return states

    def _exact_segment(self, a, b, x_a, g_b, data, per_layer, acc):
        """Backprop layers b-1..a with states recomputed from the anchor (checkpoint path)."""
        states = self._forward_states(a, b, x_a, data)
        token = _memory.hold([t for s in states[1:] for t in as_tuple(s)])
        g = g_b
        try:
            for n in range(b - 1, a - 1, -1):
                g, pgs = self._vjp(n, states[n - a], g, data, per_layer[n])
                _accumulate(acc, per_layer[n], pgs)
        finally:
            token.release()
        return g

    def _mel_segment(self, a, b, x_b, x_a, g_b, data, per_layer, acc, stats: ChainStats):
        """Backprop layers b-1..a by inversion.  Returns (grad at a, ok, drift)."""
        x_next, g = x_b, g_b
        for n in range(b - 1, a, -1):
            layer = self.layers[n]
            token = _memory.hold([t for t in as_tuple(g) if t is not None])
            try:
                if has_fused_backward(layer):
                    with torch.enable_grad(), self._freezer.active(recompute=True), _memory.hold(as_tuple(x_next)):
                        res = layer.inverse_and_backward(x_next, g, data)
                    stats.inv_iters += int(res.iterations)
                    stats.inv_residual = max(stats.inv_residual, float(res.residual))
                    if not res.converged:
                        return g, False, math.inf, n
                    _accumulate_pairs(acc, res.param_grads)
                    x_next = res.x
                    gx = tuple(
                        torch.zeros_like(t) if gg is None else gg
                        for t, gg in zip(as_tuple(res.x), as_tuple(res.grad_x))
                    )
                    g = like(res.x, gx)
                else:
                    with _memory.hold(as_tuple(x_next)):
                        res = self._invert(n, x_next, data, stats)
                    if not res.converged:
                        return g, False, math.inf, n
                    x_next = res.x  # the previous state is no longer needed: let it go
                    del res
                    g, pgs = self._vjp(n, x_next, g, data, per_layer[n])
                    _accumulate(acc, per_layer[n], pgs)
            finally:
                token.release()
        # layer a: measure drift against the stored anchor, then backprop at the anchor
        with _memory.hold([t for t in as_tuple(g) if t is not None]):
            with _memory.hold(as_tuple(x_next)):
                res = self._invert(a, x_next, data, stats)
                if not res.converged:
                    return g, False, math.inf, a
                with _memory.hold(as_tuple(res.x)):
                    drift = relative_error(res.x, x_a)
            del res, x_next
            g, pgs = self._vjp(a, x_a, g, data, per_layer[a])
        _accumulate(acc, per_layer[a], pgs)
        return g, True, drift, a

    def _update_spacing(self, n_layers: int, dtype: torch.dtype, stats: ChainStats) -> None:
        """The "auto" controller (module docstring)."""
        if self.anchor_every != "auto" or not stats.segment_drifts:
            return
        k_old = self.anchor_spacing
        eps = torch.finfo(dtype.to_real() if dtype.is_complex else dtype).eps
        target = self.drift_tol / 4
        worst_rho = 0.0
        exceeded = False
        for length, drift in stats.segment_drifts:
            if drift > self.drift_tol:
                exceeded = True
            if length >= 1 and math.isfinite(drift):
                rho = (max(drift, eps) / eps) ** (1.0 / length)
                worst_rho = max(worst_rho, rho)
            elif not math.isfinite(drift):
                worst_rho = math.inf
        if math.isinf(worst_rho):
            k_new = 1.0
        elif worst_rho <= 1.0 + 1e-12:
            k_new = 2 * k_old
        else:
            k_new = math.floor(math.log(target / eps) / math.log(worst_rho))
            k_new = min(k_new, 2 * k_old)
        if exceeded:
            k_new = min(k_new, k_old - 1)
        k_new = max(1.0, float(k_new))
        # a spacing >= the chain length means "input anchor only"; keep it finite so that
        # drift is still measured and the controller can come back
        self.anchor_spacing = float(min(k_new, max(n_layers, 1)))


def _accumulate(acc: dict[int, Tensor], params: list[nn.Parameter], grads: Sequence[Tensor | None]) -> None:
    for p, g in zip(params, grads):
        if g is None:
            continue
        acc[id(p)] = g if id(p) not in acc else acc[id(p)] + g


def _accumulate_pairs(acc: dict[int, Tensor], pairs) -> None:
    for p, g in pairs:
        if g is None or not p.requires_grad:
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
    """autograd.Function behind ``checkpoint`` and ``mel`` modes of :class:`InvertibleChain`.

    Inputs: (chain, data, is_tuple, n_state, *state_parts, *params).  The parameters are
    passed only so that autograd routes their gradients; the layers read them directly.
    """

    @staticmethod
    def forward(ctx, chain: InvertibleChain, data: Any, is_tuple: bool, n_state: int, *tensors: Tensor):
        parts = tensors[:n_state]
        x: State = tuple(parts) if is_tuple else parts[0]
        n_layers = len(chain.layers)
        positions = chain.anchor_positions(n_layers)
        pos_set = set(positions)
        anchors: list[Tensor] = []
        with chain._freezer.active():
            for n, layer in enumerate(chain.layers):
                if n in pos_set:
                    anchors.extend(as_tuple(x))
                x = layer(x, data)
        out = tuple(t.clone() if any(t is p for p in tensors) else t for t in as_tuple(x))
        ctx.chain, ctx.data, ctx.is_tuple, ctx.n_state = chain, data, is_tuple, n_state
        # the parameters autograd routes gradients to are those of this call, even if a
        # requires_grad flag changes before backward
        ctx.layer_params = chain._layer_params()
        ctx.autocast = _autocast_state(parts[0].device.type)
        ctx.positions = positions
        ctx.keep_output = chain.memory == "mel"
        if ctx.keep_output:
            ctx.save_for_backward(*out, *anchors)
        else:
            ctx.save_for_backward(*anchors)
        ctx.dtype = out[0].dtype
        spacing = chain.anchor_spacing if chain.memory == "mel" else 1.0
        chain.stats = ChainStats(
            anchors=len(positions) - 1,
            anchor_every=spacing,
            total_fallbacks=chain.stats.total_fallbacks,
        )
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable  # the per-layer VJPs build no graph: refuse double backward
    def backward(ctx, *grad_out: Tensor | None):
        chain: InvertibleChain = ctx.chain
        data, n_state, is_tuple = ctx.data, ctx.n_state, ctx.is_tuple
        saved = ctx.saved_tensors
        mk = (lambda ts: tuple(ts) if is_tuple else ts[0])  # noqa: E731
        if ctx.keep_output:
            out, rest = mk(saved[:n_state]), saved[n_state:]
        else:
            out, rest = None, saved
        positions = ctx.positions
        anchors = {p: mk(rest[i * n_state:(i + 1) * n_state]) for i, p in enumerate(positions)}
        template = out if out is not None else anchors[positions[-1]]
        g: State = mk(
            [torch.zeros_like(t) if gg is None else gg for t, gg in zip(as_tuple(template), grad_out)]
        )
        params = ctx.layer_params[0]
        flags = [p.requires_grad for p in params]
        try:
            # parameters of the forward call get their gradients even if a flag changed since
            for p in params:
                p.requires_grad_(True)
            with _autocast_like(ctx.autocast):
                grads_x, grads_p = _MELFunction._backward(ctx, chain, data, n_state, out, anchors, positions, g)
        finally:
            for p, f in zip(params, flags):
                p.requires_grad_(f)
        return (None, None, None, None, *grads_x, *grads_p)

    @staticmethod
    def _backward(ctx, chain, data, n_state, out, anchors, positions, g):
        params, per_layer = ctx.layer_params
        n_layers = len(chain.layers)
        stats = chain.stats
        acc: dict[int, Tensor] = {}
        bounds = positions + [n_layers]
        for i in range(len(positions) - 1, -1, -1):
            a, b = bounds[i], bounds[i + 1]
            x_a = anchors[a]
            if chain.memory == "checkpoint" or (b - a == 1 and i < len(positions) - 1):
                # a one-layer segment needs no inversion; with anchors at every layer the
                # drift is measured on the topmost segment only (enough for the controller)
                g = chain._exact_segment(a, b, x_a, g, data, per_layer, acc)
                continue
            x_b = out if b == n_layers else anchors[b]
            seg_acc: dict[int, Tensor] = {}
            g_new, ok, drift, where = chain._mel_segment(a, b, x_b, x_a, g, data, per_layer, seg_acc, stats)
            stats.segment_drifts.append((b - a, drift))
            if ok and drift <= chain.drift_tol:
                stats.drift = max(stats.drift, drift)
                g = g_new
            else:
                stats.fallbacks += 1
                stats.total_fallbacks += 1
                if not ok:
                    chain._warn_once(
                        "inverse",
                        f"MEL: inversion of layer {where} did not converge (residual "
                        f"{stats.inv_residual:.3g}); recomputing layers {a}..{b - 1} from the anchor at "
                        f"layer {a} by a forward pass (gradient stays exact, memory and time grow)",
                    )
                else:
                    stats.drift = max(stats.drift, drift)
                    if chain.anchor_every != "auto":
                        chain._warn_once(
                            "drift",
                            f"MEL: drift {drift:.3g} of layers {a}..{b - 1} exceeds drift_tol="
                            f"{chain.drift_tol:g}; recomputed them from the anchor at layer {a}. "
                            "Use more anchors (smaller anchor_every, or 'auto').",
                        )
                seg_acc = {}
                g = chain._exact_segment(a, b, x_a, g, data, per_layer, seg_acc)
            for k, v in seg_acc.items():
                acc[k] = v if k not in acc else acc[k] + v
        if chain.memory == "mel":
            chain._update_spacing(n_layers, ctx.dtype, stats)
        return as_tuple(g), [acc.get(id(p)) for p in params]
