"""One state-dict entry per tensor for modules that reach a submodule under several names.

An unrolled network with shared weights holds the same regulariser in every unroll, so
``nn.Module.state_dict`` lists its weights once per unroll (``chain.layers.0.conv.weight``,
``chain.layers.1.conv.weight``, ...). :func:`deduplicate_state_dict` keeps the first name of
each tensor when saving and restores the other names when loading, so checkpoints hold each
weight once and a network with shared weights loads into one with another number of unrolls.
"""

from __future__ import annotations

from typing import Any

from torch import nn


def state_aliases(module: nn.Module) -> dict[str, str]:
    """``{alias: canonical}`` for every state entry reachable under more than one name."""
    first: dict[tuple[int, str], str] = {}
    aliases: dict[str, str] = {}
    for name, mod in module.named_modules(remove_duplicate=False):
        prefix = f"{name}." if name else ""
        entries = [n for n, p in mod._parameters.items() if p is not None]
        entries += [n for n, b in mod._buffers.items() if b is not None and n not in mod._non_persistent_buffers_set]
        for n in entries:
            key = (id(mod), n)
            if key in first:
                aliases[prefix + n] = first[key]
            else:
                first[key] = prefix + n
    return aliases


def deduplicate_state_dict(module: nn.Module) -> None:
    """Register the save and load hooks described in the module docstring on ``module``."""

    def drop_aliases(mod: nn.Module, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
        for alias in state_aliases(mod):
            state.pop(prefix + alias, None)

    def restore_aliases(state: dict[str, Any], prefix: str, *args: Any) -> None:
        for alias, canonical in state_aliases(module).items():
            if prefix + canonical in state and prefix + alias not in state:
                state[prefix + alias] = state[prefix + canonical]

    module._register_state_dict_hook(drop_aliases)
    module._register_load_state_dict_pre_hook(restore_aliases)
