"""Short training runs through ``train.py``, and the check that ``train/peak_mem_gib`` is the
device's own memory figure.

    python benchmarks/gpu/train_runs.py --device cuda --csv OUT/train.csv --work WORK
    python benchmarks/gpu/train_runs.py --device cuda --precision bf16-mixed --experiments bf16 ...

Each experiment (``all``: every ``conf/experiment/*.yaml``; ``bf16``: the profile's pair in
profiles.BF16_EXPERIMENTS; or names) runs as ``train.py +experiment=NAME trainer=gpu|cpu trainer.precision=P`` plus the
profile's overrides (profiles.TRAIN_OVERRIDES: one epoch of a few steps), in its own process
with its own timeout, logging to CSV (and to W&B offline when wandb is importable). Its
``metrics.csv`` then gives one row:

- ``train_steps``, ``loss_first``/``loss_last`` (finite), ``step_time_s`` (median), ``val_psnr``;
- ``peak_mem_gib`` (largest step), ``peak_mem_reserved_gib`` and ``peak_mem_source``: ``cuda``
  when PeakMemoryMonitor logged its CUDA-only reserved figure, ``rss`` (process resident set
  size) otherwise;
- ``mem_check``: ``pass`` when the source matches the device and, on CUDA, every step's
  allocated peak is positive and at most its reserved peak (the allocator's two statistics,
  which the RSS fallback cannot produce);
- ``mel_fallbacks`` (sum over steps) and ``mel_drift`` (largest): MEL recomputing a segment by a
  forward pass because the inverse missed its tolerance (e.g. a bf16 CNN), and the drift seen;
- ``loss_check``: ``pass`` when at least one training loss was logged and all are finite;
- ``wandb_offline``: whether the W&B offline run file was written.

``status``: ``ok`` (both checks pass), ``check failed``, ``failed`` (non-zero exit), ``timeout``,
``skipped`` (time budget spent).

Synthetic data and the mask cache live under ``--work``. Runs that share a data folder run one
after the other (the first generates the data); up to ``--jobs`` such lanes run side by side, so
step times are those of a shared machine (bench.py's are the timing figures).
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Sequence
from pathlib import Path
from typing import Any

KIT = Path(__file__).resolve().parent
ROOT = KIT.parents[1]
if str(KIT) not in sys.path:
    sys.path.insert(0, str(KIT))

from profiles import BF16_EXPERIMENTS, TRAIN_OVERRIDES  # noqa: E402
from rows import RowWriter, number, read_rows  # noqa: E402

COLUMNS = ("experiment", "precision", "status", "wall_s", "train_steps", "peak_mem_gib", "peak_mem_reserved_gib",
           "peak_mem_source", "mem_check", "loss_check", "step_time_s", "loss_first", "loss_last", "val_psnr",
           "mel_fallbacks", "mel_drift", "wandb_offline", "note")
MIN_RUN_S = 10.0  # do not start a run with less time than this left


def wandb_problem() -> str | None:
    """None when ``import wandb`` works; else why not (the runs then log to CSV only, so that a
    W&B problem on the machine does not hide the training checks)."""
    try:
        importlib.import_module("wandb")
    except Exception as exc:  # noqa: BLE001 - any import failure means: no W&B here
        return f"{type(exc).__name__}: {exc}".splitlines()[0][:160]
    return None


def all_experiments() -> list[str]:
    return sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))


def resolve_experiments(names: Sequence[str], profile: str) -> list[str]:
    """``all`` | ``bf16`` (the profile's bf16 pair) | experiment names (checked against conf/experiment/)."""
    known = all_experiments()
    if list(names) == ["all"]:
        return known
    if list(names) == ["bf16"]:
        names = BF16_EXPERIMENTS[profile]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"train_runs: unknown experiment(s) {unknown}; conf/experiment/ has {known}")
    return list(names)


def command(experiment: str, device: str, precision: str, profile: str, run_dir: Path, logger: str) -> list[str]:
    """The train.py command line of one run (its Hydra run folder is ``run_dir``)."""
    return [sys.executable, str(ROOT / "train.py"), f"+experiment={experiment}",
            f"trainer={'gpu' if device == 'cuda' else 'cpu'}", f"trainer.precision={precision}", f"logger={logger}",
            f"hydra.run.dir={run_dir}", f"paths.log_dir={run_dir.parent}", *TRAIN_OVERRIDES[profile]]


def run_env(work: Path) -> dict[str, str]:
    """The runs' environment: data, caches and W&B files under ``work``, W&B offline."""
    env = dict(os.environ)
    env.update(MELRECON_DATA_DIR=str(work / "data"), MELRECON_CACHE_DIR=str(work / "cache"),
               MELRECON_ROOT=str(ROOT), WANDB_MODE="offline", WANDB_SILENT="true",
               WANDB_CONFIG_DIR=str(work / "wandb" / "config"), WANDB_CACHE_DIR=str(work / "wandb" / "cache"),
               WANDB_DATA_DIR=str(work / "wandb" / "data"), HYDRA_FULL_ERROR="1", PYTHONUNBUFFERED="1")
    return env


def run_process(cmd: list[str], env: dict[str, str], log: Path, timeout: float) -> tuple[int | None, float]:
    """Run ``cmd`` with output to ``log``; on timeout kill its whole process group (W&B's service
    too). Returns (exit code or None on timeout, seconds)."""
    t0 = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc: int | None = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    return rc, time.monotonic() - t0


def metrics_of(run_dir: Path, device: str, gpu_total_gib: float | None) -> dict[str, Any]:
    """Row fields from the run's CSV-logger ``metrics.csv`` (see the module docstring)."""
    files = sorted(run_dir.glob("csv/*/metrics.csv"))
    if not files:
        return {"mem_check": "fail", "loss_check": "fail", "note": f"no metrics.csv under {run_dir / 'csv'}"}
    rows = read_rows(files[-1])
    losses = [v for r in rows if (v := number(r.get("train/loss"))) is not None]
    pairs = [(number(r.get("train/peak_mem_gib")), number(r.get("train/peak_mem_reserved_gib"))) for r in rows
             if number(r.get("train/peak_mem_gib")) is not None]
    times = [v for r in rows if (v := number(r.get("train/step_time_s"))) is not None]
    psnr = [v for r in rows if (v := number(r.get("val/psnr"))) is not None]
    fallbacks = [v for r in rows if (v := number(r.get("mel/fallbacks"))) is not None]
    drift = [v for r in rows if (v := number(r.get("mel/drift"))) is not None]
    peaks = [p for p, _ in pairs]
    reserved = [q for _, q in pairs if q is not None]
    source = "cuda" if reserved else "rss"
    out: dict[str, Any] = {
        "train_steps": len(losses), "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None, "step_time_s": statistics.median(times) if times else None,
        "val_psnr": psnr[-1] if psnr else None, "peak_mem_gib": max(peaks) if peaks else None,
        "peak_mem_reserved_gib": max(reserved) if reserved else None, "peak_mem_source": source if peaks else None,
        "mel_fallbacks": sum(fallbacks) if fallbacks else None, "mel_drift": max(drift) if drift else None,
    }
    mem: list[str] = []
    if not peaks:
        mem.append("train/peak_mem_gib was not logged")
    elif device == "cuda":
        if source != "cuda":
            mem.append("no train/peak_mem_reserved_gib: the monitor took the CPU (RSS) branch on a GPU run")
        elif any(q is None or not 0 < p <= q for p, q in pairs):
            mem.append("a step's allocated peak is not in (0, reserved peak]")
        elif gpu_total_gib is not None and max(peaks) > gpu_total_gib:
            mem.append(f"peak {max(peaks):.1f} GiB exceeds the card's {gpu_total_gib:.1f} GiB")
    elif source != "rss" or min(peaks) <= 0:
        mem.append("on CPU the peak must be the process RSS (> 0) and no reserved figure is logged")
    loss: list[str] = []
    if not losses:
        loss.append("no train/loss logged")
    elif not all(math.isfinite(v) for v in losses):
        loss.append("non-finite training loss")
    out["mem_check"] = "fail" if mem else "pass"
    out["loss_check"] = "fail" if loss else "pass"
    if mem or loss:
        out["note"] = "; ".join(mem + loss)
    return out


def data_lanes(experiments: Sequence[str], profile: str) -> list[list[str]]:
    """The experiments grouped by data folder (``data.root`` as configured, before interpolation).

    Runs of one lane go one after the other (the first generates the synthetic data, which two
    concurrent runs must not do at once); lanes may run side by side.
    """
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    lanes: dict[str, list[str]] = {}
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for exp in experiments:
            cfg = compose(config_name="train", overrides=[f"+experiment={exp}", *TRAIN_OVERRIDES[profile]])
            root = OmegaConf.to_container(cfg.data, resolve=False).get("root")
            lanes.setdefault(str(root), []).append(exp)
    return list(lanes.values())


def _tail(path: Path, n: int = 25) -> str:
    lines = path.read_text(errors="replace").splitlines() if path.is_file() else []
    return "\n".join(lines[-n:])


class Runner:
    """Runs experiments (train.py processes) and writes one row each; shared by the lane threads."""

    def __init__(self, args: argparse.Namespace, writer: RowWriter, logger: str, gpu_total: float | None) -> None:
        self.args, self.writer, self.logger, self.gpu_total = args, writer, logger, gpu_total
        self.env = run_env(args.work)
        self.tag = args.precision.replace("-", "_")
        self.deadline = time.monotonic() + args.budget_s
        self.lock = threading.Lock()
        self.failures = 0

    def lane(self, experiments: Sequence[str]) -> None:
        for exp in experiments:
            row = self.one(exp)
            with self.lock:
                self.failures += row["status"] not in ("ok", "skipped")
                self.writer.write(row)
                print(f"train: {exp:20} {self.args.precision:10} {row['status']:12} wall={row.get('wall_s', 0):.1f}s "
                      f"steps={row.get('train_steps', '-')} peak_mem={row.get('peak_mem_gib')} GiB "
                      f"({row.get('peak_mem_source')}, check {row.get('mem_check', '-')}) "
                      f"wandb={row.get('wandb_offline', '-')} {row.get('note', '')}", flush=True)

    def one(self, exp: str) -> dict[str, Any]:
        args = self.args
        row: dict[str, Any] = {"experiment": exp, "precision": args.precision}
        left = self.deadline - time.monotonic()
        if left < MIN_RUN_S:
            row.update(status="skipped", note=f"time budget ({args.budget_s:g} s) spent")
            return row
        run_dir = args.work / "runs" / f"{exp}-{self.tag}"
        log = args.work / "runs" / f"{exp}-{self.tag}.log"
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        cmd = command(exp, args.device, args.precision, args.profile, run_dir, self.logger)
        rc, wall = run_process(cmd, self.env, log, min(args.per_run_s, left))
        row["wall_s"] = wall
        if rc is None:
            row.update(status="timeout", note=f"killed after {wall:.0f} s")
            row.update({k: v for k, v in metrics_of(run_dir, args.device, self.gpu_total).items() if k != "note"})
        elif rc != 0:
            row.update(status="failed", note=f"exit code {rc}: " + _tail(log, 1)[:200])
        else:
            row.update(metrics_of(run_dir, args.device, self.gpu_total))
            row["status"] = "ok" if row["mem_check"] == row["loss_check"] == "pass" else "check failed"
        if self.logger == "wandb_csv":
            row["wandb_offline"] = "yes" if any(run_dir.glob("wandb/offline-run-*/run-*.wandb")) else "no"
        if row["status"] != "ok":
            with self.lock:
                print(f"train: {exp} ({args.precision}) {row['status']}; last lines of {log}:\n{_tail(log)}",
                      flush=True)
        return row


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], required=True)
    ap.add_argument("--profile", choices=sorted(TRAIN_OVERRIDES), default="paper")
    ap.add_argument("--precision", default="32", help="trainer.precision (32, bf16-mixed, ...)")
    ap.add_argument("--experiments", nargs="+", default=["all"], help="all | bf16 | NAME ...")
    ap.add_argument("--csv", type=Path, required=True, help="output CSV (rewritten unless --append)")
    ap.add_argument("--append", action="store_true", help="add the rows to an existing --csv")
    ap.add_argument("--work", type=Path, required=True, help="folder for runs, data and caches")
    ap.add_argument("--per-run-s", type=float, default=60.0, help="timeout of one run")
    ap.add_argument("--budget-s", type=float, default=1e9, help="start no run after this many seconds")
    ap.add_argument("--jobs", type=int, default=2, help="data lanes run side by side (runs of a lane: in turn)")
    args = ap.parse_args(argv)
    if args.jobs < 1:
        ap.error(f"--jobs must be >= 1, got {args.jobs}")

    experiments = resolve_experiments(args.experiments, args.profile)
    no_wandb = wandb_problem()
    logger = "csv" if no_wandb else "wandb_csv"
    if no_wandb:
        print(f"train: W&B unusable here ({no_wandb}): logging to CSV only", flush=True)
    gpu_total = None
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            ap.error(f"--device cuda: torch {torch.__version__} sees no CUDA device")
        gpu_total = torch.cuda.get_device_properties(0).total_memory / 2**30
    lanes = data_lanes(experiments, args.profile)
    print(f"train: {len(experiments)} run(s) on {args.device}, precision {args.precision}, profile {args.profile}, "
          f"logger {logger}, {args.per_run_s:g} s each, budget {args.budget_s:g} s, lanes {lanes}, "
          f"{min(args.jobs, len(lanes))} at a time", flush=True)
    with RowWriter(args.csv, COLUMNS, append=args.append) as writer:
        runner = Runner(args, writer, logger, gpu_total)
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            for future in [pool.submit(runner.lane, lane) for lane in lanes]:
                future.result()
    return 1 if runner.failures else 0


if __name__ == "__main__":
    sys.exit(main())
