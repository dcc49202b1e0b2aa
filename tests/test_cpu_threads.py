"""CPU threading defaults (melrecon.cpu_threads): set where the user set nothing, inherited by
child processes, never over the user's own settings."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from melrecon import cpu_threads

ROOT = Path(__file__).resolve().parents[1]


def test_choose_spins_briefly_when_idle_and_sleeps_with_fewer_threads_when_busy():
    """The decision table of melrecon.cpu_threads (measured in benchmarks/RESULTS.md)."""
    idle = {"OMP_NUM_THREADS": "2", "GOMP_SPINCOUNT": str(cpu_threads.IDLE_SPINCOUNT)}
    assert cpu_threads.choose(2, 0.0) == idle
    assert cpu_threads.choose(2, 0.3) == idle
    assert cpu_threads.choose(2, None) == idle  # unknown (no /proc/stat): as idle
    assert cpu_threads.choose(2, 1.0) == {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    assert cpu_threads.choose(2, 4.0) == {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    assert cpu_threads.choose(8, 2.2) == {"OMP_NUM_THREADS": "6", "OMP_WAIT_POLICY": "PASSIVE"}


def test_configure_measures_once_and_keeps_user_settings():
    calls: list[int] = []

    def measure() -> float:
        calls.append(1)
        return 3.0

    env: dict[str, str] = {}
    chosen = cpu_threads.configure(env, measure=measure)
    assert chosen == {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"} and calls == [1]
    assert env[cpu_threads.CHOSEN] == "OMP_NUM_THREADS,OMP_WAIT_POLICY"
    assert not cpu_threads.user_set("OMP_NUM_THREADS", env)
    assert cpu_threads.configure(env, measure=measure) == {} and calls == [1]  # children inherit
    for var, value in {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "3", "GOMP_SPINCOUNT": "0"}.items():
        user = {var: value}
        assert cpu_threads.configure(user, measure=measure) == {} and user == {var: value}
        assert cpu_threads.user_set(var, user)
    off = {"MELRECON_CPU_DEFAULTS": "0"}
    assert cpu_threads.configure(off, measure=measure) == {} and off == {"MELRECON_CPU_DEFAULTS": "0"}
    assert calls == [1]


def test_busy_cpus_sees_another_process_spinning(tmp_path):
    """The measurement, against a fault injected: a process spinning on a core of ours."""
    stat = tmp_path / "stat"
    stat.write_text("cpu  9 0 9 90 0 0 0 0 0 0\ncpu0 4 0 4 40 2 0 0 0 0 0\ncpu1 5 0 5 50 0 0 0 0 0 0\nintr 1\n")
    assert cpu_threads._cpu_times({0, 1}, stat) == (92, 110)
    assert cpu_threads._cpu_times({0}, stat) == (42, 50)
    assert cpu_threads._cpu_times({5}, stat) is None
    assert cpu_threads.busy_cpus(0.01, tmp_path / "missing") is None
    if not Path("/proc/stat").exists():
        return
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        busy = cpu_threads.busy_cpus(0.5)
    finally:
        spinner.kill()
        spinner.wait()
    assert busy is not None and 0.5 <= busy <= len(os.sched_getaffinity(0)) + 1e-6


def test_thread_count_follows_cgroup_quota(tmp_path, monkeypatch):
    """A container limited to 1.5 CPUs of 8 visible ones gets 2 threads, not 8."""
    group = tmp_path / "cg" / "job"
    group.mkdir(parents=True)
    (group / "cpu.max").write_text("150000 100000\n")
    proc = tmp_path / "cgroup"
    proc.write_text("0::/job\n")
    assert cpu_threads._cgroup_quota(tmp_path / "cg", proc) == 1.5
    (group / "cpu.max").write_text("max 100000\n")
    assert cpu_threads._cgroup_quota(tmp_path / "cg", proc) is None
    v1 = tmp_path / "v1" / "cpu" / "slurm"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("300000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    proc.write_text("3:cpu,cpuacct:/slurm\n")
    assert cpu_threads._cgroup_quota(tmp_path / "v1", proc) == 3.0

    monkeypatch.setattr(cpu_threads, "visible_cpus", lambda: 8)
    monkeypatch.setattr(cpu_threads, "_cgroup_quota", lambda: 1.5)
    assert cpu_threads.available_cpus() == 2
    assert cpu_threads.configure({}, measure=lambda: 0.0)["OMP_NUM_THREADS"] == "2"
    monkeypatch.setattr(cpu_threads, "_cgroup_quota", lambda: None)
    assert cpu_threads.configure({}, measure=lambda: 0.0)["OMP_NUM_THREADS"] == "8"


def _child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "MELRECON_CPU"))}
    env["PYTHONPATH"] = str(ROOT / "src")
    env.update(extra)
    return env


PROBE = ("import melrecon.cli, torch, os, subprocess, sys; "
         "child = subprocess.run([sys.executable, '-c', 'import os; print(os.environ.get(\"OMP_NUM_THREADS\"))'], "
         "capture_output=True, text=True).stdout.strip(); "
         "print(os.environ.get('OMP_NUM_THREADS'), torch.get_num_threads(), child, "
         "os.environ.get('OMP_WAIT_POLICY', '-'), os.environ.get('GOMP_SPINCOUNT', '-'))")


def test_entry_point_configures_before_torch_and_children_inherit():
    """``melrecon`` imported first: torch runs the chosen thread count, children inherit it."""
    out = subprocess.run([sys.executable, "-c", PROBE], env=_child_env(), capture_output=True, text=True,
                         check=True).stdout.split()
    threads = int(out[0])
    assert 1 <= threads <= cpu_threads.available_cpus()
    assert int(out[1]) == threads and int(out[2]) == threads
    assert out[3] == "PASSIVE" or out[4] == str(cpu_threads.IDLE_SPINCOUNT)
    mine = subprocess.run([sys.executable, "-c", PROBE], env=_child_env(OMP_WAIT_POLICY="ACTIVE", OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, check=True).stdout.split()
    assert mine == ["1", "1", "1", "ACTIVE", "-"]


def test_parallel_study_jobs_get_one_thread_unless_the_user_chose(tmp_path, monkeypatch):
    """melrecon's own default (2 threads on an idle machine) must not reach K parallel jobs."""
    from omegaconf import OmegaConf

    from melrecon.study import runner

    envs: list[dict[str, str]] = []

    class Done:
        returncode = 0

        def __init__(self, cmd, cwd=None, env=None, start_new_session=False):
            envs.append(env)

        def poll(self):
            return 0

    monkeypatch.setattr(runner.subprocess, "Popen", Done)
    monkeypatch.setattr(runner, "multirun_command", lambda *a, **k: ["true"])
    monkeypatch.setattr(runner.job, "is_done", lambda path: True)
    monkeypatch.setattr(runner.time, "sleep", lambda s: None)
    cfg = OmegaConf.create({"launcher": {"parallel": 2}})
    specs = [type("Spec", (), {"name": "a"})(), type("Spec", (), {"name": "b"})()]
    for var in ("OMP_NUM_THREADS", "GOMP_SPINCOUNT", "OMP_WAIT_POLICY", cpu_threads.CHOSEN):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setenv(cpu_threads.CHOSEN, "OMP_NUM_THREADS,GOMP_SPINCOUNT")
    runner.launch(specs, tmp_path, cfg, [])
    assert [e["OMP_NUM_THREADS"] for e in envs] == ["1", "1"] and all(cpu_threads.CHOSEN not in e for e in envs)
    envs.clear()
    monkeypatch.delenv(cpu_threads.CHOSEN)
    runner.launch(specs, tmp_path, cfg, [])
    assert [e["OMP_NUM_THREADS"] for e in envs] == ["2", "2"]
