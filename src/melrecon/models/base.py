"""UnrolledBase: what every unrolled reconstruction network shares.

An unrolled network applies N unrolls, each an :class:`~melrecon.mel.InvertibleLayer` taking
``(state, data)``, as one :class:`~melrecon.mel.InvertibleChain`, so that the memory modes
(``standard | checkpoint | mel``), anchors, drift control and step freezing come with it.
The base class owns:

- the options every family takes: ``num_unrolls``, ``share_weights``, ``memory``,
  ``anchor_every``, ``drift_tol``, ``auto_start``, ``fft_dims``, ``dc_chunk``;
- weights per unroll: :meth:`replicate` gives every unroll the template modules themselves
  (shared weights) or independent copies, each re-initialised;
- the call: input checks, the physics context :class:`~melrecon.models.dc.SenseData`
  (``A``, ``A^H b``, the CG log of the call), state in and out of the chain;
- :meth:`log_stats`: the MEL statistics, the learned DC scalars and the CG solves of the
  last step.

A family (one file and one config) subclasses it:

1. ``__init__``: call ``super().__init__(num_unrolls, share_weights, memory, ...)``, build the
   N unroll layers (``self.replicate(*templates)`` for their modules) and pass them to
   ``self.set_unrolls(layers)``;
2. if the chain state is more than the image (e.g. an image and a latent), override
   ``to_state(x0)`` and ``to_image(state, x0)``;
3. optionally ``family_stats()``: more scalars for the logger.

The physics data are constants of the call: no gradient flows into k-space, maps or mask, in
every memory mode (so the modes agree).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from melrecon.mel.chain import InvertibleChain, check_depth_and_memory
from melrecon.mel.invertible import State
from melrecon.mel.shared_state import deduplicate_state_dict
from melrecon.models.dc import DataConsistency, SenseData
from melrecon.physics.cg import CGLog
from melrecon.physics.sense import SenseOperator


class UnrolledBase(nn.Module):
    """Base of the unrolled families (module docstring).

    Args:
        num_unrolls: N >= 1.
        share_weights: one set of modules for all unrolls, or N independent copies.
        memory: ``"standard" | "checkpoint" | "mel"``.
        anchor_every: ``mel`` anchors: None/"inf" (pure MEL), integer k, or "auto".
        drift_tol: ``mel``: relative drift of recomputed inputs above which a segment is redone.
        auto_start: first spacing of the "auto" anchor controller.
        fft_dims: Fourier-encoded image axes of the SENSE operator.
        dc_chunk: apply ``A^H`` and ``A^H A`` in chunks of this many positions of the first
            image axis (the readout X of a whole 3D volume; see
            :class:`~melrecon.physics.sense.SenseOperator`): the same result, coil-image
            temporaries of one chunk.  None: the whole image at once.

    ``exact_inverse`` (class attribute): True when every unroll inverts in closed form from the
    values the forward pass computed, so ``mel`` recomputes each input exactly in any precision
    the layers run in (the reversible family, also under bfloat16 autocast: the engine replays
    the autocast state, tested); False for fixed-point inverses (MoDL's residual CNN), whose
    float32 tolerance is out of reach when the CNN runs in bfloat16/float16 (every step would
    fall back to recomputation), so training refuses ``mel`` with 16-bit precision.
    """

    exact_inverse: bool = False

    def __init__(
        self,
        num_unrolls: int,
        share_weights: bool,
        memory: str,
        anchor_every: Any,
        drift_tol: float,
        auto_start: int = 4,
        fft_dims: Sequence[int] = (-2, -1),
        dc_chunk: int | None = None,
    ) -> None:
        super().__init__()
        check_depth_and_memory(num_unrolls, memory)
        if dc_chunk is not None and (isinstance(dc_chunk, bool) or not isinstance(dc_chunk, int) or dc_chunk < 1):
            raise ValueError(f"model.dc_chunk must be a positive integer or null, got {dc_chunk!r}")
        self.dc_chunk = dc_chunk
        self.num_unrolls = num_unrolls
        self.share_weights = bool(share_weights)
        self.fft_dims = tuple(fft_dims)
        self._chain_options = dict(memory=memory, anchor_every=anchor_every, drift_tol=drift_tol, auto_start=auto_start)
        self.last_cg = CGLog()

    # ------------------------------------------------------------------ building
    def replicate(self, *templates: nn.Module | None) -> list[tuple[Any, ...]]:
        """Modules for each unroll: ``templates`` for every unroll (shared weights), or for
        unroll 0 and deep copies for the others, re-initialised (``reset_parameters``) in the
        order given, so one seed gives one network. ``None`` stays ``None``."""
        if self.share_weights:
            return [templates] * self.num_unrolls
        per_unroll = [templates]
        for _ in range(self.num_unrolls - 1):
            copies = []
            for t in templates:
                c = copy.deepcopy(t)
                if callable(getattr(c, "reset_parameters", None)):
                    c.reset_parameters()
                copies.append(c)
            per_unroll.append(tuple(copies))
        return per_unroll

    def set_unrolls(self, unrolls: Sequence[nn.Module]) -> None:
        """Make the chain of the N unroll layers (call once, at the end of ``__init__``)."""
        if len(unrolls) != self.num_unrolls:
            raise ValueError(f"got {len(unrolls)} unroll layers for num_unrolls={self.num_unrolls}")
        self.chain = InvertibleChain(unrolls, **self._chain_options)
        deduplicate_state_dict(self)  # shared weights: one checkpoint entry, any number of unrolls

    @property
    def unrolls(self) -> nn.ModuleList:
        return self.chain.layers

    @property
    def memory(self) -> str:
        return self.chain.memory

    # ------------------------------------------------------------------ the call
    def to_state(self, x0: Tensor) -> State:
        """The chain's input state for the image x0 (default: x0 itself)."""
        return x0

    def to_image(self, state: State, x0: Tensor) -> Tensor:
        """The image of the chain's output state, with x0's shape and dtype (default: itself)."""
        return state

    def forward(self, x0: Tensor, kspace: Tensor, maps: Tensor, mask: Tensor) -> Tensor:
        """Reconstruct: x0 complex (B, *image), kspace (B, C, ...), maps, mask in the layouts
        of DESIGN.md ("Conventions") -> image of x0's shape and dtype."""
        if not torch.is_complex(x0):
            raise ValueError(f"x0 must be complex, got dtype {x0.dtype} (shape {tuple(x0.shape)})")
        op = SenseOperator(maps.detach(), mask.detach(), self.fft_dims, self.dc_chunk)
        data = SenseData.from_kspace(op, kspace.detach())
        if x0.shape != data.aty.shape:
            raise ValueError(
                f"x0 shape {tuple(x0.shape)} differs from the image shape {tuple(data.aty.shape)} of kspace/maps"
            )
        self.last_cg = data.cg  # filled by this call's forward and backward CG solves
        return self.to_image(self.chain(self.to_state(x0), data), x0)

    # ------------------------------------------------------------------ logging
    def family_stats(self) -> dict[str, float]:
        """More scalars for the logger (default: none)."""
        return {}

    @torch.no_grad()
    def log_stats(self) -> dict[str, float]:
        """Scalars for the logger: MEL statistics and CG solves of the last step, learned DC
        scalars (``dc/lam`` or ``dc/step``: mean, and min/max over independent copies)."""
        s = self.chain.stats
        out = {
            "mel/drift": float(s.drift),
            "mel/anchors": float(s.anchors),
            "mel/anchor_every": float(s.anchor_every),
            "mel/inv_iters": float(s.inv_iters),
            "mel/inv_residual": float(s.inv_residual),
            "mel/fallbacks": float(s.fallbacks),
            "mel/fallback_spacing": float(s.fallback_spacing),  # sub-anchor spacing of a redo (0: none)
        }
        learned: dict[str, list[Tensor]] = {}
        for m in self.modules():  # each module once, however many unrolls share it
            if isinstance(m, DataConsistency):
                for name, value in m.learned().items():
                    learned.setdefault(name, []).append(value.detach().float().reshape(()))
        for name, values in learned.items():
            v = torch.stack(values)
            out[f"dc/{name}"] = float(v.mean())
            if len(values) > 1:
                out[f"dc/{name}_min"] = float(v.min())
                out[f"dc/{name}_max"] = float(v.max())
        cg = self.last_cg
        if cg.solves:
            out["dc/cg_iters"] = float(cg.iterations)  # forward + implicit backward solves
            out["dc/cg_converged"] = float(cg.converged)  # 1: every solve met its tolerance
            out["dc/cg_residual"] = cg.residual  # worst final relative residual
        out.update(self.family_stats())
        return out
