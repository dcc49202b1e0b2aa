"""A training study's outputs: ``results.csv``, ``summary.md``, PNG plots and (optionally) W&B tables.

- ``results.csv``: one row per (method, test volume, metric): ``method, group, volume, metric, value``;
  ``validation_curves.csv``: ``method, step, val_psnr`` of every network's training.
- ``summary.md``: the command, date, machine and budget; per method its key settings, parameter
  count, autograd memory of one training step, logged peak memory, median step time,
  reconstruction time per volume and PSNR / SSIM / NMSE mean ± std over the test volumes, with
  the paired difference to the reference method (95% paired-t interval, n); then every
  comparison the study names, with both intervals, the p-value and a plain verdict.
- the arms (``arms``: the study's main contrasts a - b, with parameter counts), the networks'
  convergence (validation PSNR curves, gain of the last quarter of steps) and quality at equal
  memory (:mod:`melrecon.study.equal_memory`: test PSNR against the memory of a training step in
  every memory mode, and the study's one sentence on it).
- plots: ``psnr_vs_unrolls.png`` and ``cost_vs_unrolls.png`` (studies over depth),
  ``metrics_by_method.png``, ``psnr_vs_memory.png``, ``validation_curves.png``, ``panel.png``
  (one test volume per method with error maps).
"""

from __future__ import annotations

import logging
import math
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from melrecon.study import equal_memory, plots
from melrecon.study.config import SELECTION_MODES, RunSpec, StudyError, arms, comparisons
from melrecon.study.convergence import PLATEAU_DB, last_quarter_gain
from melrecon.study.files import write_csv, write_text
from melrecon.metrics import METRICS
from melrecon.study.results import MethodResult, load_run
from melrecon.study.stats import PairedDifference, paired_difference, summarize

log = logging.getLogger("melrecon.study")

RESULT_COLUMNS = ("method", "group", "volume", "metric", "value")
SUMMARY_COLUMNS = ("method", "label", "group", "settings", "n_params", "probe_step_mib", "peak_mem_gib",
                   "step_time_s", "recon_time_s", "n", "psnr_mean", "psnr_std", "ssim_mean", "ssim_std",
                   "nmse_mean", "nmse_std", "d_psnr", "d_psnr_low", "d_psnr_high", "d_ssim", "d_ssim_low",
                   "d_ssim_high")
_DIGITS = {"psnr": 2, "ssim": 4, "nmse": 4}


def common_volumes(methods: Sequence[MethodResult]) -> list[str]:
    """The test volumes, which must be the same for every method (paired comparisons)."""
    sets = {m.name: set(m.scores) for m in methods}
    first = next(iter(sets.values()))
    for name, s in sets.items():
        if s != first:
            raise StudyError(f"method {name} was scored on other test volumes ({sorted(s ^ first)} differ)")
    return sorted(first)


def paired(a: MethodResult, b: MethodResult, metric: str, volumes: Sequence[str]) -> PairedDifference:
    return paired_difference([a.scores[v][metric] for v in volumes], [b.scores[v][metric] for v in volumes])


def settings_text(m: MethodResult) -> str:
    s = m.settings
    if m.group == "network":
        conv = f"{s.get('conv_dim')}D CNN" if s.get("conv_dim") else "CNNs"
        where = "whole volumes" if s.get("slab_size") is None and s.get("kind") == "volume3d" else (
            f"slab {s.get('slab_size')}" if s.get("kind") == "volume3d" else str(s.get("kind", "")))
        return (f"{s.get('family')}, N={s.get('num_unrolls')}, {conv} {s.get('width')}x{s.get('depth')}, "
                f"{s.get('memory')}, {where}")
    return ", ".join(f"{k}={v}" for k, v in s.items() if k != "method")


def _num(x: Any, fmt: str) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def summary_rows(methods: Sequence[MethodResult], reference: str, volumes: Sequence[str]) -> list[dict[str, Any]]:
    ref = next(m for m in methods if m.name == reference)
    rows = []
    for m in methods:
        row: dict[str, Any] = {"method": m.name, "label": m.label, "group": m.group, "settings": settings_text(m),
                               "n": len(volumes)}
        for key in ("n_params", "probe_step_mib", "peak_mem_gib", "step_time_s", "recon_time_s"):
            row[key] = m.info.get(key, math.nan)
        for metric in METRICS:
            s = summarize([m.scores[v][metric] for v in volumes])
            row[f"{metric}_mean"], row[f"{metric}_std"] = s.mean, s.std
        for metric in ("psnr", "ssim"):
            d = paired(m, ref, metric, volumes)
            row[f"d_{metric}"], row[f"d_{metric}_low"], row[f"d_{metric}_high"] = d.mean, d.t_low, d.t_high
        rows.append(row)
    return rows


def verdict(d: PairedDifference, a: str, b: str, higher_is_better: bool = True) -> str:
    if d.n < 2 or math.isnan(d.t_low):
        return f"no interval (n = {d.n})"
    if d.t_low > 0:
        return f"{a} {'better' if higher_is_better else 'worse'}"
    if d.t_high < 0:
        return f"{b} {'better' if higher_is_better else 'worse'}"
    return "no significant difference (the interval contains 0)"


def machine_text() -> str:
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores, {dev}, "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads)")


def arms_lines(cfg: DictConfig, methods: Sequence[MethodResult], volumes: Sequence[str]) -> list[str]:
    """The arms table: per arm a - b in PSNR and SSIM with the networks' parameter counts."""
    found = arms(cfg)
    if not found:
        return []
    by_name = {m.name: m for m in methods}
    lines = ["## Arms (paired per-volume differences a - b on the test split)", "",
             "| arm | a | b | params a / b | Δ PSNR dB [95% CI] | PSNR verdict | Δ SSIM [95% CI] | SSIM verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for arm, (a_name, b_name) in found.items():
        a, b = by_name[a_name], by_name[b_name]
        dp, ds = paired(a, b, "psnr", volumes), paired(a, b, "ssim", volumes)
        params = f"{a.settings.get('n_params', a.info.get('n_params'))} / {b.settings.get('n_params', b.info.get('n_params'))}"
        lines.append(f"| {arm} | {a.label} | {b.label} | {params} | {dp.fmt(2)} | {verdict(dp, a.label, b.label)} | "
                     f"{ds.fmt(4)} | {verdict(ds, a.label, b.label)} |")
    return lines + [""]


def convergence_lines(methods: Sequence[MethodResult]) -> list[str]:
    """Per network: validations, best and last validation PSNR, gain of the last quarter of steps."""
    nets = [m for m in methods if m.group == "network" and m.curve]
    if not nets:
        return []
    lines = ["## Convergence (validation PSNR during training)", "",
             f"Plateau: the best validation PSNR of the last quarter of the steps gains less than {PLATEAU_DB} dB "
             "over the best before it.", "",
             "| network | validations | last step | best val PSNR dB | last val PSNR dB | last-quarter gain dB | plateau |",
             "|---|---|---|---|---|---|---|"]
    for m in nets:
        p = last_quarter_gain(m.curve)
        reached = "n/a (too few validations)" if p.reached is None else ("yes" if p.reached else "**no**: still rising")
        lines.append(f"| {m.label} | {len(m.curve)} | {p.last_step} | {max(v for _, v in m.curve):.2f} | "
                     f"{m.curve[-1][1]:.2f} | {_num(p.gain, '+.2f')} | {reached} |")
    return lines + [""]


def equal_memory_lines(cfg: DictConfig, methods: Sequence[MethodResult], volumes: Sequence[str],
                       points: Sequence[equal_memory.MemoryPoint]) -> list[str]:
    """The equal-memory section: the study's sentence, the (network, mode) table and the budgets."""
    if not points:
        return []
    select_on = str(cfg.get("select_on", "ssim"))
    found = equal_memory.budgets(methods, volumes, SELECTION_MODES[select_on] == "max")
    return (["## Quality at equal memory", "", equal_memory.claim(found, select_on), ""]
            + equal_memory.table(points, found, volumes)
            + ["", "Training-step memory of each trained network in each memory mode, measured at its size on "
               "its first training batch (the modes compute the same gradients, so one trained network stands "
               "for every mode). Budgets: each network's standard-backprop memory; in each, the best network "
               f"(by validation {select_on.upper()}) whose standard or MEL step fits.", ""])


def markdown(cfg: DictConfig, methods: Sequence[MethodResult], rows: Sequence[dict[str, Any]],
             volumes: Sequence[str], command: str, figures: Sequence[Path],
             points: Sequence[equal_memory.MemoryPoint] = ()) -> str:
    b = cfg.budget
    select_on = str(cfg.get("select_on", "ssim"))
    ref = next(m for m in methods if m.name == cfg.reference)
    lines = [f"# Study `{cfg.name}` (preset `{cfg.preset.name}`)", "", str(cfg.get("description") or "").strip(), "",
             f"- Command: `{command}`", f"- Date: {time.strftime('%Y-%m-%d %H:%M')}", f"- Machine: {machine_text()}",
             f"- Budget (every network): {b.max_steps} optimizer steps, seed {b.seed}, validation every "
             f"{b.val_every} steps (checkpoint chosen on `val/{select_on}`), Adam lr {b.lr}, schedule {b.get('schedule', 'constant')}",
             f"- Test split: {len(volumes)} volumes, never seen in training or model selection; baselines' "
             f"regularisation weight chosen on the validation split by {select_on.upper()} (x sqrt(10) refinement until interior; solvers run to their tolerance)", "",
             *arms_lines(cfg, methods, volumes),
             f"## Test results (mean ± std over {len(volumes)} volumes; Δ = paired difference to "
             f"**{ref.label}**, 95% paired-t interval)", "",
             "| method | settings | params | autograd MiB/step | logged peak GiB | step s | recon s/vol | "
             "PSNR dB | SSIM | NMSE | Δ PSNR dB [95% CI] | Δ SSIM [95% CI] |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m, r in zip(methods, rows):
        d = {k: paired(m, ref, k, volumes) for k in ("psnr", "ssim")}
        delta = {k: "reference" if m.name == ref.name else d[k].fmt(_DIGITS[k]) for k in d}
        lines.append(
            f"| {m.label} | {r['settings']} | {_num(r['n_params'], 'd') if m.group == 'network' else '-'} | "
            f"{_num(r['probe_step_mib'], '.2f')} | {_num(r['peak_mem_gib'], '.2f')} | {_num(r['step_time_s'], '.3f')} | "
            f"{_num(r['recon_time_s'], '.2f')} | "
            + " | ".join(summarize([m.scores[v][k] for v in volumes]).fmt(_DIGITS[k]) for k in METRICS)
            + f" | {delta['psnr']} | {delta['ssim']} |")
    lines += ["", "autograd MiB/step: bytes autograd held during one training step (forward + backward, "
              "`melrecon.mel.MemoryProbe`), device independent. logged peak GiB: `train/peak_mem_gib` "
              "(CUDA allocator peak on a GPU; on a CPU the process's resident memory, which includes "
              "Python and the data). step s: median training step time. recon s/vol: test reconstruction "
              "time per volume (baselines: on the CPU, one volume at a time).", ""]
    lines += equal_memory_lines(cfg, methods, volumes, points)
    lines += convergence_lines(methods)
    comps = comparisons(cfg)
    if comps:
        lines += ["## Comparisons (paired per-volume differences a - b on the test split)", "",
                  "| a - b | Δ PSNR dB [t 95% CI] | bootstrap 95% CI | p | PSNR verdict | Δ SSIM [t 95% CI] | "
                  "SSIM verdict | Δ NMSE [t 95% CI] | n |", "|---|---|---|---|---|---|---|---|---|"]
        by_name = {m.name: m for m in methods}
        for a_name, b_name in comps:
            a, bm = by_name[a_name], by_name[b_name]
            dp, ds, dn = (paired(a, bm, k, volumes) for k in METRICS)
            boot = "n/a" if math.isnan(dp.boot_low) else f"[{dp.boot_low:+.2f}, {dp.boot_high:+.2f}]"
            lines.append(f"| {a.label} - {bm.label} | {dp.fmt(2)} | {boot} | {_num(dp.p_value, '.3g')} | "
                         f"{verdict(dp, a.label, bm.label)} | {ds.fmt(4)} | {verdict(ds, a.label, bm.label)} | "
                         f"{dn.fmt(4)} | {dp.n} |")
        lines += ["", "Intervals: paired t, mean(d) ± t(0.975, n-1) sd(d)/sqrt(n) over the per-volume differences d "
                  "(the primary interval), and the percentile bootstrap of mean(d) (10,000 resamples of the "
                  "volumes; too narrow for very small n). p: two-sided paired t-test. A verdict needs the t "
                  "interval to exclude 0.", ""]
    if figures:
        lines += ["## Figures", ""] + [f"![{p.stem}]({p.name})" for p in figures] + [""]
    return "\n".join(lines)


def log_wandb(cfg: DictConfig, out_dir: Path, summary: Sequence[dict[str, Any]], results: Sequence[dict[str, Any]],
              figures: Sequence[Path]) -> None:
    """The summary and per-volume tables (and figures) as a W&B run of job type ``study``
    (offline unless ``WANDB_MODE=online``)."""
    import wandb

    run = wandb.init(project=str(cfg.wandb.get("project", "melrecon")), name=f"study-{cfg.name}-{cfg.preset.name}",
                     job_type="study", dir=str(out_dir), mode=os.environ.get("WANDB_MODE", "offline"),
                     config=OmegaConf.to_container(cfg, resolve=True), reinit=True)
    try:
        run.log({
            "study/summary": wandb.Table(columns=list(SUMMARY_COLUMNS),
                                         data=[[r.get(c) for c in SUMMARY_COLUMNS] for r in summary]),
            "study/results": wandb.Table(columns=list(RESULT_COLUMNS),
                                         data=[[r[c] for c in RESULT_COLUMNS] for r in results]),
            **{f"study/{p.stem}": wandb.Image(str(p)) for p in figures},
        })
    finally:
        run.finish()


def write_report(cfg: DictConfig, out_dir: Path, specs: Sequence[RunSpec], baselines: Sequence[MethodResult],
                 command: str = "") -> list[MethodResult]:
    out_dir = Path(out_dir)
    methods = [load_run(s.name, s.label, s.settings, out_dir / "runs" / s.name) for s in specs] + list(baselines)
    volumes = common_volumes(methods)
    results = [{"method": m.name, "group": m.group, "volume": v, "metric": k, "value": m.scores[v][k]}
               for m in methods for v in volumes for k in METRICS]
    write_csv(out_dir / "results.csv", results, RESULT_COLUMNS)
    rows = summary_rows(methods, str(cfg.reference), volumes)
    write_csv(out_dir / "summary.csv", rows, SUMMARY_COLUMNS)
    write_csv(out_dir / "validation_curves.csv", [{"method": m.name, "step": step, "val_psnr": value}
                                                   for m in methods for step, value in m.curve],
              ("method", "step", "val_psnr"))
    kind = str(next(iter(s.settings.get("kind") for s in specs)))
    points = equal_memory.memory_points(methods, list(cfg.get("probe_modes") or []))
    figures = [p for p in (plots.psnr_vs_memory(points, [m for m in methods if m.group == "baseline"],
                                                out_dir / "psnr_vs_memory.png"),
                           plots.validation_curves(methods, out_dir / "validation_curves.png"),
                           plots.psnr_vs_unrolls(methods, out_dir / "psnr_vs_unrolls.png"),
                           plots.cost_vs_unrolls(methods, out_dir / "cost_vs_unrolls.png"),
                           plots.metrics_by_method(methods, out_dir / "metrics_by_method.png"),
                           plots.image_panel(methods, kind, out_dir / "panel.png")) if p is not None]
    write_text(out_dir / "summary.md", markdown(cfg, methods, rows, volumes, command, figures, points))
    if (cfg.get("wandb") or {}).get("enabled"):
        log_wandb(cfg, out_dir, rows, results, figures)
    log.info("study %s: %s", cfg.name, out_dir / "summary.md")
    return methods
