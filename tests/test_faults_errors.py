"""Faults that end a run: said in one line, at start-up where they can be seen then.

- ``trainer.precision`` values melrecon cannot run (``64``, ``16-true``, ``bf16-true`` with any
  memory mode) used to end in a 170-line trace (``expected scalar type Float but found Double``
  inside the network); they are refused before data or network are built, naming the supported ones.
- A non-finite training loss used to end in an 85-line trace with the useful message (step,
  files, "the last checkpoint is intact") at its bottom; that message is now the one line.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import main_exit, one_error_line


@pytest.mark.parametrize("overrides", [["trainer.precision=64"], ["trainer.precision=bf16-true", "model.memory=checkpoint"],
                                       ["trainer.precision=16-true", "model.memory=standard"],
                                       ["trainer.precision=64-true", "model=rev_cine"]])
def test_unsupported_precision_is_refused_at_start_up_in_one_line(compose_cfg, capsys, tmp_path, overrides):
    cfg = compose_cfg("debug=tiny", "logger=none", *overrides)
    code, err = main_exit(cfg, capsys)
    assert code == 2
    raw = overrides[0].split("=", 1)[1]
    one_error_line(err, f"trainer.precision={raw} is not supported; supported: 32 (32-true), bf16-mixed, 16-mixed")
    assert not Path(cfg.paths.output_dir, "checkpoints").exists()  # refused before anything ran


@pytest.mark.parametrize("value", [32, "32", "32-true", "bf16", "bf16-mixed", "16-mixed", None])
def test_supported_precisions_pass_the_check(value):
    from melrecon.lit.module import SUPPORTED_PRECISIONS, check_precision_name

    assert check_precision_name(value) in SUPPORTED_PRECISIONS


def test_non_finite_loss_is_the_one_line(compose_cfg, capsys):
    """lr = 1e12 diverges within the first epoch: one line with the step, the files and the
    intact last checkpoint, exit 2, no traceback."""
    cfg = compose_cfg("debug=tiny", "logger=none", "module.optimizer.lr=1e12", "trainer.max_epochs=3",
                      "trainer.gradient_clip_val=null")
    code, err = main_exit(cfg, capsys)
    assert code == 2, err[-3000:]
    line = one_error_line(err, "non-finite")
    assert "training loss nan at global step" in line
    assert "files [" in line and "the last checkpoint is intact" in line
