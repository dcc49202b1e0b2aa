"""The training application behind ``train.py``: build everything from a Hydra config and run it.

``run(cfg)`` instantiates (by ``_target_``) the DataModule (``cfg.data``), the network
(``cfg.model``), the LightningModule (``cfg.module``, given ``net=``), callbacks, loggers and
the Trainer; fits, then optionally validates/tests; returns the metrics. ``main(cfg)`` wraps it
for the command line: it returns the optimised metric for sweepers, always closes the W&B run
(also on error and between multirun jobs), and turns configuration mistakes into one line.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from melrecon.lit.console import stdout_is_terminal

log = logging.getLogger("melrecon")


def _mkdir(path: str) -> str:
    """OmegaConf resolver ``${mkdir:PATH}``: create the folder, return the path (sqlite storage)."""
    Path(path).mkdir(parents=True, exist_ok=True)
    return path


if not OmegaConf.has_resolver("mkdir"):
    OmegaConf.register_new_resolver("mkdir", _mkdir)


class UserError(Exception):
    """A configuration or input mistake, reported as one line without a traceback."""


def instantiate_callbacks(cfg: DictConfig | None) -> list[pl.Callback]:
    """Instantiate every entry of ``cfg.callbacks`` that has a ``_target_`` (null entries skipped)."""
    out: list[pl.Callback] = []
    for name, c in (cfg or {}).items():
        if isinstance(c, DictConfig) and "_target_" in c:
            out.append(hydra.utils.instantiate(c))
        elif c is not None:
            raise UserError(f"callbacks.{name}: expected a config with _target_, got {c!r}")
    return out


def instantiate_loggers(cfg: DictConfig | None, wandb_id: str | None = None) -> list[Any]:
    """Instantiate the loggers; a W&B logger gets ``id=wandb_id`` when resuming a checkpoint."""
    out = []
    for name, c in (cfg or {}).items():
        if not (isinstance(c, DictConfig) and "_target_" in c):
            if c is not None:
                raise UserError(f"logger.{name}: expected a config with _target_, got {c!r}")
            continue
        kwargs = {}
        if wandb_id and c._target_.endswith("WandbLogger") and not c.get("id"):
            kwargs["id"] = wandb_id
        out.append(hydra.utils.instantiate(c, **kwargs))
    return out


def wandb_id_from_checkpoint(ckpt_path: str | None) -> str | None:
    """The W&B run id stored by ReconModule.on_save_checkpoint, or None."""
    if not ckpt_path:
        return None
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    return ckpt.get("melrecon", {}).get("wandb_id")


def finish_wandb() -> None:
    """Close the active W&B run, if any (later multirun jobs would otherwise reuse it)."""
    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish()


def run(cfg: DictConfig) -> dict[str, float]:
    """Train (and optionally validate/test) as configured; return the final metrics as floats."""
    if cfg.get("seed") is not None:
        pl.seed_everything(int(cfg.seed), workers=True)
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path and not Path(ckpt_path).is_file():
        raise UserError(f"ckpt_path: no checkpoint file at '{ckpt_path}'")

    log.info("data: %s", cfg.data._target_)
    datamodule = hydra.utils.instantiate(cfg.data)
    log.info("model: %s", cfg.model._target_)
    net = hydra.utils.instantiate(cfg.model)
    module = hydra.utils.instantiate(cfg.module, net=net)
    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    loggers = instantiate_loggers(cfg.get("logger"), wandb_id_from_checkpoint(ckpt_path))
    trainer_kwargs: dict[str, Any] = {}
    if cfg.trainer.get("enable_progress_bar", True) and not stdout_is_terminal():
        # a bar redrawn with carriage returns is noise in a SLURM log: periodic lines instead
        # (ConsoleSummary, every callbacks.console.every_n_steps steps)
        trainer_kwargs["enable_progress_bar"] = False
        log.info("stdout is not a terminal: progress bar off, progress as periodic log lines")
    trainer: pl.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                                                  **trainer_kwargs)

    if loggers:
        resolved = OmegaConf.to_container(cfg, resolve=True)
        n_params = sum(p.numel() for p in net.parameters())
        for lg in loggers:
            lg.log_hyperparams({**resolved, "n_params": n_params})

    if cfg.get("train", True):
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if cfg.get("validate", False):
        best = _best_ckpt(trainer) if cfg.get("train", True) else ckpt_path
        trainer.validate(module, datamodule=datamodule, ckpt_path=best)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
    if cfg.get("test", False):
        best = _best_ckpt(trainer) if cfg.get("train", True) else ckpt_path
        trainer.test(module, datamodule=datamodule, ckpt_path=best)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
    if trainer.is_global_zero:
        shown = {k: round(v, 4) for k, v in sorted(metrics.items()) if k.startswith(("val/", "test/"))}
        log.info("final metrics: %s", shown)
        log.info("output folder: %s", cfg.paths.output_dir)
    return metrics


def _best_ckpt(trainer: pl.Trainer) -> str | None:
    cb = trainer.checkpoint_callback
    path = getattr(cb, "best_model_path", "") if cb is not None else ""
    return path or None


def metric_value(metrics: dict[str, float], name: str | None) -> float | None:
    """The value a sweeper optimises; a missing name is an error naming the available keys."""
    if not name:
        return None
    if name not in metrics:
        raise UserError(f"optimized_metric: '{name}' was not logged; logged keys: {sorted(metrics)}")
    v = metrics[name]
    return v if math.isfinite(v) else float("nan")


def user_error_message(exc: BaseException) -> str | None:
    """One-line message for configuration/input mistakes; None for genuine bugs (re-raised)."""
    from hydra.errors import HydraException, InstantiationException

    chain, e = [], exc
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or (e.__context__ if isinstance(e, InstantiationException) else None)
    root = chain[-1]
    user_types = (UserError, ValueError, FileNotFoundError, NotADirectoryError, OmegaConfBaseException,
                  HydraException)
    if not isinstance(root, user_types) and not (isinstance(exc, InstantiationException)
                                                 and isinstance(root, TypeError)):
        return None
    msg = " ".join(str(root).split())
    where = ""
    for e in chain:
        if isinstance(e, InstantiationException):
            key = [ln for ln in str(e).splitlines() if "full_key:" in ln]
            if key:
                where = f" [config: {key[0].split('full_key:')[1].strip()}]"
                break
    kind = "" if isinstance(root, (UserError, ValueError)) else f"{type(root).__name__}: "
    return f"{kind}{msg}{where}"


def main(cfg: DictConfig) -> float | None:
    """Command-line entry (called by train.py's @hydra.main)."""
    try:
        metrics = run(cfg)
        return metric_value(metrics, cfg.get("optimized_metric"))
    except Exception as exc:  # noqa: BLE001 - filtered right below
        msg = user_error_message(exc)
        if msg is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"melrecon: error: {msg}", file=sys.stderr)
        print("(set HYDRA_FULL_ERROR=1 for the full traceback)", file=sys.stderr)
        sys.exit(2)
    finally:
        finish_wandb()


__all__ = ["run", "main", "metric_value", "UserError", "instantiate_callbacks", "instantiate_loggers",
           "finish_wandb", "user_error_message"]
