"""A callback that kills its own process with SIGKILL (a crash no handler can see), for the
resume tests: ``+callbacks.crash._target_=crash.SigkillAt +callbacks.crash.step=3`` with this
folder on PYTHONPATH."""

from __future__ import annotations

import os
import signal

import pytorch_lightning as pl


class SigkillAt(pl.Callback):
    """SIGKILL the process when training batch ``step`` (global step) starts."""

    def __init__(self, step: int) -> None:
        self.step = int(step)

    def on_train_batch_start(self, trainer: pl.Trainer, *args, **kwargs) -> None:
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class HangAt(pl.Callback):
    """Sleep ``seconds`` when training starts (a writer that holds its run folder, idle), for the
    concurrency tests: ``+callbacks.hang._target_=crash.HangAt``."""

    def __init__(self, seconds: float = 600.0) -> None:
        self.seconds = float(seconds)

    def on_train_start(self, trainer: pl.Trainer, *args, **kwargs) -> None:
        import time

        print("HangAt: hanging", flush=True)  # the test waits for this line
        time.sleep(self.seconds)
