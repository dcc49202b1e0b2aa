"""What a study knows about each method (trained run or baseline), read back from its folder."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from melrecon.study.convergence import validation_curve
from melrecon.study.files import read_csv, read_json


@dataclass
class MethodResult:
    """One method's per-volume test scores and what the summary says about it.

    Attributes:
        name, label: the study's name for the method and its display label.
        group: ``"network"`` or ``"baseline"``.
        settings: key settings (networks: family, unrolls, memory mode, width, ...; baselines:
            the lam chosen on val and solver options).
        info: measurements (``n_params``, ``step_time_s``, ``probe_step_mib``, ``peak_mem_gib``,
            reconstruction time per volume, ``val_monitor`` (the best validation value, which
            chose the checkpoint), ``memory_modes`` ({mode: {probe_step_mib, cuda_step_mib}})).
        scores: {volume file name: {metric: value}} on the test split.
        panel: ``panel.npz`` with the reconstruction of the panel volume (and for baselines
            the target and zero-filled image), or None.
        curve: networks: (step, validation PSNR) of training.
    """

    name: str
    label: str
    group: str
    settings: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    panel: Path | None = None
    curve: list[tuple[int, float]] = field(default_factory=list)


def read_scores(path: Path) -> dict[str, dict[str, float]]:
    out = {}
    for row in read_csv(path):
        out[row["volume"]] = {k: float(v) for k, v in row.items() if k != "volume" and v not in ("", None)}
    return out


def load_run(name: str, label: str, settings: dict[str, Any], run_dir: Path) -> MethodResult:
    """A finished training run (``<run>/study/``); FileNotFoundError if it has not finished."""
    d = Path(run_dir) / "study"
    if not (d / "done.json").is_file():
        raise FileNotFoundError(f"run {name}: {d / 'done.json'} missing (the run has not finished)")
    info = read_json(d / "info.json")
    scores = read_scores(d / "scores.csv")
    info["recon_time_s"] = _mean([s.get("recon_time_s", math.nan) for s in scores.values()])
    if (d / "memory.json").is_file():
        info["memory_modes"] = read_json(d / "memory.json").get("modes", {})
    panel = d / "panel.npz"
    return MethodResult(name, label, "network", settings, info, scores, panel if panel.is_file() else None,
                        validation_curve(run_dir, "psnr"))


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan
