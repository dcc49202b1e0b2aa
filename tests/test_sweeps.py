"""Multirun and Optuna sweeps through train.py (subprocesses, tiny synthetic preset)."""


import pytest
from conftest import run_train

FAST = ["debug=tiny", "trainer.limit_train_batches=1", "logger=csv", "callbacks=none"]


@pytest.mark.slow
def test_two_job_multirun(tmp_path, data_dir):
    sweep = tmp_path / "multi"
    res = run_train(["-m", *FAST, "logger=wandb_csv", "model.num_unrolls=1,2",
                     f"hydra.sweep.dir={sweep}"], tmp_path, data_dir, env={"WANDB_MODE": "offline"})
    assert res.returncode == 0, res.stderr[-3000:]
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert jobs == ["0", "1"]
    for j in jobs:
        assert list((sweep / j / "csv").rglob("metrics.csv")), f"job {j} wrote no metrics"
        overrides = (sweep / j / ".hydra" / "overrides.yaml").read_text()
        assert f"model.num_unrolls={int(j) + 1}" in overrides
    # every job has its own W&B run (the previous one was finished, not reused)
    runs = [p.name.rsplit("-", 1)[1] for j in jobs for p in (sweep / j / "wandb").glob("offline-run-*")]
    assert len(runs) == 2 and len(set(runs)) == 2, runs


@pytest.mark.slow
def test_optuna_two_trials_persist_and_resume(tmp_path, data_dir):
    import optuna

    db = tmp_path / "study.db"
    args = ["hparams_search=cine_optuna", *FAST, "hydra.sweeper.n_trials=2",
            "hydra.sweeper.sampler.n_startup_trials=2", f"hydra.sweeper.storage=sqlite:///{db}",
            "hydra.sweeper.study_name=t", f"hydra.sweep.dir={tmp_path / 'opt1'}"]
    res = run_train(args, tmp_path, data_dir)
    assert res.returncode == 0, res.stderr[-3000:]
    study = optuna.load_study(study_name="t", storage=f"sqlite:///{db}")
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 2
    assert all(0.0 < t.value <= 1.0 for t in done)  # val/ssim_best
    assert {"module.optimizer.lr", "model.regularizer.width", "model.dc.lam_init"} <= set(done[0].params)
    # the same command continues the stored study
    args[-1] = f"hydra.sweep.dir={tmp_path / 'opt2'}"
    args[args.index("hydra.sweeper.n_trials=2")] = "hydra.sweeper.n_trials=1"
    res = run_train(args, tmp_path, data_dir)
    assert res.returncode == 0, res.stderr[-3000:]
    study = optuna.load_study(study_name="t", storage=f"sqlite:///{db}")
    assert len([t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]) == 3
