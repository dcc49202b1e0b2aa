"""The command line of ``python -m melrecon.reconstruct`` (arguments, per-file loop, exit status)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from melrecon.data.h5 import LayoutError, validate_file
from melrecon.data.validate import collect
from melrecon.reconstruct.checkpoint import (
    ReconstructError,
    data_settings,
    eval_dataset,
    find_run,
    load_network,
)
from melrecon.reconstruct.output import print_table, write_csv, write_result
from melrecon.reconstruct.stitch import ScanResult, reconstruct_scan


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m melrecon.reconstruct",
                                description="Reconstruct scans with a trained melrecon network.")
    p.add_argument("run", metavar="RUN_OR_CKPT", help="training run folder, or a .ckpt file inside one")
    p.add_argument("inputs", metavar="INPUT", nargs="+", help=".h5 files or folders of them (melrecon layout)")
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--ckpt", help="checkpoint in the run folder (path or name under checkpoints/; default last.ckpt)")
    p.add_argument("--config", help="run config to use instead of <run>/.hydra/config.yaml")
    p.add_argument("--accel", type=float, help="acceleration R of the evaluation mask (default: the run's data.eval_acceleration)")
    p.add_argument("--mask-type", help="mask type (volume3d: poisson|lines; cine: vd_kt|interleaved_kt)")
    p.add_argument("--calib", type=int, help="calibration region size (default: the run's data.calib)")
    p.add_argument("--slab-size", type=int, help="volume3d: readout positions per slab (default: the run's data.slab_size)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available, else cpu")
    p.add_argument("--batch-size", type=int, default=1, help="items (slabs / slices) per network call (default 1)")
    p.add_argument("--num-unrolls", type=int,
                   help="run the network with this many unrolls (shared-weight networks only; default: as trained)")
    return p


def _setup(args: argparse.Namespace) -> tuple[nn.Module, Any, Path, Path, torch.device]:
    """Network (on its device), data settings, checkpoint and config paths; ReconstructError."""
    from omegaconf import OmegaConf

    import melrecon.lit.app  # noqa: F401  registers the config resolvers a saved config may use

    if args.batch_size < 1:
        raise ReconstructError(f"--batch-size must be >= 1, got {args.batch_size}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ReconstructError("--device cuda: no CUDA device is available (this torch build or machine)")
    ckpt_path, cfg_path = find_run(args.run, args.ckpt, args.config)
    cfg = OmegaConf.load(cfg_path)
    dm = data_settings(cfg, eval_acceleration=args.accel, mask_type=args.mask_type, calib=args.calib,
                       slab_size=args.slab_size)
    net = load_network(cfg, ckpt_path, args.num_unrolls).to(device)
    return net, dm, ckpt_path.resolve(), cfg_path.resolve(), device


def _reconstruct_file(path: Path, out_path: Path, net: nn.Module, dm: Any, device: torch.device,
                      batch_size: int, provenance: dict[str, str]) -> tuple[str, ScanResult]:
    """Validate one input, reconstruct it and write its result file; returns (kind, result).

    Raises LayoutError / ValueError / OSError / RuntimeError naming what is wrong with the file.
    """
    if out_path.exists() and out_path.resolve() == path.resolve():
        raise ValueError(f"output {out_path} is the input file itself; choose another --out")
    info = validate_file(path, check_values=True)
    if info.kind != dm.kind:
        raise ValueError(f"field 'kind': the network was trained on {dm.kind!r} data, file is {info.kind!r}")
    dataset = eval_dataset(dm, [path])
    try:
        result = reconstruct_scan(net, dataset, device, batch_size)
    finally:
        dataset.close()
    attrs = {
        **provenance, "source_file": str(path.resolve()),
        "kind": info.kind, "acceleration": result.acceleration,
        "acceleration_requested": result.acceleration_requested, "mask_type": dm.mask_type,
        "calib": dm.calib, "normalize": bool(dm.normalize), "data_range": result.data_range,
    }
    if info.kind == "volume3d":
        attrs["slab_size"] = dm.slab_size
    write_result(out_path, result, attrs)
    return info.kind, result


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        net, dm, ckpt_path, cfg_path, device = _setup(args)
    except ReconstructError as err:
        print(f"melrecon: error: {err}", file=sys.stderr)
        return 2
    files = collect(args.inputs)
    if not files:
        print(f"melrecon: error: no .h5 files found in {args.inputs}", file=sys.stderr)
        return 1
    out_dir = Path(args.out)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        print(f"melrecon: error: cannot create the output folder --out {out_dir}: {err}", file=sys.stderr)
        return 2
    provenance = {"checkpoint": str(ckpt_path), "config": str(cfg_path)}
    failed: list[tuple[Path, str]] = []
    rows: list[dict[str, Any]] = []
    taken: dict[str, Path] = {}
    print(f"checkpoint {ckpt_path} on {device}; {len(files)} file(s) -> {out_dir}")
    for path in files:
        out_path = out_dir / f"{path.stem}.h5"
        try:
            if out_path.name in taken:
                raise ValueError(f"output {out_path} would overwrite the result of {taken[out_path.name]} (same file stem)")
            kind, result = _reconstruct_file(path, out_path, net, dm, device, args.batch_size, provenance)
        except (LayoutError, ValueError, OSError, RuntimeError) as err:
            msg = " ".join(str(err).split())
            if str(path) not in msg:
                msg = f"{path}: {msg}"
            failed.append((path, msg))
            print(f"FAILED {msg}", file=sys.stderr)
            continue
        taken[out_path.name] = path
        rows.append({"file": str(path), "name": path.name, "output": str(out_path), "kind": kind,
                     "acceleration": result.acceleration, **result.metrics})
        print(f"ok     {path} -> {out_path} (R = {result.acceleration:.2f})")
    if rows:
        write_csv(out_dir / "metrics.csv", rows)
        print_table(rows)
    print(f"{len(rows)} reconstructed, {len(failed)} failed" + (f"; metrics in {out_dir / 'metrics.csv'}" if rows else ""),
          file=sys.stderr if failed else sys.stdout)
    return 1 if failed else 0
