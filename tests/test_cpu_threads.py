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
    # a 2-CPU quota on 8 visible CPUs, 6 of them busy with others: 2 are still free for us
    assert cpu_threads.choose(2, 6.0, visible=8) == {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"}
    assert cpu_threads.choose(2, 7.0, visible=8) == {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


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
    # the test process itself ran melrecon.cpu_threads.configure: drop what it set (GOMP_SPINCOUNT too)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_", "MELRECON_CPU"))}
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


class _FakeMachine:
    """/proc/stat of 2 CPUs whose busy share the test sets per interval, a clock and a CPU clock."""

    def __init__(self, path: Path):
        self.path, self.now, self.mine, self.idle, self.total = path, 0.0, 0.0, 0, 0
        self.threads = 2
        self.write()

    def write(self) -> None:
        self.path.write_text(f"cpu  0 0 0 0 0 0 0 0\ncpu0 {self.total - self.idle} 0 0 {self.idle} 0 0 0 0\n"
                             "cpu1 0 0 0 0 0 0 0 0\n")

    def advance(self, seconds: float, others: float, mine: float) -> None:
        """``seconds`` pass with ``others`` CPUs busy with other processes and ``mine`` with ours."""
        ticks = int(round(seconds * 100 * 2))
        busy = int(round(seconds * 100 * (others + mine)))
        self.now += seconds
        self.mine += seconds * mine
        self.total += ticks
        self.idle += max(0, ticks - busy)
        self.write()

    def follower(self, env: dict[str, str], every_s: float = 5.0) -> cpu_threads.LoadFollower:
        return cpu_threads.LoadFollower(every_s, env, self.path, lambda: self.now, lambda: self.mine,
                                        lambda: self.threads, lambda n: setattr(self, "threads", n))


def test_load_follower_drops_to_the_free_cpus_when_jobs_arrive_and_returns(tmp_path, monkeypatch):
    """A run started on an idle machine (2 threads): 2 other jobs arrive -> 1 thread; they leave ->
    2 again. Its own CPU use (2 threads busy) does not count as others'."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(cpu_threads, "available_cpus", lambda: 2)
    m = _FakeMachine(tmp_path / "stat")
    f = m.follower({"OMP_NUM_THREADS": "2", cpu_threads.CHOSEN: "OMP_NUM_THREADS,GOMP_SPINCOUNT"})
    assert f.active and f.poll() is None  # first sample
    m.advance(5, others=0.0, mine=2.0)
    assert f.poll() is None and f.threads == 2 and f.others == 0.0  # alone: ours is not others'
    m.advance(2, others=2.0, mine=0.0)
    assert f.poll() is None  # before every_s: not measured
    m.advance(3, others=2.0, mine=0.0)
    assert f.poll() == 1 and m.threads == 1 and abs(f.others - 2.0) < 0.01
    m.advance(5, others=1.0, mine=1.0)
    assert f.poll() is None and m.threads == 1
    m.advance(5, others=0.0, mine=1.0)
    assert f.poll() == 2 and m.threads == 2
    m.threads = 1  # the user's torch.set_num_threads: theirs wins, the follower stops
    m.advance(5, others=0.0, mine=1.0)
    assert f.poll() is None and m.threads == 1 and not f.active


def test_load_follower_leaves_user_and_launcher_choices_alone(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    m = _FakeMachine(tmp_path / "stat")
    for env in ({"OMP_NUM_THREADS": "2"},  # the user's
                {"OMP_NUM_THREADS": "1", cpu_threads.CHOSEN: "OMP_NUM_THREADS,OMP_WAIT_POLICY"},  # busy start: 1
                {}):  # MELRECON_CPU_DEFAULTS=0
        f = m.follower(env)
        m.advance(5, others=2.0, mine=0.0)
        assert not f.active and f.poll() is None and f.poll() is None and m.threads == 2


def test_load_follower_sees_a_real_spinner():
    """The fault injected on the real machine: another process (not our child: children count
    as the run's own work) spinning on a core of ours while a follower that started with every
    CPU polls."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
    if not Path("/proc/stat").exists() or len(cpus) < 2:
        return
    state = {"threads": len(cpus)}
    env = {"OMP_NUM_THREADS": str(len(cpus)), cpu_threads.CHOSEN: "OMP_NUM_THREADS,GOMP_SPINCOUNT"}
    f = cpu_threads.LoadFollower(0.5, env, get_threads=lambda: state["threads"],
                                 set_threads=lambda n: state.update(threads=n))
    launcher = subprocess.run(["sh", "-c", f"'{sys.executable}' -c 'while True: pass' >/dev/null 2>&1 & echo $!"],
                              capture_output=True, text=True, check=True)
    spinner = int(launcher.stdout.split()[0])
    try:
        time.sleep(0.2)
        f.poll()
        time.sleep(0.8)
        f.poll()
    finally:
        os.kill(spinner, 9)
    assert f.others is not None and f.others >= 0.5 and state["threads"] < len(cpus)


def test_training_logs_the_thread_change(tmp_path, monkeypatch, caplog):
    """The callback: one log line per change, the follower built when training starts."""
    from melrecon.lit import CpuThreadFollower

    class Follower:
        threads, others = 2, 2.0

        def __init__(self, every_s):
            self.every_s = every_s

        def poll(self):
            self.threads = 1
            return 1

    monkeypatch.setattr(cpu_threads, "LoadFollower", Follower)
    cb = CpuThreadFollower(every_s=3.0)
    cb.on_train_batch_start(None, None, None, 0)  # before on_train_start: nothing to follow
    cb.on_train_start(None, None)
    assert cb.follower.every_s == 3.0
    with caplog.at_level("INFO", logger="melrecon"):
        cb.on_train_batch_start(None, None, None, 0)
    assert "cpu threads 2 -> 1 (others keep 2.0 CPUs busy)" in caplog.text


def test_own_cpu_time_includes_child_processes():
    """DataLoader workers are the run's own work, not other jobs: their CPU time is the run's."""
    if not Path("/proc/self/task").exists():
        return
    before = cpu_threads._own_cpu_seconds()
    worker = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.8)
        used = cpu_threads._own_cpu_seconds() - before
    finally:
        worker.kill()
        worker.wait()
    assert used >= 0.3
