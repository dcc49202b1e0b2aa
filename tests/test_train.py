"""The training application end to end on the tiny synthetic presets (real data, model, module)."""

import time
from pathlib import Path

import pytest
import torch
from conftest import CONF, read_synced_wandb_rows, read_wandb_history, run_train
from helpers import column, read_metrics_csv

from melrecon.lit import app

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
VAL_KEYS = ("val/psnr", "val/ssim", "val/nmse")
MEM_KEY = "train/peak_mem_gib"


def test_default_run_fast_dev_run(compose_cfg):
    cfg = compose_cfg("debug=tiny", "logger=none", "trainer.fast_dev_run=true", "test=true")
    metrics = app.run(cfg)
    assert {"train/loss", *VAL_KEYS, "test/psnr", "test/ssim", "test/nmse"} <= set(metrics)
    assert app.metric_value(metrics, "val/ssim") == metrics["val/ssim"]
    with pytest.raises(app.UserError, match="was not logged"):
        app.metric_value(metrics, "val/nope")


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) for n in EXPERIMENTS])
def test_experiment_fast_dev_run(compose_cfg, name):
    """One smoke run per experiment file (found by glob), on the tiny synthetic preset, with the
    experiment's network narrowed to 4 channels (paper sizes take minutes per step)."""
    cfg = compose_cfg(f"+experiment={name}", "debug=smoke", "model.regularizer.width=4", "logger=none",
                      "trainer.fast_dev_run=true")
    metrics = app.run(cfg)
    for k in ("train/loss", *VAL_KEYS):
        assert k in metrics and metrics[k] == metrics[k], f"{name}: {k} missing or NaN"


def test_wandb_offline_and_csv_hold_metrics(compose_cfg, monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose_cfg("debug=tiny", "logger=wandb_csv")
    try:
        app.run(cfg)
    finally:
        app.finish_wandb()
    run_dir = Path(cfg.paths.output_dir)
    files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    # wandb-core may still be flushing the file when finish() returns on a busy machine
    for _ in range(40):
        history = read_wandb_history(files[0])
        if set(VAL_KEYS) <= set(history):
            break
        time.sleep(0.5)
    for key in (*VAL_KEYS, "val/psnr_zf", MEM_KEY, "train/step_time_s", "train/loss", "dc/lam"):
        assert key in history, f"{key} not in the W&B history (has {sorted(history)})"
    assert all(float(v) > 0 for v in history[MEM_KEY])
    # fixed validation items as images, and (cine) as a GIF video
    for media in ("val_images/item0", "val_video/item0"):
        assert any(k.startswith(media + "/") for k in history), f"{media} not logged: {sorted(history)}"
    rows = read_metrics_csv(run_dir / "csv")
    for key in (*VAL_KEYS, MEM_KEY):
        assert column(rows, key), f"{key} not in the csv"
    # last and best checkpoints in the run folder; images of the fixed items
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert any(p.name.startswith("epoch_") for p in (run_dir / "checkpoints").iterdir())
    assert list((run_dir / "images").glob("*.png"))


def test_resume_continues_step_and_wandb_run(compose_cfg, monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    first = compose_cfg("debug=tiny", "logger=wandb_csv")
    try:
        app.run(first)
    finally:
        app.finish_wandb()
    last = Path(first.paths.output_dir) / "checkpoints" / "last.ckpt"
    ck = torch.load(last, map_location="cpu", weights_only=False)
    assert ck["global_step"] == 2 and ck["melrecon"]["wandb_id"]

    second = compose_cfg("debug=tiny", "logger=wandb_csv", "trainer.max_epochs=2", f"ckpt_path={last}")
    second.paths.output_dir = str(tmp_path / "run2")
    try:
        app.run(second)
    finally:
        app.finish_wandb()
    # the resumed run continues in the checkpoint's run folder (issue 11); run2 points there
    run1 = Path(first.paths.output_dir)
    assert (tmp_path / "run2" / "continues_run.txt").read_text().strip() == str(run1.resolve())
    ck2 = torch.load(run1 / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ck2["global_step"] == 4  # continued from step 2, not restarted
    assert ck2["epoch"] == 1
    assert ck2["melrecon"]["wandb_id"] == ck["melrecon"]["wandb_id"]  # same W&B run
    rows = read_metrics_csv(run1 / "csv")
    steps = [int(r["step"]) for r in rows if r.get("train/loss")]
    assert steps == [0, 1, 2, 3], steps  # no step of the first epoch was repeated
    # W&B: `wandb sync` of offline folders of one id keeps the last one synced, so the resumed
    # run's folder holds the whole history (replayed from the CSV and images/), each row once
    superseded = list((run1 / "wandb" / "superseded").glob(f"offline-run-*-{ck['melrecon']['wandb_id']}"))
    assert len(superseded) == 1, superseded
    history = read_synced_wandb_rows(run1, done=lambda r: sum("val/ssim" in x for x in r) >= 2)
    assert history and all(x.get("trainer/global_step") is not None for x in history)
    assert [int(x["trainer/global_step"]) for x in history if "train/loss" in x] == [0, 1, 2, 3]
    assert [float(x["val/ssim"]) for x in history if "val/ssim" in x] == column(rows, "val/ssim")
    assert [float(x["val/ssim_best"]) for x in history if "val/ssim_best" in x] == column(rows, "val/ssim_best")
    strips = [int(x["trainer/global_step"]) for x in history if "val_images/item0/_type" in x]
    assert strips == [2, 4], strips  # epoch 0's strip replayed from images/, epoch 1's logged
    captions = [x["val_images/item0/captions"] for x in history if "val_images/item0/captions" in x]
    assert all(".h5 @ " in c for c in captions), captions  # the caption saved in the PNG


@pytest.mark.slow
def test_ddp_two_processes_score_each_volume_once(tmp_path, data_dir):
    """2-process DDP on CPU (gloo): validation metrics equal the single-process ones."""
    common = ["debug=tiny", "+data.synthetic.num_val=3", f"data.root={tmp_path / 'ddpdata'}",
              "train=false", "validate=true", "logger=csv", "callbacks=none"]
    single = run_train([*common, f"hydra.run.dir={tmp_path / 'single'}"], tmp_path, data_dir)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = run_train([*common, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                     f"hydra.run.dir={tmp_path / 'ddp'}"], tmp_path, data_dir)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a, b = read_metrics_csv(tmp_path / "single"), read_metrics_csv(tmp_path / "ddp")
    assert column(a, "val/num_volumes")[-1] == column(b, "val/num_volumes")[-1] == 3.0
    for key in (*VAL_KEYS, "val/psnr_zf"):
        assert column(b, key)[-1] == pytest.approx(column(a, key)[-1], rel=1e-4), key


@pytest.mark.parametrize("args,expect", [
    (["no_such_key=1"], "no_such_key"),
    (["data.root=/nonexistent/melrecon", "data.synthetic=null"], "/nonexistent/melrecon"),
    (["model.memory=bogus"], "memory"),
])
def test_cli_errors_are_one_clear_message(tmp_path, data_dir, args, expect):
    res = run_train([*args, "logger=none", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, data_dir)
    assert res.returncode != 0
    assert "Traceback" not in res.stderr + res.stdout, res.stderr[-3000:]
    # one message naming the culprit: ours ("melrecon: error: ...") or Hydra's override error
    msg = [ln for ln in res.stderr.splitlines() if ln.startswith(("melrecon: error:", "Could not override"))]
    assert len(msg) == 1 and expect in res.stderr, res.stderr[-3000:]


def test_console_line_per_validation_epoch_in_train_log(tmp_path, data_dir):
    """train.py without a terminal: no progress bar, periodic step lines, one line per
    validation epoch with the metrics, memory and step time, in train.log as on the console,
    and the summary table with the reconstruct command."""
    import re

    run_dir = tmp_path / "run"
    res = run_train(["debug=tiny", "logger=csv", "trainer.max_epochs=2", "trainer.log_every_n_steps=1",
                     f"hydra.run.dir={run_dir}"], tmp_path, data_dir)
    assert res.returncode == 0, res.stderr[-3000:]
    text = (run_dir / "train.log").read_text()
    line = re.compile(r"epoch (\d+) step (\d+) \| val psnr ([\d.]+) ssim ([\d.]+) nmse ([\d.]+) \| "
                      r"zero-filled psnr ([\d.]+) ssim ([\d.]+) nmse ([\d.]+) \| peak mem ([\d.]+) GiB \| step ([\d.]+) s")
    epochs = [m for m in line.finditer(text)]
    assert [int(m.group(1)) for m in epochs] == [0, 1], text[-3000:]
    rows = read_metrics_csv(run_dir)
    last = [r for r in rows if r.get("val/psnr")][-1]  # the csv logger's last validation row
    assert float(epochs[-1].group(3)) == pytest.approx(float(last["val/psnr"]), abs=0.006)
    val_steps = [int(r["step"]) for r in rows if r.get("val/psnr")]
    assert [int(m.group(2)) for m in epochs] == val_steps  # the step the CSV (and W&B) file it under
    assert float(epochs[-1].group(9)) > 0 and float(epochs[-1].group(10)) > 0
    for m in epochs:  # the figures PeakMemoryMonitor logged: epoch max and mean, not re-measured
        train = [r for r in rows if r.get("train/peak_mem_gib") and int(r["epoch"]) == int(m.group(1))]
        assert float(m.group(9)) == pytest.approx(max(float(r["train/peak_mem_gib"]) for r in train), abs=0.006)
        times = [float(r["train/step_time_s"]) for r in train]
        assert float(m.group(10)) == pytest.approx(sum(times) / len(times), abs=0.0006)
    assert re.search(r"epoch 0 step 1/\d+ loss", text)  # progress lines instead of the bar
    assert "summary (2 validation epochs" in text and "python -m melrecon.reconstruct" in text
    assert "best checkpoint: " + str(run_dir / "checkpoints") in text
    console = res.stdout + res.stderr
    assert epochs[-1].group(0) in console
    assert "\r" not in console  # no progress bar redraws


@pytest.mark.parametrize("name", ["knee3d_volume", "knee3d_rev_volume"])
def test_whole_volume_experiment_with_tiles_that_cut_the_volume(compose_cfg, name):
    """The whole-volume experiments at debug=tiny, with a tile and DC chunks smaller than the
    tiny volume (8 x 16 x 16), so that every CNN call is tiled and every normal operator chunked."""
    from hydra.utils import instantiate

    overrides = (f"+experiment={name}", "debug=tiny", "logger=none", "trainer.fast_dev_run=true",
                 "model.num_unrolls=2", "model.regularizer.tile=[5,8,null]", "model.dc_chunk=3")
    cfg = compose_cfg(*overrides)
    assert cfg.data.slab_size is None and cfg.model.regularizer.tile == [5, 8, None]
    metrics = app.run(cfg)
    for k in ("train/loss", *VAL_KEYS):
        assert k in metrics and metrics[k] == metrics[k], f"{name}: {k} missing or NaN"
    net = instantiate(cfg.model)
    stacks = [m for m in net.modules() if hasattr(m, "halo")]
    assert stacks and all(s.tile == (5, 8, None) for s in stacks) and net.dc_chunk == 3


def test_console_line_without_the_memory_monitor_says_n_a():
    from melrecon.lit.console import ConsoleSummary

    line = ConsoleSummary.epoch_line({"epoch": 0, "step": 2, "val/psnr": 20.0, "peak_mem_gib": float("nan"),
                                      "step_time_s": float("nan")})
    assert line.endswith("| peak mem n/a | step n/a") and "val psnr 20.00 ssim n/a" in line
