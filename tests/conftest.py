"""Shared fixtures for the training-application tests.

- ``compose_cfg(*overrides)``: compose conf/train.yaml like ``python train.py`` would, with the
  run folder, logs and data redirected to temporary folders (data shared per session, so the
  tiny synthetic datasets are generated once). Tests pick the tiny runs of the debug group
  (conf/debug/): ``debug=tiny`` (tiny synthetic data, one epoch of 2 batches, 2 unrolls of a
  4-channel CNN) or ``debug=smoke`` (the same data and epoch, the network as configured).
- ``TinyNet`` / ``TinyCineDataModule``: stand-ins with the real interfaces (net signature and
  :class:`melrecon.data.batch.ReconBatch` items) for fast unit tests of the LightningModule and callbacks.
- ``run_train(args, ...)``: run train.py in a subprocess (multirun, DDP, sweeps, CLI errors).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from melrecon.data.batch import ReconBatch

ROOT = Path(__file__).resolve().parents[1]
#: limit of a test's subprocess: a guard against hangs, never a speed check. A loaded shared CPU
#: (load 6-11 on 2 cores) makes a tiny run 5-20x slower, so no test bounds wall time below this.
HANG_GUARD_S = 3 * 3600


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """One intra-op thread: the tests use tiny tensors, where extra threads only add contention
    (one gradient test took 79 s with two threads on a loaded 2-core machine, 4.8 s with one)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


CONF = ROOT / "conf"
os.environ.setdefault("MELRECON_ROOT", str(ROOT))
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """One data folder per test session (synthetic data generated on first use)."""
    d = tmp_path_factory.mktemp("data")
    return d


@pytest.fixture
def compose_cfg(tmp_path, data_dir, monkeypatch):
    """Return a function composing train.yaml with overrides, paths pointed at tmp folders."""
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    monkeypatch.setenv("MELRECON_DATA_DIR", str(data_dir))

    def _compose(*overrides: str):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(config_name="train", overrides=list(overrides))
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / "run")
            cfg.paths.log_dir = str(tmp_path / "logs")
        return cfg

    return _compose


def run_train(args: list[str], tmp_path: Path, data_dir: Path, env: dict | None = None,
              timeout: float = HANG_GUARD_S) -> subprocess.CompletedProcess:
    """Run ``python train.py ARGS`` in a subprocess with logs and data in tmp folders."""
    e = dict(os.environ)
    # an in-process W&B run of an earlier test leaves its service's address here: a child would
    # share that service, and a killed child's run id would stay "in use" there for its resume
    e.pop("WANDB_SERVICE", None)
    e.update({"MELRECON_DATA_DIR": str(data_dir), "WANDB_MODE": "disabled", "WANDB_SILENT": "true",
              "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0", "PYTHONWARNINGS": "ignore"})
    e.update(env or {})
    flags = [a for a in args if a.startswith("-")]  # -m etc. must precede the overrides
    cmd = [sys.executable, str(ROOT / "train.py"), *flags, f"paths.log_dir={tmp_path / 'logs'}",
           *[a for a in args if not a.startswith("-")]]
    return subprocess.run(cmd, cwd=tmp_path, env=e, capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------- stand-ins
class TinyNet(nn.Module):
    """Stand-in network: x0 + a small 2D CNN on (real, imag), with a learned 'lam'.

    ``forward(x0, kspace, maps, mask)`` -> complex image of x0's shape (B, *lead, H, W).
    """

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.cnn = nn.Sequential(nn.Conv2d(2, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, 2, 3, padding=1))
        self.lam = nn.Parameter(torch.tensor(0.05))

    def forward(self, x0, kspace, maps, mask):
        s = x0.shape
        x = x0.reshape(-1, 1, s[-2], s[-1])
        r = self.cnn(torch.cat([x.real, x.imag], dim=1))
        return x0 + torch.complex(r[:, 0], r[:, 1]).reshape(s)

    def log_stats(self) -> dict[str, float]:
        return {"dc/lam": float(self.lam.detach())}


class TinyCineDataset(Dataset):
    """Cine-layout ReconBatch items (T=4 frames of 12x12): target a moving blob, x0 = target + noise.

    ``num_files`` volumes with ``slices`` items each; ``max`` is the volume max of |target|.
    """

    def __init__(self, num_files: int, slices: int = 2, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.items = []
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, 12), torch.linspace(-1, 1, 12), indexing="ij")
        for f in range(num_files):
            vol = []
            for s in range(slices):
                frames = []
                for t in range(4):
                    c = 0.3 * torch.rand(2, generator=g) - 0.15 + 0.05 * t
                    frames.append(((xx - c[0]) ** 2 + (yy - c[1]) ** 2 < 0.3).float() * (1 + 0.2 * s))
                vol.append(torch.stack(frames).to(torch.complex64))
            vmax = max(float(v.abs().max()) for v in vol)
            for s, tgt in enumerate(vol):
                noise = 0.2 * torch.complex(torch.randn(tgt.shape, generator=g), torch.randn(tgt.shape, generator=g))
                self.items.append(ReconBatch(
                    kspace=torch.zeros(2, 4, 12, 12, dtype=torch.complex64),
                    mask=torch.ones(1, 4, 1, 12), maps=torch.ones(2, 1, 12, 12, dtype=torch.complex64),
                    x0=tgt + noise, target=tgt, max=torch.tensor(vmax), file=f"vol{f}.h5",
                    position=torch.tensor(s), acceleration=torch.tensor(1.0),
                ))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> ReconBatch:
        return self.items[i]


class TinyCineDataModule(pl.LightningDataModule):
    def __init__(self, batch_size: int = 2, num_train: int = 4, num_val: int = 2) -> None:
        super().__init__()
        self.batch_size, self.num_train, self.num_val = batch_size, num_train, num_val

    def train_dataloader(self):
        return DataLoader(TinyCineDataset(self.num_train, seed=1), batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(TinyCineDataset(self.num_val, seed=2), batch_size=1, shuffle=False)


# ---------------------------------------------------------------------- W&B offline files
def read_wandb_history(path: Path) -> dict[str, list[str]]:
    """Keys -> JSON values of the history records in an offline ``run-*.wandb`` file."""
    history: dict[str, list[str]] = {}
    for row in read_wandb_rows(path):
        for key, value in row.items():
            history.setdefault(key, []).append(value)
    return history


def read_synced_wandb_rows(run_dir: Path, done=lambda rows: True, wait_s: float = 20.0) -> list[dict[str, str]]:
    """History rows of the run folder's one offline W&B run (what ``wandb sync
    <run>/wandb/offline-run-*`` uploads; superseded folders are not in that glob).

    wandb-core may still be writing the file after ``wandb.finish()`` returns on a busy machine:
    the file is read again until ``done(rows)`` or ``wait_s`` seconds have passed.
    """
    import time

    folders = sorted((Path(run_dir) / "wandb").glob("offline-run-*"))
    assert len(folders) == 1, f"one offline W&B run expected in {run_dir}/wandb, found {folders}"
    (file,) = folders[0].glob("run-*.wandb")
    deadline = time.monotonic() + wait_s
    while True:
        rows = read_wandb_rows(file)
        if done(rows) or time.monotonic() > deadline:
            return rows
        time.sleep(0.5)


def read_wandb_rows(path: Path) -> list[dict[str, str]]:
    """The history rows (key -> JSON value, one dict per ``log`` call) of an offline ``run-*.wandb`` file.

    The file is a LevelDB-style log (header ``:W&B``, 32 KiB blocks, records split into
    FULL/FIRST/MIDDLE/LAST chunks) of protobuf ``Record`` messages; W&B offline keeps the
    history only there (``wandb-summary.json`` is written at sync time).
    """
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    ident, _magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B", f"{path} is not a W&B run file"
    block, pos, buf, chunks = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer too small for a header: zero padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            chunks.append(chunk)
        elif kind == 2:
            buf = chunk
        elif kind == 3:
            buf += chunk
        elif kind == 4:
            chunks.append(buf + chunk)
    rows: list[dict[str, str]] = []
    for c in chunks:
        rec = pb.Record()
        rec.ParseFromString(c)
        if rec.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): item.value_json for item in rec.history.item})
    return rows
