"""What a run is, so that its folder and its checkpoints can be trusted.

- :func:`unique_dir`: the ``${unique_dir:PATH}`` resolver behind the Hydra run and sweep folders.
  It creates the folder with one ``os.mkdir`` (atomic: of two processes asking for the same
  name, exactly one gets it) and moves on to ``PATH-1``, ``PATH-2``, ... when the name is taken,
  so two runs started in the same second never share a folder.
- :func:`config_record`: the parts of a training config that define what a checkpoint's weights
  mean (model, data, module, seed), stored in every checkpoint with the model config's hash.
- :func:`config_differences` / :func:`check_same_run`: resume and ``reconstruct`` compare a
  config with the checkpoint's record and refuse a mismatch, naming the differing keys.
- :func:`read_checkpoint`: load a checkpoint file or say in one line why it cannot be read.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

# Model keys that choose how gradients are computed, not what the network computes: the
# memory modes give identical results (tests/test_mel_engine.py), so a run may switch them.
EXECUTION_KEYS = frozenset({"memory", "anchor_every", "drift_tol", "auto_start", "dc_chunk"})
# Nested model keys of the same kind (the CNNs' tile: same output, a setting, not state);
# model.memory=auto chooses them with the memory mode.
EXECUTION_LEAVES = frozenset({"tile"})
# Data keys that say where files are and how they are loaded, not which items a run sees.
DATA_LOCATION_KEYS = frozenset({"root", "num_workers", "pin_memory", "persistent_workers", "val_batch_size"})
MAX_TRIES = 1000


def unique_dir(path: str) -> str:
    """Create a fresh folder ``path`` (or ``path-1``, ``path-2``, ...) atomically; return its path.

    Registered as the OmegaConf resolver ``unique_dir`` with ``use_cache=True``: Hydra resolves
    ``hydra.run.dir`` / ``hydra.sweep.dir`` several times per run and copies the cache to every
    job of a sweep, so one run creates exactly one folder.
    """
    base = Path(path)
    try:
        base.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"run folder: cannot create {base.parent}: {err.strerror or err}") from None
    for k in range(MAX_TRIES):
        candidate = base if k == 0 else base.with_name(f"{base.name}-{k}")
        try:
            os.mkdir(candidate)  # fails if it exists: the name belongs to whoever made it first
            return str(candidate)
        except FileExistsError:
            continue
        except OSError as err:
            raise ValueError(f"run folder: cannot create {candidate}: {err.strerror or err}") from None
    raise ValueError(f"run folder: {base} and {MAX_TRIES - 1} numbered variants all exist")


def _plain(node: Any) -> Any:
    """A resolved config node as plain Python values (what a weights_only checkpoint may hold)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    return node


def model_hash(model: Mapping[str, Any]) -> str:
    """SHA-256 of the model config (canonical JSON), the short identity shown in messages."""
    return hashlib.sha256(json.dumps(model, sort_keys=True, default=str).encode()).hexdigest()[:16]


def config_record(cfg: Any) -> dict[str, Any]:
    """``{"model", "model_hash", "data", "module", "seed"}`` of a training config, as plain values."""
    model = _plain(cfg.get("model"))
    return {"model": model, "model_hash": model_hash(model), "data": _plain(cfg.get("data")),
            "module": _plain(cfg.get("module")), "seed": _plain(cfg.get("seed"))}


def _flatten(node: Any, prefix: str) -> dict[str, Any]:
    if isinstance(node, Mapping):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out or {prefix: {}}
    return {prefix: node}


def config_differences(old: Any, new: Any, prefix: str, ignore: frozenset[str] = frozenset()) -> list[str]:
    """``["model.num_unrolls: 5 -> 2", ...]``: the keys whose values differ (``ignore``: top-level keys)."""
    a = _flatten({k: v for k, v in (old or {}).items() if k not in ignore}, prefix)
    b = _flatten({k: v for k, v in (new or {}).items() if k not in ignore}, prefix)
    missing = object()
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, missing), b.get(key, missing)
        if va != vb:
            show = ["(absent)" if v is missing else repr(v) for v in (va, vb)]
            out.append(f"{key}: {show[0]} -> {show[1]}")
    return out


def run_differences(record: Mapping[str, Any], cfg: Any, sections: tuple[str, ...]) -> list[str]:
    """The keys of ``sections`` whose values differ between a checkpoint's ``record`` and ``cfg``.

    Model execution keys (:data:`EXECUTION_KEYS`, nested :data:`EXECUTION_LEAVES`) and data
    location keys (:data:`DATA_LOCATION_KEYS`) may differ and are not compared.
    """
    new = config_record(cfg)
    diffs: list[str] = []
    for section in sections:
        ignore = {"model": EXECUTION_KEYS, "data": DATA_LOCATION_KEYS}.get(section, frozenset())
        old, now = record.get(section), new[section]
        if isinstance(old, Mapping) or isinstance(now, Mapping):
            found = config_differences(old, now, section, ignore)
            if section == "model":
                found = [d for d in found if d.split(":")[0].rsplit(".", 1)[-1] not in EXECUTION_LEAVES]
            diffs += found
        elif old != now:
            diffs.append(f"{section}: {old!r} -> {now!r}")
    return diffs


def format_differences(diffs: list[str], limit: int = 8) -> str:
    """``"a: 1 -> 2; b: ..."`` with at most ``limit`` keys shown."""
    return "; ".join(diffs[:limit]) + (f"; ... ({len(diffs)} keys)" if len(diffs) > limit else "")


def check_same_run(record: Mapping[str, Any], cfg: Any, what: str, sections: tuple[str, ...]) -> None:
    """Raise ValueError naming every differing key of ``sections`` (``what`` names the checkpoint)."""
    diffs = run_differences(record, cfg, sections)
    if diffs:
        raise ValueError(f"{what} was trained with another config (checkpoint -> now): {format_differences(diffs)}")


def read_checkpoint(path: str | os.PathLike, what: str = "ckpt_path") -> dict[str, Any]:
    """Load a Lightning checkpoint on the CPU (weights only) or raise ValueError in one line."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{what}: no checkpoint file at '{p}'")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure to read means the same to the user
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        raise ValueError(f"{what}: '{p}' is not a readable checkpoint (truncated or not a "
                         f"torch file?): {reason}") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), Mapping):
        raise ValueError(f"{what}: '{p}' has no state_dict (not a Lightning checkpoint)")
    return ckpt


def checkpoint_run_dir(ckpt_path: str | os.PathLike) -> Path | None:
    """The run folder a checkpoint was written into (``<run>/checkpoints/<name>.ckpt``), or None."""
    p = Path(ckpt_path).resolve()
    return p.parent.parent if p.parent.name == "checkpoints" else None


__all__ = ["unique_dir", "config_record", "config_differences", "check_same_run", "run_differences", "format_differences",
           "read_checkpoint",
           "checkpoint_run_dir", "model_hash", "EXECUTION_KEYS", "DATA_LOCATION_KEYS"]
