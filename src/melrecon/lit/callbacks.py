"""Callbacks: peak memory and step time, learning rate, network statistics (MEL drift, lam),
images/videos."""

from __future__ import annotations

import logging
import re
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_only

from melrecon import cpu_threads
from melrecon.data.batch import ReconBatch
from melrecon.export import comparison_frames, comparison_strip, save_png, write_gif

GIB = float(2**30)
log = logging.getLogger("melrecon")


class PeakMemoryMonitor(pl.Callback):
    """Log the peak memory and the wall time of every training step.

    Keys (logged every training step, rank 0 values):
      - ``train/peak_mem_gib``: on CUDA, ``torch.cuda.max_memory_allocated`` during the step
        (the peak statistics are reset at the start of each step), in GiB; on CPU, the peak
        resident set size of the process so far (``ru_maxrss``; the OS cannot reset it), in GiB.
      - ``train/peak_mem_reserved_gib``: CUDA only, ``max_memory_reserved`` during the step.
      - ``train/step_time_s``: wall time from batch start to batch end (forward, backward and
        optimizer step; CUDA is synchronised at both ends so the time is real).

    The current training epoch's figures stay readable for other callbacks (ConsoleSummary):
    ``epoch_peak_gib`` (max of ``train/peak_mem_gib``; NaN before the first step) and
    ``epoch_step_times`` (each step's ``train/step_time_s``).
    """

    def __init__(self, log_step_time: bool = True) -> None:
        self.log_step_time = log_step_time
        self._t0 = 0.0
        self.epoch_peak_gib = float("nan")
        self.epoch_step_times: list[float] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.epoch_peak_gib, self.epoch_step_times = float("nan"), []

    @staticmethod
    def _cuda(pl_module: pl.LightningModule) -> bool:
        return pl_module.device.type == "cuda" and torch.cuda.is_available()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._cuda(pl_module):
            torch.cuda.synchronize(pl_module.device)
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if self._cuda(pl_module):
            torch.cuda.synchronize(pl_module.device)
            peak = torch.cuda.max_memory_allocated(pl_module.device) / GIB
            reserved = torch.cuda.max_memory_reserved(pl_module.device) / GIB
            pl_module.log("train/peak_mem_reserved_gib", reserved, on_step=True, on_epoch=False,
                          reduce_fx="max", sync_dist=False, batch_size=1)
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # Linux: KiB
        dt = time.perf_counter() - self._t0
        self.epoch_peak_gib = peak if not self.epoch_step_times else max(self.epoch_peak_gib, peak)
        self.epoch_step_times.append(dt)
        pl_module.log("train/peak_mem_gib", peak, on_step=True, on_epoch=False, batch_size=1)
        if self.log_step_time:
            pl_module.log("train/step_time_s", dt, on_step=True, on_epoch=False, batch_size=1)


class CpuThreadFollower(pl.Callback):
    """Keep the CPU thread count matched to the CPUs other processes leave free while training
    (:class:`melrecon.cpu_threads.LoadFollower`: re-measured every ``every_s`` seconds; only where
    melrecon chose the count, never over ``OMP_NUM_THREADS`` or ``torch.set_num_threads`` of the
    user's). Each change is one line in the log: "cpu threads 2 -> 1 (others keep 2.0 CPUs busy)".
    """

    def __init__(self, every_s: float = cpu_threads.FOLLOW_EVERY_S):
        self.every_s = every_s
        self.follower: cpu_threads.LoadFollower | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.follower = cpu_threads.LoadFollower(self.every_s)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.follower is None:
            return
        before = self.follower.threads
        changed = self.follower.poll()
        if changed is not None:
            log.info("cpu threads %d -> %d (others keep %.1f CPUs busy)", before, changed, self.follower.others)


class LearningRateMonitor(pl.callbacks.LearningRateMonitor):
    """Lightning's ``LearningRateMonitor``, logging under melrecon's key ``train/lr``.

    Lightning names the value ``lr-<Optimizer>`` (e.g. ``lr-Adam``); ``train/lr`` replaces that
    prefix (suffixes Lightning adds for several optimizers or parameter groups stay). A run
    without a logger (``logger=none``) has nowhere to log it: the callback then does nothing,
    where Lightning's would refuse to start.
    """

    def __init__(self, logging_interval: str | None = "step", key: str = "train/lr", **kwargs: Any) -> None:
        super().__init__(logging_interval=logging_interval, **kwargs)
        self.key = key
        self._active = True

    def _rename(self, names: list[list[str]], optimizers: list[Any | None]) -> list[list[str]]:
        """``lr-<Optimizer>...`` -> ``<key>...`` for the groups of ``optimizers`` (None: keep)."""
        out = []
        for group, opt in zip(names, optimizers):
            if opt is None:
                out.append(group)
                continue
            prefix = "lr-" + type(getattr(opt, "optimizer", opt)).__name__
            out.append([self.key + n[len(prefix):] if n.startswith(prefix) else n for n in group])
        return out

    # the two places Lightning makes names (used at train start and at every logging step)
    def _find_names_from_schedulers(self, lr_scheduler_configs):  # type: ignore[override]
        names, seen, types = super()._find_names_from_schedulers(lr_scheduler_configs)
        # a scheduler configured with its own ``name`` keeps it
        unnamed = [c.scheduler.optimizer if c.name is None else None for c in lr_scheduler_configs]
        return self._rename(names, unnamed), seen, types

    def _find_names_from_optimizers(self, optimizers, seen_optimizers, seen_optimizer_types):  # type: ignore[override]
        names, without_scheduler = super()._find_names_from_optimizers(optimizers, seen_optimizers,
                                                                       seen_optimizer_types)
        return self._rename(names, without_scheduler), without_scheduler

    def on_train_start(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        self._active = bool(trainer.loggers)
        if self._active:
            super().on_train_start(trainer, *args, **kwargs)

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        if self._active:
            super().on_train_batch_start(trainer, *args, **kwargs)

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        if self._active:
            super().on_train_epoch_start(trainer, *args, **kwargs)


class NetStatsLogger(pl.Callback):
    """Log ``net.log_stats()`` (learned lam, MEL drift, anchors, inversion iterations) each step.

    The network's keys are logged as they are (e.g. ``dc/lam``, ``mel/drift``); networks
    without ``log_stats`` are skipped.
    """

    def __init__(self, every_n_steps: int = 1) -> None:
        if every_n_steps < 1:
            raise ValueError(f"callbacks.net_stats.every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        net = getattr(pl_module, "net", None)
        stats_fn = getattr(net, "log_stats", None)
        if not callable(stats_fn) or batch_idx % self.every_n_steps:
            return
        stats = {str(k): float(v) for k, v in stats_fn().items()}
        if stats:
            pl_module.log_dict(stats, on_step=True, on_epoch=False, batch_size=1)


STRIP_NAME = re.compile(r"^step(\d+)_item(\d+)\.png$")
"""Name of a strip saved by :class:`ReconImageLogger` (:func:`strip_path`): step S, item i."""


def strip_path(save_dir: Path, step: int, item: int, suffix: str = ".png") -> Path:
    """``save_dir/step{S:07d}_item{i}{suffix}``: a saved strip (``.png``) or its cine GIF (``.gif``)."""
    return Path(save_dir) / f"step{step:07d}_item{item}{suffix}"


def log_wandb_strip(logger: Any, item: int, image: np.ndarray | str | Path, caption: str, step: int,
                    gif: Path | None = None) -> None:
    """Log one strip to a Lightning ``WandbLogger`` as ``val_images/item{i}`` (and a cine GIF as
    ``val_video/item{i}``) at ``trainer/global_step`` = ``step``: what ReconImageLogger logs, and
    what a resumed run replays from the saved files (melrecon.lit.wandb_history)."""
    import wandb

    logger.log_image(key=f"val_images/item{item}", images=[image if isinstance(image, np.ndarray) else str(image)],
                     caption=[caption], step=step)
    if gif is not None:  # wandb copies the file into the run's media folder when it is logged
        logger.experiment.log({f"val_video/item{item}": wandb.Video(str(gif), format="gif"),
                               "trainer/global_step": step})


class ReconImageLogger(pl.Callback):
    """Log labelled zero-filled | reconstruction | target | error strips for fixed validation items.

    The items are the first item of ``num_items`` validation batches spread evenly over the
    validation loader (fixed across epochs, as fastMRI's ``val_log_indices``). 3D slabs show the
    centre readout plane (Y, Z); cine shows the centre frame and a GIF over time. Each strip is
    :func:`melrecon.export.comparison_strip`: panels titled zero-filled / reconstruction (with
    their PSNR, data range = the item's ``max``: of the shown plane for 3D, of the whole series
    for cine, whose strip is the centre frame of :func:`melrecon.export.comparison_frames`) /
    target / |error| (own scale). Rank 0 only. W&B: ``val_images/item{i}`` and ``val_video/item{i}``; TensorBoard:
    images; ``save_dir`` (if set): ``step{S}_item{i}.png`` and, for cine, ``step{S}_item{i}.gif``.
    """

    def __init__(self, num_items: int = 2, every_n_epochs: int = 1, fps: int = 4,
                 save_dir: str | None = None) -> None:
        if num_items < 0 or every_n_epochs < 1:
            raise ValueError("callbacks.images: num_items must be >= 0 and every_n_epochs >= 1")
        self.num_items, self.every_n_epochs, self.fps = num_items, every_n_epochs, fps
        self.save_dir = Path(save_dir) if save_dir else None
        self._indices: set[int] = set()

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        n = trainer.num_val_batches[0] if trainer.num_val_batches else 0
        n = int(n) if n != float("inf") else 1000
        k = min(self.num_items, n)
        self._indices = set(np.linspace(0, n - 1, k).round().astype(int).tolist()) if k else set()

    @rank_zero_only
    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                                batch: ReconBatch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if (trainer.sanity_checking or batch_idx not in self._indices or not isinstance(outputs, dict)
                or trainer.current_epoch % self.every_n_epochs):
            return
        item = sorted(self._indices).index(batch_idx)
        zf = batch.x0[0].detach().abs().float().cpu().numpy()
        rec = outputs["pred"][0].abs().float().cpu().numpy()
        tgt = batch.target[0].detach().abs().float().cpu().numpy()
        vmax = float(batch.max.reshape(-1)[0])
        # cine maps have a singleton time axis (ReconBatch), slab maps one per readout position
        is_cine = batch.maps.ndim == 5 and batch.maps.shape[2] == 1 and zf.ndim == 3
        lead = zf.reshape(-1, *zf.shape[-2:]), rec.reshape(-1, *rec.shape[-2:]), tgt.reshape(-1, *tgt.shape[-2:])
        c = lead[0].shape[0] // 2
        if is_cine:  # one matplotlib drawing per item: the GIF frames, the centre one as the strip
            frames = list(comparison_frames(*lead, data_range=vmax))
            strip = frames[c]
        else:
            frames, strip = None, comparison_strip(lead[0][c], lead[1][c], lead[2][c], data_range=vmax,
                                                   over="this plane")
        caption = (f"{batch.file[0]} @ {int(batch.position.reshape(-1)[0])} (centre {'frame' if is_cine else 'plane'}):"
                   " zero-filled | recon | target | error (own scale)")
        self._emit(trainer, item, strip, caption, frames)

    def _emit(self, trainer: pl.Trainer, item: int, strip: np.ndarray, caption: str,
              frames: list[np.ndarray] | None) -> None:
        step = trainer.global_step
        wandb_loggers = [lg for lg in trainer.loggers if type(lg).__name__ == "WandbLogger"]
        with tempfile.TemporaryDirectory() as tmp:
            if self.save_dir is not None:
                # the saved strips (with caption) are what a resumed run replays into W&B (wandb_history)
                save_png(strip_path(self.save_dir, step, item), strip, description=caption)
            gif = None
            if frames and (self.save_dir is not None or wandb_loggers):  # written once, used by both
                gif = write_gif(strip_path(self.save_dir or Path(tmp), step, item, ".gif"), np.stack(frames),
                                fps=self.fps)
            for lg in trainer.loggers:
                name = type(lg).__name__
                if name == "WandbLogger":
                    log_wandb_strip(lg, item, strip, caption, step, gif)
                elif name == "TensorBoardLogger":
                    lg.experiment.add_image(f"val_images/item{item}", strip[None], step, dataformats="CHW")
