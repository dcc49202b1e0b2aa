"""The composed config is checked (types, ranges, choices) before any data or model is built:
one line, exit status 2, and the run's log says why it ended."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
from conftest import CONF, HANG_GUARD_S, ROOT

from melrecon import config_schema
from melrecon.config_schema import check_overrides, config_errors

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def test_choices_are_the_codes_own():
    from melrecon.data import datamodule, subsample
    from melrecon.mel import MEMORY_MODES
    from melrecon.models import reversible

    assert config_schema.MEMORY_MODES == (*MEMORY_MODES, "auto")  # auto: the planner's choice (melrecon.plan)
    assert set(config_schema.DATA_KINDS) == set(datamodule._SYNTHETIC_KIND)
    assert config_schema.MASK_TYPES == {"volume3d": subsample.VOLUME_MASKS, "cine": subsample.CINE_MASKS}
    assert config_schema.STATE_PRECISIONS == reversible.STATE_PRECISIONS


@pytest.mark.parametrize("overrides", [[], ["debug=tiny"], ["debug=smoke"], ["trainer=gpu"], ["module=cosine"]]
                         + [[f"+experiment={e}"] for e in EXPERIMENTS] + [[f"+experiment={e}", "debug=cpu"]
                                                                        for e in EXPERIMENTS])
def test_every_shipped_config_passes(compose_cfg, overrides):
    assert config_errors(compose_cfg(*overrides)) == []


@pytest.mark.parametrize("override, key", [
    ("model.memory=fast", "model.memory must be one of standard, checkpoint, mel, auto, got 'fast'"),
    ("data.batch_size=-1", "data.batch_size must be an integer >= 1, got -1"),
    ("data.batch_size=two", "data.batch_size must be an integer >= 1, got 'two'"),
    ("model.num_unrolls=2.5", "model.num_unrolls must be an integer >= 1, got 2.5"),
    ("data.accelerations=[1,4]", "data.accelerations must be a non-empty list of numbers > 1"),
    ("data.mask_type=poisson", "data.mask_type must be one of vd_kt, interleaved_kt for cine data"),
    ("trainer.precision=17", "trainer.precision must be one of"),
    ("trainer.max_epochs=-5", "trainer.max_epochs must be -1 (no limit) or an integer >= 0"),
    ("+experiment=does_not_exist", "Could not find 'experiment/does_not_exist'; choose from: " + ", ".join(EXPERIMENTS)),
    ("model.foo=1", "Could not override 'model.foo'"),
])
def test_a_wrong_option_is_one_line_and_exit_2(capsys, override, key):
    with pytest.raises(SystemExit) as done:
        check_overrides(CONF, "train", [override])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("melrecon: error: ") and key in err, err


def test_every_wrong_option_is_named_at_once(compose_cfg):
    errors = config_errors(compose_cfg("model.memory=fast", "data.num_workers=-1"))
    assert [e.split()[0] for e in errors] == ["model.memory", "data.num_workers"]


def test_train_py_refuses_before_making_a_run_folder_or_data(tmp_path):
    """The whole program: one line on stderr, status 2, no run folder, no generated data."""
    env = {"PATH": "", "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1",
           "MELRECON_DATA_DIR": str(tmp_path / "data"), "MELRECON_ROOT": str(tmp_path)}
    res = subprocess.run([sys.executable, str(ROOT / "train.py"), "model.memory=fast", "data.batch_size=-1"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert res.returncode == 2
    assert res.stderr == ("melrecon: error: model.memory must be one of standard, checkpoint, mel, auto, got 'fast'; "
                          "data.batch_size must be an integer >= 1, got -1\n")
    assert res.stdout == "" and sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_job_stops_before_building_and_its_log_says_why(compose_cfg, tmp_path, monkeypatch, capsys):
    """Inside a job (multirun, sweep): checked first, nothing instantiated, the error in the log file."""
    import hydra

    from melrecon.lit import app

    def built(*a, **k):
        raise AssertionError("something was instantiated before the config was checked")

    monkeypatch.setattr(hydra.utils, "instantiate", built)
    log_file = tmp_path / "train.log"
    handler = logging.FileHandler(log_file)
    logging.getLogger().addHandler(handler)
    try:
        with pytest.raises(SystemExit) as done:
            app.main(compose_cfg("model.memory=fast"))
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    assert done.value.code == 2
    assert "melrecon: error: model.memory must be one of" in capsys.readouterr().err
    assert "error: model.memory must be one of standard, checkpoint, mel, auto, got 'fast'" in log_file.read_text()


@pytest.mark.parametrize("argv", [["++paths.output_dir=/tmp/x"], ["-m", "paths.output_dir=/tmp/x", "seed=1,2"]])
def test_output_dir_alone_is_refused_hydra_run_dir_moves_the_run(capsys, argv):
    with pytest.raises(SystemExit) as done:
        check_overrides(CONF, "train", argv)
    err = capsys.readouterr().err
    assert done.value.code == 2 and err.count("\n") == 1 and "hydra.run.dir=DIR" in err
    check_overrides(CONF, "train", ["hydra.run.dir=/tmp/x"])  # accepted
