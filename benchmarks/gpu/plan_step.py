"""The memory model (``melrecon.models.memory_model``, what ``model.memory=auto`` plans with)
against measurement, at paper size: the GPU kit's ``plan`` step.

For every case of ``profiles.PLAN`` (family, kind, N, mode, anchors, tile) one training step of
``melrecon.bench``'s network on a random problem of that kind alone (so that
``max_memory_allocated`` is this case's: problem, parameters and gradients, the step) is measured
with ``melrecon.bench.measure_step`` and compared with the prediction:

- ``probe_MiB`` / ``model_probe_MiB``: bytes autograd held (``MemoryProbe``) and the model's
  autograd-held prediction (exact or estimated as the model states: ``probe_exact``);
- ``cuda_max_alloc_MiB`` / ``model_peak_MiB``: ``torch.cuda.max_memory_allocated`` over the step
  and the model's device peak without the Adam moments (the benchmark step has no optimizer);
  ``peak_ratio`` = model / measured (CPU: empty, no allocator figure);
- ``step_ms`` and ``model_rel_time``: the measured step and the time model's step time relative
  to ``standard`` untiled at the same size.

MoDL's ``mel`` is predicted with the fallback the step actually took (``fallbacks``), as the
planner predicts the worst case. Rows are appended as they are measured.

    python benchmarks/gpu/plan_step.py --device cuda --csv OUT/plan.csv             # paper scale
    python benchmarks/gpu/plan_step.py --device cpu --profile tiny --csv /tmp/p.csv  # seconds
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

SRC = Path(__file__).resolve().parents[2] / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

from melrecon.bench import measure_step, network_for  # noqa: E402
from melrecon.models.memory_model import predict_peak  # noqa: E402
from melrecon.physics.problems import random_sense_problem  # noqa: E402
from melrecon.plan.planner import NetworkSpec, Plan, score  # noqa: E402
from profiles import BENCH, PLAN  # noqa: E402
from rows import RowWriter  # noqa: E402

COLUMNS = ("family", "kind", "N", "mode", "anchor_every", "tile", "status", "probe_MiB", "model_probe_MiB",
           "probe_exact", "cuda_max_alloc_MiB", "model_peak_MiB", "peak_ratio", "step_ms", "model_rel_time",
           "fallbacks", "note")
MIB = float(2**20)


def measure_case(case: tuple, prof: dict[str, Any], device: torch.device) -> dict[str, Any]:
    family, kind, n, mode, anchor, tile = case
    volume = tuple(prof[kind])
    problem = random_sense_problem(kind, volume, prof["coils"], torch.complex64, device)
    net = network_for(problem, family, kind, n, mode, width=prof["width"], depth=prof["depth"], lam=1.0,
                      anchor_every=anchor, tile=tile)
    m = measure_step(net, problem, warmup=1)
    fell_back = bool(m.stats.get("mel/fallbacks", 0))
    pred = predict_peak(volume, prof["coils"], prof["width"], prof["depth"], n, mode, tile=tile, family=family,
                        anchor_every=anchor, fallback=fell_back)
    peak = pred.peak_bytes - pred.terms["params_and_optimizer"] // 2  # no Adam moments in this step
    spec = NetworkSpec(family, volume, prof["coils"], prof["width"], prof["depth"], n)
    row = {"status": "ok", "probe_MiB": m.probe_peak_bytes / MIB, "model_probe_MiB": pred.probe_bytes / MIB,
           "probe_exact": pred.probe_exact, "model_peak_MiB": peak / MIB, "step_ms": 1e3 * m.time_s,
           "model_rel_time": score(spec, Plan(mode, anchor, tile)).relative_time / score(spec, Plan("standard")).relative_time,
           "fallbacks": m.stats.get("mel/fallbacks")}
    if m.cuda_max_alloc_bytes is not None:
        row["cuda_max_alloc_MiB"] = m.cuda_max_alloc_bytes / MIB
        row["peak_ratio"] = peak / m.cuda_max_alloc_bytes
    return row


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    prof, device = BENCH[args.profile], torch.device(args.device)
    rows, deadline = [], time.monotonic() + args.budget_s
    with RowWriter(Path(args.csv), COLUMNS) as writer:
        for case in PLAN[args.profile]:
            family, kind, n, mode, anchor, tile = case
            base = {"family": family, "kind": kind, "N": n, "mode": mode, "anchor_every": anchor,
                    "tile": "x".join(map(str, tile)) if tile else "none"}
            if time.monotonic() > deadline:
                row = {**base, "status": "skipped", "note": f"time budget ({args.budget_s:g} s) spent"}
            else:
                try:
                    row = {**base, **measure_case(case, prof, device)}
                except Exception as exc:  # noqa: BLE001 - one failing case must not end the step
                    oom = isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError))
                    if not oom:
                        traceback.print_exc()
                    row = {**base, "status": "oom" if oom else "error",
                           "note": f"{type(exc).__name__}: {exc}".splitlines()[0][:200]}
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            writer.write(row)
            rows.append(row)
            print(f"plan: {row['family']:4} {row['kind']:4} N={row['N']:<3} {row['mode']:10} tile={row['tile']:10} "
                  f"{row['status']:7} probe={row.get('probe_MiB', float('nan')):.1f}/"
                  f"{row.get('model_probe_MiB', float('nan')):.1f} MiB (measured/model) "
                  f"peak ratio={row.get('peak_ratio', '-')}", flush=True)
    return rows


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", choices=sorted(PLAN), default="paper")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--csv", required=True, help="output CSV (rewritten)")
    ap.add_argument("--budget-s", type=float, default=1e9, help="start no case after this many seconds")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: torch {torch.__version__} sees no CUDA device")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    rows = run(parse_args(argv))
    bad = [r for r in rows if r["status"] == "error"]
    print(f"plan: {len(rows)} cases, {sum(r['status'] == 'ok' for r in rows)} ok, {len(bad)} errors", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
