"""A study's classical baselines: lam chosen on the validation split, scored on the test split.

For each entry of the study's ``baselines`` (``{name: {method, lam: [grid], ...options}}``) every
``lam`` of the grid reconstructs every validation file; the ``lam`` with the best mean
``select_on`` metric (SSIM by default, the metric that picks the networks' checkpoints) then
reconstructs every test file. Files are read through the study's data settings (those of its
first run) by :func:`melrecon.study.adapter.reconstruct_file`, so a baseline sees exactly the
masks, normalisation and data range the networks see; 3D volumes are given whole (one slab),
so that 3D wavelets and TV act on the whole volume.

Folder ``<study>/baselines/<name>/``: ``val_grid.csv`` (lam x volume x metric), ``scores.csv``,
``info.json`` (chosen lam, grid means, time per volume), ``panel.npz``, and last the marker
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


def score_files(model: Any, settings: Any, files: list[Path], panel: Path | None = None,
                panel_index: int = 0) -> list[dict[str, Any]]:
    """Per-volume metrics (and reconstruction time) of ``model`` on ``files``; optionally save the
    panel volume's reconstruction, target and zero-filled image to ``panel``."""
    rows = []
    for i, path in enumerate(files):
        t0 = time.perf_counter()
        res = adapter.reconstruct_file(model, settings, path)
        dt = time.perf_counter() - t0
        rows.append({"volume": Path(path).name, **adapter.volume_metrics(res.reconstruction, res.target, res.data_range),
                     "acceleration": res.acceleration, "recon_time_s": dt})
        if panel is not None and i == panel_index % len(files):
            panel.parent.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(panel, reconstruction=res.reconstruction, target=res.target,
                                zero_filled=res.zero_filled, mask=res.mask, volume=Path(path).name)
    return rows


def choose_lam(grid_rows: list[dict[str, Any]], select_on: str) -> tuple[Any, dict[str, float]]:
    """The lam with the best mean ``select_on`` over volumes, and the mean of every lam."""
    if select_on not in _HIGHER_IS_BETTER:
        raise StudyError(f"select_on must be one of {tuple(_HIGHER_IS_BETTER)}, got {select_on!r}")
    means: dict[Any, list[float]] = {}
    for r in grid_rows:
        means.setdefault(r["lam"], []).append(r[select_on])
    avg = {lam: float(np.mean(v)) for lam, v in means.items()}
    sign = 1.0 if _HIGHER_IS_BETTER[select_on] else -1.0
    best = max(avg, key=lambda lam: sign * (avg[lam] if math.isfinite(avg[lam]) else -sign * math.inf))
    return best, {str(k): v for k, v in avg.items()}


def run_one(name: str, spec: dict[str, Any], kind: str, settings: Any, val_files: list[Path],
            test_files: list[Path], out: Path, select_on: str, panel_index: int,
            fingerprint: dict[str, Any]) -> MethodResult:
    method = spec.pop("method", name)
    grid = spec.pop("lam", None)
    grid = [None] if grid is None else list(grid)
    info = _finished(name, out, fingerprint)
    if info is None:
        grid_rows = []
        if len(grid) > 1:
            for lam in grid:
                model = build_baseline(method, kind, lam, **spec)
                grid_rows += [{"lam": lam, **r} for r in score_files(model, settings, val_files)]
            lam, means = choose_lam(grid_rows, select_on)
            write_csv(out / "val_grid.csv", grid_rows, ["lam", *SCORE_COLUMNS])
        else:
            lam, means = grid[0], {}
        log.info("baseline %s (%s): lam %s chosen on val (%s)", name, method, lam, select_on)
        model = build_baseline(method, kind, lam, **spec)
        rows = score_files(model, settings, test_files, out / "panel.npz", panel_index)
        info = {"method": method, "lam": lam, "grid": grid, f"val_mean_{select_on}": means, "options": spec,
                "recon_time_s": float(np.mean([r["recon_time_s"] for r in rows]))}
        write_csv(out / "scores.csv", rows, SCORE_COLUMNS)
        write_json(out / "info.json", info)
        write_json(out / "done.json", {"fingerprint": fingerprint})
    lam = info.get("lam")
    settings_out = {"method": info["method"], **({"lam": lam} if lam is not None else {}), **info.get("options", {})}
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
    select_on = str(cfg.get("select_on", "ssim"))
    panel_index = int((cfg.get("score") or {}).get("panel_index", 0))
    results = []
    for name, spec in entries.items():
        spec = OmegaConf.to_container(spec, resolve=True)
        fingerprint = {"spec": spec, "data": data, "select_on": select_on, "panel_index": panel_index,
                       "val": [p.name for p in val_files], "test": [p.name for p in test_files]}
        results.append(run_one(str(name), dict(spec), kind, settings, val_files, test_files,
                               out_dir / "baselines" / str(name), select_on, panel_index, fingerprint))
    return results


__all__ = ["run_all", "run_one", "choose_lam", "score_files", "WHOLE_VOLUME", "METRICS"]
