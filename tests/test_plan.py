"""model.memory=auto (melrecon.plan): the choice fits the budget on the probe, the refusal is one
line, `melrecon plan` prints the table, PlanCheck warns on a wrong prediction, a tiny run trains."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch

from melrecon.bench import build_network, measure_step
from melrecon.lit.plan_check import PlanCheck
from melrecon.plan import NetworkSpec, candidates, plan_table
from melrecon.plan.__main__ import main as plan_main
from melrecon.physics.problems import random_sense_problem
from conftest import run_train

SPECS = [NetworkSpec("rev", (6, 8, 8), coils=2, width=8, depth=3, num_unrolls=4),
         NetworkSpec("modl", (6, 8, 8), coils=2, width=8, depth=3, num_unrolls=4)]


@pytest.mark.filterwarnings("ignore:MEL. drift")
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.family)
def test_choice_never_exceeds_the_budget_on_the_probe(spec):
    """Budgets across the range of predicted peaks: the chosen plan's measured autograd peak
    (MemoryProbe) is within the budget, and a larger budget never picks a slower plan."""
    peaks = sorted(t.prediction.peak_bytes for t in plan_table(spec, 1e15).rows)
    last_time = None
    for budget in (peaks[0] * 1.01, peaks[len(peaks) // 2], peaks[-1] * 1.01):
        table = plan_table(spec, budget)
        c = table.chosen
        assert c is not None and c.prediction.peak_bytes <= budget
        prob = random_sense_problem("slab", spec.volume, spec.coils, torch.complex64, seed=1)
        net = build_network(spec.family, "slab", spec.num_unrolls, c.plan.memory, width=spec.width, depth=spec.depth,
                            anchor_every=c.plan.anchor_every, tile=c.plan.tile, dc_chunk=c.plan.dc_chunk,
                            lipschitz=0.5)
        assert measure_step(net, prob).probe_peak_bytes <= budget
        assert last_time is None or c.relative_time <= last_time
        last_time = c.relative_time
    assert table.chosen.plan.memory == "standard" and table.chosen.plan.tile is None  # all fits: fastest


def test_candidates_and_refusal():
    spec = NetworkSpec("modl", (64, 64, 64), coils=8, width=64, depth=5, num_unrolls=10, precision="bf16-mixed")
    assert all(p.memory != "mel" for p in candidates(spec))  # MoDL + mel + 16-bit is refused at start-up
    table = plan_table(spec, 1e6)
    assert table.chosen is None
    msg = table.refusal()
    assert "\n" not in msg and "smallest predicted peak" in msg and "data.batch_size" in msg
    assert "model.regularizer.width" in msg
    rev = NetworkSpec("rev", (64, 64, 64), coils=8, width=64, depth=5, num_unrolls=10)
    assert {p.anchor_every for p in candidates(rev) if p.memory == "mel"} == {None}


def test_cli_prints_the_table_and_the_overrides(capsys):
    rc = plan_main(["--shape", "320", "256", "32", "--coils", "8", "+experiment=knee3d_rev_slab",
                    "trainer.memory_budget_gb=24"])
    out = capsys.readouterr().out
    assert rc == 0 and "<- chosen" in out and "model.memory=" in out and "budget 22.35 GiB" in out
    rc = plan_main(["--shape", "320", "256", "32", "--coils", "8", "+experiment=knee3d_rev_slab",
                    "trainer.memory_budget_gb=0.001"])
    assert rc == 1 and "no plan fits" in capsys.readouterr().out


def test_plan_check_warns_beyond_15_percent():
    table = plan_table(SPECS[0], 1e15)
    logged = []
    trainer = SimpleNamespace(loggers=[SimpleNamespace(log_metrics=lambda m, step: logged.append(m))], global_step=0)
    predicted = table.chosen.peak_gib
    for measured, warns in ((predicted * 1.05, False), (predicted * 1.5, True)):
        cb = PlanCheck(table, after_steps=2, measure=lambda t, m, v=measured: v)
        cb.on_train_start(trainer, None)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            for i in range(3):
                cb.on_train_batch_end(trainer, None, None, None, i)
        assert any("differ by more than 15%" in str(x.message) for x in w) == warns
    assert "plan/predicted_peak_gib" in logged[0] and any("plan/measured_peak_gib" in m for m in logged)


@pytest.mark.slow
def test_memory_auto_trains_end_to_end(tmp_path, data_dir):
    res = run_train(["debug=tiny", "logger=csv", "model.memory=auto", "trainer.memory_budget_gb=2"],
                    tmp_path, data_dir)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "<- chosen" in res.stdout
    metrics_csv = next((tmp_path / "logs").rglob("metrics.csv"))
    assert "plan/predicted_peak_gib" in metrics_csv.read_text()
    # the run's .hydra/config.yaml says memory=auto; reconstruct builds the network the plan chose
    from melrecon.reconstruct.cli import main as reconstruct_main

    run_dir = next(p.parent.parent for p in (tmp_path / "logs").rglob("last.ckpt"))
    scan = next((data_dir / "synthetic_cine" / "val").glob("*.h5"))
    assert reconstruct_main([str(run_dir), str(scan), "--out", str(tmp_path / "recon")]) == 0
    (tmp_path / "refused").mkdir()
    res = run_train(["debug=tiny", "logger=none", "model.memory=auto", "trainer.memory_budget_gb=0.000001"],
                    tmp_path / "refused", data_dir)
    assert res.returncode != 0 and "no plan fits" in res.stderr + res.stdout


def test_resume_accepts_the_settings_auto_chose():
    """A checkpoint records the plan's concrete memory, anchors, tile and dc_chunk; resuming with
    model.memory=auto (tile and dc_chunk null in the config) is the same run; a width change is not."""
    from omegaconf import OmegaConf

    from melrecon.lit.runinfo import config_record, run_differences

    now = OmegaConf.create({"model": {"memory": "auto", "dc_chunk": None, "num_unrolls": 2,
                                      "regularizer": {"width": 4, "tile": None}, "step_net": {"tile": None}}})
    record = config_record(now)
    record["model"].update(memory="mel", anchor_every=2, dc_chunk=4)
    record["model"]["regularizer"]["tile"] = [4, 8, 8]
    record["model"]["step_net"]["tile"] = [4, 8, 8]
    assert run_differences(record, now, ("model",)) == []
    record["model"]["regularizer"]["width"] = 8
    assert run_differences(record, now, ("model",)) == ["model.regularizer.width: 8 -> 4"]


def test_time_calibration_from_a_config(compose_cfg):
    """trainer.plan_calibrate=true: the two unit costs are measured on this machine (positive,
    marked calibrated in the table); the relative times stay >= 1 with the fastest at 1."""
    from melrecon.plan.config import spec_from_config, table_for

    cfg = compose_cfg("debug=tiny", "model.memory=auto", "trainer.plan_calibrate=true", "trainer.memory_budget_gb=1")
    spec = spec_from_config(cfg, (4, 16, 16), 2)
    assert (spec.family, spec.volume, spec.coils, spec.width) == ("modl", (4, 16, 16), 2, 4)
    table = table_for(cfg, (4, 16, 16), 2)
    assert table.costs.calibrated and table.costs.cnn > 0 and table.costs.dc > 0
    assert "calibrated on this machine" in table.format()
    assert min(r.relative_time for r in table.rows) == 1.0 and table.chosen is not None
    with pytest.raises(ValueError, match="trainer.memory_budget_gb"):
        table_for(compose_cfg("debug=tiny", "trainer.memory_budget_gb=-1"), (4, 16, 16), 2)
