"""The GPU check kit (benchmarks/gpu/) on CPU: the whole run at tiny sizes, and its checks one by one.

The end-to-end test runs ``run.sh OUT --device cpu --tiny`` as the GPU machine would run the
paper-scale one; the others feed the kit's pieces inputs whose answer is known (a wheel set with
a missing requirement, a metrics.csv without the CUDA figure, a benchmark that runs out of memory).
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
KIT = ROOT / "benchmarks" / "gpu"
sys.path.insert(0, str(KIT))

import bench  # noqa: E402
import depcheck  # noqa: E402
import plan_step  # noqa: E402
import train_runs  # noqa: E402
from profiles import BENCH, BF16_EXPERIMENTS, PLAN  # noqa: E402
from helpers import read_csv  # noqa: E402
from conftest import HANG_GUARD_S  # noqa: E402

from melrecon.bench import FAMILIES, build_network, grad_rel_err  # noqa: E402


# ------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_run_sh_cpu_tiny_writes_csv_log_and_table(tmp_path):
    out = tmp_path / "out"
    # the kit's step limits and time budgets are for the GPU machine; on a loaded CPU the tiny
    # rehearsal may take many times its usual 2 minutes, so they are lifted: what ran is checked
    limits = {k: str(HANG_GUARD_S) for k in ("KIT_T_TESTS", "KIT_T_BENCH", "KIT_T_TRAIN", "KIT_T_BF16", "KIT_T_PLAN", "KIT_PER_RUN_S")}
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", TMPDIR=str(tmp_path), **limits)
    proc = subprocess.run(["bash", str(KIT / "run.sh"), str(out), "--device", "cpu", "--tiny", "--wheels", "none"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=6 * HANG_GUARD_S)
    log = (out / "run.log").read_text()
    assert proc.stdout.strip().endswith(log.strip().splitlines()[-1])  # the log is what was printed
    rows = read_csv(out / "results.csv")
    by_step: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        by_step.setdefault(r["step"], []).append(r)

    kit = {r["case"]: r["status"] for r in by_step["kit"]}
    assert list(kit) == ["env", "tests", "bench", "train", "bf16", "plan"], kit
    assert all(kit[s] == "ok" for s in ("env", "tests", "bench", "train", "plan")), (kit, log[-3000:])

    tests = by_step["tests"]
    assert any("test_cuda.py::" in t["case"] for t in tests) and any("test_sense_on_cuda" in t["case"] for t in tests)
    assert {t["status"] for t in tests} == ({"skipped"} if not torch.cuda.is_available() else {"passed"})

    prof = BENCH["tiny"]
    cases = by_step["bench"]
    want = {(f, k, str(n), m) for f, ns in prof["unrolls"].items() for n in ns for k in ("slab", "cine")
            for m in ("standard", "checkpoint", "mel")}
    assert {(r["family"], r["kind"], r["N"], r["mode"]) for r in cases} == want
    assert all(r["status"] == "ok" and float(r["step_ms"]) > 0 and float(r["probe_peak_MiB"]) > 0 for r in cases)
    assert all(float(r["grad_rel_err"]) <= 1e-4 for r in cases)
    assert all(r["cuda_peak_MiB"] == "" for r in cases)  # CPU: no allocator figure, never a made-up one

    train = by_step["train"]
    experiments = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))
    fp32 = [r for r in train if r["precision"] == "32"]
    assert sorted(r["experiment"] for r in fp32) == experiments
    for r in fp32:
        assert r["status"] == "ok" and r["peak_mem_source"] == "rss" and r["mem_check"] == "pass", r
        assert int(r["train_steps"]) >= 1 and r["wandb_offline"] in ("yes", "")
    bf16 = [r for r in train if r["precision"] == "bf16-mixed"]
    assert sorted(r["experiment"] for r in bf16) == sorted(BF16_EXPERIMENTS["tiny"])
    # the memory figure must hold; the loss may not: PyTorch 2.13's CPU bf16 conv3d weight gradient
    # is garbage for strided inputs (tests/test_cuda.py), which can make a tiny CPU run's loss NaN
    assert all(r["mem_check"] == "pass" and r["status"] in ("ok", "check failed") for r in bf16), bf16

    md = (out / "summary.md").read_text()
    plan = by_step["plan"]
    assert len(plan) == len(PLAN["tiny"]) and all(r["status"] == "ok" for r in plan)
    # the probe figures of the plan step agree with the model within 10% (CPU: no allocator figure)
    assert all(abs(float(r["model_probe_MiB"]) / float(r["probe_MiB"]) - 1) <= 0.10 for r in plan)
    assert all(r["cuda_max_alloc_MiB"] == "" and r["peak_ratio"] == "" for r in plan)
    for heading in ("## Steps", "## CUDA tests", "## Memory benchmark", "## Training runs", "## Memory plan"):
        assert heading in md
    assert "| rev | slab | 3 |" in md and "| knee3d_slab | 32 | ok |" in md
    assert (out / "env.json").is_file() and "=== bench: ok" in log


@pytest.mark.slow
def test_a_step_past_its_limit_is_cut_and_the_rest_still_run(tmp_path):
    """bench gets 2 s (its imports alone take longer): it is killed, recorded as a timeout, and
    train, bf16 and summary still run; their budgets for runs are 0 s, so they start none (their
    step limits stay out of reach of a slow machine)."""
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", TMPDIR=str(tmp_path), KIT_T_BENCH="2",
               KIT_B_TRAIN="0", KIT_B_BF16="0",
               **{k: str(HANG_GUARD_S) for k in ("KIT_T_TESTS", "KIT_T_TRAIN", "KIT_T_BF16", "KIT_T_PLAN")})
    proc = subprocess.run(["bash", str(KIT / "run.sh"), str(out), "--device", "cpu", "--tiny", "--wheels", "none"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=2 * HANG_GUARD_S)
    assert proc.returncode == 1
    kit = {r["case"]: r for r in read_csv(out / "results.csv") if r["step"] == "kit"}
    assert kit["bench"]["status"] == "timeout" and kit["bench"]["rc"] == "124"
    assert float(kit["bench"]["wall_s"]) >= 2  # it ran to its limit; rc 124: TERM ended it (137 would be KILL)
    assert kit["train"]["status"] == "ok" and kit["bf16"]["status"] == "ok"
    train = read_csv(out / "train.csv")
    n_experiments = len(list((ROOT / "conf" / "experiment").glob("*.yaml")))  # all, then the bf16 pair
    assert len(train) == n_experiments + 2 and {r["status"] for r in train} == {"skipped"}
    assert "| bench | timeout | 124 |" in (out / "summary.md").read_text()
    assert "steps not ok: bench" in (out / "run.log").read_text()


def test_run_sh_rejects_bad_arguments(tmp_path):
    def run(*args):
        return subprocess.run(["bash", str(KIT / "run.sh"), *args], capture_output=True, text=True, timeout=HANG_GUARD_S)

    p = run()
    assert p.returncode == 2 and "OUT_DIR" in p.stderr
    p = run(str(tmp_path / "o"), "--device", "tpu")
    assert p.returncode == 2 and "--device must be cuda or cpu, got 'tpu'" in p.stderr
    p = run(str(tmp_path / "o"), "--fast")
    assert p.returncode == 2 and "unknown option --fast" in p.stderr


# ------------------------------------------------------------------------------ depcheck
def fake_wheel(folder: Path, name: str, version: str, requires: list[str]) -> Path:
    path = folder / f"{name}-{version}-py3-none-any.whl"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{name}-{version}.dist-info/METADATA", meta)
    return path


def test_depcheck_finds_missing_and_mismatched_requirements(tmp_path):
    env = depcheck.target_environment("3.12.3")
    fake_wheel(tmp_path, "alpha", "1.0", ["beta>=2", "numpy", "gamma; python_version < '3.10'",
                                          "delta; extra == 'docs'"])
    fake_wheel(tmp_path, "beta", "2.5", [])
    assert depcheck.check(tmp_path, env, {"numpy"}) == ([], [])  # markers: gamma, delta not needed

    problems, _ = depcheck.check(tmp_path, env, set())
    assert problems == ["alpha-1.0-py3-none-any.whl: needs numpy, which is neither a wheel here nor preinstalled"]

    fake_wheel(tmp_path, "omega", "1.0", ["beta<2"])
    problems, warnings = depcheck.check(tmp_path, env, {"numpy", "beta"})
    assert problems == ["omega-1.0-py3-none-any.whl: needs beta<2, but the wheel version is 2.5"]
    assert warnings == ["beta-2.5-py3-none-any.whl: beta is preinstalled there; the wheel shadows that copy"]

    fake_wheel(tmp_path, "beta", "3.0", [])
    assert any("a second wheel of beta" in p for p in depcheck.check(tmp_path, env, {"numpy"})[0])


def test_depcheck_installed_mode_reads_this_interpreter(tmp_path):
    fake_wheel(tmp_path, "alpha", "1.0", [f"pytest=={pytest.__version__}", "torch<1"])
    problems, _ = depcheck.check(tmp_path, dict(depcheck.default_environment(), extra=""), None)
    assert problems == [f"alpha-1.0-py3-none-any.whl: needs torch<1, but the installed version is "
                        f"{depcheck.installed_version('torch')}"]


# ------------------------------------------------------------------------------ train/peak_mem_gib
def write_metrics(run_dir: Path, rows: list[dict[str, object]]) -> None:
    path = run_dir / "csv" / "version_0" / "metrics.csv"
    path.parent.mkdir(parents=True)
    keys = sorted({k for r in rows for k in r})
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def test_peak_mem_check_tells_the_cuda_figure_from_rss(tmp_path):
    step = {"train/loss": 0.5, "train/step_time_s": 0.1}
    write_metrics(tmp_path / "cuda", [{**step, "train/peak_mem_gib": 3.2, "train/peak_mem_reserved_gib": 4.0},
                                      {**step, "train/peak_mem_gib": 3.3, "train/peak_mem_reserved_gib": 4.0}])
    m = train_runs.metrics_of(tmp_path / "cuda", "cuda", 139.8)
    assert (m["mem_check"], m["peak_mem_source"], m["peak_mem_gib"], m["train_steps"]) == ("pass", "cuda", 3.3, 2)

    write_metrics(tmp_path / "rss", [{**step, "train/peak_mem_gib": 2.1}])  # the CPU branch on a GPU run
    m = train_runs.metrics_of(tmp_path / "rss", "cuda", 139.8)
    assert m["mem_check"] == "fail" and "RSS" in m["note"]
    assert train_runs.metrics_of(tmp_path / "rss", "cpu", None)["mem_check"] == "pass"

    write_metrics(tmp_path / "bad", [{**step, "train/peak_mem_gib": 5.0, "train/peak_mem_reserved_gib": 4.0},
                                     {"train/loss": float("nan")}])
    m = train_runs.metrics_of(tmp_path / "bad", "cuda", 139.8)
    assert (m["mem_check"], m["loss_check"]) == ("fail", "fail")
    assert "not in (0, reserved peak]" in m["note"] and "non-finite" in m["note"]


# ------------------------------------------------------------------------------ bench OOM
def test_bench_records_oom_and_skips_standard_at_larger_n(tmp_path, monkeypatch):
    """standard runs out of memory at N=3: recorded as oom, skipped at N=5, other modes go on
    (without a gradient reference there)."""

    def fake_case(family, kind, n, mode, problem, opts, warmup, steps, case_cap_s):
        if mode == "standard" and n >= 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        g = [torch.full((2,), 1.0 + (1e-6 if mode == "mel" else 0.0), dtype=torch.float64)]
        return {"family": family, "kind": kind, "N": n, "mode": mode, "status": "ok", "step_ms": 1.0}, g

    monkeypatch.setattr(bench, "measure_case", fake_case)
    monkeypatch.setattr(bench, "_release", lambda device: None)  # nothing to free (its gc.collect: ~0.7 s a case)
    monkeypatch.setitem(bench.BENCH, "tiny", dict(BENCH["tiny"], unrolls={"modl": (1, 3, 5), "rev": (1,)}))
    out = tmp_path / "b.csv"
    rows = bench.run(bench.parse_args(["--device", "cpu", "--profile", "tiny", "--csv", str(out),
                                       "--families", "modl", "--kinds", "cine"]))
    got = {(r["N"], r["mode"]): (r["status"], r.get("grad_rel_err")) for r in rows}
    assert got[1, "standard"] == ("ok", 0.0) and got[1, "mel"][1] == pytest.approx(1e-6)
    assert got[3, "standard"][0] == "oom" and got[5, "standard"][0] == "skipped"
    assert got[3, "mel"] == ("ok", None) and got[5, "checkpoint"] == ("ok", None)
    csv_rows = read_csv(out)
    assert [r["status"] for r in csv_rows if r["mode"] == "standard"] == ["ok", "oom", "skipped"]
    assert "standard out of memory at N=3" in [r for r in csv_rows if r["N"] == "5"][0]["note"]


# ------------------------------------------------------------------------------ bench for real
def test_bench_measures_real_steps_on_cpu(tmp_path, monkeypatch):
    """bench's own networks, problems and steps (no fakes) at N=2: MEL's gradients follow standard's
    and a CPU run reports no allocator figure."""
    monkeypatch.setitem(bench.BENCH, "tiny", dict(BENCH["tiny"], unrolls={"modl": (2,), "rev": (2,)}))
    rows = bench.run(bench.parse_args(["--device", "cpu", "--profile", "tiny", "--csv", str(tmp_path / "b.csv"),
                                       "--kinds", "cine", "--modes", "standard", "mel", "--warmup", "0",
                                       "--steps", "1"]))
    assert [(r["family"], r["mode"]) for r in rows] == [("modl", "standard"), ("modl", "mel"),
                                                         ("rev", "standard"), ("rev", "mel")]
    for r in rows:
        assert r["status"] == "ok" and r["step_ms"] > 0 and r["probe_peak_MiB"] > 0, r
        assert r["cuda_peak_MiB"] is None and r["cuda_max_alloc_MiB"] is None
        assert r["grad_rel_err"] <= 1e-4, r


def test_bench_networks_share_their_start_and_reject_unknown_names():
    for family in FAMILIES:
        nets = [build_network(family, "slab", 3, mode, width=4, depth=2) for mode in ("standard", "checkpoint", "mel")]
        first = nets[0].state_dict()
        for net in nets[1:]:  # one seed: every memory mode starts from the same weights
            assert all(torch.equal(first[k], v) for k, v in net.state_dict().items())
    with pytest.raises(ValueError, match=r"family must be one of \('modl', 'rev'\), got 'unet'"):
        build_network("unet", "slab", 3, "mel")
    with pytest.raises(ValueError, match=r"layout must be one of \('slab', 'cine'\), got '2d'"):
        build_network("modl", "2d", 3, "mel")


def test_grad_rel_err_is_the_worst_tensor_and_absolute_against_zero():
    ref = [torch.tensor([3.0, 4.0]), torch.zeros(2)]
    assert grad_rel_err([torch.tensor([3.0, 4.5]), torch.zeros(2)], ref) == pytest.approx(0.1)  # 0.5 / 5
    assert grad_rel_err([torch.tensor([3.0, 4.0]), torch.tensor([0.0, 0.25])], ref) == pytest.approx(0.25)
    with pytest.raises(ValueError):  # a missing gradient is an error, not a shorter comparison
        grad_rel_err(ref[:1], ref)


# ------------------------------------------------------------------------------ plan step
def test_plan_step_compares_model_and_probe_on_cpu(tmp_path, monkeypatch):
    """plan_step.py's own networks and steps (no fakes), two of its tiny cases: the model's probe
    figure within 10% of the measured one, no allocator figure on CPU, a failing case recorded."""
    monkeypatch.setitem(plan_step.PLAN, "tiny", [PLAN["tiny"][1], PLAN["tiny"][-1], ("modl", "slab", 2, "bogus", None, None)])
    rows = plan_step.run(plan_step.parse_args(["--device", "cpu", "--profile", "tiny", "--csv", str(tmp_path / "p.csv")]))
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == 2 and rows[-1]["status"] == "error" and "bogus" in rows[-1]["note"]
    assert all(abs(r["model_probe_MiB"] / r["probe_MiB"] - 1) <= 0.10 and "peak_ratio" not in r for r in ok)
    assert all(r["model_rel_time"] > 1 for r in ok)  # mel and tiled mel: slower than standard
    assert len(read_csv(tmp_path / "p.csv")) == 3
