"""One study run inside its Hydra job: train, then score the checkpoint chosen on val on the test split.

:class:`StudyJob` wraps ``train.py``'s task function (the sweeper
``hydra/sweeper=melrecon_run_list`` hands it to the launcher, so it runs wherever the launcher
runs the job: in the study process, or on a SLURM node). After training it

1. takes the checkpoint ModelCheckpoint chose on validation (``best_model_path`` saved in
   ``last.ckpt``; the monitor is ``val/ssim``),
2. reconstructs every test file with it (:func:`melrecon.study.adapter.reconstruct_file`) and
   scores each volume (:func:`melrecon.study.adapter.volume_metrics`),
3. measures what the summary reports: parameter count, the autograd memory of one training step
   (:class:`melrecon.mel.MemoryProbe`; plus the CUDA peak on a GPU), and reads the step time and
   peak memory the training logged (``train/step_time_s``, ``train/peak_mem_gib``),
4. measures the training step's memory of the trained network in every memory mode of the
   study (:func:`measure_memory_modes`: same weights and batch, ``model.memory`` switched; the
   modes' gradients are equal, so one trained network stands for all of them),
5. writes ``<run>/study/scores.csv`` (one row per test volume), ``info.json``, ``memory.json``
   and ``panel.npz`` (the panel volume's reconstruction), then, last and atomically,
   ``<run>/study/done.json``: the marker by which the study skips a finished run
   (:func:`read_done`: a marker that cannot be read, or beside missing or broken study files,
   makes the run unfinished again).

A job resumed from a checkpoint that had already reached the end of training (the run was
killed while being scored) skips training and only scores (:func:`training_complete`).
"""

from __future__ import annotations

import csv
import logging
import math
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from melrecon.data.batch import ReconBatch
from melrecon.study import adapter
from melrecon.study.files import read_csv, read_json, write_csv, write_json

log = logging.getLogger("melrecon.study")

SCORE_COLUMNS = ("volume", "psnr", "ssim", "nmse", "acceleration", "recon_time_s")
DONE = "done.json"
MEMORY = "memory.json"


def study_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "study"


def read_done(run_dir: Path) -> tuple[dict[str, Any] | None, str | None]:
    """``(marker, None)`` for a finished run: ``study/done.json`` a JSON object with its
    ``overrides`` list, beside a readable ``scores.csv`` (header and at least one volume) and
    ``info.json``. ``(None, why)`` when the marker exists but the run's study files are not whole
    (a truncated, empty or malformed file, a deleted ``scores.csv``): the run is unfinished and
    is scored again. ``(None, None)`` without a marker."""
    out = study_dir(run_dir)
    if not (out / DONE).is_file():
        return None, None
    try:
        marker = read_json(out / DONE)
        if not isinstance(marker, dict) or not isinstance(marker.get("overrides"), list):
            return None, f"{out / DONE} is not a study marker (no overrides list)"
        rows = read_csv(out / "scores.csv")
        if not rows or any(r.get(c) in (None, "") for r in rows for c in SCORE_COLUMNS):
            return None, f"{out / 'scores.csv'} holds no complete per-volume rows"
        if not isinstance(read_json(out / "info.json"), dict):
            return None, f"{out / 'info.json'} is not a JSON object"
    except (OSError, ValueError, csv.Error) as err:  # json.JSONDecodeError is a ValueError
        return None, f"{out}: {type(err).__name__}: {' '.join(str(err).split())}"
    return marker, None


def is_done(run_dir: Path) -> bool:
    return read_done(run_dir)[0] is not None


def training_complete(ckpt_path: str | Path, trainer_cfg: Any) -> bool:
    """Whether the run of ``ckpt_path`` had reached the end of training (``trainer.max_steps``
    optimizer steps, or ``trainer.max_epochs`` completed epochs): resuming it would train
    nothing and validate nothing (what a run killed while being scored leaves)."""
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    max_steps = int(trainer_cfg.get("max_steps") or -1)
    if max_steps > 0 and int(ckpt.get("global_step", 0)) >= max_steps:
        return True
    max_epochs = int(trainer_cfg.get("max_epochs") or -1)
    try:
        epochs = int(ckpt["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"])
    except (KeyError, TypeError):
        return False
    return max_epochs > 0 and epochs >= max_epochs


def best_checkpoint(run_dir: Path) -> tuple[Path, float | None]:
    """The checkpoint chosen on validation and its monitored value.

    ModelCheckpoint's state in ``last.ckpt`` names the best file; a run folder that was moved
    still works, because the file is looked up by name in ``<run>/checkpoints/``.
    """
    ckpt_dir = Path(run_dir) / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    if not last.is_file():
        raise FileNotFoundError(f"{run_dir}: no checkpoints/last.ckpt (did training run and validate?)")
    state = torch.load(last, map_location="cpu", weights_only=False).get("callbacks", {})
    for key, value in state.items():
        if key.startswith("ModelCheckpoint") and value.get("best_model_path"):
            best = ckpt_dir / Path(value["best_model_path"]).name
            if best.is_file():
                score = value.get("best_model_score")
                return best, (None if score is None else float(score))
    raise FileNotFoundError(f"{run_dir}: last.ckpt names no best checkpoint (is callbacks.model_checkpoint "
                            "monitoring a validation metric?)")


def logged_training_stats(run_dir: Path) -> dict[str, float]:
    """Median ``train/step_time_s`` (first step excluded: warm-up) and max ``train/peak_mem_gib``
    over every CSV log of the run (a resumed run has several versions)."""
    times, mems = [], []
    for path in sorted(Path(run_dir).glob("csv/version_*/metrics.csv")):
        rows = read_csv(path)
        times += [float(r["train/step_time_s"]) for r in rows if r.get("train/step_time_s")][1:]
        mems += [float(r["train/peak_mem_gib"]) for r in rows if r.get("train/peak_mem_gib")]
    return {"step_time_s": statistics.median(times) if times else math.nan,
            "peak_mem_gib": max(mems) if mems else math.nan}


def probe_training_step(net: torch.nn.Module, batch: ReconBatch, device: torch.device) -> dict[str, float]:
    """Bytes autograd holds during one forward + backward on ``batch`` (MiB), and on CUDA the
    allocator's peak: the memory a training step needs, comparable across devices."""
    from melrecon.mel.memory import MemoryProbe

    net.train()
    args = [t.to(device) for t in (batch.x0, batch.kspace, batch.maps, batch.mask)]
    target = batch.target.to(device)
    with MemoryProbe(cuda=device.type == "cuda") as probe:
        loss = (net(*args) - target).abs().mean()
        loss.backward()
    net.zero_grad(set_to_none=True)
    net.eval()
    cuda = probe.cuda_peak_bytes / 2**20 if probe.cuda_peak_bytes is not None else math.nan
    return {"probe_step_mib": probe.peak_bytes / 2**20, "cuda_step_mib": cuda}


def measure_memory_modes(cfg: Any, ckpt: Path, modes: Sequence[str], device: torch.device) -> dict[str, Any]:
    """The memory of one training step of the network of ``cfg`` with the weights of ``ckpt`` in
    each memory mode (``model.memory`` switched, nothing retrained): bytes autograd held
    (``probe_step_mib``) and, on CUDA, the allocator's peak (``cuda_step_mib``), on the first
    training batch, after one warm-up step (spectral-norm estimates and MEL's anchor controller
    settle, as in :func:`melrecon.bench.measure_step`)."""
    import hydra
    from omegaconf import OmegaConf

    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    out: dict[str, Any] = {}
    for mode in modes:
        mode_cfg = OmegaConf.merge(cfg, {"model": {"memory": str(mode)}})
        net = adapter.load_network(mode_cfg, ckpt).to(device)
        probe_training_step(net, batch, device)  # warm-up
        out[str(mode)] = probe_training_step(net, batch, device)
        del net
    return {"checkpoint": Path(ckpt).name, "device": str(device), "modes": out}


def memory_of_modes(cfg: Any, run_dir: Path, modes: Sequence[str], device: torch.device | None = None) -> dict[str, Any]:
    """``<run>/study/memory.json``, measured (:func:`measure_memory_modes` on the checkpoint
    chosen on validation) unless it holds every mode of ``modes`` for that checkpoint."""
    path = study_dir(run_dir) / MEMORY
    ckpt, _ = best_checkpoint(run_dir)
    if path.is_file():
        known = read_json(path)
        if known.get("checkpoint") == ckpt.name and set(modes) <= set(known.get("modes", {})):
            return known
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = measure_memory_modes(cfg, ckpt, modes, device)
    write_json(path, result)
    return result


def score_run(cfg: Any, run_dir: Path, record: dict[str, Any]) -> dict[str, Any]:
    """Score a trained run on the test split and write its study files (see the module doc)."""
    import hydra

    run_dir = Path(run_dir)
    out = study_dir(run_dir)
    opts = record.get("score", {})
    device = torch.device(opts.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
    ckpt, val_score = best_checkpoint(run_dir)
    net = adapter.load_network(cfg, ckpt).to(device)
    n_params = sum(p.numel() for p in net.parameters())

    datamodule = hydra.utils.instantiate(cfg.data)
    test_files = datamodule.split_files("test")
    settings = adapter.eval_settings(cfg)
    rows = []
    panel_index = int(opts.get("panel_index", 0)) % len(test_files)
    for i, path in enumerate(test_files):
        t0 = time.perf_counter()
        res = adapter.reconstruct_file(net, settings, path, device, int(opts.get("batch_size", 1)))
        dt = time.perf_counter() - t0
        rows.append({"volume": Path(path).name, **adapter.volume_metrics(res.reconstruction, res.target, res.data_range),
                     "acceleration": res.acceleration, "recon_time_s": dt})
        if i == panel_index:
            out.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(out / "panel.npz", reconstruction=res.reconstruction, target=res.target,
                                zero_filled=res.zero_filled, volume=Path(path).name)

    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    memory = probe_training_step(net, batch, device)
    info = {"name": run_dir.name, "checkpoint": ckpt.name, "val_monitor": val_score, "n_params": n_params,
            "device": str(device), **logged_training_stats(run_dir), **memory,
            "test_files": [Path(p).name for p in test_files]}
    write_csv(out / "scores.csv", rows, SCORE_COLUMNS)
    write_json(out / "info.json", info)
    memory_of_modes(cfg, run_dir, record.get("probe_modes") or (), device)
    # the study's overrides, without the ckpt_path= of a resumed run (the marker identifies the run)
    overrides = [o for o in record.get("overrides", []) if not o.startswith("ckpt_path=")]
    write_json(out / DONE, {"name": run_dir.name, "overrides": overrides,
                            "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
    return info


class StudyJob:
    """Task function of a study job: ``task_function(cfg)`` (training), then :func:`score_run`.

    Picklable (the submitit launcher ships it to the cluster). The run's record is looked up in
    the runs file by the job's folder name (``hydra.sweep.subdir``).
    """

    def __init__(self, task_function: Callable[[Any], Any], runs_file: str | None) -> None:
        self.task_function = task_function
        self.runs_file = runs_file

    def __call__(self, cfg: Any) -> Any:
        from hydra.core.hydra_config import HydraConfig

        run_dir = Path(HydraConfig.get().runtime.output_dir)
        records = {r["name"]: r for r in read_json(self.runs_file)["runs"]} if self.runs_file else {}
        record = records.get(run_dir.name, {"name": run_dir.name})
        ckpt = cfg.get("ckpt_path")
        if ckpt and training_complete(ckpt, cfg.trainer):
            # killed while being scored: nothing left to train (resuming would train 0 steps,
            # validate nothing and fail on the missing metric), so score its checkpoints
            log.info("run %s: trained to the end before (%s); scoring its checkpoints", run_dir.name, ckpt)
            score_run(cfg, run_dir, record)
            return None
        try:
            value = self.task_function(cfg)
        except SystemExit as err:  # app.main exits on configuration errors: fail this job only
            raise RuntimeError(f"training of study run {run_dir.name} exited with status {err.code} "
                               f"(see {run_dir}/train.log and the messages above)") from None
        score_run(cfg, run_dir, record)
        return value
