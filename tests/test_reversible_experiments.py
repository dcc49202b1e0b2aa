"""The shipped reversible experiments train without a MEL fallback (issue 16).

Each experiment runs a few optimizer steps of the real training application on the tiny
synthetic preset with the experiment's depth and damping (``num_unrolls``, ``gamma_decay``,
``state_precision``, pure MEL) and a narrow CNN (``debug=tiny``: 4 channels), and the logged
``mel/fallbacks`` must be 0 at every step: the backward pass never recomputed the chain.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from melrecon.lit import app

EPOCHS, BATCHES = 2, 2  # the tiny preset's two training items, twice: 4 optimizer steps


@pytest.mark.parametrize("experiment,depth", [("cine_rev_unroll50", 50), ("knee3d_rev_slab", 20)])
def test_reversible_experiment_trains_without_fallback(compose_cfg, experiment, depth, tmp_path):
    cfg = compose_cfg(f"+experiment={experiment}", "debug=tiny", "logger=csv", f"trainer.max_epochs={EPOCHS}",
                      f"trainer.limit_train_batches={BATCHES}", "trainer.limit_val_batches=1",
                      "model.regularizer.depth=2")  # narrower still; depth and damping are the experiment's
    assert cfg.model.num_unrolls == depth and cfg.model.memory == "mel" and cfg.model.anchor_every is None
    assert cfg.model.state_precision == "fixed"
    app.run(cfg)
    path = next(Path(cfg.paths.output_dir).rglob("metrics.csv"))
    with open(path) as f:
        rows = [r for r in csv.DictReader(f) if r.get("mel/fallbacks") not in (None, "")]
    assert len(rows) == EPOCHS * BATCHES, rows
    assert all(float(r["mel/fallbacks"]) == 0 for r in rows)
    assert all(float(r["mel/drift"]) == 0 for r in rows)  # fixed-point streams: bit-exact inverse
