"""The ``memory_modes`` study: peak memory, step time and gradient agreement of the memory modes.

For each network family (MoDL, reversible), data kind (3D slab, cine) and depth N, one training
step per memory mode (standard, checkpoint, mel) on the same random problem
(:func:`melrecon.physics.problems.random_sense_problem`), measured as ``benchmarks/memory.py``
measures it (:func:`melrecon.bench.run_case`: autograd memory held
for backward by :class:`melrecon.mel.MemoryProbe`, plus the CUDA allocator peak on a GPU; step
time after ``warmup`` identical steps; gradients). The gradient of ``checkpoint`` and ``mel``
is compared with ``standard``'s at the same N (largest relative error over the parameters).

Outputs in the study folder: ``memory_modes.csv`` (one row per family, kind, N, mode),
``memory_modes.png`` (memory and time against N), ``summary.md`` with the table and the checks
the study exists for: reversible ``mel`` flat in N (max / min of its peak over N within
``flat_tol``), ``standard`` linear in N (least-squares line, R^2), and MoDL ``mel``'s anchor
count (the stored images that keep its inversion error below ``drift_tol``).
Each (family, kind, N) group is stored in ``groups/`` when measured, so an interrupted study
continues where it stopped.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from melrecon.bench import grad_rel_err, run_case
from melrecon.models.memory_model import predict_peak
from melrecon.physics.problems import SenseProblem, random_sense_problem
from melrecon.plan.planner import NetworkSpec, Plan, score
from melrecon.study import plots
from melrecon.study.files import read_json, write_csv, write_json, write_text
from melrecon.study.report import machine_text

log = logging.getLogger("melrecon.study")

COLUMNS = ("family", "kind", "N", "mode", "status", "probe_peak_MB", "model_peak_MB", "model_err", "cuda_peak_MB",
           "model_device_MB", "time_s", "model_rel_time", "grad_rel_err", "drift", "anchors", "anchor_every",
           "fallbacks", "loss")
MODES = ("standard", "checkpoint", "mel")


def measure_group(family: str, kind: str, n: int, m: DictConfig, problem: SenseProblem) -> list[dict[str, Any]]:
    """All memory modes of one (family, kind, N); gradients compared with ``standard``."""
    ae = m.get("anchor_every", "auto")
    opts = dict(width=int(m.width), depth=int(m.depth), lam=float(m.lam),
                anchor_every=math.inf if ae is None else ae, drift_tol=float(m.drift_tol), share_weights=True)
    rows, ref = [], None
    for mode in m.modes:
        try:
            row, grads = run_case(family, kind, n, mode, problem, opts, int(m.warmup))
            row["status"] = "ok"
        except torch.cuda.OutOfMemoryError:  # paper sizes: standard backprop may not fit at large N
            torch.cuda.empty_cache()
            row, grads = {"family": family, "kind": kind, "N": n, "mode": mode, "status": "out of memory",
                          "cuda_peak_MB": math.inf}, None
        if mode == "standard":
            ref = grads
        row["grad_rel_err"] = (0.0 if mode == "standard" and grads is not None
                               else grad_rel_err(grads, ref) if grads is not None and ref is not None else math.nan)
        rows.append({k: row.get(k, math.nan) for k in COLUMNS})
    return rows


def add_predictions(rows: list[dict[str, Any]], m: DictConfig) -> None:
    """The planner's predictions beside each measured row (:func:`melrecon.plan.planner.score`):
    ``model_peak_MB`` (autograd-held, to compare with ``probe_peak_MB``; ``model_err`` their relative
    difference), ``model_device_MB`` (the device estimate, to compare with ``cuda_peak_MB`` on a GPU),
    ``model_rel_time`` (step time relative to ``standard`` at the same N, to compare with ``time_s``).
    MoDL ``mel`` is predicted with the anchor spacing and fallbacks the measured step used."""
    real_bytes = 8 if str(m.dtype) == "complex128" else 4
    for r in rows:
        if r.get("status", "ok") != "ok":
            continue
        volume = tuple(int(v) for v in (m.slab if r["kind"] == "slab" else m.cine))
        spec = NetworkSpec(r["family"], volume, int(m.coils), int(m.width), int(m.depth), int(r["N"]),
                           precision="64" if real_bytes == 8 else "32")
        k = r.get("anchor_every", math.nan)
        anchor = int(k) if r["mode"] == "mel" and isinstance(k, (int, float)) and math.isfinite(k) else None
        fell_back = bool(r.get("fallbacks", 0) or 0) if math.isfinite(r.get("fallbacks", math.nan)) else False
        pred = predict_peak(volume, spec.coils, spec.width, spec.depth, spec.num_unrolls, r["mode"],
                            real_bytes=real_bytes, family=spec.family, anchor_every=anchor, fallback=fell_back)
        r["model_peak_MB"] = pred.probe_bytes / 2**20
        r["model_err"] = r["model_peak_MB"] / r["probe_peak_MB"] - 1
        r["model_device_MB"] = pred.peak_bytes / 2**20
        r["model_rel_time"] = score(spec, Plan(r["mode"], anchor)).relative_time / score(spec, Plan("standard")).relative_time


def linear_fit(n: list[float], y: list[float]) -> tuple[float, float, float]:
    """Least-squares line ``y = a + b n``: (a, b, R^2)."""
    b, a = np.polyfit(np.asarray(n, float), np.asarray(y, float), 1)
    pred = a + b * np.asarray(n, float)
    ss_res = float(((np.asarray(y) - pred) ** 2).sum())
    ss_tot = float(((np.asarray(y) - np.mean(y)) ** 2).sum())
    return float(a), float(b), 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0


def checks(rows: list[dict[str, Any]], flat_tol: float) -> list[str]:
    """The study's claims, each as a sentence saying whether it held."""
    out = []
    oom = [r for r in rows if r.get("status", "ok") != "ok"]
    if oom:
        out.append("out of memory: " + ", ".join(f"{r['family']} {r['kind']} {r['mode']} N = {r['N']}" for r in oom))
    rows = [r for r in rows if r.get("status", "ok") == "ok"]
    for family, kind in sorted({(r["family"], r["kind"]) for r in rows}):
        sel = {mode: sorted((r for r in rows if (r["family"], r["kind"], r["mode"]) == (family, kind, mode)),
                            key=lambda r: r["N"]) for mode in MODES}
        if sel["standard"] and len(sel["standard"]) > 1:
            a, b, r2 = linear_fit([r["N"] for r in sel["standard"]], [r["probe_peak_MB"] for r in sel["standard"]])
            out.append(f"{family} {kind} standard: peak = {a:.3f} + {b:.4f} N MiB, R^2 = {r2:.5f} "
                       f"({'linear' if r2 > 0.99 else 'NOT linear'} in N)")
        mel = sel["mel"]
        if mel and len(mel) > 1:
            peaks = [r["probe_peak_MB"] for r in mel]
            ratio = max(peaks) / min(peaks)
            n0, n1 = mel[0]["N"], mel[-1]["N"]
            if family == "rev":
                ok = ratio <= 1 + flat_tol
                out.append(f"{family} {kind} mel: peak {min(peaks):.3f}-{max(peaks):.3f} MiB for N = {n0}..{n1}, "
                           f"max/min = {ratio:.3f}: {'flat' if ok else 'NOT flat'} within {flat_tol:.0%}, "
                           f"{int(mel[-1]['anchors'])} anchors")
            else:
                out.append(f"{family} {kind} mel: {int(mel[-1]['anchors'])} anchors stored at N = {n1} "
                           f"(spacing {mel[-1]['anchor_every']:.0f}); peak {peaks[0]:.3f} MiB at N = {n0}, "
                           f"{peaks[-1]:.3f} MiB at N = {n1} (max/min {ratio:.2f}): the drift controller keeps "
                           "an anchor every few unrolls, so MoDL mel memory grows with N/spacing, not flat")
        model = [abs(r["model_err"]) for mode in MODES for r in sel[mode] if math.isfinite(r.get("model_err", math.nan))]
        if model:
            out.append(f"{family} {kind}: memory model vs probe, largest relative difference {max(model):.1%} "
                       f"over {len(model)} steps ({'within' if max(model) <= 0.10 else 'NOT within'} 10%)")
        errs = [r["grad_rel_err"] for mode in ("checkpoint", "mel") for r in sel[mode] if math.isfinite(r["grad_rel_err"])]
        if errs:
            out.append(f"{family} {kind}: largest gradient error of checkpoint/mel vs standard {max(errs):.1e}")
    return out


def markdown(cfg: DictConfig, rows: list[dict[str, Any]], lines: list[str], command: str) -> str:
    m = cfg.memory
    head = [f"# Study `{cfg.name}` (preset `{cfg.preset.name}`)", "", str(cfg.get("description") or "").strip(), "",
            f"- Command: `{command}`", f"- Date: {time.strftime('%Y-%m-%d %H:%M')}", f"- Machine: {machine_text()}",
            f"- Problem: slab {list(m.slab)} (X, Y, Z), cine {list(m.cine)} (T, X, Y), {m.coils} coils, {m.dtype}; "
            f"CNNs width {m.width}, depth {m.depth}; lam {m.lam}; MoDL anchors `{m.anchor_every}` "
            f"(drift_tol {m.drift_tol}); reversible: pure MEL, no anchors; {m.warmup} warm-up step(s); "
            f"device {m.device or 'auto'}", "", "## Checks", ""] + [f"- {ln}" for ln in lines]
    table = ["", "## Table", "", "peak MiB: bytes autograd held for backward (MemoryProbe); CUDA MiB: allocator peak "
             "(GPU only); time: one training step (forward, loss, backward); grad err: largest relative gradient "
             "error against `standard` at the same N; anchors: images MEL stored.", "",
             "model: the planner's prediction beside each measurement (memory model: autograd-held and device "
             "estimate; time model: step time relative to `standard` at the same N).", "",
             "| family | kind | N | mode | peak MiB | model MiB | CUDA MiB | model device MiB | time s | model rel. time "
             "| grad err | anchors |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        g = lambda key: r.get(key, math.nan)  # noqa: E731 - rows read back from older groups lack the model
        table.append(f"| {r['family']} | {r['kind']} | {r['N']} | {r['mode']} | {r['probe_peak_MB']:.3f} | "
                     f"{g('model_peak_MB'):.3f} | {r['cuda_peak_MB']:.1f} | {g('model_device_MB'):.1f} | "
                     f"{r['time_s']:.3f} | {g('model_rel_time'):.2f} | {r['grad_rel_err']:.1e} | "
                     f"{r['anchors']:.0f} |".replace("nan", "n/a"))
    return "\n".join(head + table + ["", "![memory_modes](memory_modes.png)", ""])


def run(cfg: DictConfig, out_dir: Path, command: str = "") -> list[dict[str, Any]]:
    m = cfg.memory
    device = str(m.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, str(m.dtype))
    groups = out_dir / "groups"
    rows: list[dict[str, Any]] = []
    setup = OmegaConf.to_container(m, resolve=True)
    for family in m.families:
        for kind in m.kinds:
            problem = None
            for n in m.unrolls:
                path = groups / f"{family}_{kind}_N{int(n):04d}.json"
                if path.is_file() and read_json(path).get("setup") == setup:
                    rows += read_json(path)["rows"]
                    continue
                if problem is None:
                    sizes = m.slab if kind == "slab" else m.cine
                    problem = random_sense_problem(kind, list(sizes), int(m.coils), dtype, device)
                group = measure_group(str(family), str(kind), int(n), m, problem)
                for r in group:
                    log.info("%s %s N=%d %-10s peak %.3f MiB, %.3f s, grad err %.1e, anchors %s", family, kind, n,
                             r["mode"], r["probe_peak_MB"], r["time_s"], r["grad_rel_err"], r["anchors"])
                write_json(path, {"setup": setup, "rows": group})
                rows += group
    add_predictions(rows, m)
    write_csv(out_dir / "memory_modes.csv", rows, COLUMNS)
    plots.memory_modes([r for r in rows if r.get("status", "ok") == "ok"], out_dir / "memory_modes.png")
    lines = checks(rows, float(cfg.get("flat_tol", 0.05)))
    write_text(out_dir / "summary.md", markdown(cfg, rows, lines, command))
    for ln in lines:
        log.info("%s", ln)
    return rows
