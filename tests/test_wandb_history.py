"""Rebuilding a resumed run's offline W&B history from the run folder (melrecon.lit.wandb_history).

The end-to-end cases (a resume in process; ``kill -9`` then resume) are in test_train.py and
test_faults_runs.py; here the pieces, with stand-in loggers where W&B itself is not the point.
"""

import csv
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from melrecon.export import save_png
from melrecon.lit import wandb_history as wh


def write_csv(path: Path, rows: list[dict]) -> Path:
    keys = sorted({k for r in rows for k in r})
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    return path


def test_csv_rows_before_keeps_rows_below_the_step_in_file_order(tmp_path):
    f = write_csv(tmp_path / "metrics.csv", [
        {"step": 0, "train/lr": 0.001},
        {"step": 0, "epoch": 0, "train/loss": 0.5},
        {"step": 1, "epoch": 0, "val/ssim": 0.7},
        {"step": 2, "epoch": 1, "train/loss": 0.4},  # the resumed run logs this one again
        {"epoch": 1},                                 # no step: not a logged row
    ])
    rows = wh.csv_rows_before(f, 2)
    assert rows == [(0, {"train/lr": 0.001}), (0, {"epoch": 0.0, "train/loss": 0.5}),
                    (1, {"epoch": 0.0, "val/ssim": 0.7})]


def test_saved_strips_upto_reads_the_callback_names(tmp_path):
    for name in ("step0000002_item0.png", "step0000002_item1.png", "step0000004_item0.png",
                 "step0000002_item0.gif", "notes.txt", "step2_item0.png.tmp"):
        (tmp_path / name).write_bytes(b"")
    assert [(s, i, p.name) for s, i, p in wh.saved_strips_upto(tmp_path, 2)] == [
        (2, 0, "step0000002_item0.png"), (2, 1, "step0000002_item1.png")]
    assert wh.saved_strips_upto(None, 10) == [] and wh.saved_strips_upto(tmp_path / "none", 10) == []


class FakeLogger:
    """Records what a WandbLogger would be asked to log."""

    def __init__(self, offline: bool = True, sync_dir: Path | None = None, run_id: str = "abc123",
                 disabled: bool = False):
        self.calls: list[tuple] = []
        self.experiment = SimpleNamespace(offline=offline, sync_dir=str(sync_dir), id=run_id, disabled=disabled,
                                          log=lambda d: self.calls.append(("log", d)))

    def log_metrics(self, metrics, step):
        self.calls.append(("metrics", step, dict(metrics)))

    def log_image(self, key, images, caption, step):
        self.calls.append(("image", step, key, caption[0]))


def test_replay_orders_by_step_reads_captions_and_skips_a_cut_strip(tmp_path, caplog):
    strip = np.zeros((4, 6, 3), np.uint8)
    save_png(tmp_path / "step0000002_item0.png", strip, description="vol_0.h5 @ 3: zf | recon")
    cut = save_png(tmp_path / "step0000001_item0.png", strip)
    cut.write_bytes(cut.read_bytes()[:20])  # what a kill during the write leaves
    rows = [(0, {"train/loss": 0.5}), (1, {"val/ssim": 0.7}), (2, {"train/loss": 0.4})]
    strips = wh.saved_strips_upto(tmp_path, 2)
    lg = FakeLogger()
    with caplog.at_level(logging.WARNING, logger="melrecon"):
        n = wh._replay(lg, rows, strips)
    assert n == 1 and "step0000001_item0.png is not a readable PNG" in caplog.text
    assert lg.calls == [("metrics", 0, {"train/loss": 0.5}), ("metrics", 1, {"val/ssim": 0.7}),
                        ("metrics", 2, {"train/loss": 0.4}),
                        ("image", 2, "val_images/item0", "vol_0.h5 @ 3: zf | recon")]


def test_earlier_offline_folders_of_the_run_are_moved_aside(tmp_path):
    wandb_dir = tmp_path / "wandb"
    for name in ("offline-run-20260101_000000-abc123", "offline-run-20260101_000100-abc123",
                 "offline-run-20260101_000200-other9", "offline-run-20260101_000300-abc123"):
        (wandb_dir / name).mkdir(parents=True)
    (wandb_dir / "superseded" / "offline-run-20260101_000000-abc123").mkdir(parents=True)  # an earlier resume's
    current = wandb_dir / "offline-run-20260101_000300-abc123"
    csv_file = write_csv(tmp_path / "metrics.csv", [{"step": 0, "train/loss": 1.0}])
    lg = FakeLogger(sync_dir=current)
    done = wh.rebuild_offline_history(lg, csv_file, resume_step=1)
    assert done.rows == 1 and done.images == 0
    assert sorted(p.name for p in wandb_dir.glob("offline-run-*")) == [
        "offline-run-20260101_000200-other9", current.name]  # another run's folder is not touched
    assert sorted(p.name for p in (wandb_dir / "superseded").iterdir()) == [
        "offline-run-20260101_000000-abc123", "offline-run-20260101_000000-abc123.1",
        "offline-run-20260101_000100-abc123"]
    assert lg.calls == [("metrics", 0, {"train/loss": 1.0})]


def test_online_run_is_left_as_wandb_resumes_it(tmp_path, caplog):
    (tmp_path / "wandb" / "run-20260101_000000-abc123").mkdir(parents=True)
    csv_file = write_csv(tmp_path / "metrics.csv", [{"step": 0, "train/loss": 1.0}])
    lg = FakeLogger(offline=False, sync_dir=tmp_path / "wandb" / "run-20260101_000100-abc123")
    with caplog.at_level(logging.WARNING, logger="melrecon"):
        assert wh.rebuild_offline_history(lg, csv_file, resume_step=1) is None
    assert lg.calls == [] and "W&B online" in caplog.text and str(csv_file) in caplog.text
    assert (tmp_path / "wandb" / "run-20260101_000000-abc123").is_dir()


def test_disabled_wandb_is_left_alone(tmp_path, caplog):
    (tmp_path / "wandb" / "offline-run-20260101_000000-abc123").mkdir(parents=True)
    csv_file = write_csv(tmp_path / "metrics.csv", [{"step": 0, "train/loss": 1.0}])
    lg = FakeLogger(offline=False, disabled=True, sync_dir=tmp_path / "wandb" / "run-x-abc123")
    with caplog.at_level(logging.WARNING, logger="melrecon"):
        assert wh.rebuild_offline_history(lg, csv_file, resume_step=1) is None
    assert lg.calls == [] and not caplog.text
    assert (tmp_path / "wandb" / "offline-run-20260101_000000-abc123").is_dir()


def test_resume_without_the_csv_logger_says_the_history_is_not_rebuilt(tmp_path, caplog):
    pytest.importorskip("wandb")
    from pytorch_lightning.loggers import WandbLogger

    old = tmp_path / "wandb" / "offline-run-20260101_000000-abc123"
    old.mkdir(parents=True)
    lg = WandbLogger(save_dir=str(tmp_path), id="abc123", mode="offline")  # experiment not created
    with caplog.at_level(logging.WARNING, logger="melrecon"):
        wh.rebuild_on_resume([lg], [], resume_step=4)
    assert "without the csv logger" in caplog.text and "step 4" in caplog.text
    assert old.is_dir() and lg._experiment is None
