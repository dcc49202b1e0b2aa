"""MemoryProbe accounting, memory scaling of the three modes, and the benchmark script."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest
import torch

from melrecon.mel import MemoryProbe, hold

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_memory", ROOT / "benchmarks" / "memory.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


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
    prob = bench.make_problem(kind, (2, 8, 8) if kind == "slab" else (3, 8, 8), coils=2, dtype=torch.complex128, seed=1)
    net = bench.build_network("modl", kind, n, memory, width=8, depth=5, lam=1.0, anchor_every=None).double()
    with MemoryProbe() as probe:
        bench.training_step(net, prob)
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


def test_benchmark_script_runs_and_writes_csv(tmp_path, capsys):
    out = tmp_path / "bench.csv"
    rows = bench.main(
        ["--unrolls", "1", "3", "--slab", "2", "6", "6", "--cine", "2", "6", "6", "--coils", "2", "--width", "2",
         "--depth", "2", "--warmup", "0", "--device", "cpu", "--csv", str(out)]
    )
    assert len(rows) == 2 * 2 * 3  # kinds x N x modes
    text = capsys.readouterr().out
    assert "probe MB" in text and "checkpoint" in text
    with open(out) as f:
        table = list(csv.DictReader(f))
    assert len(table) == 12 and {"mode", "N", "probe_peak_MB", "time_s", "grad_rel_err", "anchors"} <= set(table[0])
    for r in table:
        if r["mode"] != "standard":
            assert float(r["grad_rel_err"]) < 1e-4
