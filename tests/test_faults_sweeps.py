"""A continued Optuna study with another fixed config (another task) used to append its trials to
the study and report their "best value" beside trials of the original task. (The command-line
case, exit status 2 and no trial added, is in test_faults_runs.py's two-invocation test.)"""

from __future__ import annotations

import pytest
from conftest import CONF


def _compose(*overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides), return_hydra_config=True)


def _check(tmp_path, *overrides: str, arguments=()) -> None:
    from melrecon.lit.sweep import check_study_config

    cfg = _compose("hparams_search=cine_optuna", f"paths.log_dir={tmp_path}", *overrides)
    sw = cfg.hydra.sweeper
    check_study_config(cfg, list(arguments), sw.params, f"sqlite:///{tmp_path / 's.db'}", "s", ["maximize"])


def test_continuation_with_another_fixed_config_is_refused_naming_the_keys(tmp_path):
    import optuna

    from melrecon.lit.sweep import FIXED_CONFIG_ATTR, StudyConfigError

    _check(tmp_path)  # a new study records its fixed config
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 's.db'}")
    fixed = study.user_attrs[FIXED_CONFIG_ATTR]
    assert "data.accelerations" in fixed and "module.optimizer.lr" not in fixed  # lr is swept
    # the same command again, logging elsewhere, with a swept key on the command line: a continuation
    _check(tmp_path, "logger=none", arguments=["model.dc.lam_init=interval(0.1,0.2)"])
    with pytest.raises(StudyConfigError, match=r"data\.accelerations \(\[4, 6, 8\] -> \[2\]\)") as err:
        _check(tmp_path, "data.accelerations=[2]", "model.regularizer.depth=4")
    assert "model.regularizer.depth (3 -> 4)" in str(err.value)
    assert "study_name" in str(err.value) and "\n" not in str(err.value)
