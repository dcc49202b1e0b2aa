"""Memory and time of one training step versus the number of unrolls, per memory mode.

For each network kind (3D slab, cine), each N and each mode (standard, checkpoint, mel),
one training step (forward, loss, backward) is run on a random problem and reported:
peak memory held for backward (MemoryProbe; on CUDA also the allocator's peak), step time,
the gradient's relative error against ``standard`` at the same N (where standard ran),
the MEL drift, anchors and fallbacks.  Results print as a table and go to a CSV.

    python benchmarks/memory.py                        # small CPU defaults (about a minute)
    python benchmarks/memory.py --unrolls 1 5 10 --modes standard mel --kinds cine
    python benchmarks/memory.py --device cuda --slab 21 256 320 --cine 20 192 160 \
        --coils 8 --width 64 --csv benchmarks/paper_scale.csv     # paper scale on a GPU

Reversible study (``--rev-study``, issue 16): the reversible family under pure MEL for each N
(``--unrolls``), ``gamma_decay`` (``--decays``) and ``state_precision`` (``--precisions``):
probe peak, recomputed-input drift, fallbacks, gradient error against ``standard`` of the same
precision (up to ``--standard-max-n``), step time, optionally after ``--train-steps`` Adam
steps (under MEL) so the drift is that of a trained network::

    python benchmarks/memory.py --rev-study --unrolls 1 10 50 100 200 --decays 1.0 0.9 0.8 \
        --cine 4 16 16 --coils 4 --sampled 0.1667 --width 8 --depth 3 --csv benchmarks/rev_study.csv

Networks and the step are :mod:`melrecon.bench`'s (``build_network``, ``training_step``),
shared with the GPU kit's benchmarks/gpu/bench.py.  Every mode gets ``--warmup`` identical
steps first (so spectral-norm estimates and the ``auto`` anchor controller are in their steady
state, and all modes still compute the same function).
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

from melrecon.bench import FAMILIES, build_network, grad_rel_err, run_case, training_step  # noqa: E402
from melrecon.mel.memory import MemoryProbe  # noqa: E402
from melrecon.physics.problems import LAYOUTS as KINDS  # noqa: E402
from melrecon.physics.problems import random_sense_problem  # noqa: E402


def rev_study(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The reversible study (module docstring): one row per (N, gamma_decay, state_precision)."""
    dtype = getattr(torch, args.dtype)
    sizes = args.cine if "cine" in args.kinds else args.slab
    kind = "cine" if "cine" in args.kinds else "slab"
    problem = random_sense_problem(kind, sizes, args.coils, dtype, args.device, sampled=args.sampled)
    print(f"reversible study: {kind} {sizes} coils={args.coils} sampled={args.sampled:.3f} width={args.width} "
          f"depth={args.depth} physics={args.rev_physics} train_steps={args.train_steps} dtype={args.dtype} "
          f"device={args.device} threads={torch.get_num_threads()}")
    print(f"{'N':>4} {'decay':>5} {'precision':9} {'mel MB':>8} {'std MB':>8} {'drift':>9} {'fb':>3} {'train fb':>8} "
          f"{'grad err':>9} {'mel s':>6} {'std s':>6}")
    rows = []
    for n in args.unrolls:
        for decay in args.decays:
            for prec in args.precisions:
                opts = dict(width=args.width, depth=args.depth, lam=args.lam, drift_tol=args.drift_tol,
                            share_weights=not args.unshared, gamma_decay=decay, state_precision=prec,
                            physics=args.rev_physics, gamma_init=0.5)
                net = build_network("rev", kind, n, "mel", **opts).to(args.device)
                opt = torch.optim.Adam(net.parameters(), lr=1e-3)
                train_fb = 0
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # fallbacks and coarse grids are counted, not printed
                    for _ in range(args.train_steps):
                        net.zero_grad(set_to_none=True)
                        training_step(net, problem)
                        opt.step()
                        train_fb += int(net.log_stats()["mel/fallbacks"])
                    row = {"N": n, "gamma_decay": decay, "state_precision": prec, "train_steps": args.train_steps,
                           "train_fallbacks": train_fb}
                    for mode in ("mel", "standard"):
                        if mode == "standard" and n > args.standard_max_n:
                            continue
                        net.chain.memory = mode
                        net.zero_grad(set_to_none=True)
                        t0 = time.perf_counter()
                        with MemoryProbe(cuda=args.device.startswith("cuda")) as probe:
                            training_step(net, problem)
                        row[f"{mode}_time_s"] = time.perf_counter() - t0
                        row[f"{mode}_probe_peak_MB"] = probe.peak_bytes / 2**20
                        grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                                 for p in net.parameters()]
                        if mode == "mel":
                            st = net.log_stats()
                            row.update(drift=st["mel/drift"], fallbacks=st["mel/fallbacks"],
                                       fallback_spacing=st["mel/fallback_spacing"])
                            mel_grads = grads
                        else:
                            row["grad_rel_err"] = grad_rel_err(mel_grads, grads)
                rows.append(row)
                nan = float("nan")
                print(f"{n:>4} {decay:>5.2f} {prec:9} {row['mel_probe_peak_MB']:>8.3f} "
                      f"{row.get('standard_probe_peak_MB', nan):>8.3f} {row['drift']:>9.2e} {row['fallbacks']:>3.0f} "
                      f"{train_fb:>8d} {row.get('grad_rel_err', nan):>9.1e} {row['mel_time_s']:>6.2f} "
                      f"{row.get('standard_time_s', nan):>6.2f}", flush=True)
    return rows


def _write_csv(rows: list[dict[str, Any]], path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {path}")


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", nargs="+", default=["modl"], choices=FAMILIES)
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    ap.add_argument("--modes", nargs="+", default=["standard", "checkpoint", "mel"], choices=["standard", "checkpoint", "mel"])
    ap.add_argument("--unrolls", nargs="+", type=int, default=[1, 2, 5, 10, 20, 50])
    ap.add_argument("--slab", nargs=3, type=int, default=[4, 16, 16], metavar=("X", "Y", "Z"))
    ap.add_argument("--cine", nargs=3, type=int, default=[6, 16, 16], metavar=("T", "X", "Y"))
    ap.add_argument("--coils", type=int, default=4)
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--depth", type=int, default=5)
    ap.add_argument("--lam", type=float, default=1.0, help="initial DC lam (the MEL paper uses 0.05)")
    ap.add_argument("--anchor-every", default="auto", help="mel anchors: auto | k | inf")
    ap.add_argument("--drift-tol", type=float, default=1e-5)
    ap.add_argument("--unshared", action="store_true", help="independent weights per unroll")
    ap.add_argument("--anderson", type=int, default=0, help="Anderson memory of the CNN's fixed-point inverse")
    ap.add_argument("--standard-max-n", type=int, default=10**9, help="skip standard above this N (memory)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--dtype", default="complex64", choices=["complex64", "complex128"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--csv", default=str(ROOT / "benchmarks" / "memory.csv"))
    ap.add_argument("--sampled", type=float, default=0.35, help="fraction of phase-encode lines kept (1/R)")
    ap.add_argument("--rev-study", action="store_true", help="the reversible study (module docstring)")
    ap.add_argument("--decays", nargs="+", type=float, default=[1.0, 0.9, 0.8], help="rev study: gamma_decay values")
    ap.add_argument("--precisions", nargs="+", default=["fixed", "double", "input"], help="rev study: state_precision")
    ap.add_argument("--rev-physics", default="gradient", choices=["gradient", "proximal"], help="rev study: direction")
    ap.add_argument("--train-steps", type=int, default=0, help="rev study: Adam steps (MEL) before measuring")
    args = ap.parse_args(argv)
    if args.rev_study:
        rows = rev_study(args)
        if args.csv:
            _write_csv(rows, args.csv)
        return rows

    dtype = getattr(torch, args.dtype)
    ae: Any = args.anchor_every
    ae = math.inf if str(ae).lower() in ("inf", "none") else (ae if ae == "auto" else int(ae))
    opts = dict(width=args.width, depth=args.depth, lam=args.lam, anchor_every=ae, drift_tol=args.drift_tol,
                share_weights=not args.unshared, anderson=args.anderson)
    rows: list[dict[str, Any]] = []
    header = (f"{'family':6} {'kind':5} {'N':>3} {'mode':10} {'probe MB':>9} {'cuda MB':>8} {'time s':>7} "
              f"{'grad err':>9} {'drift':>8} {'anch':>4} {'k':>4} {'fb':>3}")
    print(f"device={args.device} dtype={args.dtype} slab={args.slab} cine={args.cine} coils={args.coils} "
          f"width={args.width} depth={args.depth} lam={args.lam} anchor_every={args.anchor_every} "
          f"anderson={args.anderson} shared={not args.unshared} warmup={args.warmup} threads={torch.get_num_threads()}")
    if args.device.startswith("cuda"):
        print(f"card: {torch.cuda.get_device_name()}")
    print(header)
    for family in args.families:
        for kind in args.kinds:
            sizes = args.slab if kind == "slab" else args.cine
            problem = random_sense_problem(kind, sizes, args.coils, dtype, args.device, sampled=args.sampled)
            for n in args.unrolls:
                ref = None
                for mode in args.modes:
                    if mode == "standard" and n > args.standard_max_n:
                        continue
                    try:
                        row, grads = run_case(family, kind, n, mode, problem, opts, args.warmup)
                    except torch.cuda.OutOfMemoryError:
                        torch.cuda.empty_cache()
                        row, grads = {"family": family, "kind": kind, "N": n, "mode": mode, "probe_peak_MB": float("nan"),
                                      "cuda_peak_MB": float("inf"), "time_s": float("nan")}, None
                    if mode == "standard" and grads is not None:
                        ref = grads
                    net_err = float("nan")
                    if ref is not None and grads is not None and mode != "standard":
                        net_err = grad_rel_err(grads, ref)
                    row["grad_rel_err"] = net_err if mode != "standard" else 0.0
                    rows.append(row)
                    print(f"{family:6} {kind:5} {n:>3} {mode:10} {row['probe_peak_MB']:>9.3f} {row['cuda_peak_MB']:>8.1f} "
                          f"{row['time_s']:>7.2f} {row['grad_rel_err']:>9.1e} {row.get('drift', float('nan')):>8.1e} "
                          f"{row.get('anchors', float('nan')):>4.0f} {row.get('anchor_every', float('nan')):>4.0f} "
                          f"{row.get('fallbacks', float('nan')):>3.0f}", flush=True)
    if args.csv:
        Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
        keys = sorted({k for r in rows for k in r}, key=lambda k: list(rows[0]).index(k) if k in rows[0] else 99)
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
        print(f"wrote {args.csv}")
    return rows


if __name__ == "__main__":
    main()
