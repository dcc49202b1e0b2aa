"""Faults that left a study stuck: a run killed while being scored (trained, no ``done.json``),
and broken study files (truncated, empty or malformed ``done.json``, deleted ``scores.csv``)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from melrecon.study.config import RunSpec
from melrecon.study.files import write_csv
from melrecon.study.job import SCORE_COLUMNS
from melrecon.study.runner import plan_runs


def _finished_run(root: Path, name: str) -> Path:
    study = root / name / "study"
    study.mkdir(parents=True)
    (study / "done.json").write_text(json.dumps({"overrides": [f"x={name}"]}))
    (study / "info.json").write_text("{}")
    write_csv(study / "scores.csv", [{c: 1 for c in SCORE_COLUMNS} | {"volume": "v.h5"}], SCORE_COLUMNS)
    (root / name / "checkpoints").mkdir()
    (root / name / "checkpoints" / "last.ckpt").write_bytes(b"")
    return study


@pytest.mark.parametrize("damage", ["empty", "truncated", "malformed", "list", "no_scores", "short_scores"])
def test_broken_study_files_make_the_run_unfinished_in_one_line(tmp_path, caplog, damage):
    specs = [RunSpec(n, n, [f"x={n}"]) for n in ("good", "bad")]
    _finished_run(tmp_path, "good")
    study = _finished_run(tmp_path, "bad")
    text = (study / "done.json").read_text()
    if damage == "empty":
        (study / "done.json").write_text("")
    elif damage == "truncated":
        (study / "done.json").write_text(text[: len(text) // 2])
    elif damage == "malformed":
        (study / "done.json").write_text("{overrides: x}")
    elif damage == "list":
        (study / "done.json").write_text("[1, 2]")
    elif damage == "no_scores":
        (study / "scores.csv").unlink()
    else:
        (study / "scores.csv").write_text((study / "scores.csv").read_text()[:-6])
    with caplog.at_level(logging.INFO, logger="melrecon.study"):
        pending = {s.name: s.overrides for s in plan_runs(specs, tmp_path, "last")}
    # the broken run continues from its checkpoint (a finished training is only scored)
    assert list(pending) == ["bad"] and pending["bad"][-1].startswith("ckpt_path=")
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "run bad: unfinished" in warned[0] and "\n" not in warned[0], warned


def test_training_complete_reads_the_checkpoint(tmp_path):
    import torch
    from omegaconf import OmegaConf

    from melrecon.study.job import training_complete

    path = tmp_path / "last.ckpt"
    torch.save({"global_step": 4, "loops": {"fit_loop": {"epoch_progress": {"current": {"processed": 1}}}}}, path)
    assert training_complete(path, OmegaConf.create({"max_steps": 4, "max_epochs": None}))
    assert not training_complete(path, OmegaConf.create({"max_steps": 8, "max_epochs": None}))
    assert training_complete(path, OmegaConf.create({"max_steps": -1, "max_epochs": 1}))
    assert not training_complete(path, OmegaConf.create({"max_steps": -1, "max_epochs": 2}))


@pytest.mark.slow
def test_study_killed_while_scoring_or_with_broken_files_finishes_on_rerun(monkeypatch, data_dir, tmp_path, caplog):
    """Every run folder of a finished tiny study is damaged as a kill -9 during scoring (or a
    user) leaves it; the rerun scores the trained runs from their checkpoints, without training."""
    from melrecon.study.runner import run_study

    for key, value in {"MELRECON_DATA_DIR": str(data_dir), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
                       "PYTHONWARNINGS": "ignore"}.items():
        monkeypatch.setenv(key, value)
    args = ["preset=tiny", f"out_dir={tmp_path / 's'}"]
    out = run_study("knee3d_vs_2d", args)
    runs = sorted(p for p in (out / "runs").iterdir() if (p / "study").is_dir())
    assert len(runs) >= 2
    results = (out / "results.csv").read_text()
    steps = {r.name: sorted(p.name for p in (r / "checkpoints").iterdir()) for r in runs}
    # killed while scoring: training done, no marker, no scores
    (runs[0] / "study" / "done.json").unlink()
    (runs[0] / "study" / "scores.csv").unlink()
    # a truncated marker, a deleted scores.csv
    (runs[1] / "study" / "done.json").write_text('{"overr')
    baseline = sorted((out / "baselines").iterdir())[0]
    (baseline / "scores.csv").unlink()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="melrecon.study"):
        run_study("knee3d_vs_2d", args)
    assert f"run {runs[1].name}: unfinished" in caplog.text
    assert f"baseline {baseline.name}: unfinished" in caplog.text
    for r in runs[:2]:
        assert (r / "study" / "done.json").is_file() and (r / "study" / "scores.csv").is_file()
        assert sorted(p.name for p in (r / "checkpoints").iterdir()) == steps[r.name]  # nothing trained
    assert (out / "results.csv").read_text() == results  # the same checkpoints give the same scores
    shutil.rmtree(out)
