"""Score reconstructions against targets and compare methods (after fastMRI's ``evaluate.py``).

Usage::

    python -m melrecon.evaluate --target DIR --predictions DIR [DIR ...]
        [--names NAME ...] [--zero-filled] [--out DIR]

``--target`` is a folder of files in the melrecon layout (searched recursively); their
``target`` dataset (S^H F^H k, complex) is the reference. Each ``--predictions`` folder is one
method: ``<stem>.h5`` files as ``python -m melrecon.reconstruct`` writes them, holding a
``reconstruction`` dataset (complex or magnitude) with the target's shape. Files are matched by
file name. When a reconstruction is smaller than its target in the last two axes (a run trained
with ``data.crop``), the target is centre-cropped to it (index ``N // 2 - n // 2`` on, the
datasets' convention) and the data range is the cropped target's maximum, as in training.
``--zero-filled`` adds the ``zero_filled`` dataset of the first predictions folder as a method.

Per volume: PSNR, SSIM and NMSE with the project's metric definitions (fastMRI: magnitudes,
data range = max |target| of the volume, PSNR/NMSE over the volume, SSIM per 2D slice averaged;
see :func:`_metrics`). Methods are compared on the same volumes: the summary and paired tables
use only the volumes every method scored (the common set); a volume that one method lacks (no
file, or a file that could not be scored) is named, left out of every method's means, and
makes the exit status 1. Per method: mean and sample standard deviation (ddof = 1) over the
common volumes. Per pair of methods (B - A): mean paired difference with a 95% Student-t
confidence interval and n. Written to ``--out`` (default ``evaluation``): ``per_volume.csv``
(every volume scored, common or not), ``summary.csv``, ``paired.csv`` and ``evaluation.md``
(the Markdown tables, also printed). A prediction without a target, or with a shape the target
cannot be matched to, is reported by name and left out; the exit status is then 1 (0 when every
file was scored, 2 for a usage error).
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import h5py
import numpy as np

from melrecon.data.h5 import LayoutError, atomic_path, find_files, validate_file
from melrecon.study import stats

METRICS = ("psnr", "ssim", "nmse")
MetricFn = Callable[[np.ndarray, np.ndarray, float], float]


def _metrics() -> dict[str, MetricFn]:
    """``{"psnr", "ssim", "nmse"}``: ``f(pred, target, data_range) -> float`` on magnitude
    volumes of one shape whose last two axes are one 2D slice.

    Each is :func:`melrecon.metrics.volume_metrics` (the one implementation, shared with
    training, validation and ``melrecon.reconstruct.scan_metrics``) reduced to one value; SSIM
    is NaN when slices are smaller than the SSIM window, as there. :func:`score_volume` calls
    ``volume_metrics`` once for all three.
    """
    def one(name: str) -> MetricFn:
        def fn(pred: np.ndarray, target: np.ndarray, data_range: float) -> float:
            return _volume_metrics(pred, target, data_range)[name]
        fn.__name__ = name
        return fn

    return {name: one(name) for name in METRICS}


def _volume_metrics(pred: np.ndarray, target: np.ndarray, data_range: float) -> dict[str, float]:
    import torch

    from melrecon.metrics import volume_metrics

    return volume_metrics(torch.from_numpy(np.asarray(pred)), torch.from_numpy(np.asarray(target)), data_range)


class EvaluateError(Exception):
    """A usage mistake (folders, names): one line, exit status 2."""


@dataclass(frozen=True)
class Method:
    """One method: a name and its ``{file name: prediction file}``; ``dataset`` is the HDF5
    dataset read from each file (``reconstruction``, or ``zero_filled``)."""

    name: str
    files: dict[str, Path]
    dataset: str = "reconstruction"


def index_files(folder: str | os.PathLike, what: str) -> dict[str, Path]:
    """``{file name: path}`` of the ``.h5`` files below ``folder``; a name found twice is an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EvaluateError(f"{what} folder {folder} does not exist")
    out: dict[str, Path] = {}
    for path in find_files(folder):
        if path.name in out:
            raise EvaluateError(f"{what} folder {folder}: file name {path.name} found twice "
                                f"({out[path.name]} and {path}); names must be unique")
        out[path.name] = path
    if not out:
        raise EvaluateError(f"{what} folder {folder} holds no .h5 files")
    return out


def center_crop(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Centre crop of the last two axes to ``size`` (index ``N // 2 - n // 2`` on)."""
    starts = [n // 2 - s // 2 for n, s in zip(x.shape[-2:], size)]
    return x[..., starts[0]:starts[0] + size[0], starts[1]:starts[1] + size[1]]


def read_pair(pred_path: Path, target_path: Path,
              dataset: str = "reconstruction") -> tuple[np.ndarray, np.ndarray, bool]:
    """Magnitudes ``(prediction, target, cropped)`` of one matched pair, target cropped if needed.

    Raises:
        ValueError: naming the file(s) when a dataset is missing or the shapes cannot be matched.
    """
    try:
        validate_file(target_path, check_values=False)
    except LayoutError as err:
        raise ValueError(f"target {err}") from None
    try:
        with h5py.File(pred_path, "r") as f:
            if dataset not in f:
                raise ValueError(f"{pred_path}: field '{dataset}': missing (keys: {sorted(f.keys())})")
            pred = np.abs(f[dataset][()])
    except OSError as err:
        raise ValueError(f"{pred_path}: field 'file': cannot open as HDF5: {err}") from None
    with h5py.File(target_path, "r") as f:
        target = np.abs(f["target"][()])
    cropped = False
    if pred.shape != target.shape:
        fits = (pred.ndim == target.ndim and pred.shape[:-2] == target.shape[:-2]
                and all(p <= t for p, t in zip(pred.shape[-2:], target.shape[-2:])))
        if not fits:
            raise ValueError(f"{pred_path}: field '{dataset}': shape {pred.shape} does not match the target "
                             f"{target.shape} of {target_path} (nor a centre crop of its last two axes)")
        target = center_crop(target, pred.shape[-2:])
        cropped = True
    if not np.isfinite(pred).all():
        raise ValueError(f"{pred_path}: field '{dataset}': contains NaN or Inf")
    return pred.astype(np.float64), target.astype(np.float64), cropped


def score_volume(pred: np.ndarray, target: np.ndarray, metrics: dict[str, MetricFn] | None = None) -> dict[str, float]:
    """PSNR, SSIM and NMSE of one volume (magnitudes) with data range max |target|."""
    data_range = float(target.max())
    if not data_range > 0:
        raise ValueError("the target is zero everywhere; the data range must be > 0")
    if metrics is None:  # the project's definitions, computed once for the three
        return _volume_metrics(pred, target, data_range) | {"data_range": data_range}
    return {name: metrics[name](pred, target, data_range) for name in METRICS} | {"data_range": data_range}


def summarize(values: Sequence[float]) -> tuple[float, float, int]:
    """``(mean, sample std (ddof 1; NaN for n < 2), n)`` of the finite values."""
    s = stats.summarize([x for x in values if np.isfinite(x)])
    return s.mean, s.std, s.n


def paired_difference(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> dict[str, float]:
    """Mean of ``b - a`` over pairs with both values finite, its Student-t CI
    (:func:`melrecon.study.stats.t_interval`, the study's interval) and n.

    Returns ``{"mean_diff", "ci_low", "ci_high", "n"}`` (CI NaN for n < 2).
    """
    d = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    d = d[np.isfinite(d)]
    low, high = stats.t_interval(d, level)
    return {"mean_diff": float(d.mean()) if d.size else math.nan, "ci_low": low, "ci_high": high, "n": int(d.size)}


@dataclass
class Evaluation:
    """Scores of every method: ``scores[method][file] = {"psnr", "ssim", "nmse", "data_range"}``,
    ``errors`` the files left out (one message each), ``notes`` what was adapted (crops).

    The summary and paired tables are over :meth:`common` volumes only (paired comparisons need
    the same volumes); :meth:`missing` names the rest."""

    methods: list[str]
    scores: dict[str, dict[str, dict[str, float]]]
    errors: list[str]
    notes: list[str]

    def common(self) -> list[str]:
        """The volumes every method scored, sorted."""
        sets = [set(self.scores[m]) for m in self.methods]
        return sorted(set.intersection(*sets)) if sets else []

    def missing(self) -> dict[str, list[str]]:
        """``{method: [volumes another method scored but this one did not]}`` (methods with none left out)."""
        every = set().union(*(self.scores[m] for m in self.methods)) if self.methods else set()
        out = {m: sorted(every - set(self.scores[m])) for m in self.methods}
        return {m: names for m, names in out.items() if names}

    def summary_rows(self) -> list[dict[str, object]]:
        rows = []
        common = self.common()
        for m in self.methods:
            row: dict[str, object] = {"method": m, "n": len(common)}
            for k in METRICS:
                mean, std, _ = summarize([self.scores[m][f][k] for f in common])
                row[f"{k}_mean"], row[f"{k}_std"] = mean, std
            rows.append(row)
        return rows

    def paired_rows(self) -> list[dict[str, object]]:
        rows = []
        common = self.common()
        for a, b in combinations(self.methods, 2):
            for k in METRICS:
                diff = paired_difference([self.scores[a][f][k] for f in common], [self.scores[b][f][k] for f in common])
                rows.append({"a": a, "b": b, "metric": k, **diff})
        return rows

    def per_volume_rows(self) -> list[dict[str, object]]:
        return [{"method": m, "file": f, **s} for m in self.methods for f, s in sorted(self.scores[m].items())]


def evaluate(targets: dict[str, Path], methods: Sequence[Method], metrics: dict[str, MetricFn] | None = None,
             progress: bool = False) -> Evaluation:
    """Score every prediction of every method against its target (matched by file name)."""
    from tqdm import tqdm

    scores: dict[str, dict[str, dict[str, float]]] = {m.name: {} for m in methods}
    errors: list[str] = []
    notes: list[str] = []
    for m in methods:
        for name, path in tqdm(sorted(m.files.items()), desc=m.name, disable=not progress):
            if name not in targets:
                errors.append(f"{path}: no target file named {name} in the target folder")
                continue
            try:
                pred, target, cropped = read_pair(path, targets[name], m.dataset)
                scores[m.name][name] = score_volume(pred, target, metrics)
            except (ValueError, OSError) as err:
                errors.append(" ".join(str(err).split()))
                continue
            if cropped:
                notes.append(f"{m.name}: {name}: target centre-cropped to {pred.shape}")
    return Evaluation([m.name for m in methods], scores, errors, notes)


# ---------------------------------------------------------------------- output
def _fmt(key: str, value: object) -> str:
    if not isinstance(value, float):
        return str(value)
    if math.isnan(value):
        return "nan"
    return f"{value:.2f}" if key.startswith("psnr") else f"{value:.4f}"


def markdown(ev: Evaluation) -> str:
    """The summary (mean ± std) and paired-difference tables as Markdown."""
    lines = ["| method | n | " + " | ".join(k.upper() for k in METRICS) + " |",
             "|---|---:|" + "---:|" * len(METRICS)]
    for row in ev.summary_rows():
        cells = [f"{_fmt(k, row[f'{k}_mean'])} ± {_fmt(k, row[f'{k}_std'])}" for k in METRICS]
        lines.append(f"| {row['method']} | {row['n']} | " + " | ".join(cells) + " |")
    paired = ev.paired_rows()
    if paired:
        lines += ["", "Paired differences (B − A, mean with 95% CI, over the n volumes every method has):", "",
                  "| A | B | metric | mean diff | 95% CI | n |", "|---|---|---|---:|---|---:|"]
        for r in paired:
            k = str(r["metric"])
            lines.append(f"| {r['a']} | {r['b']} | {k.upper()} | {_fmt(k, r['mean_diff'])} | "
                         f"[{_fmt(k, r['ci_low'])}, {_fmt(k, r['ci_high'])}] | {r['n']} |")
    return "\n".join(lines) + "\n"


def _write_csv(path: Path, rows: list[dict[str, object]], columns: Sequence[str]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue())


def write_outputs(ev: Evaluation, out: str | os.PathLike) -> dict[str, Path]:
    """``per_volume.csv``, ``summary.csv``, ``paired.csv``, ``evaluation.md`` in ``out`` (created)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in ("per_volume.csv", "summary.csv", "paired.csv", "evaluation.md")}
    _write_csv(paths["per_volume.csv"], ev.per_volume_rows(), ("method", "file", *METRICS, "data_range"))
    _write_csv(paths["summary.csv"], ev.summary_rows(),
               ("method", "n", *[f"{k}_{s}" for k in METRICS for s in ("mean", "std")]))
    _write_csv(paths["paired.csv"], ev.paired_rows(), ("a", "b", "metric", "mean_diff", "ci_low", "ci_high", "n"))
    with atomic_path(paths["evaluation.md"]) as tmp:
        tmp.write_text(markdown(ev))
    return paths


# ---------------------------------------------------------------------- command line
def build_parser(prog: str = "python -m melrecon.evaluate") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    p.add_argument("--target", required=True, help="folder of files in the melrecon layout (their 'target')")
    p.add_argument("--predictions", required=True, nargs="+",
                   help="one folder per method, with <stem>.h5 files holding 'reconstruction'")
    p.add_argument("--names", nargs="+", help="method names, one per predictions folder (default: folder names)")
    p.add_argument("--zero-filled", action="store_true",
                   help="also score the 'zero_filled' dataset of the first predictions folder")
    p.add_argument("--out", default="evaluation", help="output folder for the CSV and Markdown files")
    return p


def _methods(args: argparse.Namespace) -> list[Method]:
    folders = [Path(p) for p in args.predictions]
    names = args.names or [f.resolve().name for f in folders]
    if len(names) != len(folders):
        raise EvaluateError(f"--names gives {len(names)} names for {len(folders)} predictions folders")
    if len(set(names)) != len(names):
        raise EvaluateError(f"method names must differ, got {names} (set them with --names)")
    methods = [Method(n, index_files(f, "predictions")) for n, f in zip(names, folders)]
    if args.zero_filled:
        methods.insert(0, Method(f"zero-filled ({names[0]})", methods[0].files, "zero_filled"))
    return methods


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        targets = index_files(args.target, "target")
        methods = _methods(args)
    except EvaluateError as err:
        print(f"melrecon: error: {err}", file=sys.stderr)
        return 2
    ev = evaluate(targets, methods, progress=sys.stderr.isatty())
    for note in ev.notes:
        print(f"note   {note}")
    for msg in ev.errors:
        print(f"FAILED {msg}", file=sys.stderr)
    if not any(ev.scores.values()):
        print("melrecon: error: no prediction could be scored", file=sys.stderr)
        return 1
    missing = ev.missing()
    if missing:
        lacks = "; ".join(f"{m} lacks {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
                          for m, names in missing.items())
        print(f"melrecon: warning: methods are compared on the {len(ev.common())} volume(s) every method has; "
              f"left out: {lacks}", file=sys.stderr)
        if not ev.common():
            print("melrecon: error: no volume was scored for every method", file=sys.stderr)
            return 1
    paths = write_outputs(ev, args.out)
    print(markdown(ev), end="")
    print(f"tables in {paths['evaluation.md'].parent} ({', '.join(paths)})")
    return 1 if ev.errors or missing else 0


if __name__ == "__main__":
    sys.exit(main())
