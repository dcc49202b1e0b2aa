"""Faults of two writers at once: one process writes a run folder, one study writes an out_dir.

Two resumes of one checkpoint used to both exit 0 with every step logged twice, ``-v1``
checkpoints and each process's live W&B folder moved aside by the other; two studies into one
``out_dir`` failed with a CSV error after training runs twice. The second writer is now
refused in one line before it writes anything; a writer killed with SIGKILL blocks no one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CONF, ROOT, run_train
from helpers import one_error_line, train_tiny_run

from melrecon.data.locks import file_lock
from melrecon.lit import app


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """{relative path: (size, mtime_ns)} of every file under ``folder``."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data_dir) -> Path:
    """A finished one-epoch tiny run with its CSV history (the folder a resume continues)."""
    return train_tiny_run(tmp_path_factory.mktemp("locked") / "run", CONF, data_dir, "logger=csv")


# ---------------------------------------------------------------------- one writer per run folder
def test_resume_into_a_run_folder_being_written_is_refused_in_one_line(finished_run, compose_cfg, capsys):
    """Another process writing the run folder (its lock held): a resume of the run's checkpoint
    exits 2 with one line naming the folder and the holder, and writes nothing there (no
    resumes.txt line, no checkpoint, no history rows). Once the writer is gone it resumes."""
    ckpt = finished_run / "checkpoints" / "last.ckpt"
    before = _snapshot(finished_run)
    cfg = compose_cfg("debug=tiny", "logger=csv", "trainer.max_epochs=2", f"ckpt_path={ckpt}")
    with file_lock(finished_run / app.RUN_LOCK):  # what the first resume holds while it trains
        with pytest.raises(SystemExit) as stop:
            app.main(cfg)
        after = _snapshot(finished_run)
    assert stop.value.code == 2
    line = one_error_line(capsys.readouterr().err, f"run folder {finished_run} is being written by process {os.getpid()}")
    assert "wait for it to end" in line
    after.pop(app.RUN_LOCK, None)  # the holder's own lock file
    assert after == before
    # the writer has finished: the same command resumes the run in its folder
    cfg = compose_cfg("debug=tiny", "logger=csv", "trainer.max_epochs=2", f"ckpt_path={ckpt}")
    app.main(cfg)
    names = sorted(p.name for p in (finished_run / "checkpoints").iterdir())
    assert "epoch_001.ckpt" in names and not any("-v" in n for n in names), names
    assert not (finished_run / app.RUN_LOCK).exists()  # released and removed


@pytest.mark.slow
def test_two_resumes_at_once_then_sigkill_of_the_writer(finished_run, compose_cfg, tmp_path, data_dir):
    """Real processes: resume A holds the run folder (idle in on_train_start); resume B of the
    same checkpoint, started meanwhile, exits 2 with one line and leaves the folder alone; A is
    then killed with SIGKILL (its lock dies with it) and resume C continues the run at once."""
    ckpt = finished_run / "checkpoints" / "last.ckpt"
    tests_dir = Path(__file__).resolve().parent
    env = {**os.environ, "MELRECON_DATA_DIR": str(data_dir), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
           "HYDRA_FULL_ERROR": "0", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": f"{tests_dir}{os.pathsep}{ROOT / 'src'}"}
    env.pop("WANDB_SERVICE", None)
    a = subprocess.Popen([sys.executable, str(ROOT / "train.py"), f"paths.log_dir={tmp_path / 'logs'}", "debug=tiny",
                          "logger=csv", "trainer.max_epochs=9", f"ckpt_path={ckpt}",
                          "+callbacks.hang._target_=crash.HangAt"],
                         cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    lock = finished_run / app.RUN_LOCK
    try:
        for line in a.stdout:  # A has set up its run (loggers, history) and holds the folder
            if line.startswith("HangAt: hanging"):
                break
        assert a.poll() is None and lock.read_text().strip() == str(a.pid)
        before = _snapshot(finished_run)
        b = run_train(["debug=tiny", "logger=csv", "trainer.max_epochs=9", f"ckpt_path={ckpt}"], tmp_path, data_dir)
        assert b.returncode == 2
        one_error_line(b.stderr, f"run folder {finished_run} is being written by process {a.pid}")
        assert _snapshot(finished_run) == before and a.poll() is None  # A and its files untouched
    finally:
        a.send_signal(signal.SIGKILL)
        a.wait()
    assert lock.is_file()  # left behind by the killed process; it blocks no one
    app.run(compose_cfg("debug=tiny", "logger=csv", "trainer.max_epochs=3", f"ckpt_path={ckpt}"))
    assert not lock.exists()


# ---------------------------------------------------------------------- one study per out_dir
def test_second_study_into_a_busy_out_dir_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    """A study running in out_dir (its lock held): a second study with the same out_dir exits 2
    with one line, before it writes anything (study.yaml, plan, data, training)."""
    from melrecon.study import __main__ as study_main
    from melrecon.study import runner

    def started(*args, **kwargs):
        raise AssertionError("the second study went on writing into the busy out_dir")

    for name in ("write_text", "write_json", "prepare_data", "launch"):
        monkeypatch.setattr(runner, name, started)
    out = tmp_path / "study"
    out.mkdir()
    with file_lock(out / runner.STUDY_LOCK):
        code = study_main.main(["cine_depth", "preset=tiny", f"out_dir={out}"])
    assert code == 2
    line = one_error_line(capsys.readouterr().err, f"out_dir {out} is being written by process {os.getpid()}",
                           prefix="melrecon.study: error:")
    assert "another study" in line
    assert sorted(p.name for p in out.iterdir()) == []


def test_a_lock_held_by_a_killed_process_is_free(tmp_path):
    """kill -9 of a lock holder: the kernel drops its flock, the next process takes the lock at
    once (the lock file it left is reused)."""
    from melrecon.data.locks import LockBusy

    lock = tmp_path / "x.lock"
    code = ("import sys, time; from melrecon.data.locks import file_lock\n"
            f"with file_lock({str(lock)!r}):\n    print('held', flush=True); time.sleep(600)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockBusy, match=f"held by process {holder.pid}"):
            with file_lock(lock, blocking=False):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert lock.is_file()
    with file_lock(lock, blocking=False):
        pass
