"""Training step time of the default run under CPU contention: thread settings compared.

    python benchmarks/cpu_threads.py                  # idle, 4 busy, 4 arriving late, 2 jobs side by side
    python benchmarks/cpu_threads.py --busy 0 4 --rounds 3 --steps 6

Each measurement is a fresh Python process (OpenMP reads its environment when torch loads)
that builds the default run's network (conf/train.yaml as ``python train.py`` composes it:
MoDL, 5 unrolls, 3D CNN 16 channels x 3 convs, MEL backward) and times Adam training steps
on a random cine batch of the default data's shape (batch 2, 8 frames, 48 x 48, 4 coils).
Settings, in the child's environment:

- ``before``: ``MELRECON_CPU_DEFAULTS=0``: torch's own defaults (one thread per CPU, OpenMP's
  default spin-waiting), what ``python train.py`` did before melrecon set its defaults;
- ``default``: what ``python train.py`` does now (melrecon.cpu_threads: on an idle machine one
  thread per available CPU and a short spin, ``GOMP_SPINCOUNT=10000``; on a busy one the free
  CPUs' worth of threads and ``OMP_WAIT_POLICY=PASSIVE``, decided at start-up; then, as the
  training callback does, a LoadFollower polled before each step moves the thread count with
  the load every ``--follow-every`` seconds);
- ``1 thread``: ``OMP_NUM_THREADS=1``;
- ``passive``: ``OMP_WAIT_POLICY=PASSIVE`` at every load (melrecon's first default);
- ``spin 1e3`` / ``1e4`` / ``1e5`` (``--settings``): a fixed ``GOMP_SPINCOUNT`` at every load.

Scenarios: ``busy B`` starts B processes that spin on a core each (``while True: pass``) for the
duration of the measurements, before the child starts (``busy 0``: whatever else runs on the
machine); ``late B``: the B spinners start 1 s after the child, once its start-up decision is
taken on an idle machine (other jobs arriving during a run); ``2 jobs``: two children of the
same setting at once (two runs side by side on one machine). The settings
are interleaved round by round, so slow phases of a shared machine hit all of them; read the
ratios. Prints the median step time per setting and scenario and the ratios to ``1 thread`` and
to ``before``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS: dict[str, dict[str, str]] = {
    "before": {"MELRECON_CPU_DEFAULTS": "0"},
    "default": {},
    "1 thread": {"OMP_NUM_THREADS": "1"},
    # the first release of melrecon.cpu_threads: passive waiting, threads = available CPUs
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    # fixed spin counts (GOMP_SPINCOUNT, libgomp's iterations before a waiting thread sleeps)
    "spin 1e3": {"GOMP_SPINCOUNT": "1000"},
    "spin 1e4": {"GOMP_SPINCOUNT": "10000"},
    "spin 1e5": {"GOMP_SPINCOUNT": "100000"},
}
DEFAULT_SETTINGS = ["before", "default", "1 thread", "passive"]
THREAD_VARS = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS", "GOMP_SPINCOUNT", "MELRECON_CPU_DEFAULTS")


def child(steps: int, warmup: int, every_s: float) -> None:
    """Time ``steps`` training steps of the default network after ``warmup``, with the training
    callback's thread follower polled before each step (every ``every_s`` s); print JSON."""
    import melrecon  # noqa: F401  (first: sets the OpenMP defaults before torch loads)
    import torch
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from melrecon.cpu_threads import LoadFollower
    from melrecon.physics.problems import random_sense_problem

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train")
    torch.manual_seed(0)
    net = instantiate(cfg.model)
    data = cfg.data
    frames, size, coils = 8, 48, 4  # melrecon.data.synthetic preset "small"
    prob = random_sense_problem("cine", (frames, size, size), coils=coils, batch=int(data.batch_size), seed=0)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    # what the training callback does (conf/callbacks/default.yaml cpu_threads); inactive unless
    # melrecon chose the thread count
    follower = LoadFollower(every_s)
    times = []
    for i in range(warmup + steps):
        follower.poll()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = (net(*prob[:4]) - prob.target).abs().mean()
        loss.backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    print(json.dumps({"times": times, "threads": torch.get_num_threads(), "threads_start": follower.cap or None,
                      "wait_policy": os.environ.get("OMP_WAIT_POLICY", "-"),
                      "spincount": os.environ.get("GOMP_SPINCOUNT", "-")}))


def _start(setting: str, steps: int, warmup: int, every_s: float) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    env.update(SETTINGS[setting])
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, __file__, "--child", "--steps", str(steps), "--warmup", str(warmup),
           "--follow-every", str(every_s)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)


def _collect(proc: subprocess.Popen) -> dict:
    out, _ = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"benchmark child failed (exit {proc.returncode})")
    return json.loads(out.strip().splitlines()[-1])


def _spinners(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        proc.kill()
        proc.wait()


def _ratio(med: dict[str, float], setting: str, ref: str) -> str:
    return f"{med[setting] / med[ref]:.2f}" if ref in med else "-"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--busy", type=int, nargs="+", default=[0, 4], help="busy processes per scenario")
    p.add_argument("--late", type=int, nargs="*", default=[4], help="spinners that start after the child")
    p.add_argument("--no-pair", action="store_true", help="skip the '2 jobs side by side' scenario")
    p.add_argument("--rounds", type=int, default=3, help="rounds over the settings (interleaved)")
    p.add_argument("--steps", type=int, default=6, help="timed steps per process")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per process")
    p.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=DEFAULT_SETTINGS, help="settings compared")
    p.add_argument("--follow-every", type=float, default=5.0,
                   help="seconds between the thread follower's measurements (the training callback's every_s)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.steps, args.warmup, args.follow_every)
        return

    scenarios = ([f"busy {b}" for b in args.busy] + [f"late {b}" for b in args.late]
                 + ([] if args.no_pair else ["2 jobs"]))
    times: dict[tuple[str, str], list[float]] = {(s, k): [] for s in scenarios for k in SETTINGS}
    info: dict[tuple[str, str], dict] = {}
    start = time.time()
    load0 = os.getloadavg()
    for r in range(args.rounds):
        for scenario in scenarios:
            busy = int(scenario.split()[1]) if scenario.startswith("busy") else 0
            spin = _spinners(busy)
            try:
                for setting in args.settings:
                    jobs = 2 if scenario == "2 jobs" else 1
                    procs = [_start(setting, args.steps, args.warmup, args.follow_every) for _ in range(jobs)]
                    if scenario.startswith("late"):
                        time.sleep(1.0)
                        spin += _spinners(int(scenario.split()[1]))
                    for proc in procs:
                        res = _collect(proc)
                        times[scenario, setting] += res["times"]
                        info[setting, scenario] = {k: res[k] for k in ("threads", "threads_start", "wait_policy", "spincount")}
                    if scenario.startswith("late"):
                        _stop(spin)
                        spin = []
            finally:
                _stop(spin)
        so_far = {k: f"{statistics.median(v):.2f}" for k, v in times.items() if v}
        print(f"round {r + 1}/{args.rounds} done ({time.time() - start:.0f} s, load {os.getloadavg()[0]:.1f}): "
              f"median s/step so far {so_far}", file=sys.stderr, flush=True)
    load1 = os.getloadavg()

    import platform

    print(f"{platform.machine()}, {os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} available), "
          f"load average {load0[0]:.1f} at start, {load1[0]:.1f} at end; {args.rounds} rounds x {args.steps} steps "
          f"(+{args.warmup} warm-up) per process")
    for (setting, scenario), i in info.items():
        start = f"{i['threads_start']} -> " if i["threads_start"] else ""
        print(f"  {scenario:8s} {setting:9s} threads={start}{i['threads']} OMP_WAIT_POLICY={i['wait_policy']} "
              f"GOMP_SPINCOUNT={i['spincount']}")
    print(f"{'scenario':10s} {'setting':9s} {'median s/step':>13s} {'x 1 thread':>10s} {'x before':>9s}")
    for scenario in scenarios:
        med = {k: statistics.median(times[scenario, k]) for k in args.settings}
        for setting in args.settings:
            print(f"{scenario:10s} {setting:9s} {med[setting]:13.3f} {_ratio(med, setting, '1 thread'):>10s} "
                  f"{_ratio(med, setting, 'before'):>9s}")


if __name__ == "__main__":
    main()
