"""Study configs: compose ``conf/study/NAME.yaml`` and turn it into training runs with one budget.

A study config (Hydra, its own tree ``conf/study/``) has::

    defaults: [_self_, preset: cpu, optional NAME@_here_: ${preset}]
    name, kind (training | memory), description, out_dir
    reference: a method name; comparisons: [[a, b], ...] (paired a - b on the test volumes)
    select_on: psnr | ssim | nmse, the one validation metric that picks every network's checkpoint
               (the checkpoint callback's monitor ``val/<select_on>``) and every baseline's lam
    budget: {seed, max_steps, val_every, lr, schedule: constant | cosine}
    train: {override: value}           every run, Hydra override syntax (``+key`` / ``++key`` ok)
    runs: {name: {label, experiment, overrides: {override: value}}}   (null drops a run); the label
          may name fields of :func:`run_settings` in braces (``MoDL N={num_unrolls}``), filled
          from the run's composed config, so it says what ran at any preset
    arms: {name: [run a, run b]}       optional: the study's main contrasts (a - b), reported first
    baselines: {name: {method, lam: [grid], ...solver options}}     (null drops a baseline)
    launcher: {name: basic | slurm | ..., parallel: K, overrides: {hydra.launcher.key: value}}
              (``parallel``: with the basic launcher, K training runs at a time, one thread each)
    probe_modes: [standard, checkpoint, mel]    the modes whose training-step memory is measured
                                                at every trained network's size (equal-memory table)
    score: {device, batch_size, panel_index}, resume: last | restart, wandb: {enabled, project}

``conf/study/preset/{tiny,cpu,long,paper}.yaml`` holds what every study shares at a preset (``train``
overrides, e.g. the tiny data settings, and ``synthetic``: the synthetic dataset's options, merged
into ``data.synthetic``; ``preset.synthetic=null`` for real data), ``conf/study/NAME/{preset}.yaml``
the study's sizes at that preset. A run's ``train.py`` overrides are, in this order:
``+experiment=...``, the study's ``train``, the preset's ``train`` and ``synthetic``, the run's
``overrides``, the ``--`` arguments, then the budget (so a run cannot change it) and the logger. :func:`check_same_budget` composes every run's training config and
refuses a study whose runs differ in data, seed, steps, validation, optimizer, schedule or loss.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf


class StudyError(Exception):
    """A study configuration or state problem, reported as one line."""


def repo_root() -> Path:
    """The checkout holding ``train.py`` and ``conf/`` (``MELRECON_ROOT`` or above this package)."""
    env = os.environ.get("MELRECON_ROOT")
    root = Path(env) if env else Path(__file__).resolve().parents[3]
    if not (root / "train.py").is_file() or not (root / "conf" / "study").is_dir():
        raise StudyError(f"no train.py and conf/study/ in {root}: run from a melrecon checkout or set MELRECON_ROOT")
    return root


def study_names() -> list[str]:
    return sorted(p.stem for p in (repo_root() / "conf" / "study").glob("*.yaml"))


def compose_study(name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """Compose ``conf/study/NAME.yaml`` with ``overrides`` (e.g. ``preset=tiny``) and check it."""
    from hydra import compose, initialize_config_dir

    names = study_names()
    if name not in names:
        raise StudyError(f"unknown study {name!r}; the studies are {names} (conf/study/*.yaml)")
    os.environ.setdefault("MELRECON_ROOT", str(repo_root()))
    with initialize_config_dir(config_dir=str(repo_root() / "conf" / "study"), version_base="1.3"):
        cfg = compose(config_name=name, overrides=list(overrides))
    check_study(cfg)
    preset = (cfg.get("preset") or {}).get("name")
    if cfg.kind == "training" and not (repo_root() / "conf" / "study" / name / f"{preset}.yaml").is_file():
        raise StudyError(f"study {name} has no preset {preset!r} (no conf/study/{name}/{preset}.yaml); its presets are "
                         f"{sorted(p.stem for p in (repo_root() / 'conf' / 'study' / name).glob('*.yaml'))}")
    return cfg


def _entries(node: Any) -> dict[str, Any]:
    """A mapping of entries without the null (dropped) ones."""
    return {k: v for k, v in (node or {}).items() if v is not None}


def check_study(cfg: DictConfig) -> None:
    """Errors that name the field at fault."""
    for key in ("name", "kind", "out_dir"):
        if cfg.get(key) in (None, ""):
            raise StudyError(f"study config: field {key!r} is missing")
    if cfg.kind not in ("training", "memory"):
        raise StudyError(f"study {cfg.name}: kind must be 'training' or 'memory', got {cfg.kind!r}")
    if cfg.kind == "memory":
        return
    runs, baselines = _entries(cfg.get("runs")), _entries(cfg.get("baselines"))
    if not runs:
        raise StudyError(f"study {cfg.name}: no training runs (field 'runs')")
    clash = set(runs) & set(baselines)
    if clash:
        raise StudyError(f"study {cfg.name}: names used by both a run and a baseline: {sorted(clash)}")
    methods = set(runs) | set(baselines)
    if cfg.get("reference") not in methods:
        raise StudyError(f"study {cfg.name}: reference {cfg.get('reference')!r} is not a run or baseline {sorted(methods)}")
    named = set(cfg.get("runs") or {}) | set(cfg.get("baselines") or {})  # including dropped (null) ones
    for i, pair in enumerate(cfg.get("comparisons") or []):
        if len(pair) != 2 or any(m not in named for m in pair):
            raise StudyError(f"study {cfg.name}: comparisons[{i}] = {list(pair)} must name two of {sorted(methods)}")
    b = cfg.budget
    for key in ("seed", "max_steps", "val_every", "lr"):
        if b.get(key) is None:
            raise StudyError(f"study {cfg.name}: budget.{key} is missing")
    if int(b.max_steps) < 1 or int(b.val_every) < 1 or int(b.max_steps) % int(b.val_every):
        raise StudyError(f"study {cfg.name}: budget.max_steps ({b.max_steps}) must be a positive multiple of "
                         f"budget.val_every ({b.val_every}), so that the last step is validated")
    if b.get("schedule", "constant") not in ("constant", "cosine"):
        raise StudyError(f"study {cfg.name}: budget.schedule must be constant or cosine, got {b.schedule!r}")
    if cfg.get("resume", "last") not in ("last", "restart"):
        raise StudyError(f"study {cfg.name}: resume must be 'last' or 'restart', got {cfg.resume!r}")
    for name, run in runs.items():
        if not run.get("experiment"):
            raise StudyError(f"study {cfg.name}: runs.{name}.experiment is missing")
    if cfg.get("select_on", "ssim") not in SELECTION_MODES:
        raise StudyError(f"study {cfg.name}: select_on must be one of {tuple(SELECTION_MODES)}, got {cfg.select_on!r}")
    for arm, pair in (cfg.get("arms") or {}).items():
        if pair is not None and (len(pair) != 2 or any(m not in runs for m in pair)):
            raise StudyError(f"study {cfg.name}: arms.{arm} = {list(pair)} must name two training runs of {sorted(runs)}")
    modes = list(cfg.get("probe_modes") or [])
    if any(m not in MEMORY_MODES for m in modes):
        raise StudyError(f"study {cfg.name}: probe_modes {modes} must be a subset of {MEMORY_MODES}")
    parallel = (cfg.get("launcher") or {}).get("parallel", 1)
    if not isinstance(parallel, int) or parallel < 1:
        raise StudyError(f"study {cfg.name}: launcher.parallel must be an integer >= 1, got {parallel!r}")


#: select_on -> the checkpoint callback's mode (higher or lower is better).
SELECTION_MODES = {"psnr": "max", "ssim": "max", "nmse": "min"}
#: the networks' memory modes (``model.memory``).
MEMORY_MODES = ("standard", "checkpoint", "mel")


def arms(cfg: DictConfig) -> dict[str, tuple[str, str]]:
    """The study's arms ``{name: (run a, run b)}`` whose runs are both in the study."""
    active = set(_entries(cfg.get("runs")))
    return {str(k): (str(v[0]), str(v[1])) for k, v in (cfg.get("arms") or {}).items()
            if v is not None and v[0] in active and v[1] in active}


def comparisons(cfg: DictConfig) -> list[tuple[str, str]]:
    """The study's comparisons between methods it runs (those naming a dropped method are left out)."""
    active = set(_entries(cfg.get("runs"))) | set(_entries(cfg.get("baselines")))
    return [(str(a), str(b)) for a, b in cfg.get("comparisons") or [] if a in active and b in active]


_PLAIN = re.compile(r"^[\w.\-+/:${}]*$")


def format_value(value: Any) -> str:
    """A Python/OmegaConf value in Hydra's override syntax (lists, null, booleans, quoted strings)."""
    if isinstance(value, (ListConfig, DictConfig)):
        value = OmegaConf.to_container(value, resolve=True)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{format_value(v)}" for k, v in value.items()) + "}"
    text = str(value)
    return text if _PLAIN.match(text) and text else "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def format_overrides(mapping: Mapping[str, Any] | None) -> list[str]:
    return [f"{k}={format_value(v)}" for k, v in (mapping or {}).items()]


def budget_overrides(budget: DictConfig, select_on: str = "ssim") -> list[str]:
    """The overrides that give every run one budget: seed, optimizer steps counted by
    ``max_steps`` (epochs unbounded), validation every ``val_every`` steps, the checkpoint
    chosen on ``val/<select_on>``, learning rate and schedule (cosine: annealed per step over
    ``max_steps``)."""
    steps, every = int(budget.max_steps), int(budget.val_every)
    out = [f"seed={int(budget.seed)}", f"++trainer.max_steps={steps}", "trainer.max_epochs=-1",
           "trainer.min_epochs=null", "trainer.check_val_every_n_epoch=null",
           f"++trainer.val_check_interval={every}", f"module.optimizer.lr={format_value(float(budget.lr))}",
           f"callbacks.model_checkpoint.monitor=val/{select_on}",
           f"callbacks.model_checkpoint.mode={SELECTION_MODES[select_on]}"]
    if budget.get("schedule", "constant") == "cosine":
        out += ["module=cosine", f"module.scheduler.T_max={steps}", "module.scheduler_interval=step"]
    else:
        out += ["module.scheduler=null"]
    return out


@dataclass
class RunSpec:
    """One training run of a study: its folder name, label and ``train.py`` overrides."""

    name: str
    label: str
    overrides: list[str]
    settings: dict[str, Any] = field(default_factory=dict)


def run_specs(cfg: DictConfig, extra: Sequence[str] = ()) -> list[RunSpec]:
    """The study's runs in config order; ``extra`` overrides go to every run (before the budget)."""
    logger = "logger=wandb_csv" if cfg.get("wandb", {}).get("enabled") else "logger=csv"
    preset = cfg.get("preset") or {}
    synthetic = preset.get("synthetic")
    data = [f"++data.synthetic={format_value(synthetic)}"] if synthetic else []
    specs = []
    for name, run in _entries(cfg.runs).items():
        overrides = [f"+experiment={run.experiment}", *format_overrides(cfg.get("train")),
                     *format_overrides(preset.get("train")), *data, *format_overrides(run.get("overrides")), *extra,
                     *budget_overrides(cfg.budget, str(cfg.get("select_on", "ssim"))), logger]
        specs.append(RunSpec(name=str(name), label=str(run.get("label") or name), overrides=overrides))
    return specs


def compose_train(overrides: Sequence[str]) -> DictConfig:
    """``conf/train.yaml`` composed with ``overrides``, as ``train.py`` would (without running)."""
    from hydra import compose, initialize_config_dir

    os.environ.setdefault("MELRECON_ROOT", str(repo_root()))
    with initialize_config_dir(config_dir=str(repo_root() / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


#: Training-config keys that must be equal across the runs of a study (the budget).
BUDGET_KEYS = ("data", "seed", "trainer.max_steps", "trainer.max_epochs", "trainer.val_check_interval",
               "trainer.check_val_every_n_epoch", "trainer.accumulate_grad_batches", "trainer.precision",
               "trainer.gradient_clip_val", "trainer.limit_train_batches", "module.optimizer", "module.scheduler",
               "module.scheduler_interval", "module.loss", "callbacks.model_checkpoint.monitor",
               "callbacks.model_checkpoint.mode")


def check_same_budget(train_cfgs: Mapping[str, DictConfig]) -> None:
    """StudyError naming the runs and keys whose values differ (data, seed, steps, optimizer...)."""
    def value(cfg: DictConfig, key: str) -> Any:
        v = OmegaConf.select(cfg, key, default=None)
        return OmegaConf.to_container(v, resolve=True) if isinstance(v, (DictConfig, ListConfig)) else v

    names = list(train_cfgs)
    ref = names[0]
    for key in BUDGET_KEYS:
        base = value(train_cfgs[ref], key)
        for other in names[1:]:
            got = value(train_cfgs[other], key)
            if got != base:
                raise StudyError(f"runs {ref!r} and {other!r} differ in {key} ({base!r} vs {got!r}): every run of a "
                                 "study must use the same data and budget")


def run_settings(train_cfg: DictConfig) -> dict[str, Any]:
    """What the summary says about a run: family, unrolls, memory mode, CNN size, slab size."""
    m = train_cfg.model
    family = "reversible" if "Reversible" in str(m._target_) else "MoDL"
    reg = m.get("regularizer") or {}
    slab = train_cfg.data.get("slab_size")
    return {"family": family, "num_unrolls": int(m.num_unrolls), "memory": str(m.memory),
            "width": reg.get("width"), "depth": reg.get("depth"), "conv_dim": reg.get("conv_dim"),
            "share_weights": bool(m.get("share_weights", True)), "slab_size": None if slab is None else int(slab),
            "kind": str(train_cfg.data.kind)}


def run_label(template: str, settings: Mapping[str, Any], run: str = "?") -> str:
    """A run's label: ``template`` with ``{field}``s filled from its :func:`run_settings`, so the
    label says what ran (a preset that changes a depth changes the label too)."""
    try:
        return template.format(**settings)
    except (KeyError, IndexError, ValueError) as err:
        raise StudyError(f"runs.{run}.label {template!r}: cannot fill {err} (fields: {sorted(settings)})") from None


def count_parameters(train_cfg: DictConfig) -> int:
    """Parameters of the run's network (shared weights counted once)."""
    import hydra

    net = hydra.utils.instantiate(train_cfg.model)
    return int(sum(p.numel() for p in net.parameters()))
