"""MemoryProbe accounting, memory scaling of the three modes, and the benchmark script."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import HANG_GUARD_S
from helpers import make_sense_problem
from melrecon.mel import MemoryProbe, hold
from melrecon.models import ProximalDC, ResidualCNN, UnrolledNet

ROOT = Path(__file__).resolve().parents[1]


def test_probe_counts_saved_tensors_once_per_storage():
    x = torch.randn(1000, requires_grad=True)  # float32: 4000 bytes
    with MemoryProbe() as probe:
        y = x * x  # saves x twice: one storage
        z = y.exp()  # saves its result: a second storage
        assert probe.current_bytes == 8000
        z.sum().backward()
        assert probe.current_bytes == 0  # released by backward
        with hold([torch.empty(250)]):  # engine-held tensors are counted too
            assert probe.current_bytes == 1000
    assert probe.peak_bytes == 8000 and probe.current_bytes == 0
    assert probe.cuda_peak_bytes is None or probe.cuda_peak_bytes >= 0


def peak(kind, n, memory):
    prob = make_sense_problem(kind, (2, 8, 8) if kind == "slab" else (3, 8, 8), coils=2, dtype=torch.complex128, seed=1)
    torch.manual_seed(0)
    net = UnrolledNet(ResidualCNN(3, width=8, depth=5, lipschitz=0.9), ProximalDC(lam_init=1.0), n, True, memory, None)
    net = net.double()
    with MemoryProbe() as probe:
        out = net(prob.x0, prob.kspace, prob.maps, prob.mask)
        (out - prob.target).abs().pow(2).mean().backward()
    if memory == "mel":
        assert net.chain.stats.fallbacks == 0 and net.chain.stats.anchors == 0
    return probe.peak_bytes


@pytest.mark.parametrize("kind", ["slab", "cine"])
def test_memory_scaling_with_unrolls(kind):
    p = {(m, n): peak(kind, n, m) for m in ("standard", "checkpoint", "mel") for n in (1, 20)}
    print(f"\n{kind} probe peaks (bytes): {p}")
    assert p["mel", 20] <= 1.1 * p["mel", 1]  # flat in N
    assert p["standard", 20] >= 10 * p["standard", 1]  # linear in N
    assert p["mel", 20] < p["checkpoint", 20] < p["standard", 20]  # checkpoint in between
    image_bytes = 2 * 8 * 8 * 16 if kind == "slab" else 3 * 8 * 8 * 16  # complex128
    assert p["checkpoint", 20] - p["checkpoint", 1] >= 19 * image_bytes  # it stores every unroll's input


def test_benchmark_script_runs_and_writes_csv(tmp_path):
    out = tmp_path / "bench.csv"
    args = ["--unrolls", "1", "3", "--slab", "2", "6", "6", "--cine", "2", "6", "6", "--coils", "2", "--width", "2",
            "--depth", "2", "--warmup", "0", "--device", "cpu", "--csv", str(out)]
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "memory.py"), *args],
                         capture_output=True, text=True, timeout=HANG_GUARD_S, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    assert "probe MB" in res.stdout and "checkpoint" in res.stdout
    with open(out) as f:
        table = list(csv.DictReader(f))
    assert len(table) == 2 * 2 * 3  # kinds x N x modes
    assert {"mode", "N", "probe_peak_MB", "time_s", "grad_rel_err", "anchors"} <= set(table[0])
    for r in table:
        if r["mode"] != "standard":
            assert float(r["grad_rel_err"]) < 1e-4


def test_benchmark_rev_study_runs_and_writes_csv(tmp_path):
    """The reversible study (issue 16): one row per (N, gamma_decay, state_precision); fixed
    streams drift 0 and match standard exactly; every row reports peak, drift and fallbacks."""
    out = tmp_path / "rev.csv"
    args = ["--rev-study", "--unrolls", "1", "4", "--decays", "1.0", "0.8", "--precisions", "fixed", "input",
            "--cine", "2", "6", "6", "--coils", "2", "--width", "2", "--depth", "2", "--standard-max-n", "1",
            "--train-steps", "1", "--csv", str(out)]
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "memory.py"), *args],
                         capture_output=True, text=True, timeout=HANG_GUARD_S, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    with open(out) as f:
        table = list(csv.DictReader(f))
    assert len(table) == 2 * 2 * 2
    assert {"N", "gamma_decay", "state_precision", "mel_probe_peak_MB", "drift", "fallbacks", "grad_rel_err"} <= set(
        k for r in table for k in r)
    for r in table:
        assert float(r["mel_probe_peak_MB"]) > 0
        if r["state_precision"] == "fixed":
            assert float(r["drift"]) == 0.0 and float(r["fallbacks"]) == 0
        assert (r["grad_rel_err"] == "") == (int(r["N"]) > 1)  # standard only up to --standard-max-n
    assert all(float(r["grad_rel_err"]) == 0.0 for r in table if r["state_precision"] == "fixed" and r["N"] == "1")
