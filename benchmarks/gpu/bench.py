"""Memory and step time of one training step at paper scale, per family, kind, N and memory mode.

The GPU kit's memory benchmark (run.sh's third step). Its problems, networks and training step
are those of ``benchmarks/memory.py`` (``melrecon.physics.problems.random_sense_problem``,
``melrecon.bench.build_network`` and ``training_step``); it adds what a GPU figure needs:

- ``cuda_max_alloc_MiB``: ``torch.cuda.max_memory_allocated()`` over one step (absolute: it
  includes the resident problems of both kinds, a few hundred MiB at paper scale, and the
  parameters); ``cuda_peak_MiB``: the same peak minus what was allocated when the step began
  (activations, saved tensors, gradients, workspaces);
- ``probe_peak_MiB``: the bytes autograd holds for backward (``MemoryProbe``; also on CPU);
- ``step_ms``: the median over ``timed_steps`` steps after ``--warmup`` warm-up steps and the
  measured step, timed by CUDA events (``perf_counter`` on CPU);
- ``grad_rel_err``: the largest relative error of a parameter's gradient against ``standard``
  at the same N, all modes taken after the same number of steps (spectral-norm estimates
  advance once per step, so this keeps the compared functions identical);
- ``status``: ``ok``, ``oom`` (``standard`` is then skipped at larger N of that family and
  kind), ``error`` (the message is in ``note``, the traceback in the log), ``skipped``.

Cases run smallest N first across all (family, kind) pairs, so when the time budget
(``--budget-s``) runs out it is the largest N that are missing, not a whole family. Each row
is appended to the CSV as soon as it is measured (a step killed by run.sh's timeout keeps it).

    python benchmarks/gpu/bench.py --device cuda --csv OUT/bench.csv              # paper scale
    python benchmarks/gpu/bench.py --device cpu --profile tiny --csv /tmp/b.csv   # seconds
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

SRC = Path(__file__).resolve().parents[2] / "src"
if str(SRC) not in sys.path:  # a checkout without `pip install -e .` (run.sh also sets PYTHONPATH)
    sys.path.insert(0, str(SRC))

from melrecon.bench import FAMILIES, grad_rel_err, measure_step, network_for, training_step  # noqa: E402
from melrecon.physics.problems import LAYOUTS, SenseProblem, random_sense_problem  # noqa: E402
from profiles import BENCH  # noqa: E402  (benchmarks/gpu/, this script's folder)
from rows import RowWriter  # noqa: E402

MODES = ("standard", "checkpoint", "mel")
COLUMNS = ("family", "kind", "N", "mode", "status", "cuda_peak_MiB", "cuda_max_alloc_MiB", "probe_peak_MiB",
           "step_ms", "timed_steps", "grad_rel_err", "loss", "drift", "anchors", "fallbacks", "inv_iters", "note")
MIB = float(2**20)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(net: torch.nn.Module, problem: SenseProblem) -> torch.Tensor:
    net.zero_grad(set_to_none=True)  # as Lightning does: gradients are allocated by each backward
    return training_step(net, problem)


def timed_step(net: torch.nn.Module, problem: SenseProblem) -> float:
    """Seconds of one training step: CUDA events on a GPU (the device's own clock, launch gaps
    included), ``perf_counter`` on CPU."""
    device = problem.x0.device
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        _step(net, problem)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    _step(net, problem)
    return time.perf_counter() - t0


def measure_case(family: str, kind: str, n: int, mode: str, problem: SenseProblem, opts: dict[str, Any],
                 warmup: int, steps: int, case_cap_s: float) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """One case: warm-up steps, one measured step (memory, gradients), then timed steps.

    The number of timed steps is ``steps``, cut so that they take about ``case_cap_s`` seconds
    in all (at least one). Returns the CSV row and the parameter gradients of the measured step.
    """
    net = network_for(problem, family, kind, n, mode, **opts)
    m = measure_step(net, problem, warmup)
    first_s, grads, stats, max_alloc = m.time_s, m.grads, m.stats, m.cuda_max_alloc_bytes
    n_timed = max(1, min(steps, int(case_cap_s // max(first_s, 1e-9))))
    times = [timed_step(net, problem) for _ in range(n_timed)]
    row: dict[str, Any] = {
        "family": family, "kind": kind, "N": n, "mode": mode, "status": "ok",
        "cuda_peak_MiB": m.cuda_peak_bytes / MIB if m.cuda_peak_bytes is not None else None,
        "cuda_max_alloc_MiB": max_alloc / MIB if max_alloc is not None else None,
        "probe_peak_MiB": m.probe_peak_bytes / MIB,
        "step_ms": 1e3 * statistics.median(times), "timed_steps": n_timed, "loss": m.loss,
        "drift": stats.get("mel/drift"), "anchors": stats.get("mel/anchors"),
        "fallbacks": stats.get("mel/fallbacks"), "inv_iters": stats.get("mel/inv_iters"),
    }
    return row, grads


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)  # CPU allocator


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _print_row(row: dict[str, Any]) -> None:
    def f(key: str, spec: str) -> str:
        v = row.get(key)
        return format(v, spec) if isinstance(v, (int, float)) else "-"
    print(f"bench: {row['family']:4} {row['kind']:4} N={row['N']:<3} {row['mode']:10} {row['status']:7} "
          f"cuda_peak={f('cuda_peak_MiB', '.0f')} MiB max_alloc={f('cuda_max_alloc_MiB', '.0f')} MiB "
          f"probe={f('probe_peak_MiB', '.1f')} MiB step={f('step_ms', '.1f')} ms (x{row.get('timed_steps', '-')}) "
          f"grad_err={f('grad_rel_err', '.1e')} {row.get('note', '')}", flush=True)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    prof = BENCH[args.profile]
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    opts = dict(width=prof["width"], depth=prof["depth"], lam=args.lam)
    unrolls = {f: tuple(prof["unrolls"][f]) for f in args.families}
    print(f"bench: profile={args.profile} device={device} dtype={args.dtype} slab={prof['slab']} "
          f"cine={prof['cine']} coils={prof['coils']} width={prof['width']} depth={prof['depth']} lam={args.lam} "
          f"unrolls={unrolls} modes={args.modes} warmup={args.warmup} steps<={args.steps} "
          f"budget={args.budget_s:g}s", flush=True)
    problems = {k: random_sense_problem(k, prof[k], prof["coils"], dtype, device) for k in args.kinds}
    writer = RowWriter(Path(args.csv), COLUMNS)
    rows: list[dict[str, Any]] = []
    standard_oom_at: dict[tuple[str, str], int] = {}
    deadline = time.monotonic() + args.budget_s
    try:
        for i in range(max(len(u) for u in unrolls.values())):  # smallest N of every pair first
            for family in args.families:
                if i >= len(unrolls[family]):
                    continue
                n = unrolls[family][i]
                for kind in args.kinds:
                    ref: list[torch.Tensor] | None = None
                    for mode in args.modes:
                        base = {"family": family, "kind": kind, "N": n, "mode": mode}
                        grads = None
                        if time.monotonic() > deadline:
                            row = {**base, "status": "skipped", "note": f"time budget ({args.budget_s:g} s) spent"}
                        elif mode == "standard" and (family, kind) in standard_oom_at:
                            row = {**base, "status": "skipped",
                                   "note": f"standard out of memory at N={standard_oom_at[family, kind]}"}
                        else:
                            row, grads = _run_case(base, problems[kind], opts, args, standard_oom_at)
                        if mode == "standard" and grads is not None:
                            ref = grads
                        if grads is not None:
                            row["grad_rel_err"] = 0.0 if mode == "standard" else (
                                grad_rel_err(grads, ref) if ref is not None else None)
                        del grads
                        _release(device)
                        writer.write(row)
                        rows.append(row)
                        _print_row(row)
    finally:
        writer.close()
    return rows


def _run_case(base: dict[str, Any], problem: SenseProblem, opts: dict[str, Any], args: argparse.Namespace,
              standard_oom_at: dict[tuple[str, str], int]) -> tuple[dict[str, Any], list[torch.Tensor] | None]:
    """measure_case with out-of-memory and other failures turned into a row (the run goes on)."""
    try:
        return measure_case(base["family"], base["kind"], base["N"], base["mode"], problem, opts, args.warmup,
                            args.steps, args.case_cap_s)
    except Exception as exc:  # noqa: BLE001 - one failing case must not end the benchmark
        if _is_oom(exc):
            if base["mode"] == "standard":
                standard_oom_at[base["family"], base["kind"]] = base["N"]
            return {**base, "status": "oom", "note": str(exc).splitlines()[0][:160]}, None
        traceback.print_exc()
        return {**base, "status": "error", "note": f"{type(exc).__name__}: {exc}".splitlines()[0][:200]}, None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=sorted(BENCH), default="paper", help="sizes (benchmarks/gpu/profiles.py)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--csv", required=True, help="output CSV (rewritten)")
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    ap.add_argument("--kinds", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES,
                    help="standard first: it is the gradient reference")
    ap.add_argument("--lam", type=float, default=1.0, help="initial DC lam (as benchmarks/memory.py's default)")
    ap.add_argument("--dtype", default="complex64", choices=["complex64", "complex128"])
    ap.add_argument("--warmup", type=int, default=1, help="identical steps before the measured one")
    ap.add_argument("--steps", type=int, default=5, help="timed steps (median), at most")
    ap.add_argument("--case-cap-s", type=float, default=10.0, help="about this many seconds of timed steps a case")
    ap.add_argument("--budget-s", type=float, default=1e9, help="start no case after this many seconds")
    args = ap.parse_args(argv)
    if args.warmup < 0 or args.steps < 1:
        ap.error(f"--warmup must be >= 0 and --steps >= 1, got {args.warmup} and {args.steps}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: torch {torch.__version__} sees no CUDA device")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    rows = run(parse_args(argv))
    bad = [r for r in rows if r["status"] == "error"]
    print(f"bench: {len(rows)} cases, {sum(r['status'] == 'ok' for r in rows)} ok, "
          f"{sum(r['status'] == 'oom' for r in rows)} out of memory, {len(bad)} errors", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
