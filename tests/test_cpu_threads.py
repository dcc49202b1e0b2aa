"""CPU threading defaults (melrecon.cpu_threads): set where the user set nothing, inherited by
child processes, never over the user's own settings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from melrecon import cpu_threads

ROOT = Path(__file__).resolve().parents[1]


def test_configure_sets_passive_wait_and_keeps_user_settings():
    env: dict[str, str] = {}
    assert cpu_threads.configure(env)["OMP_WAIT_POLICY"] == "PASSIVE"
    assert env["OMP_WAIT_POLICY"] == "PASSIVE"
    user = {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "3"}
    assert cpu_threads.configure(user) == {}
    assert user == {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "3"}
    off = {"MELRECON_CPU_DEFAULTS": "0"}
    assert cpu_threads.configure(off) == {} and off == {"MELRECON_CPU_DEFAULTS": "0"}


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
    env: dict[str, str] = {}
    assert cpu_threads.configure(env)["OMP_NUM_THREADS"] == "2"
    monkeypatch.setattr(cpu_threads, "_cgroup_quota", lambda: None)
    assert "OMP_NUM_THREADS" not in cpu_threads.configure({})  # no quota: torch's one thread per CPU


def _child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "MELRECON_CPU"))}
    env["PYTHONPATH"] = str(ROOT / "src")
    env.update(extra)
    return env


PROBE = ("import melrecon.cli, torch, os, subprocess, sys; "
         "child = subprocess.run([sys.executable, '-c', 'import os; print(os.environ.get(\"OMP_WAIT_POLICY\"))'], "
         "capture_output=True, text=True).stdout.strip(); "
         "print(os.environ.get('OMP_WAIT_POLICY'), torch.get_num_threads(), child)")


def test_entry_point_sets_policy_before_torch_and_children_inherit():
    """``melrecon`` imported first: this process and its children wait passively."""
    out = subprocess.run([sys.executable, "-c", PROBE], env=_child_env(), capture_output=True, text=True,
                         check=True).stdout.split()
    assert out[0] == "PASSIVE" and out[2] == "PASSIVE"
    assert int(out[1]) == cpu_threads.available_cpus()
    mine = subprocess.run([sys.executable, "-c", PROBE], env=_child_env(OMP_WAIT_POLICY="ACTIVE", OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, check=True).stdout.split()
    assert mine == ["ACTIVE", "1", "ACTIVE"]
