"""Slab loading throughput: samples per second for 21 x 256 x 320 slabs with 8 coils.

Writes a temporary volume in the melrecon layout (default 64 readout positions x 256 x 320,
8 coils: about 0.7 GB), then times ``SlabDataset`` training items (random slab, Poisson-disc
mask at R=8 from a warm cache, A^H y with the SENSE operator) through a DataLoader, and the raw
h5py slab read alone. The file is deleted afterwards.

Usage::

    python benchmarks/data_loading.py [--readouts 64] [--slab 21] [--coils 8] [--samples 20]
        [--workers 0 2] [--dir /tmp]

Prints one line per setting: ``slab CxSxYxZ workers=W: N samples/s (read only: M samples/s)``.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler

from melrecon.data.datasets import SlabDataset
from melrecon.data.h5 import LAYOUT_VERSION, validate_file
from melrecon.data.subsample import volume_mask


def write_volume(path: Path, coils: int, x: int, y: int, z: int, seed: int = 0) -> None:
    """A layout-compliant volume3d file of random data, written one readout position at a time
    (the full arrays would need several GB of RAM)."""
    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as f:
        k = f.create_dataset("kspace", (coils, x, y, z), np.complex64, chunks=(coils, 1, y, z))
        m = f.create_dataset("maps", (coils, x, y, z), np.complex64, chunks=(coils, 1, y, z))
        t = f.create_dataset("target", (x, y, z), np.complex64, chunks=(1, y, z))
        for i in range(x):
            block = (rng.standard_normal((coils, y, z), np.float32)
                     + 1j * rng.standard_normal((coils, y, z), np.float32)).astype(np.complex64)
            k[:, i] = block
            m[:, i] = block / np.sqrt((np.abs(block) ** 2).sum(0, keepdims=True))
            t[i] = block[0]
        f.attrs.update(kind="volume3d", axes="coil,x,y,z", max=float(np.abs(t[()]).max()),
                       source="benchmarks/data_loading.py random volume", layout_version=LAYOUT_VERSION)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--readouts", type=int, default=64)
    parser.add_argument("--ny", type=int, default=256)
    parser.add_argument("--nz", type=int, default=320)
    parser.add_argument("--coils", type=int, default=8)
    parser.add_argument("--slab", type=int, default=21)
    parser.add_argument("--accel", type=float, default=8.0)
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--dir", default=None, help="folder for the temporary file (default: system temp)")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="melrecon_bench_", dir=args.dir))
    try:
        path = tmp / "volume.h5"
        t0 = time.perf_counter()
        write_volume(path, args.coils, args.readouts, args.ny, args.nz)
        validate_file(path, check_values=False)
        size_gb = path.stat().st_size / 1e9
        print(f"wrote {path.name}: {args.coils}x{args.readouts}x{args.ny}x{args.nz}, {size_gb:.2f} GB "
              f"in {time.perf_counter() - t0:.1f} s")
        pool = 4
        t0 = time.perf_counter()
        for seed in range(pool):  # warm the Poisson-disc cache (seconds per mask at 256x320)
            volume_mask((args.ny, args.nz), args.accel, 24, "poisson", seed)
        print(f"warmed {pool} Poisson masks in {time.perf_counter() - t0:.1f} s (cached afterwards)")

        ds = SlabDataset([path], slab_size=args.slab, train=True, accelerations=[args.accel], calib=24,
                         mask_type="poisson", mask_pool=pool)
        # raw slab read alone (h5py hyperslab of kspace + maps + target)
        with h5py.File(path, "r") as f:
            starts = np.random.default_rng(1).integers(0, args.readouts - args.slab + 1, args.samples)
            t0 = time.perf_counter()
            for s in starts:
                f["kspace"][:, s:s + args.slab]
                f["maps"][:, s:s + args.slab]
                f["target"][s:s + args.slab]
            read_rate = args.samples / (time.perf_counter() - t0)
        shape = f"{args.coils}x{args.slab}x{args.ny}x{args.nz}"
        for workers in args.workers:
            torch.manual_seed(0)
            sampler = RandomSampler(ds, replacement=True, num_samples=args.samples + 1)  # epoch = few slabs
            loader = DataLoader(ds, batch_size=1, num_workers=workers, sampler=sampler)
            n, t0, it = 0, None, iter(loader)
            for batch in it:
                if t0 is None:  # exclude worker start-up and the first item
                    t0 = time.perf_counter()
                    continue
                n += 1
                if n >= args.samples:
                    break
            rate = n / (time.perf_counter() - t0)
            del it
            print(f"slab {shape} workers={workers}: {rate:.2f} samples/s "
                  f"(read only: {read_rate:.2f} samples/s; torch threads {torch.get_num_threads()})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
