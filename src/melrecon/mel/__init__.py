"""Memory-efficient learning (MEL): invertible layers and a backward pass that recomputes
each layer's input by inversion instead of storing it.  Knows nothing about MRI.

- :mod:`.invertible`: the ``InvertibleLayer`` contract (state = tensor or tuple of tensors),
  ``InvertResult``/``FusedResult``, ``SequentialInvertible``, the fixed-point inverse helper.
- :mod:`.function`: ``InvertibleChain`` (memory modes standard/checkpoint/mel, anchors,
  the "auto" anchor controller, drift measurement, fallback) and its autograd Function.
- :mod:`.freeze`: ``StepFreezer`` (spectral norm / dropout / batch norm frozen per step).
- :mod:`.memory`: ``MemoryProbe`` (bytes held for backward, deduplicated, and their peak).
"""

from melrecon.mel.freeze import StepFreezer
from melrecon.mel.function import MEMORY_MODES, ChainStats, InvertibleChain
from melrecon.mel.invertible import (
    FixedPointResult,
    FusedResult,
    InvertibleLayer,
    InvertResult,
    SequentialInvertible,
    State,
    as_tuple,
    default_tolerance,
    has_fused_backward,
    invert_residual_map,
    like,
    relative_error,
    state_norm,
)
from melrecon.mel.memory import MemoryProbe, hold

__all__ = [
    "MEMORY_MODES",
    "ChainStats",
    "FixedPointResult",
    "FusedResult",
    "InvertResult",
    "InvertibleChain",
    "InvertibleLayer",
    "MemoryProbe",
    "SequentialInvertible",
    "State",
    "StepFreezer",
    "as_tuple",
    "default_tolerance",
    "has_fused_backward",
    "hold",
    "invert_residual_map",
    "like",
    "relative_error",
    "state_norm",
]
