"""Did a study's networks converge? Their validation curves and the gain of the last quarter of steps.

A run's validation metric per step is read back from its CSV log (``<run>/csv/version_*/metrics.csv``;
a resumed run's later versions win for the steps they repeat). The plateau test of the study
summary: the best validation value over the last quarter of the steps minus the best before it;
under ``PLATEAU_DB`` (0.1 dB of PSNR) the run counts as having reached a plateau.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from melrecon.study.files import read_csv

PLATEAU_DB = 0.1


def validation_curve(run_dir: Path, metric: str = "psnr") -> list[tuple[int, float]]:
    """(step, ``val/<metric>``) of a run, ascending in step."""
    points: dict[int, float] = {}
    for path in sorted(Path(run_dir).glob("csv/version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[-1])):
        for row in read_csv(path):
            value = row.get(f"val/{metric}")
            if value not in (None, "") and row.get("step") not in (None, ""):
                points[int(float(row["step"]))] = float(value)
    return sorted(points.items())


@dataclass(frozen=True)
class Plateau:
    """The last quarter's gain of a validation curve and whether it is under the threshold."""

    gain: float            # best over steps > 3/4 of the last step, minus best up to there
    last_step: int
    reached: bool | None   # None: too few validations to tell


def last_quarter_gain(curve: list[tuple[int, float]], threshold: float = PLATEAU_DB) -> Plateau:
    if not curve:
        return Plateau(math.nan, 0, None)
    last = curve[-1][0]
    early = [v for s, v in curve if s <= 0.75 * last]
    late = [v for s, v in curve if s > 0.75 * last]
    if not early or not late:
        return Plateau(math.nan, last, None)
    gain = max(late) - max(early)
    return Plateau(gain, last, gain < threshold)
