"""A study's classical baselines: lam chosen on the validation split, scored on the test split.

For each entry of the study's ``baselines`` (``{name: {method, lam: [grid], ...options}}``) every
``lam`` of the (coarse) grid reconstructs every validation file; the grid is then refined around the
best mean ``select_on`` metric (PSNR, the headline metric; the study's networks pick their checkpoints
by it too) in steps of x sqrt(10) (:func:`refine_lam`): outward while the best ``lam`` is at an end
of the grid, then its two x sqrt(10) neighbours, so the choice is interior and within a half-decade.
The chosen ``lam`` then reconstructs every test file. Every solve's iterations and whether it met
its criterion are recorded (``val_grid.csv``, ``scores.csv``) and summarised in ``info.json`` and the
study's settings column (``iters <= N, converged k/n``). Files are read through the study's data settings (those of its
first run) by :func:`melrecon.study.adapter.reconstruct_file`, so a baseline sees exactly the
masks, normalisation and data range the networks see; 3D volumes are given whole (one slab),
so that 3D wavelets and TV act on the whole volume.

Folder ``<study>/baselines/<name>/``: ``val_grid.csv`` (lam x volume x metric), ``scores.csv``,
``info.json`` (chosen lam, grid means, whether it is interior, iterations, time per volume), ``panel.npz``, and last the marker
``done.json`` holding the baseline's settings and file lists: rerunning the study skips a
baseline whose marker matches.
"""

from __future__ import annotations

import csv
import logging
import math
import time
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

from melrecon.study import adapter
from melrecon.study.baselines import build_baseline
from melrecon.study.config import StudyError
from melrecon.study.files import read_json, write_csv, write_json
from melrecon.study.job import SCORE_COLUMNS
from melrecon.metrics import METRICS
from melrecon.study.results import MethodResult, read_scores

log = logging.getLogger("melrecon.study")

WHOLE_VOLUME = 2**31 - 1  # slab size that makes every 3D volume one evaluation item
_HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "nmse": False}
REFINE_FACTOR = math.sqrt(10.0)
MAX_REFINE_STEPS = 8  # outward steps at most (a grid that still ends at its best value is reported)
SOLVE_COLUMNS = ("iterations", "converged")


def score_files(model: Any, settings: Any, files: list[Path], panel: Path | None = None,
                panel_index: int = 0) -> list[dict[str, Any]]:
    """Per-volume metrics (and reconstruction time) of ``model`` on ``files``; optionally save the
    panel volume's reconstruction, target and zero-filled image to ``panel``."""
    rows = []
    for i, path in enumerate(files):
        solves = getattr(model, "solves", None)
        if solves is not None:
            solves.clear()
        t0 = time.perf_counter()
        res = adapter.reconstruct_file(model, settings, path)
        dt = time.perf_counter() - t0
        rows.append({"volume": Path(path).name, **adapter.volume_metrics(res.reconstruction, res.target, res.data_range),
                     "acceleration": res.acceleration, "recon_time_s": dt, **solve_summary(solves or [])})
        if panel is not None and i == panel_index % len(files):
            panel.parent.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(panel, reconstruction=res.reconstruction, target=res.target,
                                zero_filled=res.zero_filled, mask=res.mask, volume=Path(path).name)
    return rows


def solve_summary(solves: list[dict[str, Any]]) -> dict[str, Any]:
    """One file's solves (one per reconstructed item): most iterations, and whether all converged
    (1 or 0; ``""`` when the method is not iterative or the backend cannot tell)."""
    if not solves:
        return {"iterations": "", "converged": ""}
    flags = [s["converged"] for s in solves]
    return {"iterations": max(int(s["iterations"]) for s in solves),
            "converged": "" if any(f is None for f in flags) else int(all(flags))}


def refine_lam(score: Any, grid: list[float], higher_is_better: bool = True,
               factor: float = REFINE_FACTOR, max_steps: int = MAX_REFINE_STEPS) -> tuple[float, dict[float, float], bool]:
    """Best ``lam`` of ``score(lam)`` (a mean validation metric) starting from the coarse ``grid``.

    While the best value is at an end of the grid (among positive lams), the grid grows outward by
    x ``factor`` (at most ``max_steps`` times); then the best value's x ``factor`` and / ``factor``
    neighbours are added once. Returns (best lam, every evaluated lam's score, whether the best lam
    has evaluated values on both sides). ``lam = 0`` is scored if given but never extended from.
    """
    sign = 1.0 if higher_is_better else -1.0
    scores: dict[float, float] = {}

    def evaluate(lam: float) -> None:
        lam = float(f"{lam:.6g}")
        if lam not in scores:
            scores[lam] = float(score(lam))

    def best() -> float:
        return max(scores, key=lambda lam: sign * scores[lam] if math.isfinite(scores[lam]) else -math.inf)

    for lam in grid:
        evaluate(lam)
    for _ in range(max_steps):
        b, positive = best(), sorted(lam for lam in scores if lam > 0)
        if b <= 0 or not positive or positive[0] < b < positive[-1]:
            break
        evaluate(b * factor if b == positive[-1] else b / factor)
    b = best()
    if b > 0:
        evaluate(b * factor)
        evaluate(b / factor)
    b = best()
    interior = any(lam < b for lam in scores) and any(lam > b for lam in scores)
    return b, scores, interior


def run_one(name: str, spec: dict[str, Any], kind: str, settings: Any, val_files: list[Path],
            test_files: list[Path], out: Path, select_on: str, panel_index: int,
            fingerprint: dict[str, Any]) -> MethodResult:
    method = spec.pop("method", name)
    grid = spec.pop("lam", None)
    grid = [None] if grid is None else list(grid)
    info = _finished(name, out, fingerprint)
    if info is None:
        grid_rows: list[dict[str, Any]] = []
        interior = None
        if len(grid) > 1:
            if select_on not in _HIGHER_IS_BETTER:
                raise StudyError(f"select_on must be one of {tuple(_HIGHER_IS_BETTER)}, got {select_on!r}")

            def val_score(lam: float) -> float:
                rows = [{"lam": lam, **r} for r in score_files(build_baseline(method, kind, lam, **spec), settings, val_files)]
                grid_rows.extend(rows)
                return float(np.mean([r[select_on] for r in rows]))

            lam, scores, interior = refine_lam(val_score, [float(v) for v in grid], _HIGHER_IS_BETTER[select_on])
            means = {str(k): v for k, v in sorted(scores.items())}
            write_csv(out / "val_grid.csv", grid_rows, ["lam", *SCORE_COLUMNS, *SOLVE_COLUMNS])
        else:
            lam, means = grid[0], {}
        log.info("baseline %s (%s): lam %s chosen on val (%s)", name, method, lam, select_on)
        model = build_baseline(method, kind, lam, **spec)
        rows = score_files(model, settings, test_files, out / "panel.npz", panel_index)
        iters = [r["iterations"] for r in rows if r["iterations"] != ""]
        known = [r["converged"] for r in rows if r["converged"] != ""]
        info = {"method": method, "lam": lam, "grid": grid, f"val_mean_{select_on}": means, "interior": interior,
                "options": spec, "recon_time_s": float(np.mean([r["recon_time_s"] for r in rows])),
                "iterations_max": max(iters) if iters else None,
                "converged": f"{sum(map(bool, known))}/{len(known)}" if known else None}
        write_csv(out / "scores.csv", rows, [*SCORE_COLUMNS, *SOLVE_COLUMNS])
        write_json(out / "info.json", info)
        write_json(out / "done.json", {"fingerprint": fingerprint})
    lam = info.get("lam")
    settings_out = {"method": info["method"], **({"lam": lam} if lam is not None else {}), **info.get("options", {})}
    if info.get("iterations_max") is not None:
        settings_out["iters"] = f"<= {info['iterations_max']}"
    if info.get("converged") is not None:
        settings_out["converged"] = info["converged"]
    if info.get("interior") is False:
        settings_out["lam at grid end"] = True
    panel = out / "panel.npz"
    return MethodResult(name, _LABELS.get(info["method"], name), "baseline", settings_out,
                        {"recon_time_s": info["recon_time_s"], "n_params": 0}, read_scores(out / "scores.csv"),
                        panel if panel.is_file() else None)


def _finished(name: str, out: Path, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    """The ``info.json`` of a finished baseline whose marker matches ``fingerprint``, else None;
    a marker that cannot be read, or beside a missing or broken ``scores.csv`` / ``info.json``,
    is said in one line (the baseline is computed again)."""
    marker = out / "done.json"
    if not marker.is_file():
        return None
    try:
        found = read_json(marker)
        if not isinstance(found, dict) or found.get("fingerprint") != fingerprint:
            return None
        info = read_json(out / "info.json")
        if not read_scores(out / "scores.csv") or not isinstance(info, dict) or "method" not in info:
            raise ValueError("no scores or no method")
    except (OSError, ValueError, KeyError, csv.Error) as err:
        log.warning("baseline %s: unfinished (%s: %s); computing it again", name, type(err).__name__,
                    " ".join(str(err).split()))
        return None
    log.info("baseline %s: finished, skipped", name)
    return info


_LABELS = {"zero_filled": "zero-filled", "cg_sense": "CG-SENSE", "l1_wavelet": "CS L1-wavelet", "tv": "CS TV"}


def run_all(cfg: DictConfig, train_cfg: DictConfig, out_dir: Path) -> list[MethodResult]:
    """Every baseline of the study (``cfg.baselines``) on the data of ``train_cfg``."""
    entries = {k: v for k, v in (cfg.get("baselines") or {}).items() if v is not None}
    if not entries:
        return []
    dm = hydra.utils.instantiate(train_cfg.data)
    val_files, test_files = dm.split_files("val"), dm.split_files("test")
    kind = str(train_cfg.data.kind)
    settings = adapter.eval_settings(train_cfg, slab_size=WHOLE_VOLUME)
    data = OmegaConf.to_container(train_cfg.data, resolve=True)
    select_on = str(cfg.get("select_on", "psnr"))
    panel_index = int((cfg.get("score") or {}).get("panel_index", 0))
    results = []
    for name, spec in entries.items():
        spec = OmegaConf.to_container(spec, resolve=True)
        fingerprint = {"spec": spec, "data": data, "select_on": select_on, "panel_index": panel_index,
                       "val": [p.name for p in val_files], "test": [p.name for p in test_files]}
        results.append(run_one(str(name), dict(spec), kind, settings, val_files, test_files,
                               out_dir / "baselines" / str(name), select_on, panel_index, fingerprint))
    return results


__all__ = ["run_all", "run_one", "refine_lam", "score_files", "solve_summary", "WHOLE_VOLUME", "METRICS"]
