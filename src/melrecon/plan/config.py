"""From a Hydra run config to the planner and back: the network's sizes (:func:`spec_from_config`),
the training item's shape (:func:`item_shape`), the chosen plan written into ``cfg.model``
(:func:`apply_plan`) and the whole start-up step (:func:`resolve_auto`)."""

from __future__ import annotations

import logging
from typing import Any

from omegaconf import DictConfig, open_dict

from melrecon.plan.planner import NetworkSpec, Plan, PlanTable, default_budget_bytes, plan_table, precision_name
from melrecon.plan.time_model import TimeCosts, calibrate

log = logging.getLogger(__name__)


def family_of(model_cfg: DictConfig) -> str:
    target = str(model_cfg.get("_target_", ""))
    if target.endswith("ReversibleUnrolledNet"):
        return "rev"
    if target.endswith("UnrolledNet"):
        return "modl"
    raise ValueError(f"model.memory=auto knows UnrolledNet and ReversibleUnrolledNet, got model._target_={target}")


def item_shape(datamodule: Any) -> tuple[tuple[int, ...], int]:
    """(image shape without the batch axis, coils) of the first training item."""
    datamodule.prepare_data()  # synthetic data are generated on first use
    datamodule.setup("fit")
    item = datamodule.datasets["train"][0]
    return tuple(int(s) for s in item.x0.shape), int(item.kspace.shape[0])


def spec_from_config(cfg: DictConfig, image: tuple[int, ...], coils: int) -> NetworkSpec:
    """The planner's view of ``cfg`` for items of ``image`` shape ((X, Y, Z) or (T, X, Y)) and ``coils``."""
    m, reg = cfg.model, cfg.model.regularizer
    conv_dim = int(reg.get("conv_dim", 3))
    batch = int(cfg.data.get("batch_size", 1))
    volume = tuple(image[-conv_dim:])
    batch *= int(math_prod(image[:-conv_dim]))  # 2D CNNs fold the leading image axes into the batch
    family = family_of(m)
    return NetworkSpec(
        family=family, volume=volume, coils=coils, width=int(reg.width), depth=int(reg.depth),
        num_unrolls=int(m.num_unrolls), batch=batch, kernel_size=int(reg.get("kernel_size", 3)),
        share_weights=bool(m.get("share_weights", True)), precision=precision_name(cfg.trainer.get("precision", 32)),
        latent_channels=int(reg.get("out_channels", 2)) if family == "rev" else 2,
        state_precision=str(m.get("state_precision", "fixed")))


def math_prod(xs: Any) -> int:
    out = 1
    for x in xs:
        out *= int(x)
    return out


def apply_plan(cfg: DictConfig, plan: Plan) -> None:
    """Write the plan into ``cfg.model`` (memory, anchor_every, regularizer.tile, dc_chunk)."""
    with open_dict(cfg):
        cfg.model.memory = plan.memory
        if plan.memory == "mel":
            cfg.model.anchor_every = plan.anchor_every
        cfg.model.regularizer.tile = list(plan.tile) if plan.tile is not None else None
        cfg.model.dc_chunk = plan.dc_chunk


def budget_bytes(cfg: DictConfig) -> float:
    """``trainer.memory_budget_gb`` in bytes, or the default of :func:`default_budget_bytes`."""
    gb = cfg.trainer.get("memory_budget_gb")
    if gb is None:
        return default_budget_bytes(str(cfg.trainer.get("accelerator", "cpu")))
    if isinstance(gb, bool) or not isinstance(gb, (int, float)) or gb <= 0:
        raise ValueError(f"trainer.memory_budget_gb must be a positive number of GB or null, got {gb!r}")
    return float(gb) * 1e9


def table_for(cfg: DictConfig, image: tuple[int, ...], coils: int) -> PlanTable:
    """The plan table of ``cfg`` (time calibrated when ``trainer.plan_calibrate`` is true)."""
    spec = spec_from_config(cfg, image, coils)
    costs = TimeCosts()
    if cfg.trainer.get("plan_calibrate", False):
        import torch

        dev = "cuda" if str(cfg.trainer.get("accelerator")) in ("gpu", "cuda") and torch.cuda.is_available() else "cpu"
        costs = calibrate(spec.width, spec.depth, spec.kernel_size, spec.family, spec.coils, spec.latent_channels, dev)
    return plan_table(spec, budget_bytes(cfg), costs)


def resolve_auto(cfg: DictConfig, datamodule: Any) -> PlanTable | None:
    """``model.memory=auto``: print the plan table, write the fastest fitting plan into ``cfg``;
    raise ValueError (one line) when none fits. None when ``model.memory`` is not ``auto``."""
    if str(cfg.model.get("memory")) != "auto":
        return None
    image, coils = item_shape(datamodule)
    table = table_for(cfg, image, coils)
    print(table.format(), flush=True)
    if table.chosen is None:
        raise ValueError(table.refusal())
    apply_plan(cfg, table.chosen.plan)
    log.info("model.memory=auto chose %s", table.chosen.plan.label())
    return table
