"""CPU threading defaults that stay fast on an idle machine and on a shared one.

PyTorch's CPU build runs its intra-op parallelism on OpenMP (libgomp). Out of the box every
OpenMP thread busy-waits ("spins", ~300k iterations) at the end of each parallel region for its
team mates: fast on an idle machine, but when other processes hold the cores the team waits for
a thread that is not running and a training step becomes several times slower than with one
thread. Sleeping at once instead (``OMP_WAIT_POLICY=PASSIVE``) fixes contention but pays a
wake-up for every one of the thousands of small parallel regions of a step: 2-2.5x slower than
the default on an idle machine. No single setting is best in both places (measured:
benchmarks/RESULTS.md "CPU threads under contention"), so melrecon decides when it starts, from
how busy the process's CPUs are:

- it measures the CPU time other processes use on the CPUs this process may run on over
  :data:`SAMPLE_S` seconds (``/proc/stat``; :func:`busy_cpus`);
- **idle** (less than half a CPU busy): one thread per available CPU and a short spin
  (``GOMP_SPINCOUNT`` = :data:`IDLE_SPINCOUNT`, ~0.1 ms instead of ~3 ms): as fast as torch's
  default while idle;
- **busy**: as many threads as CPUs are left free (at least one) and ``OMP_WAIT_POLICY=PASSIVE``.

:func:`configure` is called by ``import melrecon`` (``melrecon/__init__.py``), which every
entry point (``train.py``, ``melrecon ...``, ``python -m melrecon.study`` and the study's jobs,
benchmarks) does before torch is imported: libgomp reads its environment once, when torch
loads it. It only sets what the user left unset, in ``os.environ``, so that child processes
(study jobs, DataLoader workers, DDP ranks) inherit the same settings rather than measure again.
"Available CPUs" are the affinity mask cut by a cgroup CPU quota (:func:`available_cpus`).

The wait policy is fixed when torch loads, the thread count is not: while a run trains,
:class:`LoadFollower` (the ``cpu_threads`` training callback) measures again every
:data:`FOLLOW_EVERY_S` seconds from the same counters, without sleeping, and moves
``torch.set_num_threads`` between one and the count chosen at start, so that a run that started
on an idle machine drops to the free CPUs when other jobs arrive and returns when they leave.
An explicit ``OMP_NUM_THREADS``, ``OMP_WAIT_POLICY``, ``GOMP_SPINCOUNT`` or a
``torch.set_num_threads`` call of the user's always wins; ``MELRECON_CPU_DEFAULTS=0`` leaves the
environment entirely alone.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import Callable

#: set to 0 / false / off to keep torch's and OpenMP's own defaults
OPT_OUT = "MELRECON_CPU_DEFAULTS"
#: seconds over which busy_cpus samples /proc/stat at start-up (USER_HZ ticks are 10 ms)
SAMPLE_S = 0.1
#: libgomp spin iterations before a waiting thread sleeps, on an idle machine (~0.1 ms;
#: OpenMP's default is 300000, ~3 ms; benchmarks/cpu_threads.py compares them)
IDLE_SPINCOUNT = 10000
#: CPUs busy with other processes below which the machine counts as idle
IDLE_BELOW = 0.5
#: the variables whose presence means "the user chose": nothing is measured or set then
USER_VARS = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
#: seconds between LoadFollower's measurements while a run trains
FOLLOW_EVERY_S = 5.0
#: names of the variables configure set (comma-separated), so that a launcher can tell its own
#: defaults from the user's (a study's parallel jobs get one thread each unless the user chose)
CHOSEN = "MELRECON_CPU_CHOSEN"


def _cgroup_quota(root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """CPUs allowed by the cgroup CPU quota (quota / period), None without a quota.

    cgroup v2: ``cpu.max`` ("max 100000" or "200000 100000") of this process's cgroup;
    cgroup v1: ``cpu/cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (quota -1: none).
    """
    candidates: list[tuple[Path, Path | None]] = []
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        rel = path.lstrip("/")
        if hierarchy == "0" and controllers == "":  # v2 unified hierarchy
            candidates.append((root / rel / "cpu.max", None))
        elif "cpu" in controllers.split(","):
            base = root / "cpu" / rel if (root / "cpu").is_dir() else root / controllers / rel
            candidates.append((base / "cpu.cfs_quota_us", base / "cpu.cfs_period_us"))
    candidates += [(root / "cpu.max", None), (root / "cpu" / "cpu.cfs_quota_us", root / "cpu" / "cpu.cfs_period_us")]
    for quota_file, period_file in candidates:
        try:
            if period_file is None:
                quota, _, period = quota_file.read_text().strip().partition(" ")
            else:
                quota, period = quota_file.read_text().strip(), period_file.read_text().strip()
        except OSError:
            continue
        if quota in ("max", "-1") or not period:
            return None
        try:
            q, p = float(quota), float(period)
        except ValueError:
            continue
        return q / p if q > 0 and p > 0 else None
    return None


def visible_cpus() -> int:
    """CPUs this process may be scheduled on (its affinity mask; all CPUs where unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def available_cpus() -> int:
    """CPUs this process can actually use: its affinity mask, cut by a cgroup CPU quota
    (rounded up: a quota of 1.5 CPUs runs 2 threads), at least 1."""
    n = visible_cpus()
    quota = _cgroup_quota()
    if quota is not None:
        n = min(n, max(1, math.ceil(quota)))
    return max(1, n)


def _cpu_times(cpus: set[int], stat: Path) -> tuple[int, int] | None:
    """(idle, total) clock ticks summed over ``cpus`` from /proc/stat, None where unreadable."""
    try:
        lines = stat.read_text().splitlines()
    except OSError:
        return None
    idle = total = 0
    seen = 0
    for line in lines:
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        ticks = [int(v) for v in rest.split()]
        # user nice system idle iowait irq softirq steal (guest time is inside user already)
        idle += ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
        total += sum(ticks[:8])
        seen += 1
    return (idle, total) if seen else None


def busy_cpus(sample_s: float = SAMPLE_S, stat: Path = Path("/proc/stat")) -> float | None:
    """CPUs (of this process's affinity set) that other processes kept busy over ``sample_s``
    seconds while this one slept; None where /proc/stat is missing (not Linux) or did not move."""
    try:
        cpus = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        return None
    before = _cpu_times(cpus, stat)
    if before is None:
        return None
    time.sleep(sample_s)
    return _busy_between(before, _cpu_times(cpus, stat), len(cpus))


def _busy_between(before: tuple[int, int], after: tuple[int, int] | None, cpus: int) -> float | None:
    """CPUs busy (with anything) between two :func:`_cpu_times` samples of ``cpus`` CPUs; None
    where the second is missing or the counters did not move."""
    if after is None or after[1] <= before[1]:
        return None
    idle, total = after[0] - before[0], after[1] - before[1]
    return cpus * (1.0 - idle / total)


def choose(available: int, busy: float | None, visible: int | None = None) -> dict[str, str]:
    """The OpenMP settings for a process that may use ``available`` CPUs (its quota) of the
    ``visible`` ones it may be scheduled on (default: the same), of which ``busy`` are used by
    others (None: unknown, treated as idle). Pure: :func:`configure` measures and applies it."""
    if busy is None or busy < IDLE_BELOW:
        return {"OMP_NUM_THREADS": str(available), "GOMP_SPINCOUNT": str(IDLE_SPINCOUNT)}
    free = max(1, math.floor((available if visible is None else visible) - busy + 0.5))
    return {"OMP_NUM_THREADS": str(min(available, free)), "OMP_WAIT_POLICY": "PASSIVE"}


def configure(environ: "os._Environ[str] | dict[str, str] | None" = None,
              measure: Callable[[], float | None] = busy_cpus) -> dict[str, str]:
    """Set the OpenMP defaults described in the module docstring where the user set none.

    ``measure`` returns the CPUs busy with other processes (:func:`busy_cpus`; tests inject
    their own). Returns the variables it set: empty when the opt-out is set or the user set any
    of :data:`USER_VARS` (a user's thread count is not second-guessed, and children of a
    configured process inherit its choice). Takes effect for this process only if torch has not
    been imported yet (libgomp reads its environment when torch loads it).
    """
    env = os.environ if environ is None else environ
    if env.get(OPT_OUT, "1").strip().lower() in ("0", "false", "off", "no"):
        return {}
    if any(env.get(k) for k in USER_VARS):
        return {}
    chosen = choose(available_cpus(), measure(), visible_cpus())
    env.update(chosen)
    env[CHOSEN] = ",".join(chosen)
    return chosen


def user_set(name: str, environ: "os._Environ[str] | dict[str, str] | None" = None) -> bool:
    """True when ``name`` is set in the environment by the user, not by :func:`configure`."""
    env = os.environ if environ is None else environ
    return bool(env.get(name)) and name not in env.get(CHOSEN, "").split(",")


def _own_cpu_seconds(proc: Path = Path("/proc")) -> float:
    """CPU seconds used so far by this process (all its threads) and its live child processes
    (DataLoader workers): work of this run, not of others."""
    total = time.process_time()
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    try:
        tasks = list((proc / str(os.getpid()) / "task").iterdir())
    except OSError:
        return total
    for task in tasks:
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in children:
            try:
                fields = (proc / child / "stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
            except (OSError, IndexError, ValueError):
                continue
    return total


class LoadFollower:
    """Keep the thread count of a running process matched to the CPUs others leave free.

    Active only where :func:`configure` chose the thread count (``OMP_NUM_THREADS`` among
    :data:`CHOSEN`): never over the user's settings or a study launcher's. Between two calls of
    :meth:`poll` at least ``every_s`` apart it takes the CPU time of the process's CPUs from
    ``/proc/stat``, subtracts its own (and its children's), and applies :func:`choose` to the rest,
    capped at the count chosen at start (a run started on a busy machine waits passively, where
    more threads than CPUs would be slower than one). A ``torch.set_num_threads`` by anyone else
    is noticed (the count is not the last one set) and ends the following.
    """

    def __init__(self, every_s: float = FOLLOW_EVERY_S, environ: "os._Environ[str] | dict[str, str] | None" = None,
                 stat: Path = Path("/proc/stat"), clock: Callable[[], float] = time.monotonic,
                 own_cpu: Callable[[], float] = _own_cpu_seconds,
                 get_threads: Callable[[], int] | None = None, set_threads: Callable[[int], None] | None = None):
        env = os.environ if environ is None else environ
        self.every_s = float(every_s)
        self.stat, self.clock, self.own_cpu = stat, clock, own_cpu
        self.cap = 0
        if "OMP_NUM_THREADS" in env.get(CHOSEN, "").split(",") and env.get("OMP_NUM_THREADS", "").isdigit():
            self.cap = int(env["OMP_NUM_THREADS"])
        if get_threads is None or set_threads is None:
            import torch  # noqa: PLC0415  (not at module level: this module runs before torch loads)

            get_threads, set_threads = torch.get_num_threads, torch.set_num_threads
        self._get, self._set = get_threads, set_threads
        self.threads = self._get() if self.cap else 0
        try:
            self.cpus = os.sched_getaffinity(0)
        except (AttributeError, OSError):
            self.cpus = set()
        self.available = available_cpus()
        self._last: tuple[float, float, tuple[int, int]] | None = None
        self.others: float | None = None  # CPUs others kept busy over the last interval

    @property
    def active(self) -> bool:
        return self.cap > 1 and bool(self.cpus)

    def _sample(self) -> tuple[float, float, tuple[int, int]] | None:
        ticks = _cpu_times(self.cpus, self.stat)
        return None if ticks is None else (self.clock(), self.own_cpu(), ticks)

    def poll(self) -> int | None:
        """Measure if ``every_s`` passed since the last measurement; returns the new thread count
        when it changed, else None. Costs a clock read between measurements."""
        if not self.active:
            return None
        now = self.clock()
        if self._last is not None and now - self._last[0] < self.every_s:
            return None
        sample = self._sample()
        if sample is None:
            self.cap = 0
            return None
        last, self._last = self._last, sample
        if last is None:
            return None
        if self._get() != self.threads:  # someone else set the count: theirs wins from now on
            self.cap = 0
            return None
        wall = sample[0] - last[0]
        busy = _busy_between(last[2], sample[2], len(self.cpus))
        if wall <= 0 or busy is None:
            return None
        self.others = max(0.0, busy - (sample[1] - last[1]) / wall)
        target = min(self.cap, int(choose(self.available, self.others, len(self.cpus))["OMP_NUM_THREADS"]))
        if target == self.threads:
            return None
        self._set(target)
        self.threads = target
        return target


def torch_loaded_first() -> bool:
    """True when torch was imported before melrecon: the wait policy then no longer applies to
    this process (set ``OMP_WAIT_POLICY=PASSIVE`` in the shell, or import melrecon first)."""
    return "torch" in sys.modules


__all__ = ["configure", "choose", "LoadFollower", "user_set", "busy_cpus", "available_cpus", "visible_cpus", "torch_loaded_first", "OPT_OUT"]
