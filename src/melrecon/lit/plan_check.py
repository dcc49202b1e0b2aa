"""PlanCheck: ``model.memory=auto``'s choice logged as ``plan/*``, and its predicted peak compared
with the measured one after the first training steps."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl

from melrecon.plan.planner import PlanTable

#: relative difference between predicted and measured peak above which PlanCheck warns
TOLERANCE = 0.15


def cuda_peak_gib(trainer: pl.Trainer, pl_module: pl.LightningModule) -> float | None:
    """``train/peak_mem_gib`` of the last step (PeakMemoryMonitor) on CUDA; None on CPU, where
    that figure is the process's resident set size and not comparable with the model."""
    if pl_module.device.type != "cuda":
        return None
    v = trainer.callback_metrics.get("train/peak_mem_gib")
    return None if v is None else float(v)


class PlanCheck(pl.Callback):
    """Log the plan at the start of training; after ``after_steps`` steps compare the predicted
    peak with ``measure(trainer, module)`` (GiB; default :func:`cuda_peak_gib`) and warn, with
    both figures, when they differ by more than :data:`TOLERANCE`."""

    def __init__(self, table: PlanTable, after_steps: int = 3,
                 measure: Callable[[pl.Trainer, pl.LightningModule], float | None] = cuda_peak_gib) -> None:
        self.table, self.after_steps, self.measure = table, after_steps, measure
        self.measured_gib: float | None = None
        self._seen = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for lg in trainer.loggers:
            lg.log_metrics(self.table.log_values(), step=trainer.global_step)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._seen += 1
        if self._seen > self.after_steps:
            return
        m = self.measure(trainer, pl_module)
        if m is not None and not math.isnan(m):
            self.measured_gib = m if self.measured_gib is None else max(self.measured_gib, m)
        if self._seen == self.after_steps and self.measured_gib is not None:
            predicted = self.table.chosen.peak_gib
            for lg in trainer.loggers:
                lg.log_metrics({"plan/measured_peak_gib": self.measured_gib}, step=trainer.global_step)
            if abs(self.measured_gib - predicted) > TOLERANCE * self.measured_gib:
                warnings.warn(
                    f"model.memory=auto: predicted peak {predicted:.3f} GiB, measured {self.measured_gib:.3f} GiB "
                    f"(train/peak_mem_gib, first {self.after_steps} steps): they differ by more than "
                    f"{TOLERANCE:.0%}; trainer.memory_budget_gb leaves the margin", RuntimeWarning, stacklevel=1)


__all__ = ["PlanCheck", "cuda_peak_gib"]
