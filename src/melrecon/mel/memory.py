"""Memory probe: bytes that autograd holds for the backward pass, and their peak.

``MemoryProbe`` is a context manager.  Inside it, every tensor autograd saves for backward
(``saved_tensors_hooks``: ordinary graphs, ``ctx.save_for_backward`` of custom functions,
and the one-layer graphs MEL rebuilds during its backward pass) is counted once per
storage (views and repeated saves of one storage count once) until autograd releases it.
Tensors that the MEL engine holds outside autograd (its current state and gradient, and
states recomputed by a fallback) are reported to the probe with :func:`hold`, so the peak
covers MEL's layer-by-layer recompute too.  Wrap the forward *and* the backward call::

    with MemoryProbe() as probe:
        loss = net(x).abs().sum()
        loss.backward()
    probe.peak_bytes            # peak of the counted bytes
    probe.cuda_peak_bytes       # torch.cuda.max_memory_allocated() delta, None on CPU

Parameters saved by a graph are counted like any other saved tensor (they are part of what
a graph keeps alive); tensors that are not saved (the loss, parameters outside a graph) are
not.  The probe is exact in what it counts and portable (CPU tests use it); the CUDA figure
is the allocator's ground truth.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

_ACTIVE: list["MemoryProbe"] = []


def _key(t: Tensor) -> tuple[Any, ...] | None:
    try:
        s = t.untyped_storage()
        return (t.device.type, t.device.index, s.data_ptr(), s.nbytes())
    except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. sparse)
        return None


class _Held:
    """A saved tensor plus its accounting; releases its bytes when autograd drops it."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: Tensor) -> None:
        self.tensor = tensor


class MemoryProbe:
    """Counts bytes held for backward (deduplicated by storage) and their peak."""

    def __init__(self, cuda: bool | None = None) -> None:
        self.current_bytes = 0
        self.peak_bytes = 0
        self.cuda_peak_bytes: int | None = None
        self._refs: dict[tuple[Any, ...], int] = {}
        self._cuda = torch.cuda.is_available() if cuda is None else cuda
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._cuda_start = 0

    # ---------------------------------------------------------------------- accounting
    def _add(self, key: tuple[Any, ...] | None) -> None:
        if key is None:
            return
        n = self._refs.get(key, 0)
        self._refs[key] = n + 1
        if n == 0:
            self.current_bytes += key[3]
            self.peak_bytes = max(self.peak_bytes, self.current_bytes)

    def _remove(self, key: tuple[Any, ...] | None) -> None:
        if key is None or key not in self._refs:
            return
        self._refs[key] -= 1
        if self._refs[key] == 0:
            del self._refs[key]
            self.current_bytes -= key[3]

    def _pack(self, t: Tensor) -> _Held:
        key = _key(t)
        self._add(key)
        # detach: the packed object must not hold the graph (avoids a reference cycle
        # through saved outputs); autograd re-attaches what it needs on unpack
        held = _Held(t.detach())
        weakref.finalize(held, self._remove, key)
        return held

    @staticmethod
    def _unpack(held: _Held) -> Tensor:
        return held.tensor

    # ---------------------------------------------------------------------- context
    def __enter__(self) -> "MemoryProbe":
        if self._cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._cuda_start = torch.cuda.memory_allocated()
        self._hooks.__enter__()
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        _ACTIVE.remove(self)
        self._hooks.__exit__(*exc)
        if self._cuda:
            torch.cuda.synchronize()
            self.cuda_peak_bytes = torch.cuda.max_memory_allocated() - self._cuda_start


class _Hold:
    """Token returned by :func:`hold`; ``release()`` (or context exit) un-counts the bytes."""

    def __init__(self, tensors: Iterable[Tensor]) -> None:
        self.keys = [_key(t) for t in tensors]
        self.probes = list(_ACTIVE)
        for p in self.probes:
            for k in self.keys:
                p._add(k)

    def release(self) -> None:
        for p in self.probes:
            for k in self.keys:
                p._remove(k)
        self.probes = []

    def __enter__(self) -> "_Hold":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def hold(tensors: Iterable[Tensor]) -> _Hold:
    """Tell the active probes (if any) that these tensors are held for backward until the
    returned token is released.  No-op cost when no probe is active."""
    return _Hold(tensors)
