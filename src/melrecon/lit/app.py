"""The training application behind ``train.py``: build everything from a Hydra config and run it.

``run(cfg)`` instantiates (by ``_target_``) the DataModule (``cfg.data``), the network
(``cfg.model``), the LightningModule (``cfg.module``, given ``net=``), callbacks, loggers and
the Trainer; fits, then optionally validates/tests; returns the metrics. ``main(cfg)`` wraps it
for the command line: it returns the optimised metric for sweepers, always closes the W&B run
(also on error and between multirun jobs), and turns configuration mistakes, failed writes (a
full disk) and a diverged step into one line. One process writes a run folder at a time.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from melrecon.atomic import WriteError
from melrecon.data.locks import LockBusy, file_lock, holder
from melrecon.config_schema import check_config
from melrecon.lit.console import stdout_is_terminal
from melrecon.lit.module import check_precision_name
from melrecon.lit.plan_check import PlanCheck
from melrecon.lit.runinfo import check_same_run, checkpoint_run_dir, config_record, read_checkpoint, unique_dir
from melrecon.lit.wandb_history import rebuild_on_resume
from melrecon.plan.config import resolve_auto

log = logging.getLogger("melrecon")
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)


def _mkdir(path: str) -> str:
    """OmegaConf resolver ``${mkdir:PATH}``: create the folder, return the path (sqlite storage)."""
    Path(path).mkdir(parents=True, exist_ok=True)
    return path


if not OmegaConf.has_resolver("mkdir"):
    OmegaConf.register_new_resolver("mkdir", _mkdir)


def _unique_dir(path: str) -> str:
    """OmegaConf resolver ``${unique_dir:PATH}`` (conf/hydra/default.yaml): a fresh run folder.

    Hydra resolves the run folder before the task starts and prints a long traceback for any
    error there, so a folder that cannot be created ends the program here with one line.
    """
    try:
        return unique_dir(path)
    except ValueError as err:
        print(f"melrecon: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if not OmegaConf.has_resolver("unique_dir"):
    # cached: Hydra resolves hydra.run.dir several times and copies the cache to sweep jobs
    OmegaConf.register_new_resolver("unique_dir", _unique_dir, use_cache=True)


#: trainer settings of model.memory=auto (melrecon.plan), not Trainer arguments
PLAN_KEYS = ("memory_budget_gb", "plan_calibrate")


class UserError(Exception):
    """A configuration or input mistake, reported as one line without a traceback."""


def instantiate_trainer(trainer_cfg: DictConfig, **kwargs: Any) -> pl.Trainer:
    """``cfg.trainer`` as a Trainer, without the :data:`PLAN_KEYS` (taken out for the call only)."""
    with open_dict(trainer_cfg):
        plan_settings = {k: trainer_cfg.pop(k) for k in PLAN_KEYS if k in trainer_cfg}
    try:
        return hydra.utils.instantiate(trainer_cfg, **kwargs)
    finally:
        with open_dict(trainer_cfg):
            trainer_cfg.update(plan_settings)


def instantiate_callbacks(cfg: DictConfig | None) -> list[pl.Callback]:
    """Instantiate every entry of ``cfg.callbacks`` that has a ``_target_`` (null entries skipped)."""
    out: list[pl.Callback] = []
    for name, c in (cfg or {}).items():
        if isinstance(c, DictConfig) and "_target_" in c:
            out.append(hydra.utils.instantiate(c))
        elif c is not None:
            raise UserError(f"callbacks.{name}: expected a config with _target_, got {c!r}")
    return out


def instantiate_loggers(cfg: DictConfig | None, wandb_id: str | None = None,
                        resume_step: int | None = None) -> list[Any]:
    """Instantiate the loggers. Resuming a checkpoint: a W&B logger gets ``id=wandb_id`` (W&B
    resumes that run), a ResumableCSVLogger ``resume_step`` (the checkpoint's global step)."""
    out = []
    for name, c in (cfg or {}).items():
        if not (isinstance(c, DictConfig) and "_target_" in c):
            if c is not None:
                raise UserError(f"logger.{name}: expected a config with _target_, got {c!r}")
            continue
        kwargs = {}
        if wandb_id and c._target_.endswith("WandbLogger") and not c.get("id"):
            kwargs["id"] = wandb_id
        if resume_step is not None and c._target_.endswith("ResumableCSVLogger"):
            kwargs["resume_step"] = resume_step
        out.append(hydra.utils.instantiate(c, **kwargs))
    return out


def check_limits(trainer_cfg: DictConfig) -> None:
    """Refuse epoch/step limits Lightning would misread: -1 means no limit, other negatives are errors."""
    for key in ("max_epochs", "min_epochs", "max_steps", "min_steps"):
        v = trainer_cfg.get(key)
        if v is not None and (not isinstance(v, int) or v < -1):
            raise UserError(f"trainer.{key} must be -1 (no limit) or an integer >= 0, got {v!r}")


def check_data_folder(cfg: DictConfig) -> None:
    """A file where the data folder should be is one line (not a traceback from generation)."""
    for name, path in (("paths.data_dir (MELRECON_DATA_DIR)", cfg.paths.get("data_dir")),
                       ("data.root", cfg.data.get("root"))):
        if path and Path(path).exists() and not Path(path).is_dir():
            raise UserError(f"{name}: '{path}' is a file, not a folder")


def check_run_folder(cfg: DictConfig) -> None:
    """The run folder exists and is writable, or one line says why not."""
    out = Path(cfg.paths.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"run folder: cannot create '{out}': {err.strerror or err}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise UserError(f"run folder: '{out}' is not writable")


def continue_run_folder(cfg: DictConfig, ckpt_path: str) -> None:
    """Make a resumed run write into the run folder its checkpoint belongs to.

    ``<run>/checkpoints/x.ckpt`` -> ``paths.output_dir = <run>``: checkpoints, CSV and W&B
    files continue there, so one folder holds the run's whole history. This invocation's own
    folder (Hydra's, with its ``.hydra`` record and log) gets ``continues_run.txt`` naming the
    run folder, and the run folder's ``resumes.txt`` gains a line naming this invocation.
    A checkpoint outside a run's ``checkpoints/`` folder is resumed into the new folder.
    """
    import time

    run_dir = checkpoint_run_dir(ckpt_path)
    here = Path(cfg.paths.output_dir).resolve()
    if run_dir is None or run_dir == here:
        return
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    # DDP: every process follows rank 0's folder; rank 0 alone writes the records
    if int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0:
        try:
            here.mkdir(parents=True, exist_ok=True)
            (here / "continues_run.txt").write_text(f"{run_dir}\n")
            with open(run_dir / "resumes.txt", "a") as f:
                f.write(f"{stamp} resumed from {Path(ckpt_path).resolve()} by {here}\n")
        except OSError as err:
            raise UserError(f"ckpt_path: cannot continue the run in {run_dir}: {err.strerror or err}") from None
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
    log.info("resuming: the run continues in its folder %s", run_dir)


def resume_checkpoint(cfg: DictConfig) -> dict[str, Any] | None:
    """The checkpoint of ``ckpt_path`` (None without one), checked against the config.

    A resumed run is the same run continued: its model, data (but the folder and loader
    settings, see :mod:`melrecon.lit.runinfo`), module (optimizer, scheduler, loss) and seed must
    be the checkpoint's. A changed optimizer setting would be recorded in the new config but
    overwritten by the optimizer state Lightning restores, so it is refused like the rest;
    trainer settings (max_epochs, ...) may change. Checkpoints made before the config was stored
    in them are checked by the strict weight loading only.
    """
    ckpt_path = cfg.get("ckpt_path")
    if not ckpt_path:
        return None
    try:
        ckpt = read_checkpoint(ckpt_path)
        record = ckpt.get("melrecon", {}).get("config")
        if record is not None:
            check_same_run(record, cfg, f"ckpt_path '{ckpt_path}'", ("model", "data", "module", "seed"))
    except ValueError as err:
        raise UserError(str(err)) from None
    return ckpt


RUN_LOCK = ".melrecon-run.lock"
"""Lock file in a run folder, held by the one process writing it (:func:`lock_run_folder`)."""


def _rank() -> int:
    """This process's global rank under DDP (0 without it)."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))


def lock_run_folder(folder: Path, held: contextlib.ExitStack) -> None:
    """Make this process the one writer of run folder ``folder`` until ``held`` closes.

    Two processes writing one run folder (two resumes of one checkpoint) would each log the
    same steps into its history, write ``-v1`` checkpoints and move the other's live W&B folder
    aside; the second is refused in one line instead, before it writes anything. The lock is an
    OS lock (:func:`melrecon.data.locks.file_lock`): a killed process (``kill -9``) holds it no
    more. DDP ranks other than 0 write through rank 0 and take no lock.
    """
    if _rank() != 0:
        return
    lock = folder / RUN_LOCK
    try:
        held.enter_context(file_lock(lock, blocking=False))
    except LockBusy:
        raise UserError(f"run folder {folder} is being written by {holder(lock)} (another training or resume "
                        "of this run); one process writes a run folder at a time: wait for it to end") from None


def finish_wandb() -> None:
    """Close the active W&B run, if any (later multirun jobs would otherwise reuse it)."""
    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish()


def run(cfg: DictConfig, held: contextlib.ExitStack | None = None) -> dict[str, float]:
    """Train (and optionally validate/test) as configured; return the final metrics as floats.

    The run folder is locked (:func:`lock_run_folder`) until ``held`` closes (main: after W&B has
    finished), or until this call returns when ``held`` is None.
    """
    if held is None:
        with contextlib.ExitStack() as own:
            return run(cfg, own)
    check_config(cfg)  # types, ranges and choices, before anything is built
    if cfg.get("seed") is not None:
        pl.seed_everything(int(cfg.seed), workers=True)
    ckpt_path = cfg.get("ckpt_path")
    check_limits(cfg.trainer)
    check_precision_name(cfg.trainer.get("precision"))
    check_data_folder(cfg)
    ckpt = resume_checkpoint(cfg)
    run_dir = checkpoint_run_dir(ckpt_path) if ckpt is not None else None
    if run_dir is not None:
        lock_run_folder(run_dir, held)  # before this invocation writes anything into it
        continue_run_folder(cfg, ckpt_path)
    check_run_folder(cfg)
    if run_dir is None:
        lock_run_folder(Path(cfg.paths.output_dir), held)

    log.info("data: %s", cfg.data._target_)
    datamodule = hydra.utils.instantiate(cfg.data)
    plan = resolve_auto(cfg, datamodule)  # model.memory=auto: the plan's settings go into cfg.model
    log.info("model: %s", cfg.model._target_)
    net = hydra.utils.instantiate(cfg.model)
    module = hydra.utils.instantiate(cfg.module, net=net)
    module.run_record = config_record(cfg)  # stored in every checkpoint
    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    if plan is not None:
        callbacks.append(PlanCheck(plan))
    loggers = instantiate_loggers(cfg.get("logger"), (ckpt or {}).get("melrecon", {}).get("wandb_id"),
                                  None if ckpt is None else int(ckpt.get("global_step", 0)))
    trainer_kwargs: dict[str, Any] = {}
    if cfg.trainer.get("enable_progress_bar", True) and not stdout_is_terminal():
        # a bar redrawn with carriage returns is noise in a SLURM log: periodic lines instead
        # (ConsoleSummary, every callbacks.console.every_n_steps steps)
        trainer_kwargs["enable_progress_bar"] = False
        log.info("stdout is not a terminal: progress bar off, progress as periodic log lines")
    trainer = instantiate_trainer(cfg.trainer, callbacks=callbacks, logger=loggers or False, **trainer_kwargs)

    if loggers:
        resolved = OmegaConf.to_container(cfg, resolve=True)
        n_params = sum(p.numel() for p in net.parameters())
        for lg in loggers:
            lg.log_hyperparams({**resolved, "n_params": n_params})
        if ckpt is not None:  # the new offline W&B run gets the history before the checkpoint
            rebuild_on_resume(loggers, callbacks, int(ckpt.get("global_step", 0)))

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
    # a failed output write (names the file) or a diverged step (names step and files) says it all
    told = next((e for e in chain if isinstance(e, (WriteError, FloatingPointError))), None)
    if told is not None:
        return " ".join(str(told).split())
    root = chain[-1]
    if isinstance(root, OSError) and root.errno in DISK_FULL:  # a write outside melrecon's own files
        return f"{root.strerror}" + (f": {root.filename}" if root.filename else "")
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


def log_to_files(message: str) -> None:
    """Write ``message`` to the run's log files only (the ``<task_name>.log`` of Hydra's job
    logging): the console already has it on stderr, the run folder must say why the run ended."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers + log.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def sweeper_needs_metric() -> bool:
    """True inside a Hydra multirun driven by a sweeper that optimises (Optuna, ...); False for a
    plain run and for the basic sweeper (``-m a=1,2``), which ignores the returned value."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return False
    hc = HydraConfig.get()
    return hc.mode == RunMode.MULTIRUN and not str(hc.sweeper.get("_target_", "")).endswith("BasicSweeper")


def main(cfg: DictConfig) -> float | None:
    """Command-line entry (called by train.py's @hydra.main)."""
    with contextlib.ExitStack() as held:  # the run folder's lock, released after W&B has finished
        try:
            metrics = run(cfg, held)
            name = cfg.get("optimized_metric")
            if name and name not in metrics and not sweeper_needs_metric():
                # e.g. max_epochs=0 or max_steps ending before the first validation: the run is fine
                log.warning("optimized_metric '%s' was not logged (no validation ran); only a sweep needs it", name)
                return None
            return metric_value(metrics, name)
        except Exception as exc:  # noqa: BLE001 - filtered right below
            msg = user_error_message(exc)
            if msg is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            print(f"melrecon: error: {msg}", file=sys.stderr)
            print("(set HYDRA_FULL_ERROR=1 for the full traceback)", file=sys.stderr)
            log_to_files(f"error: {msg}")
            sys.exit(2)
        finally:
            finish_wandb()


__all__ = ["run", "main", "metric_value", "UserError", "instantiate_callbacks", "instantiate_loggers",
           "finish_wandb", "user_error_message", "check_limits", "check_data_folder", "check_run_folder",
           "resume_checkpoint", "continue_run_folder", "lock_run_folder", "RUN_LOCK",
           "sweeper_needs_metric", "log_to_files"]
