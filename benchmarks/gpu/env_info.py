"""Print the machine, card, driver and package versions, and write them to a JSON file.

    python benchmarks/gpu/env_info.py OUT/env.json [--command "the kit's command line"]

The summary table's heading is built from this file, so every recorded figure names its card,
driver, CUDA, torch and the packages that ran it.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

PACKAGES = ("torch", "pytorch-lightning", "torchmetrics", "numpy", "scipy", "h5py", "hydra-core", "omegaconf",
            "wandb", "sigpy", "numba")


def _version(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def _nvidia_smi() -> str | None:
    """``name, driver_version, memory.total`` of each GPU, or None where nvidia-smi is absent."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"nvidia-smi failed: {exc}"
    return out.stdout.strip() or out.stderr.strip()


def _cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else the machine type."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit(root: Path) -> str | None:
    """KIT_COMMIT if set (a copied working tree has no .git), else ``git rev-parse``."""
    if os.environ.get("KIT_COMMIT"):
        return os.environ["KIT_COMMIT"]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def collect(command: str | None = None) -> dict[str, Any]:
    """Versions and device facts as a flat JSON-able dict."""
    info: dict[str, Any] = {
        "command": command,
        "commit": _git_commit(Path(__file__).resolve().parents[2]),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cuda_available": torch.cuda.is_available(),
        # TF32 changes float32 convolutions and matrix products on Ampere and later: it is part
        # of every float32 GPU figure (speed, MEL drift, gradient agreement)
        "tf32_conv": torch.backends.cudnn.allow_tf32,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "nvidia_smi": _nvidia_smi(),
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(card=p.name, capability=f"{p.major}.{p.minor}", gpu_memory_GiB=round(p.total_memory / 2**30, 1),
                    multiprocessors=p.multi_processor_count, device_count=torch.cuda.device_count())
    else:
        info.update(card=f"CPU ({_cpu_name()})")
    info["packages"] = {name: _version(name) for name in PACKAGES}
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="JSON file to write")
    ap.add_argument("--command", default=None, help="the command line to record")
    args = ap.parse_args(argv)
    info = collect(args.command)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(info, indent=2) + "\n")
    for key, value in info.items():
        if key != "packages":
            print(f"env: {key}: {value}")
    print("env: packages: " + ", ".join(f"{k} {v or '-'}" for k, v in info["packages"].items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
