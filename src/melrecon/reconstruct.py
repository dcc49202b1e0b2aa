"""Reconstruct scans with a trained network.

Usage::

    python -m melrecon.reconstruct RUN_OR_CKPT INPUT [INPUT ...] --out DIR
        [--ckpt NAME] [--config YAML] [--accel R] [--mask-type T] [--calib N]
        [--slab-size S] [--device cpu|cuda] [--batch-size B]

``RUN_OR_CKPT`` is a training run folder (``logs/train/runs/<time>/``; its
``checkpoints/last.ckpt`` is used unless ``--ckpt`` names another) or a ``.ckpt`` file inside
one. The network is rebuilt from the run's saved Hydra config (``<run>/.hydra/config.yaml``,
``hydra.utils.instantiate(cfg.model)``) and loaded from the checkpoint's ``state_dict``
(:class:`melrecon.lit.ReconModule` keeps the network under ``net.``). The data settings
(kind, mask type, calibration, slab size, normalisation, accelerations) come from the run's
``cfg.data`` (instantiated as :class:`melrecon.data.KspaceDataModule`); flags override them.

Every ``INPUT`` is an ``.h5`` file in the melrecon layout or a folder of them (recursive). Each
file is validated first; a bad file is reported by name and skipped, the others go on. A file
is undersampled retrospectively with the evaluation mask (seeded by the file name, exactly as
validation does), and the network runs in eval mode under ``torch.no_grad`` over the whole
scan: every slab tile of a 3D volume (stitched back at its readout positions), every slice of
a cine file.

Output per input, ``DIR/<stem>.h5`` (written to a temporary name, then renamed):

- ``reconstruction``, ``zero_filled`` (A^H y): complex64, the target's shape (volume3d
  (X, Y, Z); cine (S, T, X, Y) or (T, X, Y), cropped if the run's data config crops), in the
  source file's units (the dataset's per-file normalisation is undone);
- ``mask``: float32 0/1, volume3d (Y, Z); cine (S, T, Y) or (T, Y);
- attributes: ``checkpoint``, ``config``, ``source_file``, ``kind``, ``acceleration`` (achieved:
  mask size / samples), ``acceleration_requested``, ``mask_type``, ``calib``, ``slab_size``
  (volume3d), ``normalize``, ``data_range`` and the metrics ``psnr``, ``ssim``, ``nmse``, ``psnr_zf``,
  ``ssim_zf``, ``nmse_zf``.

Metrics follow the project's fastMRI definitions (:mod:`melrecon.lit.metrics`): magnitudes,
data range = maximum of the target volume, PSNR and NMSE over the volume, SSIM per 2D slice
(readout plane / frame) averaged. They are printed as a table and written to
``DIR/metrics.csv``. Exit status: 0 if every file was reconstructed, 1 if any failed, 2 for a
usage error (run folder, checkpoint, config, device).
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from melrecon.data.h5 import LayoutError, atomic_path, validate_file
from melrecon.data.subsample import check_mask_options
from melrecon.data.validate import collect

CONFIG = Path(".hydra") / "config.yaml"
METRIC_KEYS = ("psnr", "ssim", "nmse", "psnr_zf", "ssim_zf", "nmse_zf")
CSV_COLUMNS = ("file", "output", "kind", "acceleration", *METRIC_KEYS)


class ReconstructError(Exception):
    """A usage mistake (run folder, checkpoint, config, device): one line, exit status 2."""


# ---------------------------------------------------------------------- run, config, network
def find_run(run_or_ckpt: str | os.PathLike, ckpt: str | None = None,
             config: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """Resolve ``(checkpoint file, config.yaml)`` from a run folder or a checkpoint path.

    A folder: ``--ckpt`` (a path, or a name inside ``<run>/checkpoints/``) or
    ``<run>/checkpoints/last.ckpt``. A file: the checkpoint itself; its run folder is the first
    folder above it holding ``.hydra/config.yaml``. ``config`` overrides the config found.
    """
    p = Path(run_or_ckpt)
    if p.is_dir():
        run_dir = p
        if ckpt is None:
            ckpt_path = p / "checkpoints" / "last.ckpt"
        else:
            ckpt_path = Path(ckpt)
            if not ckpt_path.is_file() and (p / "checkpoints" / ckpt).is_file():
                ckpt_path = p / "checkpoints" / ckpt
        if not ckpt_path.is_file():
            raise ReconstructError(f"no checkpoint {ckpt_path} (run folder {p}; name one with --ckpt)")
    elif p.is_file():
        if ckpt is not None:
            raise ReconstructError(f"--ckpt {ckpt!r} given with a checkpoint file {p}; give a run folder instead")
        ckpt_path = p
        run_dir = next((d for d in list(p.resolve().parents)[:3] if (d / CONFIG).is_file()), None)
        if run_dir is None and config is None:
            raise ReconstructError(f"no {CONFIG} in the folders above {p}: pass the run folder, or --config")
    else:
        raise ReconstructError(f"run folder or checkpoint {p} does not exist")
    cfg_path = Path(config) if config is not None else run_dir / CONFIG
    if not cfg_path.is_file():
        raise ReconstructError(f"no run config {cfg_path} (the run's .hydra/config.yaml; or pass --config)")
    return ckpt_path, cfg_path


def load_network(cfg: Any, ckpt_path: str | os.PathLike) -> nn.Module:
    """Build the network of ``cfg.model`` and load its weights from a Lightning checkpoint.

    :class:`melrecon.lit.ReconModule` stores the network as ``self.net``, so its parameters
    are the ``net.``-prefixed entries of the checkpoint's ``state_dict`` (loaded strictly:
    a checkpoint that does not match the config is an error). Returns the network in eval mode.
    """
    import hydra

    if "model" not in cfg or "_target_" not in cfg.model:
        raise ReconstructError("the run config has no model section with a _target_")
    try:
        net = hydra.utils.instantiate(cfg.model)
    except Exception as err:  # noqa: BLE001 - any instantiation failure is a config problem here
        raise ReconstructError(f"cannot build the network from the run config: {err}") from err
    try:
        # Lightning checkpoints made by ReconModule hold only plain values (weights_only-safe)
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise ReconstructError(f"cannot read checkpoint {ckpt_path}: {err}") from err
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not state:
        raise ReconstructError(f"checkpoint {ckpt_path} has no state_dict (is it a Lightning checkpoint?)")
    weights = {k[len("net."):]: v for k, v in state.items() if k.startswith("net.")}
    if not weights:
        raise ReconstructError(f"checkpoint {ckpt_path}: no 'net.*' parameters (not a ReconModule checkpoint)")
    try:
        net.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        msg = " ".join(str(err).split())
        raise ReconstructError(f"checkpoint {ckpt_path} does not fit the run's model config: {msg}") from err
    return net.eval()


def data_settings(cfg: Any, **overrides: Any):
    """The run's data settings as a :class:`KspaceDataModule` (no files are touched).

    ``root`` and ``synthetic`` are replaced (the run's data folder is not needed, and its path
    may use interpolations that only resolve inside Hydra). ``overrides`` with value ``None``
    are ignored; the others replace ``cfg.data`` keys (``eval_acceleration``, ``mask_type``,
    ``calib``, ``slab_size``) and are checked by the DataModule/datasets.
    """
    import hydra

    from melrecon.data.datamodule import KspaceDataModule

    if "data" not in cfg or "_target_" not in cfg.data:
        raise ReconstructError("the run config has no data section with a _target_")
    kwargs = {k: v for k, v in overrides.items() if v is not None}
    try:
        dm = hydra.utils.instantiate(cfg.data, root=".", synthetic=None, **kwargs)
    except Exception as err:  # noqa: BLE001
        raise ReconstructError(f"cannot read the run's data settings: {err}") from err
    if not isinstance(dm, KspaceDataModule):
        raise ReconstructError(f"data._target_ {cfg.data._target_} is not melrecon's KspaceDataModule")
    # checked once here rather than failing every file the same way
    try:
        check_mask_options(dm.kind, dm.mask_type, dm.accelerations, dm.calib)
    except ValueError as err:
        raise ReconstructError(f"data settings: {err}") from None
    if dm.eval_acceleration is not None and not float(dm.eval_acceleration) > 1:
        raise ReconstructError(f"acceleration (--accel / data.eval_acceleration) must be > 1, got {dm.eval_acceleration}")
    if dm.slab_size < 1:
        raise ReconstructError(f"slab size (--slab-size / data.slab_size) must be >= 1, got {dm.slab_size}")
    return dm


def eval_dataset(dm: Any, files: Sequence[str | os.PathLike]):
    """The dataset validation would build over ``files``."""
    return dm.dataset(files, train=False)


# ---------------------------------------------------------------------- one scan
@dataclass
class ScanResult:
    """A reconstructed scan in the source file's units (arrays in the layout of the module doc)."""

    reconstruction: np.ndarray
    zero_filled: np.ndarray
    target: np.ndarray
    mask: np.ndarray
    data_range: float
    acceleration: float
    acceleration_requested: float
    metrics: dict[str, float] = field(default_factory=dict)


def _batches(dataset: Any, batch_size: int) -> list[list[int]]:
    """Item indices in order, grouped into batches of equal image shape (a volume's last slab
    may be shorter than the others and cannot be stacked with them)."""
    def shape_key(i: int) -> int:
        if hasattr(dataset, "tiles"):
            _, start, stop = dataset.tiles[i]
            return stop - start
        return 0

    groups: list[list[int]] = []
    for i in range(len(dataset)):
        if groups and len(groups[-1]) < batch_size and shape_key(groups[-1][0]) == shape_key(i):
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


@torch.no_grad()
def run_network(net: nn.Module, dataset: Any, device: torch.device | str = "cpu",
                batch_size: int = 1) -> Iterator[tuple[dict[str, Any], torch.Tensor]]:
    """Yield ``(batch, prediction)`` over every item of ``dataset`` in order, the prediction
    on the CPU with the batch's ``x0`` shape (in the dataset's normalised units)."""
    net.eval()
    loader = DataLoader(dataset, batch_sampler=_batches(dataset, batch_size), num_workers=0)
    for batch in loader:
        args = [batch[k].to(device) for k in ("x0", "kspace", "maps", "mask")]
        yield batch, net(*args).cpu()


def reconstruct_scan(net: nn.Module, dataset: Any, device: torch.device | str = "cpu",
                     batch_size: int = 1) -> ScanResult:
    """Run the network over every item of a one-file evaluation dataset and stitch the scan.

    volume3d: slab ``[start, start + S)`` of the volume goes to readout positions
    ``start..start+S-1`` (``batch['slice']`` is the slab start); cine: item ``s`` is slice
    ``s``. Every position must be covered exactly once (checked). The dataset divides items by
    the file's ``max`` (``normalize``); outputs are multiplied back into the file's units.
    """
    if len(dataset.infos) != 1:
        raise ValueError(f"reconstruct_scan: expected a dataset over one file, got {len(dataset.infos)}")
    info = dataset.infos[0]
    scale = info.max if dataset.normalize else 1.0
    volume = info.kind == "volume3d"
    n_pos = info.positions
    recon = zf = target = None
    covered = np.zeros(n_pos, dtype=np.int64)
    masks: dict[int, np.ndarray] = {}
    data_range = 0.0
    for batch, pred in run_network(net, dataset, device, batch_size):
        for b in range(pred.shape[0]):
            pos = int(batch["slice"][b])
            p, x0, t = pred[b], batch["x0"][b], batch["target"][b]
            if recon is None:
                # volume: (X, Y, Z) from a slab (S, Y, Z); cine: (S, T, X', Y') from (T, X', Y')
                full = (n_pos, *p.shape[1:]) if volume else (n_pos, *p.shape)
                recon, zf, target = (np.zeros(full, dtype=np.complex64) for _ in range(3))
            sel = slice(pos, pos + p.shape[0]) if volume else pos
            recon[sel], zf[sel], target[sel] = (a.numpy() * scale for a in (p, x0, t))
            covered[sel] += 1
            m = batch["mask"][b]
            masks[pos] = (m.reshape(m.shape[-2:]) if volume else m.reshape(m.shape[1], m.shape[-1])).numpy()
            data_range = max(data_range, float(batch["max"][b]) * scale)
    if recon is None or not (covered == 1).all():
        raise RuntimeError(f"{info.path}: stitching covered positions {covered.tolist()} (expected each once)")
    if volume:
        mask = masks[0]
        if any(not np.array_equal(m, mask) for m in masks.values()):
            raise RuntimeError(f"{info.path}: slabs of one volume got different masks")
    else:
        mask = np.stack([masks[s] for s in range(n_pos)])
        if not info.has_slice_axis:  # keep the file's layout: (T, X, Y) series, (T, Y) mask
            recon, zf, target, mask = recon[0], zf[0], target[0], mask[0]
    # the R asked of the mask sampler (cine: per slice, by the same keys the dataset uses)
    name = Path(info.path).name
    keys = [name] if volume else [f"{name}#{s}" for s in range(n_pos)]
    accel_req = float(np.mean([dataset.masks(k)[0] for k in keys]))
    res = ScanResult(
        reconstruction=recon, zero_filled=zf, target=target, mask=mask.astype(np.float32),
        data_range=data_range, acceleration=float(mask.size / max(mask.sum(), 1.0)),
        acceleration_requested=float(accel_req),
    )
    res.metrics = scan_metrics(res.reconstruction, res.zero_filled, res.target, res.data_range)
    return res


def scan_metrics(recon: np.ndarray, zero_filled: np.ndarray, target: np.ndarray,
                 data_range: float) -> dict[str, float]:
    """fastMRI PSNR / SSIM / NMSE of a whole scan (reconstruction and zero-filled).

    Arrays are complex (any layout whose last two axes are one 2D slice); magnitudes are
    scored with the given data range (the target volume's maximum). SSIM averages the SSIM of
    every 2D slice (:func:`melrecon.lit.metrics.ssim_slices`); it is NaN when slices are
    smaller than the 7 x 7 window.
    """
    from melrecon.lit.metrics import SSIM_WIN, as_slices, ssim_slices, volume_nmse, volume_psnr

    t = torch.from_numpy(np.abs(target))
    out: dict[str, float] = {}
    for suffix, arr in (("", recon), ("_zf", zero_filled)):
        p = torch.from_numpy(np.abs(arr))
        out[f"psnr{suffix}"] = float(volume_psnr(p, t, data_range))
        if min(t.shape[-2:]) >= SSIM_WIN:
            out[f"ssim{suffix}"] = float(ssim_slices(as_slices(p), as_slices(t), data_range).mean())
        else:
            out[f"ssim{suffix}"] = math.nan
        out[f"nmse{suffix}"] = float(volume_nmse(p, t))
    return {k: out[k] for k in METRIC_KEYS}


# ---------------------------------------------------------------------- writing
def write_result(path: str | os.PathLike, result: ScanResult, attrs: dict[str, Any]) -> Path:
    """Write one result atomically: a hidden temporary file in the same folder, then
    ``os.replace``; on any error the temporary file is removed and nothing is left."""
    path = Path(path)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("reconstruction", data=result.reconstruction.astype(np.complex64))
        f.create_dataset("zero_filled", data=result.zero_filled.astype(np.complex64))
        f.create_dataset("mask", data=result.mask.astype(np.float32))
        for key, value in {**attrs, **result.metrics}.items():
            f.attrs[key] = value
    return path


def write_csv(path: str | os.PathLike, rows: list[dict[str, Any]]) -> Path:
    """``metrics.csv`` (columns :data:`CSV_COLUMNS`), written atomically."""
    path = Path(path)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue())
    return path


def print_table(rows: list[dict[str, Any]], file: Any = None) -> None:
    """The per-volume metrics as a table (rich), with the mean over volumes if several."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="reconstruction metrics (fastMRI; _zf = zero-filled input)")
    for col in ("file", "R", *METRIC_KEYS):
        table.add_column(col, justify="left" if col == "file" else "right")

    def fmt(row: dict[str, Any]) -> list[str]:
        vals = [f"{row[k]:.2f}" if k.startswith("psnr") else f"{row[k]:.4f}" for k in METRIC_KEYS]
        return [str(row["name"]), f"{row['acceleration']:.2f}", *vals]

    for row in rows:
        table.add_row(*fmt(row))
    if len(rows) > 1:
        mean = {k: float(np.mean([r[k] for r in rows])) for k in (*METRIC_KEYS, "acceleration")}
        table.add_row(*fmt({"name": f"mean of {len(rows)}", **mean}), style="bold")
    Console(file=file or sys.stdout, width=160).print(table)


# ---------------------------------------------------------------------- command line
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
    from omegaconf import OmegaConf

    import melrecon.lit.app  # noqa: F401  registers the config resolvers a saved config may use

    if args.batch_size < 1:
        raise ReconstructError(f"--batch-size must be >= 1, got {args.batch_size}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ReconstructError("--device cuda: no CUDA device is available (this torch build or machine)")
    ckpt_path, cfg_path = find_run(args.run, args.ckpt, args.config)
    cfg = OmegaConf.load(cfg_path)
    if args.num_unrolls is not None:
        if args.num_unrolls < 1 or "num_unrolls" not in cfg.get("model", {}):
            raise ReconstructError(f"--num-unrolls {args.num_unrolls}: needs N >= 1 and a model with num_unrolls")
        if not cfg.model.get("share_weights", False):
            raise ReconstructError("--num-unrolls: the run's network has separate weights per unroll")
        cfg.model.num_unrolls = args.num_unrolls
    dm = data_settings(cfg, eval_acceleration=args.accel, mask_type=args.mask_type, calib=args.calib,
                       slab_size=args.slab_size)
    net = load_network(cfg, ckpt_path).to(device)
    return net, dm, ckpt_path.resolve(), cfg_path.resolve(), device


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
    failed: list[tuple[Path, str]] = []
    rows: list[dict[str, Any]] = []
    taken: dict[str, Path] = {}
    print(f"checkpoint {ckpt_path} on {device}; {len(files)} file(s) -> {out_dir}")
    for path in files:
        out_path = out_dir / f"{path.stem}.h5"
        try:
            if out_path.name in taken:
                raise ValueError(f"output {out_path} would overwrite the result of {taken[out_path.name]} (same file stem)")
            if out_path.exists() and out_path.resolve() == path.resolve():
                raise ValueError(f"output {out_path} is the input file itself; choose another --out")
            info = validate_file(path, check_values=True)
            if info.kind != dm.kind:
                raise ValueError(f"field 'kind': the network was trained on {dm.kind!r} data, file is {info.kind!r}")
            dataset = eval_dataset(dm, [path])
            try:
                result = reconstruct_scan(net, dataset, device, args.batch_size)
            finally:
                dataset.close()
            attrs = {
                "checkpoint": str(ckpt_path), "config": str(cfg_path), "source_file": str(path.resolve()),
                "kind": info.kind, "acceleration": result.acceleration,
                "acceleration_requested": result.acceleration_requested, "mask_type": dm.mask_type,
                "calib": dm.calib, "normalize": bool(dm.normalize), "data_range": result.data_range,
            }
            if info.kind == "volume3d":
                attrs["slab_size"] = dm.slab_size
            write_result(out_path, result, attrs)
        except (LayoutError, ValueError, OSError, RuntimeError) as err:
            msg = " ".join(str(err).split())
            if str(path) not in msg:
                msg = f"{path}: {msg}"
            failed.append((path, msg))
            print(f"FAILED {msg}", file=sys.stderr)
            continue
        taken[out_path.name] = path
        rows.append({"file": str(path), "name": path.name, "output": str(out_path), "kind": info.kind,
                     "acceleration": result.acceleration, **result.metrics})
        print(f"ok     {path} -> {out_path} (R = {result.acceleration:.2f})")
    if rows:
        write_csv(out_dir / "metrics.csv", rows)
        print_table(rows)
    print(f"{len(rows)} reconstructed, {len(failed)} failed" + (f"; metrics in {out_dir / 'metrics.csv'}" if rows else ""),
          file=sys.stderr if failed else sys.stdout)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
