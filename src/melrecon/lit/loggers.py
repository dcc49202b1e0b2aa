"""A CSV logger that continues its run's history when the run is resumed.

Lightning's ``CSVLogger`` gives every invocation a new ``version_N`` folder, and when it finds
a ``metrics.csv`` in its folder it deletes it. A resumed run (``ckpt_path=``) continues in its
original run folder (melrecon.lit.app), so :class:`ResumableCSVLogger` writes to
``<run>/csv/version_0/metrics.csv`` always and, when resuming from a checkpoint at global step
G, keeps the rows logged before G and drops those from G on (the crashed run's steps after the
checkpoint, which the resumed run logs again): every step and every validation epoch appears
exactly once.
"""

from __future__ import annotations

import csv
import os
from typing import Any

from lightning_fabric.loggers.logger import rank_zero_experiment
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter

from melrecon.data.h5 import atomic_path


class _ResumingWriter(ExperimentWriter):
    def __init__(self, log_dir: str, resume_step: int | None) -> None:
        self.resume_step = resume_step
        super().__init__(log_dir=log_dir)

    def _check_log_dir_exists(self) -> None:
        if self.resume_step is None or not os.path.isfile(self.metrics_file_path):
            return super()._check_log_dir_exists()  # a new run: Lightning's behaviour
        with open(self.metrics_file_path, newline="") as f:
            reader = csv.DictReader(f)
            fields = list(reader.fieldnames or [])
            rows = [r for r in reader if not r.get("step") or int(float(r["step"])) < self.resume_step]
        with atomic_path(self.metrics_file_path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
            f.flush()
            os.fsync(f.fileno())
        self.metrics_keys = sorted(fields)  # new keys are added to this header (Lightning rewrites it)
        return None


class ResumableCSVLogger(CSVLogger):
    """``CSVLogger`` with a fixed version (one history per run folder) that resumes it.

    Args:
        resume_step: the global step of the checkpoint being resumed (set by the app with
            ``ckpt_path=``); rows at this step or later are dropped from the existing file.
        The others: as Lightning's ``CSVLogger`` (``version`` defaults to 0).
    """

    def __init__(self, save_dir: str, name: str = "csv", version: int | str | None = 0,
                 resume_step: int | None = None, **kwargs: Any) -> None:
        super().__init__(save_dir=save_dir, name=name, version=version, **kwargs)
        self.resume_step = None if resume_step is None else int(resume_step)

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:  # type: ignore[override]
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ResumingWriter(self.log_dir, self.resume_step)
        return self._experiment


__all__ = ["ResumableCSVLogger"]
