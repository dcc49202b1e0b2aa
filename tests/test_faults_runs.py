"""Faults around runs (issue 11): run folders, checkpoints, resume, clear errors, sweeps.

Every test here reproduces a way melrecon used to lose a run or report wrong numbers with
exit status 0, on the tiny synthetic presets (``debug=tiny``). A tiny run is trained once per
module (``trained``) and its checkpoint reused by the resume and reconstruct tests.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import CONF, run_train
from helpers import main_exit, one_error_line, read_metrics_csv
from omegaconf import OmegaConf, open_dict

from melrecon.lit import app


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    """A finished one-epoch tiny run: (run folder, its config with a concrete output_dir)."""
    from hydra import compose, initialize_config_dir

    run_dir = tmp_path_factory.mktemp("trained") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MELRECON_DATA_DIR", str(data_dir))
        mp.setenv("WANDB_MODE", "disabled")
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(config_name="train", overrides=["debug=tiny", "logger=none"])
        with open_dict(cfg):
            cfg.paths.output_dir = str(run_dir)
        app.run(cfg)
        saved = cfg.copy()
        with open_dict(saved):
            saved.paths.output_dir = "${hydra:runtime.output_dir}"
        (run_dir / ".hydra").mkdir()
        OmegaConf.save(saved, run_dir / ".hydra" / "config.yaml")
        yield run_dir, cfg


# ---------------------------------------------------------------------- 1. run folders
def _compose_with_hydra(*overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides), return_hydra_config=True)


def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path):
    a = _compose_with_hydra(f"paths.log_dir={tmp_path}")
    dirs_a = str(a.hydra.run.dir), str(a.hydra.sweep.dir)
    b = _compose_with_hydra(f"paths.log_dir={tmp_path}")
    # the second process started in the same second: it sees the same ${now:} values
    OmegaConf.set_cache(b, {"now": OmegaConf.get_cache(a)["now"], "unique_dir": {}})
    dirs_b = str(b.hydra.run.dir), str(b.hydra.sweep.dir)
    for da, db in zip(dirs_a, dirs_b):  # run folders, then sweep folders
        assert da != db and Path(da).parent == Path(db).parent, (da, db)
        assert Path(da).is_dir() and Path(db).is_dir()
        assert Path(db).name == Path(da).name + "-1"
    # resolved again (Hydra resolves hydra.run.dir several times per run): no new folder
    assert str(b.hydra.run.dir) == dirs_b[0]
    assert len(list((tmp_path / "train" / "runs").iterdir())) == 2


def test_checkpoint_carries_model_and_data_config(trained):
    run_dir, cfg = trained
    ck = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    rec = ck["melrecon"]["config"]
    assert rec["model"] == OmegaConf.to_container(cfg.model, resolve=True)
    assert rec["data"] == OmegaConf.to_container(cfg.data, resolve=True)
    assert rec["module"]["optimizer"]["lr"] == cfg.module.optimizer.lr
    assert len(rec["model_hash"]) == 16


def test_reconstruct_refuses_weights_of_another_model_config(trained, tmp_path, capsys, data_dir, monkeypatch):
    """Same tensor shapes, other network (what a collided run folder produced): refused."""
    from melrecon import reconstruct as rc

    monkeypatch.setenv("MELRECON_DATA_DIR", str(data_dir))
    run_dir, _ = trained
    other = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    other.model.dc.lam_init = 0.5
    other.model.num_unrolls = 3
    OmegaConf.save(other, tmp_path / "other.yaml")
    src = data_dir / "synthetic_cine" / "val" / "cine_val_0000.h5"
    code = rc.main([str(run_dir), str(src), "--out", str(tmp_path / "out"), "--config", str(tmp_path / "other.yaml")])
    line = one_error_line(capsys.readouterr().err, "does not fit the run's model config")
    assert code == 2 and "model.dc.lam_init" in line and "model.num_unrolls" in line
    # --num-unrolls on a shared-weight network is a deliberate change: still allowed
    assert rc.main([str(run_dir), str(src), "--out", str(tmp_path / "deeper"), "--num-unrolls", "3"]) == 0


# ---------------------------------------------------------------------- 3. resume with another config
@pytest.mark.parametrize("override,key", [
    ("model.num_unrolls=1", "model.num_unrolls"),       # shared weights: the state dict fits
    ("model.regularizer.width=8", "model.regularizer.width"),
    ("module.optimizer.lr=1e-6", "module.optimizer.lr"),
    ("data.accelerations=[2]", "data.accelerations"),
])
def test_resume_with_another_config_is_refused_naming_the_keys(trained, compose_cfg, capsys, override, key):
    run_dir, _ = trained
    cfg = compose_cfg("debug=tiny", "logger=none", "trainer.max_epochs=2",
                      f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", override)
    code, err = main_exit(cfg, capsys)
    assert code == 2
    line = one_error_line(err, "trained with another config")
    assert key in line


def test_resume_may_switch_memory_mode_and_data_folder(trained, compose_cfg, tmp_path):
    run_dir, _ = trained
    ckpt = tmp_path / "copy" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    shutil.copy(run_dir / "checkpoints" / "last.ckpt", ckpt)
    cfg = compose_cfg("debug=tiny", "logger=none", "callbacks=none", "trainer.max_epochs=2",
                      "model.memory=standard", "data.num_workers=0", f"ckpt_path={ckpt}")
    metrics = app.run(cfg)
    assert "val/ssim" in metrics


# ---------------------------------------------------------------------- 11. clear errors
@pytest.mark.parametrize("override,expect", [
    ("trainer.max_epochs=-5", "trainer.max_epochs"),
    ("+trainer.max_steps=-3", "trainer.max_steps"),
])
def test_negative_epoch_or_step_limits_are_refused(compose_cfg, capsys, override, expect):
    code, err = main_exit(compose_cfg("debug=tiny", "logger=none", override), capsys)
    assert code == 2
    one_error_line(err, expect)


def test_plain_run_without_validation_warns_and_exits_0(compose_cfg, caplog):
    cfg = compose_cfg("debug=tiny", "logger=none", "trainer.max_epochs=0")
    with caplog.at_level("WARNING", logger="melrecon"):
        assert app.main(cfg) is None
    assert any("val/ssim_best" in r.getMessage() and "not logged" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("kind", ["text", "truncated", "empty"])
def test_unreadable_ckpt_path_is_one_line(trained, compose_cfg, capsys, tmp_path, kind):
    run_dir, _ = trained
    bad = tmp_path / "bad.ckpt"
    if kind == "text":
        bad.write_text("not a checkpoint\n")
    elif kind == "truncated":
        data = (run_dir / "checkpoints" / "last.ckpt").read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    else:
        bad.write_bytes(b"")
    code, err = main_exit(compose_cfg("debug=tiny", "logger=none", f"ckpt_path={bad}"), capsys)
    assert code == 2
    one_error_line(err, str(bad))


def test_data_dir_that_is_a_file_is_one_line(compose_cfg, capsys, tmp_path, monkeypatch):
    cfg = compose_cfg("debug=tiny", "logger=none")
    f = tmp_path / "datafile"
    f.write_text("x")
    monkeypatch.setenv("MELRECON_DATA_DIR", str(f))
    code, err = main_exit(cfg, capsys)
    assert code == 2
    one_error_line(err, str(f))


def test_unwritable_run_folder_is_one_line(tmp_path, data_dir):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the log folder should be")
    res = run_train(["debug=tiny", "logger=none", "train=false", f"paths.log_dir={blocker / 'logs'}"],
                    tmp_path, data_dir)
    assert res.returncode != 0
    one_error_line(res.stderr, str(blocker))


# ---------------------------------------------------------------------- 6. checkpoints on a full disk
def test_checkpoint_write_failure_leaves_previous_checkpoints_intact(compose_cfg, monkeypatch):
    """The disk fills while epoch 1's checkpoint is written (half the bytes, then ENOSPC): epoch
    0's files stay readable, nothing corrupt lies under a final name, no temporary file remains;
    the bytes go to a temporary file in the checkpoint folder itself (renamed when complete),
    not through the system temp folder (a copy across file systems is not atomic)."""
    import io

    real_save = torch.save
    targets: list[object] = []

    def filling_save(obj, f, *args, **kwargs):
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        data = buf.getvalue()
        epoch = obj.get("epoch") if isinstance(obj, dict) else None
        targets.append(getattr(f, "name", f))
        if epoch != 1:
            f.write(data) if hasattr(f, "write") else Path(f).write_bytes(data)
            return
        half = data[: len(data) // 2]
        f.write(half) if hasattr(f, "write") else Path(f).write_bytes(half)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    cfg = compose_cfg("debug=tiny", "logger=none", "trainer.max_epochs=2")
    ckpt_dir = Path(cfg.paths.output_dir) / "checkpoints"
    monkeypatch.setattr(torch, "save", filling_save)
    with pytest.raises(OSError, match="No space left"):
        app.run(cfg)
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["epoch_000.ckpt", "last.ckpt"]
    for p in ckpt_dir.iterdir():
        assert torch.load(p, map_location="cpu", weights_only=True)["epoch"] == 0
    # every write went to a temporary name in the checkpoint folder
    assert targets and all(isinstance(t, str) and Path(t).parent == ckpt_dir and not t.endswith(".ckpt")
                           for t in targets), targets


# ---------------------------------------------------------------------- 13. continued Optuna studies
def _first_params(sampler_cfg, storage: str, value: float) -> dict:
    """Instantiate the configured sampler, run one trial of the cine search space, return its params."""
    import hydra
    import optuna

    sampler = hydra.utils.instantiate(sampler_cfg)
    study = optuna.create_study(study_name="s", storage=storage, sampler=sampler, direction="maximize",
                                load_if_exists=True)
    trial = study.ask()
    trial.suggest_float("lr", 1e-4, 1e-2, log=True)
    trial.suggest_categorical("width", [8, 16, 32])
    study.tell(trial, value)
    return trial.params


def test_continued_optuna_study_samples_new_points(tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    cfg = _compose_with_hydra("hparams_search=cine_optuna", f"hydra.sweeper.storage={storage}",
                              "hydra.sweeper.study_name=s", f"paths.log_dir={tmp_path}")
    first = _first_params(cfg.hydra.sweeper.sampler, storage, 0.5)
    again = _first_params(cfg.hydra.sweeper.sampler, storage, 0.6)  # the same command, run again
    assert first != again
    # a fresh study is still reproducible from the configured seed
    cfg2 = _compose_with_hydra("hparams_search=cine_optuna", f"hydra.sweeper.storage=sqlite:///{tmp_path / 'b.db'}",
                               "hydra.sweeper.study_name=s", f"paths.log_dir={tmp_path}")
    assert _first_params(cfg2.hydra.sweeper.sampler, f"sqlite:///{tmp_path / 'b.db'}", 0.5) == first


@pytest.mark.slow
def test_two_optuna_invocations_with_one_storage_try_different_points(tmp_path, data_dir):
    import optuna

    db = tmp_path / "study.db"
    args = ["hparams_search=cine_optuna", "debug=tiny", "trainer.limit_train_batches=1", "logger=none",
            "callbacks=none", "hydra.sweeper.n_trials=1", f"hydra.sweeper.storage=sqlite:///{db}",
            "hydra.sweeper.study_name=t"]
    for _ in range(2):
        res = run_train(args, tmp_path, data_dir)
        assert res.returncode == 0, res.stderr[-3000:]
    trials = optuna.load_study(study_name="t", storage=f"sqlite:///{db}").trials
    assert len(trials) == 2 and trials[0].params != trials[1].params
    # continued with another task: refused before any trial, one line naming the key
    res = run_train([*args, "data.accelerations=[2]"], tmp_path, data_dir)
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("melrecon: error:")]
    assert res.returncode == 2 and len(lines) == 1 and "data.accelerations" in lines[0], res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    assert len(optuna.load_study(study_name="t", storage=f"sqlite:///{db}").trials) == 2


# ---------------------------------------------------------------------- 9. exact resume
def test_two_epochs_straight_equal_one_plus_resumed_one(compose_cfg, tmp_path):
    """Random choices (order, masks, accelerations, slab starts) are functions of (seed, epoch,
    index): a run resumed from its epoch-boundary last.ckpt reproduces the uninterrupted one
    bit for bit on the CPU (weights, optimizer state, validation metrics)."""
    common = ("debug=tiny", "logger=none", "data.accelerations=[2,3,4]")

    def fit(folder: str, *extra: str) -> tuple[dict, dict]:
        cfg = compose_cfg(*common, *extra)
        cfg.paths.output_dir = str(tmp_path / folder)
        metrics = app.run(cfg)
        return metrics, torch.load(tmp_path / folder / "checkpoints" / "last.ckpt", map_location="cpu",
                                   weights_only=True)

    straight, ck_a = fit("straight", "trainer.max_epochs=2")
    fit("split", "trainer.max_epochs=1")
    resumed, ck_b = fit("split", "trainer.max_epochs=2",
                        f"ckpt_path={tmp_path / 'split' / 'checkpoints' / 'last.ckpt'}")
    assert ck_a["global_step"] == ck_b["global_step"] == 4
    for k, v in ck_a["state_dict"].items():
        assert torch.equal(v, ck_b["state_dict"][k]), k
    for sa, sb in zip(ck_a["optimizer_states"][0]["state"].values(), ck_b["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    for key in ("val/psnr", "val/ssim", "val/nmse", "val/loss", "val/ssim_best"):
        assert resumed[key] == straight[key], key


# ---------------------------------------------------------------------- 7. kill -9, then resume
def _csv_rows(run_dir: Path) -> list[dict]:
    return read_metrics_csv(run_dir / "csv")  # one history, not one per invocation


def _val_epochs_in_csv(run_dir: Path) -> list[int]:
    return [int(r["epoch"]) for r in _csv_rows(run_dir) if r.get("val/ssim")]


@pytest.mark.slow
def test_sigkill_then_resume_keeps_one_history_in_the_run_folder(tmp_path, data_dir):
    """Killed (SIGKILL) in epoch 1 after epoch 0's validation, then resumed from last.ckpt: the
    resumed run writes into the original run folder; its CSV history and its offline W&B run
    (one run id, rebuilt from the run folder by melrecon.lit.wandb_history) hold every training
    step, validation epochs 0, 1, 2 and their image strips exactly once."""
    from conftest import read_synced_wandb_rows

    tests_dir, src = Path(__file__).resolve().parent, Path(__file__).resolve().parents[1] / "src"
    env = {"WANDB_MODE": "offline", "PYTHONPATH": f"{tests_dir}{os.pathsep}{src}"}
    common = ["debug=tiny", "logger=wandb_csv", "trainer.max_epochs=3"]
    res = run_train([*common, "+callbacks.crash._target_=crash.SigkillAt", "+callbacks.crash.step=3"],
                    tmp_path, data_dir, env=env)
    assert res.returncode == -9, res.stderr[-3000:]
    (run_dir,) = list((tmp_path / "logs" / "train" / "runs").iterdir())
    assert _val_epochs_in_csv(run_dir) == [0]
    res = run_train([*common, f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}"], tmp_path, data_dir, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert _val_epochs_in_csv(run_dir) == [0, 1, 2]
    train_steps = [int(r["step"]) for r in _csv_rows(run_dir) if r.get("train/loss")]
    assert train_steps == list(range(6)), train_steps  # step 2 was logged before the kill: once
    invocation = [p for p in (tmp_path / "logs" / "train" / "runs").iterdir() if p != run_dir]
    assert len(invocation) == 1 and (invocation[0] / "continues_run.txt").read_text().strip() == str(run_dir)
    assert str(invocation[0]) in (run_dir / "resumes.txt").read_text()
    ck = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ck["epoch"] == 2 and ck["global_step"] == 6
    # W&B (offline): the killed invocation's folder is kept in wandb/superseded/; the resumed
    # run's folder, what `wandb sync <run>/wandb/offline-run-*` uploads, holds every training
    # step and every validation epoch once, equal to the CSV's (the killed process's own W&B
    # file may hold nothing: W&B buffers it)
    (killed,) = (run_dir / "wandb" / "superseded").iterdir()
    history = read_synced_wandb_rows(run_dir, done=lambda r: sum("val/ssim" in x for x in r) >= 3)
    assert killed.name.rsplit("-", 1)[1] == next((run_dir / "wandb").glob("offline-run-*")).name.rsplit("-", 1)[1]
    assert [int(x["trainer/global_step"]) for x in history if "train/loss" in x] == list(range(6))
    csv_val = [(int(r["epoch"]), float(r["val/ssim"])) for r in _csv_rows(run_dir) if r.get("val/ssim")]
    wb_val = [(int(float(x["epoch"])), float(x["val/ssim"])) for x in history if "val/ssim" in x]
    assert wb_val == csv_val and [e for e, _ in wb_val] == [0, 1, 2], (wb_val, csv_val)
    strips = [int(x["trainer/global_step"]) for x in history if "val_images/item0/_type" in x]
    assert strips == [2, 4, 6], strips  # epoch 0's strip (saved by the killed process) replayed
