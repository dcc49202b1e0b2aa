"""The trained run behind a reconstruction: checkpoint and config files, network, data settings."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from melrecon.data.subsample import check_mask_options

CONFIG = Path(".hydra") / "config.yaml"


class ReconstructError(Exception):
    """A usage mistake (run folder, checkpoint, config, device): one line, exit status 2."""


def find_run(run_or_ckpt: str | os.PathLike, ckpt: str | None = None,
             config: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """Resolve ``(checkpoint file, config.yaml)`` from a run folder or a checkpoint path.

    A folder: ``--ckpt`` (a path, or a name inside ``<run>/checkpoints/``) or
    ``<run>/checkpoints/last.ckpt``. A file: the checkpoint itself; its run folder is the first
    folder above it holding ``.hydra/config.yaml``. ``config`` overrides the config found.
    """
    p = Path(run_or_ckpt)
    if p.is_dir():
        run_dir = p
        if ckpt is None:
            ckpt_path = p / "checkpoints" / "last.ckpt"
        else:
            ckpt_path = Path(ckpt)
            if not ckpt_path.is_file() and (p / "checkpoints" / ckpt).is_file():
                ckpt_path = p / "checkpoints" / ckpt
        if not ckpt_path.is_file():
            raise ReconstructError(f"no checkpoint {ckpt_path} (run folder {p}; name one with --ckpt)")
    elif p.is_file():
        if ckpt is not None:
            raise ReconstructError(f"--ckpt {ckpt!r} given with a checkpoint file {p}; give a run folder instead")
        ckpt_path = p
        run_dir = next((d for d in list(p.resolve().parents)[:3] if (d / CONFIG).is_file()), None)
        if run_dir is None and config is None:
            raise ReconstructError(f"no {CONFIG} in the folders above {p}: pass the run folder, or --config")
    else:
        raise ReconstructError(f"run folder or checkpoint {p} does not exist")
    cfg_path = Path(config) if config is not None else run_dir / CONFIG
    if not cfg_path.is_file():
        raise ReconstructError(f"no run config {cfg_path} (the run's .hydra/config.yaml; or pass --config)")
    return ckpt_path, cfg_path


def settle_auto_memory(cfg: Any, recorded_model: Any) -> None:
    """``model.memory=auto`` in a run's config: the memory mode, anchors, ``dc_chunk`` and CNN
    tiles the planner chose at the start of training (the checkpoint's record of the model), or
    ``standard`` untiled for a checkpoint without a record (same weights, same output)."""
    from omegaconf import open_dict

    with open_dict(cfg):
        cfg.model.memory = recorded_model.get("memory", "standard")
        for key in ("anchor_every", "dc_chunk"):
            if key in recorded_model:
                cfg.model[key] = recorded_model[key]
        for part in ("regularizer", "step_net"):
            tile = (recorded_model.get(part) or {}).get("tile")
            if part in cfg.model and cfg.model[part] is not None and "tile" in cfg.model[part]:
                cfg.model[part].tile = tile


def load_network(cfg: Any, ckpt_path: str | os.PathLike, num_unrolls: int | None = None) -> nn.Module:
    """Build the network of ``cfg.model`` and load its weights from a Lightning checkpoint.

    The checkpoint's own record of the model config (stored by :class:`melrecon.lit.ReconModule`
    since issue 11) must equal ``cfg.model`` (but the memory-mode keys,
    :data:`melrecon.lit.runinfo.EXECUTION_KEYS`): weights of another network are refused with
    the differing keys even when every tensor shape fits. ``num_unrolls`` then rebuilds a
    shared-weight network at another depth (:func:`set_num_unrolls`). The parameters are the
    ``net.``-prefixed entries of the checkpoint's ``state_dict``, loaded strictly. Returns the
    network in eval mode.
    """
    import hydra

    from melrecon.lit.runinfo import format_differences, read_checkpoint, run_differences

    if "model" not in cfg or "_target_" not in cfg.model:
        raise ReconstructError("the run config has no model section with a _target_")
    try:
        # Lightning checkpoints made by ReconModule hold only plain values (weights_only-safe)
        ckpt = read_checkpoint(ckpt_path, what="checkpoint")
    except ValueError as err:
        raise ReconstructError(str(err)) from None
    state = ckpt["state_dict"]
    record = ckpt.get("melrecon", {}).get("config")
    diffs = run_differences(record, cfg, ("model",)) if record is not None else []
    if diffs:
        raise ReconstructError(f"checkpoint {ckpt_path} does not fit the run's model config (checkpoint -> "
                               f"config): {format_differences(diffs)}")
    if str(cfg.model.get("memory")) == "auto":  # trained with model.memory=auto: the plan it chose
        settle_auto_memory(cfg, (record or {}).get("model") or {})
    if num_unrolls is not None:
        set_num_unrolls(cfg, num_unrolls)
    try:
        net = hydra.utils.instantiate(cfg.model)
    except Exception as err:  # noqa: BLE001 - any instantiation failure is a config problem here
        raise ReconstructError(f"cannot build the network from the run config: {err}") from err
    weights = {k[len("net."):]: v for k, v in state.items() if k.startswith("net.")}
    if not weights:
        raise ReconstructError(f"checkpoint {ckpt_path}: no 'net.*' parameters (not a ReconModule checkpoint)")
    try:
        net.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        msg = " ".join(str(err).split())
        raise ReconstructError(f"checkpoint {ckpt_path} does not fit the run's model config: {msg}") from err
    return net.eval()


def data_settings(cfg: Any, whole_volume: bool = False, **overrides: Any) -> Any:
    """The run's data settings as a :class:`KspaceDataModule` (no files are touched).

    ``root`` and ``synthetic`` are replaced (the run's data folder is not needed, and its path
    may use interpolations that only resolve inside Hydra). ``overrides`` with value ``None``
    are ignored; the others replace ``cfg.data`` keys (``eval_acceleration``, ``mask_type``,
    ``calib``, ``slab_size``) and are checked by the DataModule/datasets.  ``whole_volume``:
    ``slab_size=None``, one item per volume (as for a run trained on whole volumes).
    """
    if whole_volume:
        overrides = {**overrides, "slab_size": None}
    import hydra

    from melrecon.data.datamodule import KspaceDataModule

    if "data" not in cfg or "_target_" not in cfg.data:
        raise ReconstructError("the run config has no data section with a _target_")
    kwargs = {k: v for k, v in overrides.items() if v is not None or (k == "slab_size" and whole_volume)}
    try:
        dm = hydra.utils.instantiate(cfg.data, root=".", synthetic=None, **kwargs)
    except Exception as err:  # noqa: BLE001
        raise ReconstructError(f"cannot read the run's data settings: {err}") from err
    if not isinstance(dm, KspaceDataModule):
        raise ReconstructError(f"data._target_ {cfg.data._target_} is not melrecon's KspaceDataModule")
    # checked once here rather than failing every file the same way
    try:
        check_mask_options(dm.kind, dm.mask_type, dm.accelerations, dm.calib)
    except ValueError as err:
        raise ReconstructError(f"data settings: {err}") from None
    if dm.eval_acceleration is not None and not float(dm.eval_acceleration) > 1:
        raise ReconstructError(f"acceleration (--accel / data.eval_acceleration) must be > 1, got {dm.eval_acceleration}")
    if dm.slab_size is not None and dm.slab_size < 1:
        raise ReconstructError(f"slab size (--slab-size / data.slab_size) must be >= 1, got {dm.slab_size}")
    return dm


def eval_dataset(dm: Any, files: Sequence[str | os.PathLike]) -> Any:
    """The dataset validation would build over ``files`` (same masks, same acceleration)."""
    return dm.dataset(files, train=False)


def set_num_unrolls(cfg: Any, num_unrolls: int) -> None:
    """Make ``cfg.model`` build its shared-weight network with ``num_unrolls`` unrolls (the
    checkpoint stores the shared weights once, so they load at any depth)."""
    if num_unrolls < 1 or "num_unrolls" not in cfg.get("model", {}):
        raise ReconstructError(f"--num-unrolls {num_unrolls}: needs N >= 1 and a model with num_unrolls")
    if not cfg.model.get("share_weights", False):
        raise ReconstructError("--num-unrolls: the run's network has separate weights per unroll")
    cfg.model.num_unrolls = num_unrolls
