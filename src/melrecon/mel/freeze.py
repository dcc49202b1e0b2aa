"""Freeze everything that could change a layer's function between forward and recompute.

MEL (and checkpointing) recompute layers during the backward pass and invert them; if the
layer is a different function the second time, the gradient is silently wrong.  Three things
change a module between calls in training mode:

- spectral-norm power iterations (``torch.nn.utils.parametrizations.spectral_norm`` updates
  its ``u``/``v`` on every weight access in training mode; our own bounded convs expose
  ``refresh_()``): they are advanced **once per step** by :meth:`StepFreezer.begin`, then
  held still (the parametrisations are put in eval mode while the chain runs);
- dropout: each ``nn.Dropout*`` module draws **one mask per step** (per input shape) and
  reuses it for every call during the step (forward, inverse iterations, recompute);
- batch-norm running statistics: snapshot before an inversion/recompute and restored after
  it, so that the running averages are updated exactly once per step, by the forward pass.

The freezer is used by :class:`melrecon.mel.chain.InvertibleChain` in every memory
mode, so the three modes compute the same function.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.dropout import _DropoutNd
from torch.nn.utils import parametrize


def _is_torch_spectral_norm(m: nn.Module) -> bool:
    # torch's parametrisation class is private; match it by name to stay version-robust
    return type(m).__name__ == "_SpectralNorm"


class StepFreezer:
    """Holds the per-step frozen state of a set of modules.

    Use: ``begin()`` once at the start of a training step (advances power iterations,
    forgets last step's dropout masks), then wrap every call into the layers with
    ``active()`` and every inversion/recompute with ``active(recompute=True)``.
    """

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        seen: set[int] = set()
        self.sn: list[nn.Module] = []  # torch spectral-norm parametrisations
        self.sn_parents: list[tuple[nn.Module, str]] = []
        self.refreshers: list[nn.Module] = []  # modules with refresh_()
        self.dropouts: list[_DropoutNd] = []
        self.norms: list[_NormBase] = []
        for root in modules:
            for m in root.modules():
                if id(m) in seen:
                    continue
                seen.add(id(m))
                if _is_torch_spectral_norm(m):
                    self.sn.append(m)
                if parametrize.is_parametrized(m):
                    for name, plist in m.parametrizations.items():
                        if any(_is_torch_spectral_norm(p) for p in plist):
                            self.sn_parents.append((m, name))
                if callable(getattr(m, "refresh_", None)):
                    self.refreshers.append(m)
                if isinstance(m, _DropoutNd):
                    self.dropouts.append(m)
                if isinstance(m, _NormBase) and m.track_running_stats:
                    self.norms.append(m)
        self.masks: dict[tuple[int, tuple[int, ...]], Tensor] = {}

    def begin(self) -> None:
        """Start a step: one power-iteration update (training mode only) and fresh masks."""
        self.masks.clear()
        with torch.no_grad():
            for m in self.refreshers:
                if m.training:
                    m.refresh_()
            for parent, name in self.sn_parents:
                if parent.training:
                    getattr(parent, name)  # one access = one power iteration in training mode

    @contextmanager
    def active(self, recompute: bool = False) -> Iterator[None]:
        """Within: spectral norms frozen, dropout masks fixed; with ``recompute=True``
        batch-norm running statistics are restored on exit (no double update)."""
        sn_modes = [m.training for m in self.sn]
        for m in self.sn:
            m.eval()
        originals = []
        for d in self.dropouts:
            originals.append(d.__dict__.get("forward"))
            d.forward = self._frozen_dropout(d)  # instance attribute shadows the method
        snapshot = None
        if recompute:
            snapshot = [
                {k: v.clone() for k, v in m._buffers.items() if v is not None} for m in self.norms
            ]
        try:
            yield
        finally:
            for m, mode in zip(self.sn, sn_modes):
                m.train(mode)
            for d, orig in zip(self.dropouts, originals):
                if orig is None:
                    del d.forward
                else:
                    d.forward = orig
            if snapshot is not None:
                # replace (not copy_ into) the buffers: the graph just built may have saved
                # the updated tensors, and an in-place restore would invalidate it
                for m, snap in zip(self.norms, snapshot):
                    for k, v in snap.items():
                        m._buffers[k] = v

    def _frozen_dropout(self, d: _DropoutNd):
        def forward(x: Tensor) -> Tensor:
            if not d.training or d.p == 0.0:
                return x
            key = (id(d), tuple(x.shape))
            mask = self.masks.get(key)
            if mask is None:
                # same mask structure as nn.Dropout (elementwise); drawn once per step
                keep = torch.rand(x.shape, device=x.device) >= d.p
                mask = keep.to(x.real.dtype if x.is_complex() else x.dtype) / (1.0 - d.p)
                self.masks[key] = mask
            return x * mask

        return forward
