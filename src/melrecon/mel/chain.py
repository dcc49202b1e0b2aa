"""A chain of invertible layers and its three memory modes.

:class:`InvertibleChain` applies a list of layers honouring the
:mod:`melrecon.mel.invertible` contract and chooses how the backward pass is made:

``standard``
    Ordinary autograd: every activation of every layer is stored.
``checkpoint``
    The input of every layer is stored (no activations); the backward pass re-runs each
    layer's forward to rebuild its graph.  Same arithmetic as ``standard``.
``mel``
    Only the chain's input and output are stored, plus *anchors*: copies of the state every
    ``anchor_every`` layers (:mod:`melrecon.mel.anchors`).  The backward pass inverts the
    layers one by one, measures the drift of the recomputed inputs at every anchor and
    redoes a segment exactly when it exceeds ``drift_tol`` (:mod:`melrecon.mel.backward`),
    so the returned gradient never rests on inputs worse than ``drift_tol``.

Freezing: every mode runs the layers inside a :class:`melrecon.mel.freeze.StepFreezer`, so
spectral-norm power iterations advance once per call of ``forward`` (a training step),
dropout masks are fixed for the step, and batch-norm statistics are updated once.

Gradients never flow into ``data`` in ``checkpoint``/``mel`` modes (``data`` tensors that
require grad raise ``ValueError``); they do flow into the chain input and the parameters.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from melrecon.mel.anchors import AnchorController
from melrecon.mel.backward import ChainRun, ChainStats, _MELFunction, layer_params
from melrecon.mel.freeze import StepFreezer
from melrecon.mel.invertible import State, as_tuple, like

MEMORY_MODES = ("standard", "checkpoint", "mel")


def check_depth_and_memory(num_unrolls: Any, memory: Any) -> None:
    """Validate the two options every unrolled network takes, naming the one at fault."""
    if isinstance(num_unrolls, bool) or not isinstance(num_unrolls, int) or num_unrolls < 1:
        raise ValueError(f"num_unrolls must be an integer >= 1, got {num_unrolls!r}")
    if memory not in MEMORY_MODES:
        raise ValueError(f"memory must be one of {MEMORY_MODES}, got {memory!r}")


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


class InvertibleChain(nn.Module):
    """A chain of invertible layers with a selectable memory mode (see module docstring).

    Args:
        layers: the layers, applied in order.  The same module may appear several times
            (shared weights); its parameter gradients are summed.
        memory: ``"standard" | "checkpoint" | "mel"``.
        anchor_every: ``mel`` only: None/inf (pure), integer k >= 1, or ``"auto"``.
        drift_tol: ``mel`` only: relative drift above which a segment is recomputed.
        auto_start: first spacing tried by the ``"auto"`` controller.

    ``stats`` (:class:`ChainStats`) describes the last step; ``anchor_spacing`` is the
    spacing the next ``mel`` forward pass uses.
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
        self.anchors = AnchorController(anchor_every, auto_start)
        if memory == "mel":
            for i, layer in enumerate(layers):
                if not callable(getattr(layer, "inverse", None)):
                    raise ValueError(f"layers[{i}] ({type(layer).__name__}) has no inverse(); memory='mel' needs one")
        self.layers = nn.ModuleList(layers)
        self.memory = memory
        self.drift_tol = float(drift_tol)
        self.stats = ChainStats(anchor_every=self.anchors.spacing)
        self._freezer = StepFreezer(list(self.layers))
        self._warned: set[str] = set()

    @property
    def anchor_every(self) -> float | str:
        """The parsed ``anchor_every`` option: ``math.inf``, an int or ``"auto"``."""
        return self.anchors.anchor_every

    @property
    def anchor_spacing(self) -> float:
        return self.anchors.spacing

    def warn_once(self, key: str, msg: str) -> None:
        """Warn with ``msg`` the first time ``key`` comes up for this chain."""
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(msg, RuntimeWarning, stacklevel=3)

    def forward(self, x: State, data: Any = None) -> State:
        """Apply the layers to ``x`` (a tensor or tuple of tensors) with ``data``."""
        self._freezer.begin()
        params, _ = layer_params(self.layers)
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
        run = ChainRun(
            self.layers, self._freezer, self.memory, self.anchors, self.drift_tol, self.warn_once,
            self.stats.total_fallbacks,
        )
        self.stats = run.stats
        parts = as_tuple(x)
        out = _MELFunction.apply(run, data, isinstance(x, (tuple, list)), len(parts), *parts, *run.params)
        return like(x, out) if isinstance(x, (tuple, list)) else out[0]
