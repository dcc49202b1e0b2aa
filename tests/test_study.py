"""Studies (melrecon.study): statistics against SciPy, overrides, budget checks, resume planning,
baselines on tiny problems (same masks as the networks, better than zero-filled), and every
shipped study end to end at the tiny preset."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch
from conftest import CONF

from melrecon.data.subsample import MaskSampler, cine_mask, volume_mask
from melrecon.data.synthetic import generate_dataset
from melrecon.physics.sense import SenseOperator
from melrecon.study import adapter, stats
from melrecon.study.baseline_runs import WHOLE_VOLUME
from melrecon.study.baselines import CGSense, L1Wavelet, TotalVariation, ZeroFilled, build_baseline
from melrecon.study.config import (
    RunSpec, StudyError, check_same_budget, compose_study, compose_train, format_overrides, run_specs,
)
from melrecon.study.job import SCORE_COLUMNS
from melrecon.study.runner import plan_runs

STUDIES = sorted(p.stem for p in (CONF / "study").glob("*.yaml"))


# ---------------------------------------------------------------------- statistics
def test_paired_t_interval_matches_scipy():
    rng = np.random.default_rng(0)
    a = rng.normal(30, 2, 12)
    b = a - rng.normal(0.5, 0.4, 12)
    d = stats.paired_difference(a, b)
    ref = scipy.stats.ttest_rel(a, b)
    ci = ref.confidence_interval(0.95)
    assert d.n == 12 and d.mean == pytest.approx(np.mean(a - b), rel=1e-12)
    assert (d.t_low, d.t_high) == pytest.approx((ci.low, ci.high), rel=1e-10)
    assert d.p_value == pytest.approx(ref.pvalue, rel=1e-10)
    lo, hi = scipy.stats.t.interval(0.9, 11, loc=np.mean(a - b), scale=scipy.stats.sem(a - b))
    assert stats.t_interval(a - b, 0.9) == pytest.approx((lo, hi), rel=1e-10)


def test_bootstrap_interval_is_seeded_and_near_t_for_large_normal_samples():
    d = np.random.default_rng(1).normal(0.3, 1.0, 400)
    boot = stats.bootstrap_interval(d, seed=3)
    assert boot == stats.bootstrap_interval(d, seed=3)  # reproducible
    t = stats.t_interval(d)
    assert boot[0] < d.mean() < boot[1]
    assert (boot[1] - boot[0]) == pytest.approx(t[1] - t[0], rel=0.1)  # CLT: both ~ 3.92 sd / sqrt(n)
    assert stats.bootstrap_interval([0.2, 0.2, 0.2]) == (0.2, 0.2)


def test_no_interval_below_two_volumes_and_summary_uses_sample_std():
    d = stats.paired_difference([1.0], [0.5])
    assert d.n == 1 and d.mean == 0.5 and math.isnan(d.t_low) and math.isnan(d.boot_high)
    assert "no CI" in d.fmt()
    s = stats.summarize([1.0, 2.0, 4.0])
    assert s.std == pytest.approx(np.std([1, 2, 4], ddof=1)) and s.n == 3
    assert math.isnan(stats.summarize([3.0]).std)
    with pytest.raises(ValueError, match="equal length"):
        stats.paired_difference([1.0, 2.0], [1.0])


# ---------------------------------------------------------------------- configs
def test_overrides_round_trip_through_hydras_parser():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    values = {"a.b": [4, 6], "c": None, "d": "two words", "e": True, "f": 1.0e-4, "g": "${paths.data_dir}/x",
              "+h": "plain"}
    parsed = OverridesParser.create().parse_overrides(format_overrides(values))
    got = {("+" if o.is_add() else "") + o.key_or_group: o.value() for o in parsed}
    assert got == {"a.b": [4, 6], "c": None, "d": "two words", "e": True, "f": 1.0e-4,
                   "g": "${paths.data_dir}/x", "+h": "plain"}


@pytest.mark.parametrize("name", STUDIES)
def test_every_study_composes_at_every_preset(name):
    for preset in ("tiny", "cpu", "paper"):
        cfg = compose_study(name, [f"preset={preset}"])
        assert cfg.preset.name == preset
        if cfg.kind == "training":
            specs = run_specs(cfg)
            assert specs and all(any(o.startswith("++trainer.max_steps=") for o in s.overrides) for s in specs)


def test_runs_must_share_data_and_budget():
    cfg = compose_study("knee3d_vs_2d", ["preset=tiny"])
    specs = run_specs(cfg)
    good = {s.name: compose_train(s.overrides) for s in specs}
    check_same_budget(good)
    bad = dict(good)
    bad["net2d_width"] = compose_train([*specs[1].overrides, "data.calib=3"])
    with pytest.raises(StudyError, match="differ in data"):
        check_same_budget(bad)
    bad["net2d_width"] = compose_train([*specs[1].overrides, "module.optimizer.lr=0.5"])
    with pytest.raises(StudyError, match="module.optimizer"):
        check_same_budget(bad)


def test_labels_name_what_ran_at_every_preset():
    """The tiny preset runs cine_depth's "modl20" with 5 unrolls: its label says N=5, not N=20."""
    from melrecon.study.runner import describe_runs

    cfg = compose_study("cine_depth", ["preset=tiny"])
    specs = run_specs(cfg)
    describe_runs(specs, {s.name: compose_train(s.overrides) for s in specs})
    labels = {s.name: s.label for s in specs}
    assert labels["modl20"] == "MoDL N=5" and labels["modl5"] == "MoDL N=3" and labels["rev50"] == "reversible N=10"
    assert len(set(labels.values())) == len(labels)


def test_one_selection_metric_picks_checkpoints_and_lams():
    for study in ("knee3d_vs_2d", "cine_depth"):
        cfg = compose_study(study, ["preset=tiny"])
        assert cfg.select_on == "psnr"
        model_checkpoint = compose_train(run_specs(cfg)[0].overrides).callbacks.model_checkpoint  # the budget: every run
        assert (model_checkpoint.monitor, model_checkpoint.mode) == ("val/psnr", "max")
    cfg = compose_study("knee3d_vs_2d", ["preset=tiny", "select_on=nmse"])
    ckpt = compose_train(run_specs(cfg)[0].overrides).callbacks.model_checkpoint
    assert (ckpt.monitor, ckpt.mode) == ("val/nmse", "min")


def test_study_config_errors_name_the_field():
    with pytest.raises(StudyError, match="unknown study 'nope'"):
        compose_study("nope")
    with pytest.raises(StudyError, match="max_steps"):
        compose_study("knee3d_vs_2d", ["preset=tiny", "budget.max_steps=5", "budget.val_every=2"])
    with pytest.raises(StudyError, match="reference"):
        compose_study("knee3d_vs_2d", ["preset=tiny", "reference=nothing"])
    with pytest.raises(StudyError, match="arms.equal_width"):
        compose_study("knee3d_vs_2d", ["preset=tiny", "arms.equal_width=[net3d,tv]"])
    with pytest.raises(StudyError, match="select_on"):
        compose_study("knee3d_vs_2d", ["preset=tiny", "select_on=loss"])
    with pytest.raises(StudyError, match="probe_modes"):
        compose_study("knee3d_vs_2d", ["preset=tiny", "probe_modes=[standard,fast]"])
    with pytest.raises(StudyError, match="has no preset 'long'"):
        compose_study("cine_depth", ["preset=long"])
    from melrecon.study.__main__ import main

    assert main(["nope"]) == 2
    assert main([]) == 2  # no study named


def test_melrecon_study_subcommand_lists_the_studies(capsys):
    from melrecon import cli

    assert cli.main(["study", "--list"]) == 0
    assert capsys.readouterr().out.split() == STUDIES


def test_plan_skips_finished_resumes_unfinished_and_refuses_foreign_runs(tmp_path):
    specs = [RunSpec(n, n, [f"x={n}"]) for n in ("done", "ckpt", "broken", "fresh")]
    (tmp_path / "done" / "study").mkdir(parents=True)
    (tmp_path / "done" / "study" / "done.json").write_text(json.dumps({"overrides": ["x=done"]}))
    (tmp_path / "done" / "study" / "info.json").write_text("{}")  # a finished run's study files are whole
    (tmp_path / "done" / "study" / "scores.csv").write_text(",".join(SCORE_COLUMNS) + "\n" + "v.h5" + ",1" * 5 + "\n")
    (tmp_path / "ckpt" / "checkpoints").mkdir(parents=True)
    (tmp_path / "ckpt" / "checkpoints" / "last.ckpt").write_bytes(b"")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "partial.log").write_text("killed")
    pending = {s.name: s.overrides for s in plan_runs(specs, tmp_path, "last")}
    assert set(pending) == {"ckpt", "broken", "fresh"}
    assert pending["ckpt"][-1] == f"ckpt_path={tmp_path / 'ckpt' / 'checkpoints' / 'last.ckpt'}"
    assert pending["broken"] == ["x=broken"] and not (tmp_path / "broken").exists()  # removed, restarts clean
    restart = {s.name: s.overrides for s in plan_runs(specs, tmp_path, "restart")}
    assert restart["ckpt"] == ["x=ckpt"] and not (tmp_path / "ckpt").exists()
    (tmp_path / "done" / "study" / "done.json").write_text(json.dumps({"overrides": ["x=other"]}))
    with pytest.raises(StudyError, match="other overrides"):
        plan_runs(specs, tmp_path, "last")


def test_run_list_sweeper_rejects_bad_lists(tmp_path):
    from hydra_plugins.melrecon_study.run_list_sweeper import read_runs

    path = tmp_path / "runs.json"
    path.write_text(json.dumps({"runs": [{"name": "a", "overrides": []}, {"name": "a", "overrides": []}]}))
    with pytest.raises(ValueError, match="repeated"):
        read_runs(path)
    path.write_text(json.dumps({"runs": [{"name": "a/b", "overrides": []}]}))
    with pytest.raises(ValueError, match="folder name"):
        read_runs(path)


# ---------------------------------------------------------------------- baselines
@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("baseline_data")
    files = {}
    for kind, folder in (("knee3d", "knee"), ("cine", "cine")):
        generate_dataset(root / folder, kind, preset="tiny", progress=False)
        files[kind] = sorted((root / folder / "test").glob("*.h5"))[0]
    return files


def _settings(kind: str, **over):
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"data": {"_target_": "melrecon.data.datamodule.KspaceDataModule",
                                     "kind": "volume3d" if kind == "knee3d" else "cine", "root": ".",
                                     "slab_size": 4, "accelerations": [4], "eval_acceleration": 4, "calib": 4}})
    return adapter.eval_settings(cfg, **over)


@pytest.mark.parametrize("kind", ["knee3d", "cine"])
def test_baselines_see_the_networks_masks(tiny_files, kind):
    """Baselines (whole volumes) and networks (slabs) get the mask the data layer draws from the
    file name's seed."""
    path = tiny_files[kind]
    whole = adapter.reconstruct_file(ZeroFilled(), _settings(kind, slab_size=WHOLE_VOLUME), path)
    slabs = adapter.reconstruct_file(ZeroFilled(), _settings(kind), path)
    np.testing.assert_array_equal(whole.mask, slabs.mask)
    np.testing.assert_array_equal(whole.zero_filled, slabs.zero_filled)
    accel, seed = MaskSampler([4.0], train=False, eval_acceleration=4)(path.name, "" if kind == "knee3d" else "#0")
    if kind == "knee3d":
        expected = volume_mask(whole.target.shape[1:], accel, 4, "poisson", seed)[0, 0]  # (Y, Z)
    else:  # file with a slice axis: mask (S, T, Y); slice 0
        expected = cine_mask(whole.target.shape[-3], whole.target.shape[-1], accel, 4, "vd_kt", seed)[0, :, 0]
    np.testing.assert_array_equal(whole.mask.reshape(-1, *expected.shape)[0], expected.numpy())


@pytest.mark.parametrize("kind", ["knee3d", "cine"])
def test_cg_sense_and_compressed_sensing_beat_zero_filled(tiny_files, kind):
    settings = _settings(kind, slab_size=WHOLE_VOLUME)
    data_kind = "volume3d" if kind == "knee3d" else "cine"
    psnr = {}
    for name, model in {"zf": ZeroFilled(), "cg": CGSense(1e-2, kind=data_kind),
                        "l1": L1Wavelet(data_kind, 1e-3), "tv": TotalVariation(data_kind, 1e-3)}.items():
        res = adapter.reconstruct_file(model, settings, tiny_files[kind])
        psnr[name] = adapter.volume_metrics(res.reconstruction, res.target, res.data_range)["psnr"]
        assert all(s["converged"] for s in model.solves), (name, model.solves)  # converged, and said so
    assert psnr["cg"] > psnr["zf"] + 1.0, psnr
    assert psnr["l1"] > psnr["zf"] + 1.0 and psnr["tv"] > psnr["zf"] + 1.0, psnr


def test_volume_metrics_equal_reconstructs_metrics(tiny_files):
    from melrecon.reconstruct import scan_metrics

    res = adapter.reconstruct_file(CGSense(0.0, max_iter=5), _settings("knee3d"), tiny_files["knee3d"])
    ours = adapter.volume_metrics(res.reconstruction, res.target, res.data_range)
    theirs = scan_metrics(res.reconstruction, res.zero_filled, res.target, res.data_range)
    assert ours == pytest.approx({k: theirs[k] for k in ("psnr", "ssim", "nmse")}, rel=1e-12)


def test_bad_baselines():
    with pytest.raises(ValueError, match="unknown baseline"):
        build_baseline("magic", "cine", 1.0)
    with pytest.raises(ValueError, match="kind"):
        build_baseline("tv", "radial", 1.0)


# ---------------------------------------------------------------------- studies end to end
@pytest.fixture
def study_env(monkeypatch, data_dir):
    monkeypatch.setenv("MELRECON_DATA_DIR", str(data_dir))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONWARNINGS", "ignore")


def _check_training_outputs(out: Path, methods: set[str]) -> None:
    import csv

    rows = list(csv.DictReader(open(out / "results.csv")))
    volumes = {r["volume"] for r in rows}
    assert {r["method"] for r in rows} == methods
    assert len(rows) == len(methods) * len(volumes) * 3  # method x volume x metric
    assert all(math.isfinite(float(r["value"])) for r in rows)
    text = (out / "summary.md").read_text()
    assert "## Comparisons" in text and "Δ PSNR" in text
    for png in ("metrics_by_method.png", "panel.png"):
        assert (out / png).stat().st_size > 1000, png


@pytest.mark.slow
def test_knee3d_vs_2d_tiny_end_to_end_and_rerun_skips(study_env, tmp_path, caplog, monkeypatch):
    from melrecon.study.runner import run_study

    out = run_study("knee3d_vs_2d", ["preset=tiny", f"out_dir={tmp_path / 'knee'}", "launcher.parallel=2"])
    _check_training_outputs(out, {"net3d", "net2d_width", "net2d_params", "zero_filled", "cg_sense", "l1_wavelet", "tv"})
    plan = json.loads((out / "plan.json").read_text())
    assert plan["net3d"]["n_params"] > plan["net2d_width"]["n_params"] > 0  # equal width: 3D holds ~3x the weights
    text = (out / "summary.md").read_text()
    assert "| 3D MoDL 4x3 N=2 | MoDL, N=2, 3D CNN 4x3, mel, whole volumes" in text
    # both arms, 3D - 2D
    assert "| equal_width | 3D MoDL 4x3 N=2 | 2D MoDL 4x3 N=2 |" in text
    assert "| equal_params | 3D MoDL 4x3 N=2 | 2D MoDL 7x3 N=2 |" in text
    # quality at equal memory: every network in every mode, the sentence, the plot
    for label in ("3D MoDL 4x3 N=2", "2D MoDL 4x3 N=2", "2D MoDL 7x3 N=2"):
        for mode in ("standard", "checkpoint", "mel"):
            assert f"| {label} | {mode} |" in text, (label, mode)
    assert "## Quality at equal memory" in text and ("MEL trains" in text or "MEL buys no quality" in text)
    assert "## Convergence" in text and "checkpoint chosen on `val/psnr`" in text
    for png in ("psnr_vs_memory.png", "validation_curves.png"):
        assert (out / png).stat().st_size > 1000, png
    memory = json.loads((out / "runs" / "net3d" / "study" / "memory.json").read_text())["modes"]
    assert set(memory) == {"standard", "checkpoint", "mel"} and all(m["probe_step_mib"] > 0 for m in memory.values())
    markers = {p: p.stat().st_mtime_ns for p in out.rglob("done.json")}
    assert len(markers) == 7
    results = (out / "results.csv").read_text()
    memory_json = out / "runs" / "net2d_width" / "study" / "memory.json"
    memory_json.unlink()  # a run finished before its modes were measured: measured again, not retrained
    # rerun with W&B on (offline): nothing is retrained (the logger is not part of a run's
    # identity), the report is rebuilt and its tables go to W&B
    monkeypatch.setenv("WANDB_MODE", "offline")
    with caplog.at_level("INFO", logger="melrecon.study"):
        run_study("knee3d_vs_2d", ["preset=tiny", f"out_dir={tmp_path / 'knee'}", "wandb.enabled=true"])
    assert "launching" not in caplog.text and caplog.text.count("finished, skipped") == 7
    assert {p: p.stat().st_mtime_ns for p in out.rglob("done.json")} == markers
    assert (out / "results.csv").read_text() == results
    assert set(json.loads(memory_json.read_text())["modes"]) == {"standard", "checkpoint", "mel"}
    tables = sorted(out.glob("wandb/offline-run-*/files/media/table/study/summary_*.table.json"))
    assert len(tables) == 1
    table = json.loads(tables[0].read_text())
    assert table["columns"][:2] == ["method", "label"] and len(table["data"]) == 7


@pytest.mark.slow
def test_cine_depth_tiny_end_to_end(study_env, tmp_path):
    from melrecon.study.runner import run_study

    out = run_study("cine_depth", ["preset=tiny", f"out_dir={tmp_path / 'cine'}"])
    _check_training_outputs(out, {"modl2", "modl5", "modl10", "modl20", "rev10", "rev20", "rev50",
                                  "zero_filled", "cg_sense", "tv"})
    for png in ("psnr_vs_unrolls.png", "cost_vs_unrolls.png", "psnr_vs_memory.png"):
        assert (out / png).stat().st_size > 1000, png
    text = (out / "summary.md").read_text()
    # labels say what ran: the tiny preset runs "modl20" with 5 unrolls, "rev50" with 10
    assert "| MoDL N=5 | MoDL, N=5," in text and "N=20" not in text and "N=50" not in text
    assert "## Quality at equal memory" in text and "| reversible N=10 | mel |" in text


@pytest.mark.slow
def test_memory_modes_tiny_shows_flat_reversible_mel_and_linear_standard(study_env, tmp_path):
    from melrecon.study.runner import run_study

    out = run_study("memory_modes", ["preset=tiny", f"out_dir={tmp_path / 'mem'}", "memory.unrolls=[1,100]"])
    text = (out / "summary.md").read_text()
    assert "rev cine mel:" in text and "flat within 5%" in text and "NOT flat" not in text
    assert "rev cine standard:" in text and "(linear in N)" in text and "NOT linear" not in text
    assert "modl cine mel:" in text and "anchors stored at N = 100" in text
    # the planner's predictions beside the measurements: the memory model within 10% of the probe
    assert "rev cine: memory model vs probe" in text and "modl cine: memory model vs probe" in text
    assert "NOT within 10%" not in text and "model MiB" in text
    assert (out / "memory_modes.png").stat().st_size > 1000


# ---------------------------------------------------------------------- equal memory, convergence
def _net(name, psnrs, val, std_mib, mel_mib):
    from melrecon.study.results import MethodResult

    scores = {f"v{i}": {"psnr": p, "ssim": 0.9, "nmse": 0.01} for i, p in enumerate(psnrs)}
    modes = {"standard": {"probe_step_mib": std_mib, "cuda_step_mib": math.nan},
             "mel": {"probe_step_mib": mel_mib, "cuda_step_mib": math.nan}}
    return MethodResult(name, name.upper(), "network", {}, {"val_monitor": val, "memory_modes": modes}, scores)


def test_equal_memory_sentence_comes_from_the_data_and_selects_on_validation():
    from melrecon.study import equal_memory

    small = _net("small", [30.0, 31.0, 32.0, 31.5], val=30.0, std_mib=100.0, mel_mib=40.0)
    big = _net("big", [31.0, 31.8, 33.1, 32.2], val=31.0, std_mib=300.0, mel_mib=90.0)
    # "lucky" is best on test but worst on validation: never chosen
    lucky = _net("lucky", [40.0, 40.0, 40.0, 40.0], val=10.0, std_mib=50.0, mel_mib=20.0)
    volumes = ["v0", "v1", "v2", "v3"]
    found = equal_memory.budgets([small, big, lucky], volumes)
    assert [b.at.name for b in found] == ["lucky", "small", "big"]
    at_small = found[1]
    assert at_small.standard.name == "small" and at_small.mel.name == "big"  # big's MEL step (90) fits in 100
    d = np.array([31.0, 31.8, 33.1, 32.2]) - np.array([30.0, 31.0, 32.0, 31.5])
    lo, hi = scipy.stats.t.interval(0.95, 3, loc=d.mean(), scale=scipy.stats.sem(d))
    assert at_small.diff.mean == pytest.approx(d.mean()) and (at_small.diff.t_low, at_small.diff.t_high) == pytest.approx((lo, hi))
    # the sentence: the smallest budget at which MEL fits another network; chosen on validation,
    # so at LUCKY's budget MEL picks SMALL although LUCKY scores higher on test: a negative result
    text = equal_memory.claim(found)
    assert text.startswith("Within the memory of standard backprop at LUCKY (50 MiB per training step), MEL trains SMALL (40 MiB)")
    assert "-8.88 dB [" in text and "over LUCKY" in text
    text = equal_memory.claim(found[1:])
    assert text.startswith("Within the memory of standard backprop at SMALL (100 MiB per training step), MEL trains BIG (90 MiB)")
    assert f"{d.mean():+.2f} dB [{lo:+.2f}, {hi:+.2f}]" in text and "over SMALL" in text
    # MEL's steps no smaller than standard's: no network gains, and the sentence says so
    flat = [_net("a", [30.0] * 4, 30.0, 100.0, 100.0), _net("b", [31.0] * 4, 31.0, 300.0, 300.0)]
    assert "MEL buys no quality" in equal_memory.claim(equal_memory.budgets(flat, volumes))


def test_last_quarter_gain_and_validation_curve_of_a_resumed_run(tmp_path):
    from melrecon.study.convergence import last_quarter_gain, validation_curve

    for version, rows in (("version_0", [(9, 20.0), (19, 21.0), (29, 21.5)]), ("version_1", [(29, 21.6), (39, 21.65)])):
        d = tmp_path / "csv" / version
        d.mkdir(parents=True)
        (d / "metrics.csv").write_text("step,train/loss,val/psnr\n5,0.1,\n"
                                       + "".join(f"{s},,{v}\n" for s, v in rows))
    curve = validation_curve(tmp_path)
    assert curve == [(9, 20.0), (19, 21.0), (29, 21.6), (39, 21.65)]  # the resumed version wins at step 29
    p = last_quarter_gain(curve)
    assert p.gain == pytest.approx(21.65 - 21.6) and p.reached is True
    rising = last_quarter_gain([(10, 20.0), (20, 21.0), (30, 22.0), (40, 23.0)])
    assert rising.gain == pytest.approx(1.0) and rising.reached is False
    assert last_quarter_gain([(10, 20.0)]).reached is None


def test_long_preset_trains_networks_of_32_channels_and_5_convs_on_whole_volumes():
    cfg = compose_study("knee3d_vs_2d", ["preset=long", "data=brain3d"])
    b = cfg.budget
    assert b.max_steps % (4 * b.val_every) == 0  # a validation starts the last quarter
    assert cfg.launcher.parallel == 2 and cfg.select_on == "psnr"
    assert {tuple(v) for v in cfg.arms.values()} == {("net3d", "net2d_width"), ("net3d", "net2d_params")}
    runs = {s.name: compose_train(s.overrides) for s in run_specs(cfg)}
    check_same_budget(runs)
    reg = {n: c.model.regularizer for n, c in runs.items()}
    assert all(r.width >= 32 and r.depth >= 5 for r in reg.values())
    assert reg["net3d"].conv_dim == 3 and reg["net2d_width"].conv_dim == reg["net2d_params"].conv_dim == 2
    assert reg["net3d"].width == reg["net2d_width"].width < reg["net2d_params"].width
    assert len({c.model.num_unrolls for c in runs.values()}) == 1
    assert all(c.data.slab_size is None and c.data.kind == "volume3d" for c in runs.values())
    assert all(str(c.data.root).endswith("brain3d") for c in runs.values())
