"""Check a composed training config (types, ranges, choices) before anything is built.

``python train.py model.memory=fast`` used to fail only once the data and the network were
built (a minute and more on a loaded CPU). :func:`config_errors` reads the options a user sets
most and reports every wrong one at once, by its full key; ``train.py`` calls
:func:`check_overrides` on its command line before Hydra makes a run folder, and
:func:`melrecon.lit.app.run` calls :func:`check_config` first (multiruns, sweeps, tests).

The module imports neither torch nor the data or model code (it runs before them); the
choices below are the code's own (tests/test_config_schema.py compares them).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

MEMORY_MODES = ("standard", "checkpoint", "mel", "auto")  # melrecon.mel.chain.MEMORY_MODES, and auto (melrecon.plan)
DATA_KINDS = ("volume3d", "cine")  # melrecon.data.datamodule
MASK_TYPES = {"volume3d": ("poisson", "lines"), "cine": ("vd_kt", "interleaved_kt")}  # melrecon.data.subsample
STATE_PRECISIONS = ("fixed", "double", "input")  # melrecon.models.reversible.STATE_PRECISIONS
#: Lightning's precision names (lightning.fabric.connector._PRECISION_INPUT)
PRECISIONS = ("64", "32", "16", "bf16", "64-true", "32-true", "16-true", "bf16-true", "16-mixed", "bf16-mixed",
              "transformer-engine", "transformer-engine-float16")


class ConfigError(ValueError):
    """Wrong values in a composed config; the message is one line naming every key at fault."""


@dataclass(frozen=True)
class Rule:
    """``check(value)`` is True for an allowed value; ``expect`` says what is allowed."""

    check: Callable[[Any], bool]
    expect: str
    nullable: bool = False


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def integer(low: int, nullable: bool = False) -> Rule:
    return Rule(lambda v: _is_int(v) and v >= low, f"an integer >= {low}", nullable)


def number(low: float, high: float | None = None, low_open: bool = False, high_open: bool = False,
           nullable: bool = False) -> Rule:
    def ok(v: Any) -> bool:
        if not _is_number(v):
            return False
        above = v > low if low_open else v >= low
        below = high is None or (v < high if high_open else v <= high)
        return above and below

    lo = f"> {low:g}" if low_open else f">= {low:g}"
    hi = "" if high is None else (f" and < {high:g}" if high_open else f" and <= {high:g}")
    return Rule(ok, f"a number {lo}{hi}", nullable)


def choice(options: Sequence[Any], nullable: bool = False) -> Rule:
    return Rule(lambda v: v in options, "one of " + ", ".join(map(str, options)), nullable)


BOOLEAN = Rule(lambda v: isinstance(v, bool), "true or false")
ANCHORS = Rule(lambda v: v == "auto" or (_is_int(v) and v >= 1), "auto, an integer >= 1 or null", True)
ACCELERATIONS = Rule(lambda v: isinstance(v, (list, tuple, ListConfig)) and len(v) > 0
                     and all(_is_number(a) and a > 1 for a in v), "a non-empty list of numbers > 1")
LIMIT = Rule(lambda v: _is_int(v) and v >= -1, "-1 (no limit) or an integer >= 0", True)
BATCHES = Rule(lambda v: (_is_int(v) and v >= 0) or (isinstance(v, float) and 0.0 <= v <= 1.0),
               "an integer >= 0 (batches) or a fraction in [0, 1]", True)

#: full key -> rule; a key the config does not have is skipped (families and datasets differ)
RULES: dict[str, Rule] = {
    "seed": integer(0, nullable=True),
    "model.num_unrolls": integer(1),
    "model.memory": choice(MEMORY_MODES),
    "model.share_weights": BOOLEAN,
    "model.anchor_every": ANCHORS,
    "model.drift_tol": number(0, low_open=True),
    "model.auto_start": integer(1),
    "model.dc_chunk": integer(1, nullable=True),
    "model.state_precision": choice(STATE_PRECISIONS),
    "model.gamma_decay": number(0, low_open=True),
    "model.regularizer.width": integer(1),
    "model.regularizer.depth": integer(1),
    "model.regularizer.kernel_size": integer(1),
    "model.regularizer.conv_dim": choice((2, 3)),
    "model.regularizer.lipschitz": number(0, low_open=True, nullable=True),
    "model.dc.lam_init": number(0, low_open=True),
    "model.dc.cg_max_iter": integer(1),
    "data.kind": choice(DATA_KINDS),
    "data.batch_size": integer(1),
    "data.val_batch_size": integer(1),
    "data.num_workers": integer(0),
    "data.slab_size": integer(1, nullable=True),
    "data.accelerations": ACCELERATIONS,
    "data.eval_acceleration": number(1, low_open=True, nullable=True),
    "data.calib": integer(0),
    "data.mask_pool": integer(1, nullable=True),
    "module.optimizer.lr": number(0, low_open=True),
    "module.loss.l1": number(0),
    "module.loss.mse": number(0),
    "module.loss.ssim": number(0),
    "trainer.max_epochs": LIMIT,
    "trainer.min_epochs": LIMIT,
    "trainer.max_steps": LIMIT,
    "trainer.min_steps": LIMIT,
    "trainer.precision": Rule(lambda v: str(v) in PRECISIONS, "one of " + ", ".join(PRECISIONS)),
    "trainer.limit_train_batches": BATCHES,
    "trainer.limit_val_batches": BATCHES,
}


def _value(cfg: DictConfig, key: str) -> tuple[bool, Any]:
    """(present, value) of ``key``; a value that cannot be resolved or is ``???`` counts as absent
    (the code that uses it reports it)."""
    try:
        node = OmegaConf.select(cfg, key, throw_on_missing=True, throw_on_resolution_failure=True,
                                default=_ABSENT)
    except Exception:  # noqa: BLE001 - missing or unresolvable: not this module's to judge
        return False, None
    if node is _ABSENT:
        return False, None
    return True, OmegaConf.to_object(node) if isinstance(node, (DictConfig, ListConfig)) else node


_ABSENT = object()


def config_errors(cfg: DictConfig) -> list[str]:
    """``"KEY must be EXPECT, got VALUE"`` for every key of :data:`RULES` whose value is wrong."""
    errors = []
    for key, rule in RULES.items():
        present, value = _value(cfg, key)
        if not present or (value is None and rule.nullable):
            continue
        if not rule.check(value):
            errors.append(f"{key} must be {rule.expect}{' or null' if rule.nullable and 'null' not in rule.expect else ''}"
                          f", got {value!r}")
    present, kind = _value(cfg, "data.kind")
    has_mask, mask = _value(cfg, "data.mask_type")
    if present and kind in MASK_TYPES and has_mask and mask is not None and mask not in MASK_TYPES[kind]:
        errors.append(f"data.mask_type must be one of {', '.join(MASK_TYPES[kind])} for {kind} data, got {mask!r}")
    return errors


def check_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` (one line) when :func:`config_errors` finds anything."""
    errors = config_errors(cfg)
    if errors:
        raise ConfigError("; ".join(errors))


def one_line(message: str) -> str:
    """Hydra's multi-line composition errors as one line (the option lists joined)."""
    lines = [ln.strip() for ln in str(message).splitlines() if ln.strip()]
    if not lines:
        return ""
    out, options = lines[0], []
    for ln in lines[1:]:
        if ln.startswith("Available options in"):
            continue
        if ln.startswith(("full_key:", "object_type=", "Set the environment variable HYDRA_FULL_ERROR",
                          "Config search path", "provider=")):
            continue
        if " " not in ln:  # one option name per line
            options.append(ln)
        else:
            out += f"{' ' if out.endswith('.') else '; '}{ln}"
    if options:
        out += f"; choose from: {', '.join(options)}"
    return out


def check_overrides(config_dir: Path, config_name: str, argv: Sequence[str]) -> None:
    """Compose ``config_name`` with the command line's overrides and check it, before Hydra makes
    a run folder: a composition error (unknown group option such as ``+experiment=NAME``, an
    unknown key, a parse error) or a wrong value prints one line and exits with status 2.

    ``paths.output_dir=DIR`` is refused (it would split the run: checkpoints in DIR, the log and
    ``.hydra/`` in Hydra's folder); ``hydra.run.dir=DIR`` moves the whole run.

    Only a plain single run is composed and checked here: with Hydra flags (``-m``, ``--help``, ``--cfg``, ...)
    Hydra parses the command line itself, and :func:`check_config` checks each job.
    """
    for arg in argv:
        if arg.lstrip("+~").split("=", 1)[0] == "paths.output_dir":
            _exit("paths.output_dir is the run folder Hydra makes and cannot be set alone (the log and .hydra/ "
                  "would stay behind); move the whole run with hydra.run.dir=DIR (multirun: hydra.sweep.dir=DIR)")
    if not argv or any(a.startswith("-") for a in argv):
        return
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=list(argv))
    except (HydraException, OmegaConfBaseException) as err:
        _exit(one_line(str(err)))
    errors = config_errors(cfg)
    if errors:
        _exit("; ".join(errors))


def _exit(message: str) -> None:
    print(f"melrecon: error: {message}", file=sys.stderr)
    raise SystemExit(2)


__all__ = ["ConfigError", "RULES", "config_errors", "check_config", "check_overrides", "one_line", "MEMORY_MODES"]
