"""CPU threading defaults that stay fast when other processes share the cores.

PyTorch's CPU build runs its intra-op parallelism on OpenMP (libgomp). Out of the box every
OpenMP thread busy-waits ("spins") at the end of each parallel region for its team mates;
when another process holds a core, the team waits for a thread that is not running and a
training step becomes several times slower than with one thread (measured: default run,
2-core machine, 4 busy processes, benchmarks/RESULTS.md "CPU threads under contention").
With ``OMP_WAIT_POLICY=PASSIVE`` waiting threads sleep instead, and an idle machine runs as
fast as before (same table).

:func:`configure` is called by ``import melrecon`` (``melrecon/__init__.py``), which every
entry point (``train.py``, ``melrecon ...``, ``python -m melrecon.study`` and the study's jobs,
benchmarks) does before torch is imported: libgomp reads its environment once, when torch
loads it. It only sets what the user left unset, in ``os.environ``, so that child processes
(study jobs, DataLoader workers, DDP ranks) inherit the same settings:

- ``OMP_WAIT_POLICY=PASSIVE``;
- ``OMP_NUM_THREADS`` = the CPUs this process may use (:func:`available_cpus`: affinity mask
  and cgroup CPU quota), only where that is fewer than the CPUs the process sees (torch would
  otherwise start one thread per visible core in a container limited to fewer).

An explicit ``OMP_NUM_THREADS``, ``OMP_WAIT_POLICY`` or a later ``torch.set_num_threads`` call
always wins; ``MELRECON_CPU_DEFAULTS=0`` leaves the environment entirely alone.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

#: set to 0 / false / off to keep torch's and OpenMP's own defaults
OPT_OUT = "MELRECON_CPU_DEFAULTS"


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


def configure(environ: "os._Environ[str] | dict[str, str] | None" = None) -> dict[str, str]:
    """Set the OpenMP defaults described in the module docstring where the user set none.

    Returns the variables it set (empty when the user's settings or the opt-out stand). Takes
    effect for this process only if torch has not been imported yet (libgomp reads its
    environment when torch loads it); child processes inherit it in any case.
    """
    env = os.environ if environ is None else environ
    if env.get(OPT_OUT, "1").strip().lower() in ("0", "false", "off", "no"):
        return {}
    chosen: dict[str, str] = {}
    if not env.get("OMP_WAIT_POLICY"):
        chosen["OMP_WAIT_POLICY"] = "PASSIVE"
    if not env.get("OMP_NUM_THREADS"):
        n = available_cpus()
        if n < visible_cpus():
            chosen["OMP_NUM_THREADS"] = str(n)
    env.update(chosen)
    return chosen


def torch_loaded_first() -> bool:
    """True when torch was imported before melrecon: the wait policy then no longer applies to
    this process (set ``OMP_WAIT_POLICY=PASSIVE`` in the shell, or import melrecon first)."""
    return "torch" in sys.modules


__all__ = ["configure", "available_cpus", "visible_cpus", "torch_loaded_first", "OPT_OUT"]
