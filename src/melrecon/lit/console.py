"""What a person reads while a run trains: one line per validation epoch, periodic progress
lines where there is no terminal (SLURM logs), and a summary table at the end.

The lines go to the ``melrecon`` logger, which Hydra's job logging sends to the console and to
``<run>/train.log`` (``conf/hydra/default.yaml``: the ``file`` handler of ``job_logging``).
"""

from __future__ import annotations

import logging
import math
import sys
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_only

from melrecon.lit.callbacks import PeakMemoryMonitor

log = logging.getLogger("melrecon")

VAL_KEYS = ("psnr", "ssim", "nmse")


def stdout_is_terminal() -> bool:
    """True when stdout is an interactive terminal (progress bars make sense there)."""
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):  # replaced or closed stdout
        return False


def _fmt(key: str, value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.2f}" if key.startswith("psnr") else f"{value:.4f}"


def logged_step(trainer: pl.Trainer) -> int:
    """The step the loggers (CSV, W&B) file validation metrics under: Lightning's count of
    batches that stepped, which lags ``global_step`` by one while validation runs at the end of
    a training epoch (12 steps: the CSV row says 11). The console says the same number."""
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    return int(getattr(loop, "_batches_that_stepped", trainer.global_step))


class ConsoleSummary(pl.Callback):
    """One line per validation epoch, progress lines without a terminal, a summary at the end.

    Epoch line (rank 0, after each validation epoch that is not the sanity check)::

        epoch 3 step 120 | val psnr 22.65 ssim 0.7012 nmse 0.0312 | zero-filled psnr 15.71 ...
        | peak mem 1.21 GiB | step 0.350 s

    ``peak mem``: the maximum of ``train/peak_mem_gib`` over the epoch's training steps, and
    ``step``: the mean of their ``train/step_time_s``, both as measured (and logged) by
    :class:`melrecon.lit.callbacks.PeakMemoryMonitor`; ``n/a`` without that callback. Without
    a progress bar (``trainer.enable_progress_bar=false``, which
    :func:`melrecon.lit.app.run` sets when stdout is not a terminal) a line ``epoch E step
    S/N loss L`` is written every ``every_n_steps`` training steps. At the end of ``fit``: the
    best epoch by the checkpoint callback's monitor (``val/ssim`` by default), its metrics, the
    best and last checkpoint paths and the command that reconstructs scans with the run.
    """

    def __init__(self, every_n_steps: int = 50) -> None:
        if every_n_steps < 1:
            raise ValueError(f"callbacks.console.every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = int(every_n_steps)
        self.history: list[dict[str, float]] = []  # one entry per validation epoch

    # ------------------------------------------------------------------ training steps
    @staticmethod
    def _step_figures(trainer: pl.Trainer) -> tuple[float, list[float]]:
        """The current epoch's peak memory (GiB) and step times (s) from PeakMemoryMonitor."""
        monitor = next((cb for cb in trainer.callbacks if isinstance(cb, PeakMemoryMonitor)), None)
        return (math.nan, []) if monitor is None else (monitor.epoch_peak_gib, monitor.epoch_step_times)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if trainer.progress_bar_callback is None and (batch_idx + 1) % self.every_n_steps == 0:
            self._progress_line(trainer, batch_idx)

    @rank_zero_only
    def _progress_line(self, trainer: pl.Trainer, batch_idx: int) -> None:
        total = trainer.num_training_batches
        total_s = str(int(total)) if math.isfinite(total) else "?"
        loss = trainer.callback_metrics.get("train/loss")
        loss_s = f"{float(loss):.4g}" if loss is not None else "n/a"
        recent = self._step_figures(trainer)[1][-self.every_n_steps:]
        timing = f" ({sum(recent) / len(recent):.3f} s/step)" if recent else ""
        log.info("epoch %d step %d/%s loss %s%s", trainer.current_epoch, batch_idx + 1, total_s, loss_s, timing)

    # ------------------------------------------------------------------ validation epochs
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        m = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        peak, times = self._step_figures(trainer)
        entry = {"epoch": trainer.current_epoch, "step": logged_step(trainer), **m, "peak_mem_gib": peak,
                 "step_time_s": sum(times) / len(times) if times else math.nan}
        self.history.append(entry)
        self._epoch_line(entry)

    @staticmethod
    def epoch_line(entry: dict[str, float]) -> str:
        """The one-line summary of a validation epoch (see the class docstring)."""
        val = " ".join(f"{k} {_fmt(k, entry.get(f'val/{k}'))}" for k in VAL_KEYS)
        zf = " ".join(f"{k} {_fmt(k, entry.get(f'val/{k}_zf'))}" for k in VAL_KEYS)
        peak, step = entry["peak_mem_gib"], entry["step_time_s"]
        peak_s = f"{peak:.2f} GiB" if math.isfinite(peak) else "n/a"
        step_s = f"{step:.3f} s" if math.isfinite(step) else "n/a"
        return (f"epoch {int(entry['epoch'])} step {int(entry['step'])} | val {val} | zero-filled {zf} | "
                f"peak mem {peak_s} | step {step_s}")

    @rank_zero_only
    def _epoch_line(self, entry: dict[str, float]) -> None:
        log.info(self.epoch_line(entry))

    # ------------------------------------------------------------------ end of the run
    @rank_zero_only
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.history:
            return
        ckpt = trainer.checkpoint_callback
        monitor = getattr(ckpt, "monitor", None) or "val/ssim"
        mode = getattr(ckpt, "mode", "max")
        scored = [h for h in self.history if math.isfinite(h.get(monitor, math.nan))]
        best = (max if mode == "max" else min)(scored, key=lambda h: h[monitor]) if scored else self.history[-1]
        best_path = getattr(ckpt, "best_model_path", "") or ""
        last_path = getattr(ckpt, "last_model_path", "") or ""
        run_dir = trainer.default_root_dir
        lines = [f"summary ({len(self.history)} validation epochs; best by {monitor}, {mode})",
                 f"  {'':<12} {'psnr':>8} {'ssim':>8} {'nmse':>8}",
                 f"  {'best epoch ' + str(int(best['epoch'])):<12} "
                 + " ".join(f"{_fmt(k, best.get(f'val/{k}')):>8}" for k in VAL_KEYS),
                 f"  {'zero-filled':<12} " + " ".join(f"{_fmt(k, best.get(f'val/{k}_zf')):>8}" for k in VAL_KEYS),
                 f"  {'last epoch ' + str(int(self.history[-1]['epoch'])):<12} "
                 + " ".join(f"{_fmt(k, self.history[-1].get(f'val/{k}')):>8}" for k in VAL_KEYS),
                 f"  best checkpoint: {best_path or 'none saved'}",
                 f"  last checkpoint: {last_path or 'none saved'}"]
        ckpt_flag = f" --ckpt {best_path}" if best_path else ""
        lines.append(f"  reconstruct:     python -m melrecon.reconstruct {run_dir}{ckpt_flag} DATA --out recon "
                     "--format h5,nifti,png")
        log.info("\n".join(lines))
