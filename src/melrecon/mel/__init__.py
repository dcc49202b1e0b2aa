"""Memory-efficient learning (MEL): invertible layers and a backward pass that recomputes
each layer's input by inversion instead of storing it.  Knows nothing about MRI.

- :mod:`.invertible`: the ``InvertibleLayer`` contract (state = tensor or tuple of tensors),
  ``InvertResult``/``FusedResult``, ``SequentialInvertible``, the fixed-point inverse helper.
- :mod:`.chain`: ``InvertibleChain`` (memory modes standard/checkpoint/mel).
- :mod:`.anchors`: where anchors go; the "auto" anchor controller.
- :mod:`.backward`: ``ChainRun``, the checkpoint/MEL backward (inversion, drift measurement,
  fallback) and the autograd Function that hands it to autograd.
- :mod:`.freeze`: ``StepFreezer`` (spectral norm / dropout / batch norm frozen per step).
- :mod:`.memory`: ``MemoryProbe`` (bytes held for backward, deduplicated, and their peak).
"""

from melrecon.mel.backward import ChainStats
from melrecon.mel.chain import MEMORY_MODES, InvertibleChain, check_depth_and_memory
from melrecon.mel.freeze import StepFreezer
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
    "check_depth_and_memory",
    "default_tolerance",
    "has_fused_backward",
    "hold",
    "invert_residual_map",
    "like",
    "relative_error",
    "state_norm",
]
