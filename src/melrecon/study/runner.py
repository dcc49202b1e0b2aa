"""Run a study end to end: plan, train through Hydra's launcher, baselines, statistics, report.

``run_study(name, overrides)`` (``python -m melrecon.study NAME [key=value ...] [-- train.py args]``):

1. compose the study (:mod:`melrecon.study.config`), compose every run's training config,
   refuse runs that differ in data or budget, print each network's parameter count;
2. generate the (synthetic) data once, before any job starts (jobs may run in parallel);
3. plan: a run whose ``study/done.json`` exists with the same overrides is skipped (other
   overrides: an error, the folder belongs to another study config); an unfinished run
   (no marker, or one that cannot be read or whose ``scores.csv`` is missing or broken: said
   in one line) continues from its ``last.ckpt`` (``resume: last``; a run that had finished
   training is only scored) or is removed and restarted;
4. launch the remaining runs as one Hydra multirun of ``train.py`` with the run-list sweeper
   (``hydra/sweeper=melrecon_run_list``) and the study's launcher (``basic`` in this process, or
   e.g. ``slurm``); each job trains and scores itself (:mod:`melrecon.study.job`);
5. baselines (:mod:`melrecon.study.baseline_runs`), each resumable the same way, scored in this
   process while the training runs (subprocesses) train; then each finished run's memory per
   mode (``<run>/study/memory.json``, measured here if the job did not);
6. the report (:mod:`melrecon.study.report`): ``results.csv``, ``summary.md``, plots, W&B table.

One study writes ``out_dir`` at a time (:func:`lock_study_folder`; a second one is refused).
Folder ``out_dir``: ``study.yaml`` (the composed study), ``runs/<name>/`` (Hydra job folders),
``baselines/<name>/``, ``results.csv``, ``summary.md``, ``*.png``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from melrecon import cpu_threads
from melrecon.data.locks import LockBusy, file_lock, holder
from melrecon.study import job
from melrecon.study.config import (
    RunSpec, StudyError, check_same_budget, compose_study, compose_train, count_parameters, format_overrides,
    format_value, repo_root, run_label, run_settings, run_specs,
)
from melrecon.study.files import write_json, write_text

log = logging.getLogger("melrecon.study")
STUDY_LOCK = ".melrecon-study.lock"
"""Lock file in a study's ``out_dir``, held by the one study writing it (:func:`lock_study_folder`)."""


def run_identity(overrides: Sequence[str]) -> list[str]:
    """The overrides that define what a run computes: all but the logger (switching W&B on for
    a finished study must not retrain it) and the ckpt_path of a resumed run."""
    return [o for o in overrides if not o.startswith(("logger=", "ckpt_path="))]


def plan_runs(specs: Sequence[RunSpec], runs_dir: Path, resume: str) -> list[RunSpec]:
    """The runs still to do, with ``ckpt_path=`` added where an unfinished run can continue.

    Finished runs (done marker with the same overrides) are skipped; a marker with other
    overrides is an error naming the folder; unfinished folders are resumed or removed.
    """
    pending = []
    for spec in specs:
        run_dir = runs_dir / spec.name
        marker, broken = job.read_done(run_dir)
        if broken:
            log.warning("run %s: unfinished (%s); scoring it again", spec.name, broken)
        if marker is not None:
            made_with = marker.get("overrides")
            if run_identity(made_with or []) != run_identity(spec.overrides):
                raise StudyError(f"{run_dir} holds a finished run made with other overrides ({made_with}); "
                                 "delete it or choose another out_dir")
            log.info("run %s: finished, skipped", spec.name)
            continue
        last = run_dir / "checkpoints" / "last.ckpt"
        if resume == "last" and last.is_file():
            log.info("run %s: unfinished, continuing from %s", spec.name, last)
            pending.append(RunSpec(spec.name, spec.label, [*spec.overrides, f"ckpt_path={format_value(str(last))}"],
                                   spec.settings))
            continue
        if run_dir.exists():
            log.info("run %s: unfinished, removing %s and starting again", spec.name, run_dir)
            shutil.rmtree(run_dir)
        pending.append(spec)
    return pending


def multirun_command(pending: Sequence[RunSpec], launch_file: Path, out_dir: Path, cfg: DictConfig,
                     hydra_args: Sequence[str]) -> list[str]:
    """The ``train.py`` multirun over ``pending`` through the run-list sweeper and the study's
    launcher; writes ``launch_file`` (read by the sweeper and by each job, :class:`job.StudyJob`)."""
    score = OmegaConf.to_container(cfg.get("score") or {}, resolve=True)
    modes = list(cfg.get("probe_modes") or [])
    write_json(launch_file, {"runs": [{"name": s.name, "overrides": s.overrides, "score": score, "probe_modes": modes}
                                      for s in pending]})
    launcher = cfg.get("launcher") or {}
    cmd = [sys.executable, str(repo_root() / "train.py"), "-m", "hydra/sweeper=melrecon_run_list",
           f"hydra.sweeper.runs_file={launch_file}", f"hydra.sweep.dir={out_dir / 'runs'}"]
    if launcher.get("name") and launcher.name != "basic":
        cmd.append(f"hydra/launcher={launcher.name}")
    return cmd + format_overrides(launcher.get("overrides")) + list(hydra_args)


def launch(pending: Sequence[RunSpec], out_dir: Path, cfg: DictConfig, hydra_args: Sequence[str]) -> None:
    """Train ``pending``: one multirun through the study's launcher, or, with the basic launcher
    and ``launcher.parallel: K > 1``, K multiruns at a time over a queue of single runs (in
    config order), each with one thread (``OMP_NUM_THREADS=1``) unless the user set
    ``OMP_NUM_THREADS`` (not melrecon's own default, :mod:`melrecon.cpu_threads`): K processes on
    K cores, none waiting for another's threads."""
    launcher = cfg.get("launcher") or {}
    parallel = int(launcher.get("parallel", 1))
    if parallel <= 1 or (launcher.get("name") or "basic") != "basic":
        cmd = multirun_command(pending, out_dir / "launch.json", out_dir, cfg, hydra_args)
        log.info("launching %d run(s): %s", len(pending), " ".join(cmd))
        codes = [subprocess.run(cmd, cwd=repo_root()).returncode]
    else:
        threads = os.environ["OMP_NUM_THREADS"] if cpu_threads.user_set("OMP_NUM_THREADS") else "1"
        env = {**os.environ, "OMP_NUM_THREADS": threads}
        env.pop(cpu_threads.CHOSEN, None)  # the jobs' thread count is this launcher's choice
        queue = list(pending)
        running: list[subprocess.Popen] = []
        codes = []
        try:
            while queue or running:
                while queue and len(running) < parallel:
                    spec = queue.pop(0)
                    cmd = multirun_command([spec], out_dir / f"launch-{spec.name}.json", out_dir, cfg, hydra_args)
                    log.info("launching run %s (%d at a time): %s", spec.name, parallel, " ".join(cmd))
                    # a session of its own: Linux's autogroup scheduler shares the CPUs between
                    # sessions, so K runs in the study's session would get one session's share
                    running.append(subprocess.Popen(cmd, cwd=repo_root(), env=env, start_new_session=True))
                time.sleep(1.0)
                for proc in [p for p in running if p.poll() is not None]:
                    codes.append(proc.returncode)
                    running.remove(proc)
        finally:  # interrupted (Ctrl-C reaches only this session): stop the runs; they resume from last.ckpt
            for proc in running:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
    failed = [s.name for s in pending if not job.is_done(out_dir / "runs" / s.name)]
    if any(codes) or failed:
        raise StudyError(f"training runs failed: {failed or 'see above'} (train.py exit status {max(codes)}); "
                         f"logs in {out_dir / 'runs'}/<run>/; run the study again to continue")


def split_extra(extra: Sequence[str]) -> tuple[list[str], list[str]]:
    """``--`` arguments: ``hydra...`` ones go to the multirun command, the rest to every run."""
    hydra_args = [a for a in extra if a.lstrip("+~").startswith("hydra")]
    return [a for a in extra if a not in hydra_args], hydra_args


def run_study(name: str, overrides: Sequence[str] = (), extra: Sequence[str] = ()) -> Path:
    """Run (or continue) study ``name``; return its folder."""
    command = " ".join(["python -m melrecon.study", name, *overrides, *(["--", *extra] if extra else [])])
    cfg = compose_study(name, overrides)
    out_dir = Path(cfg.out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    with lock_study_folder(out_dir):
        return _run_locked(cfg, out_dir, command, extra)


@contextlib.contextmanager
def lock_study_folder(out_dir: Path) -> Iterator[None]:
    """One study writes ``out_dir`` at a time: a second is refused at once (StudyError, one line)
    before it writes anything. Waiting instead would keep it silent for the whole of the first
    study, then rerun its plan; refusing says so while the user is there. The lock is an OS lock
    (:func:`melrecon.data.locks.file_lock`), released when the study ends, however it ends."""
    lock = out_dir / STUDY_LOCK
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(file_lock(lock, blocking=False))
        except LockBusy:
            raise StudyError(f"out_dir {out_dir} is being written by {holder(lock)} (another study); one study "
                             "writes a folder at a time: wait for it to end, or choose another out_dir") from None
        yield


def _run_locked(cfg: DictConfig, out_dir: Path, command: str, extra: Sequence[str]) -> Path:
    """The study in its locked folder (see :func:`run_study`)."""
    write_text(out_dir / "study.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    log.info("study %s (preset %s) in %s", cfg.name, cfg.preset.name, out_dir)
    if cfg.kind == "memory":
        from melrecon.study import memory_study

        memory_study.run(cfg, out_dir, command)
        return out_dir

    train_extra, hydra_args = split_extra(extra)
    specs = run_specs(cfg, train_extra)
    train_cfgs = {s.name: compose_train(s.overrides) for s in specs}
    check_same_budget(train_cfgs)
    describe_runs(specs, train_cfgs)
    for s in specs:
        log.info("run %-12s %-24s %8d parameters  %s", s.name, s.label, s.settings["n_params"],
                 ", ".join(f"{k}={v}" for k, v in s.settings.items() if k != "n_params"))
    write_json(out_dir / "plan.json", {s.name: {"label": s.label, "overrides": s.overrides, **s.settings} for s in specs})

    ref_cfg = train_cfgs[specs[0].name]
    prepare_data(ref_cfg)
    pending = plan_runs(specs, out_dir / "runs", str(cfg.get("resume", "last")))
    from melrecon.study import baseline_runs, report

    # the training runs are subprocesses: this process scores the baselines meanwhile (with
    # launcher.parallel > 1 the baselines fill the cores the runs leave idle near the end)
    with ThreadPoolExecutor(max_workers=1) as pool:
        training = pool.submit(launch, pending, out_dir, cfg, hydra_args) if pending else None
        try:
            baselines = baseline_runs.run_all(cfg, ref_cfg, out_dir)
        finally:
            if training is not None:
                training.result()  # waits for the runs; re-raises their failure

    modes = list(cfg.get("probe_modes") or [])
    for s in specs:  # runs finished before the study measured these modes: measured now, not retrained
        device = (cfg.get("score") or {}).get("device")
        job.memory_of_modes(train_cfgs[s.name], out_dir / "runs" / s.name, modes, device and torch.device(device))
    report.write_report(cfg, out_dir, specs, baselines, command)
    return out_dir


def describe_runs(specs: Sequence[RunSpec], train_cfgs: dict[str, DictConfig]) -> None:
    """Fill each run's settings (from its composed config) and its label (the config's label
    template filled from those settings, so it names what runs; runs left with one label get
    their names added)."""
    for s in specs:
        s.settings = {**run_settings(train_cfgs[s.name]), "n_params": count_parameters(train_cfgs[s.name])}
        s.label = run_label(s.label, s.settings, s.name)
    labels = [s.label for s in specs]
    for s in specs:
        if labels.count(s.label) > 1:
            s.label = f"{s.label} ({s.name})"


def prepare_data(train_cfg: DictConfig) -> None:
    """Generate the study's synthetic data once (checks an existing folder against the config)."""
    import hydra

    dm = hydra.utils.instantiate(train_cfg.data)
    dm.prepare_data()


__all__ = ["run_study", "lock_study_folder", "STUDY_LOCK", "plan_runs", "launch", "split_extra", "prepare_data",
           "describe_runs"]


