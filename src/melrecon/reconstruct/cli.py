"""The command line of ``python -m melrecon.reconstruct`` (arguments, per-file loop, exit status)."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from melrecon.atomic import all_or_none
from melrecon.data.h5 import LayoutError, validate_file
from melrecon.data.locks import LockBusy, file_lock
from melrecon.data.validate import collect
from melrecon.reconstruct.checkpoint import (
    ReconstructError,
    data_settings,
    eval_dataset,
    find_run,
    load_network,
)
from melrecon.models.regularizers import ConvStack, set_tile
from melrecon.reconstruct.output import (
    LOCK_NAME,
    csv_row,
    file_sha256,
    print_table,
    results_in,
    write_csv,
    write_result,
)
from melrecon.reconstruct.stitch import ScanResult, reconstruct_scan


#: ``--method``: classical reconstructions (no checkpoint) and their default weight ``--lam``, in the
#: data's normalised units (a study's tuned values are the better choice: ``--lam``)
CLASSICAL = {"zero_filled": None, "cg_sense": 1e-2, "l1_wavelet": 1e-3, "tv": 1e-3}


def build_parser(prog: str = "python -m melrecon.reconstruct", classical: bool = False) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog,
                                description="Reconstruct scans with a trained melrecon network, or with a classical "
                                            "method (--method, no checkpoint).")
    if not classical:
        p.add_argument("run", metavar="RUN_OR_CKPT", help="training run folder, or a .ckpt file inside one "
                                                          "(omitted with --method)")
    p.add_argument("inputs", metavar="INPUT", nargs="+", help=".h5 files or folders of them (melrecon layout)")
    p.add_argument("--method", choices=tuple(CLASSICAL),
                   help="classical reconstruction instead of a network: CG-SENSE, L1-wavelet or TV compressed "
                        "sensing run to convergence (melrecon.study.baselines); whole volumes; no RUN_OR_CKPT")
    p.add_argument("--lam", type=float, help="--method: regularisation weight in normalised units (default: "
                   + ", ".join(f"{k} {v:g}" for k, v in CLASSICAL.items() if v is not None) + ")")
    p.add_argument("--backend", choices=("melrecon", "bart"), default="melrecon",
                   help="--method: solver (bart: BART's pics, needs the bart executable)")
    p.add_argument("--out", required=True,
                   help="output folder (created); it holds the results of one checkpoint, written by one run at a time")
    p.add_argument("--overwrite", action="store_true",
                   help="remove results of another checkpoint found in --out (default: refuse)")
    p.add_argument("--ckpt", help="checkpoint in the run folder (path or name under checkpoints/; default last.ckpt)")
    p.add_argument("--config", help="run config to use instead of <run>/.hydra/config.yaml")
    p.add_argument("--accel", type=float, help="acceleration R of the evaluation mask (default: the run's data.eval_acceleration)")
    p.add_argument("--mask-type", help="mask type (volume3d: poisson|lines; cine: vd_kt|interleaved_kt)")
    p.add_argument("--calib", type=int, help="calibration region size (default: the run's data.calib)")
    p.add_argument("--slab-size", type=int, help="volume3d: readout positions per slab (default: the run's data.slab_size)")
    p.add_argument("--whole-volume", action="store_true",
                   help="volume3d: one network call per volume, all readout positions (no slabs, no seams); "
                        "the default for runs trained on whole volumes (data.slab_size null)")
    p.add_argument("--tile", type=int, nargs="+", metavar="T",
                   help="evaluate every CNN in exact tiles of this size, one entry per convolved axis "
                        "(bounds memory on whole volumes; default: the run's model.regularizer.tile)")
    p.add_argument("--dc-chunk", type=int, metavar="N",
                   help="apply the SENSE adjoint/normal in chunks of N readout positions (default: the run's model.dc_chunk)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available, else cpu")
    p.add_argument("--batch-size", type=int, default=1, help="items (slabs / slices) per network call (default 1)")
    p.add_argument("--num-unrolls", type=int,
                   help="run the network with this many unrolls (shared-weight networks only; default: as trained); "
                        "with a target, the metrics at the trained depth are printed beside the new ones")
    p.add_argument("--format", default="h5",
                   help="comma-separated outputs: h5 (result file, what evaluate reads), nifti (<stem>.nii.gz), "
                        "png (previews; cine also a GIF; a labelled comparison when there is a target)")
    return p


FORMATS = ("h5", "nifti", "png")


def parse_formats(text: str) -> tuple[str, ...]:
    """``"h5,nifti"`` -> ``("h5", "nifti")``; unknown names are a usage error."""
    formats = tuple(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))
    bad = [x for x in formats if x not in FORMATS]
    if bad or not formats:
        raise ReconstructError(f"--format {text!r}: choose from {', '.join(FORMATS)} (comma-separated)")
    return formats


def _classical_setup(args: argparse.Namespace, files: list[Path]) -> tuple[nn.Module, Any, str]:
    """``--method``: the classical model, data settings for the files' kind (whole volumes, the
    DataModule's defaults unless --accel/--mask-type/--calib) and a provenance name; ReconstructError."""
    from omegaconf import OmegaConf

    from melrecon.study.baselines import build_baseline

    for bad in ("ckpt", "config", "num_unrolls", "tile", "dc_chunk", "slab_size"):
        if getattr(args, bad) is not None:
            raise ReconstructError(f"--{bad.replace('_', '-')} applies to networks, not to --method {args.method}")
    kinds = set()
    for path in files:
        try:
            kinds.add(validate_file(path).kind)
        except (LayoutError, ValueError, OSError):
            continue  # reported per file later
    if len(kinds) > 1:
        raise ReconstructError(f"--method: the inputs mix data kinds {sorted(kinds)}; reconstruct one kind per call")
    kind = kinds.pop() if kinds else "volume3d"
    lam = args.lam if args.lam is not None else CLASSICAL[args.method]
    if lam is not None and lam < 0:
        raise ReconstructError(f"--lam must be >= 0, got {lam}")
    try:
        options = {} if args.method == "zero_filled" else {"backend": args.backend}
        model = build_baseline(args.method, kind, lam, **options)
    except (ValueError, RuntimeError) as err:
        raise ReconstructError(str(err)) from None
    cfg = OmegaConf.create({"data": {"_target_": "melrecon.data.datamodule.KspaceDataModule", "kind": kind,
                                     "root": ".", "accelerations": [args.accel or 4.0]}})
    dm = data_settings(cfg, eval_acceleration=args.accel, mask_type=args.mask_type, calib=args.calib, whole_volume=True)
    name = f"{args.method}" + (f" lam={lam:g}" if lam is not None else "") + (" (bart)" if args.backend == "bart" else "")
    return model, dm, name


def _setup(args: argparse.Namespace) -> tuple[nn.Module, nn.Module | None, Any, Path, Path, torch.device]:
    """Network (on its device), the network at its trained depth when ``--num-unrolls`` changes
    it (else None), data settings, checkpoint and config paths; ReconstructError."""
    from omegaconf import OmegaConf

    import melrecon.lit.app  # noqa: F401  registers the config resolvers a saved config may use

    if args.batch_size < 1:
        raise ReconstructError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.whole_volume and args.slab_size is not None:
        raise ReconstructError("--whole-volume and --slab-size exclude each other")
    if args.dc_chunk is not None and args.dc_chunk < 1:
        raise ReconstructError(f"--dc-chunk must be >= 1, got {args.dc_chunk}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ReconstructError("--device cuda: no CUDA device is available (this torch build or machine)")
    ckpt_path, cfg_path = find_run(args.run, args.ckpt, args.config)
    cfg = OmegaConf.load(cfg_path)
    trained = None
    depth = int(cfg.model.get("num_unrolls", 0))
    if args.num_unrolls is not None and args.num_unrolls != depth:
        print(f"note: --num-unrolls {args.num_unrolls}: the network runs {args.num_unrolls} unrolls of its shared "
              f"weights; it was trained with {depth} (metrics at {depth} are shown beside)")
        trained = load_network(OmegaConf.load(cfg_path), ckpt_path).to(device)
    dm = data_settings(cfg, eval_acceleration=args.accel, mask_type=args.mask_type, calib=args.calib,
                       slab_size=args.slab_size, whole_volume=args.whole_volume)
    net = load_network(cfg, ckpt_path, args.num_unrolls).to(device)
    if args.tile is not None:
        try:
            if trained is not None:
                set_tile(trained, args.tile)
            if set_tile(net, args.tile) == 0:
                raise ReconstructError("--tile: the run's network has no ConvStack CNN to tile")
        except ValueError as err:
            raise ReconstructError(f"--tile {' '.join(map(str, args.tile))}: {err}") from None
    if args.dc_chunk is not None:
        net.dc_chunk = args.dc_chunk
        if trained is not None:
            trained.dc_chunk = args.dc_chunk
    return net, trained, dm, ckpt_path.resolve(), cfg_path.resolve(), device


def _layout_input(path: Path, scratch: Path) -> Path:
    """``path`` itself, or for a fastMRI test/challenge file (k-space with ``mask``, no melrecon
    layout) a prospective layout file converted into ``scratch`` (ESPIRiT maps from the
    fully-sampled centre columns, at most 24 wide, as ``melrecon convert fastmri``)."""
    from melrecon.data.convert.fastmri import convert_fastmri, is_fastmri_undersampled

    if not is_fastmri_undersampled(path):
        return path
    print(f"       {path}: fastMRI undersampled file; ESPIRiT maps from its calibration region")
    return convert_fastmri(path, scratch / path.name, progress=False)


def _mask_note(result: ScanResult, dm: Any) -> str:
    """Which mask was used and its acceleration, for the console and the result attributes."""
    if result.mask_stored:
        return f"mask stored in the file, R = {result.acceleration:.2f}"
    return (f"mask {dm.mask_type} drawn (calib {dm.calib}), R = {result.acceleration:.2f} "
            f"(requested {result.acceleration_requested:g})")


def _reconstruct_file(path: Path, out_path: Path, net: nn.Module, dm: Any, device: torch.device,
                      batch_size: int, provenance: dict[str, str], formats: tuple[str, ...] = ("h5",),
                      source: Path | None = None,
                      trained: nn.Module | None = None) -> tuple[str, ScanResult, dict[str, float]]:
    """Validate one input, reconstruct it and write its outputs; returns (kind, result, metrics of
    the network at its trained depth when ``trained`` is given and the file has a target, else {}).

    ``source`` is the file the user named when ``path`` was converted from it (fastMRI).
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
        **provenance, "source_file": str((source or path).resolve()),
        "kind": info.kind, "acceleration": result.acceleration,
        "acceleration_requested": result.acceleration_requested,
        "mask_type": "stored" if result.mask_stored else dm.mask_type, "mask": _mask_note(result, dm),
        "calib": dm.calib, "normalize": bool(dm.normalize), "data_range": result.data_range,
        "has_target": result.has_target,
    }
    if info.kind == "volume3d":
        attrs["slab_size"] = -1 if dm.slab_size is None else dm.slab_size  # -1: the whole volume at once
        attrs["tile"] = ", ".join(sorted({str(m.tile) for m in net.modules() if isinstance(m, ConvStack)}))
    at_trained = _trained_depth_metrics(trained, path, dm, device, batch_size, result)
    attrs.update({f"{k}_trained_depth": v for k, v in at_trained.items()})
    with all_or_none() as written:  # a scan that FAILED leaves none of its outputs (nor a metrics.csv row)
        if "h5" in formats:
            written.append(write_result(out_path, result, attrs))
        _export(out_path.parent, out_path.stem, result, info.kind, formats, path, written)
    return info.kind, result, at_trained


def _claim_out(out_dir: Path, ckpt_sha: str, depth: int | None, overwrite: bool) -> None:
    """Make ``out_dir`` hold results of this checkpoint at this depth (``num_unrolls``) only:
    results of another checkpoint or depth (or of unknown depth) are refused
    (ReconstructError) or, with ``--overwrite``, removed. The caller holds the lock."""
    def other(a: dict[str, Any]) -> str | None:
        if a.get("checkpoint_sha256") != ckpt_sha:
            return f"of another checkpoint ({a['checkpoint']})"
        found = a.get("num_unrolls")
        if depth is not None and (found is None or int(found) != depth):
            return f"at another depth ({'unknown' if found is None else f'{int(found)} unrolls'}; this run: {depth})"
        return None

    others = {p: why for p, a in results_in(out_dir).items() if (why := other(a)) is not None}
    if not others:
        return
    first, why = next(iter(others.items()))
    if not overwrite:
        raise ReconstructError(
            f"--out {out_dir} holds {len(others)} result(s) {why}, e.g. {first.name}; an output folder holds one "
            "checkpoint at one depth: choose another --out, or pass --overwrite to remove them"
        )
    for p in others:
        p.unlink()
    print(f"removed {len(others)} result(s) {why} from {out_dir} (--overwrite)")


def _export(out_dir: Path, stem: str, result: ScanResult, kind: str, formats: tuple[str, ...], path: Path,
            written: list[Path]) -> None:
    """NIfTI / PNG outputs of one result (:mod:`melrecon.export`), with a labelled
    zero-filled / reconstruction / target / error strip of the centre plane when there is a target;
    each file, once complete, is appended to ``written``."""
    from melrecon.export import comparison_strip, comparison_titles, export_image, save_png, voxel_size_of

    wanted = [f for f in formats if f in ("nifti", "png")]
    if not wanted:
        return
    written += export_image(out_dir, stem, result.reconstruction, kind, wanted, voxel_size_of(path))
    if "png" in wanted and result.has_target:
        def centre(a: Any) -> Any:  # volume3d: the (Y, Z) plane at the centre readout; cine: frame 0 of the centre slice
            return a[a.shape[0] // 2] if kind == "volume3d" else (a if a.ndim == 3 else a[a.shape[0] // 2])[0]
        shown = centre(result.zero_filled), centre(result.reconstruction), centre(result.target)
        # the titles carry the volume metrics of metrics.csv, and say so; the panels show one plane or frame
        over, psnrs = "volume", None
        if "psnr" in result.metrics and "psnr_zf" in result.metrics:
            psnrs = (result.metrics["psnr_zf"], result.metrics["psnr"])
        else:
            over = "this plane" if kind == "volume3d" else "this frame"
        strip = comparison_strip(*shown, data_range=result.data_range, over=over, psnrs=psnrs)
        titles = comparison_titles(*shown, result.data_range, over=over, psnrs=psnrs)
        shows = "the centre readout plane" if kind == "volume3d" else "frame 0 of the centre slice"
        description = f"{stem}: panels show {shows}; " + "; ".join(t.replace("\n", " ") for t in titles)
        written.append(save_png(out_dir / f"{stem}_comparison.png", strip, description=description))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--method")
    classical = pre.parse_known_args(argv)[0].method is not None
    args = build_parser(classical=classical).parse_args(argv)
    files = collect(args.inputs)
    try:
        formats = parse_formats(args.format)
        if classical:
            net, dm, name = _classical_setup(args, files)
            trained, device = None, torch.device("cpu")
            provenance = {"checkpoint": f"classical: {name}", "config": ""}
            provenance["checkpoint_sha256"] = hashlib.sha256(provenance["checkpoint"].encode()).hexdigest()
        else:
            net, trained, dm, ckpt_path, cfg_path, device = _setup(args)
            provenance = {}
    except ReconstructError as err:
        print(f"melrecon: error: {err}", file=sys.stderr)
        return 2
    if not files:
        print(f"melrecon: error: no .h5 files found in {args.inputs}", file=sys.stderr)
        return 1
    out_dir = Path(args.out)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        print(f"melrecon: error: cannot create the output folder --out {out_dir}: {err}", file=sys.stderr)
        return 2
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(file_lock(out_dir / LOCK_NAME, blocking=False))
            if not classical:
                provenance = {"checkpoint": str(ckpt_path), "checkpoint_sha256": file_sha256(ckpt_path),
                              "config": str(cfg_path), **_depths(net, trained)}
            _claim_out(out_dir, provenance["checkpoint_sha256"], provenance.get("num_unrolls"), args.overwrite)
        except LockBusy:
            print(f"melrecon: error: another reconstruct is writing to --out {out_dir} (lock "
                  f"{out_dir / LOCK_NAME} is held): wait for it, or choose another --out", file=sys.stderr)
            return 2
        except (ReconstructError, OSError) as err:
            print(f"melrecon: error: {' '.join(str(err).split())}", file=sys.stderr)
            return 2
        with tempfile.TemporaryDirectory(prefix="melrecon-reconstruct-") as scratch:
            return _run(files, out_dir, net, trained, dm, device, args, formats, provenance,
                        provenance["checkpoint"], Path(scratch))


def _depths(net: nn.Module, trained: nn.Module | None) -> dict[str, int]:
    """``num_unrolls`` the network runs and ``trained_num_unrolls`` it was trained with (result
    attributes; empty for a network without ``num_unrolls``)."""
    depth = getattr(net, "num_unrolls", None)
    if depth is None:
        return {}
    return {"num_unrolls": int(depth), "trained_num_unrolls": int(getattr(trained or net, "num_unrolls"))}


def _run(files: list[Path], out_dir: Path, net: nn.Module, trained: nn.Module | None, dm: Any,
         device: torch.device, args: argparse.Namespace, formats: tuple[str, ...], provenance: dict[str, str],
         ckpt_path: Path | str, scratch: Path) -> int:
    """Reconstruct every file into ``out_dir`` (locked and claimed; ``scratch``: a temporary
    folder for inputs converted on the fly); write metrics.csv from every result in the folder."""
    failed: list[tuple[Path, str]] = []
    rows: list[dict[str, Any]] = []
    taken: dict[str, Path] = {}
    print(f"{'' if str(ckpt_path).startswith('classical') else 'checkpoint '}{ckpt_path} on {device}; "
          f"{len(files)} file(s) -> {out_dir}")
    for path in files:
        out_path = out_dir / f"{path.stem}.h5"
        try:
            if out_path.name in taken:
                raise ValueError(f"output {out_path} would overwrite the result of {taken[out_path.name]} (same file stem)")
            layout_path = _layout_input(path, scratch)
            kind, result, at_trained = _reconstruct_file(layout_path, out_path, net, dm, device, args.batch_size,
                                                         provenance, formats, source=path, trained=trained)
        except (LayoutError, ValueError, OSError, RuntimeError) as err:
            msg = " ".join(str(err).split())
            if str(path) not in msg:
                msg = f"{path}: {msg}"
            failed.append((path, msg))
            print(f"FAILED {msg}", file=sys.stderr)
            continue
        taken[out_path.name] = path
        rows.append({"file": str(path), "name": path.name, "output": str(out_path), "kind": kind,
                     "acceleration": result.acceleration, "mask": _mask_note(result, dm),
                     "num_unrolls": provenance.get("num_unrolls", ""), **result.metrics,
                     **{f"{k}_trained_depth": v for k, v in at_trained.items()}})
        print(f"ok     {path} -> {out_path} ({_mask_note(result, dm)}"
              + ("" if result.has_target else "; no target, no metrics") + ")")
        if at_trained:
            print(f"       depth {args.num_unrolls}: PSNR {result.metrics['psnr']:.2f} dB, SSIM {result.metrics['ssim']:.4f}"
                  f"; trained depth: PSNR {at_trained['psnr']:.2f} dB, SSIM {at_trained['ssim']:.4f}")
    # metrics.csv from every result in the folder (earlier runs of this checkpoint included),
    # so that it never disagrees with the files beside it
    everything = [csv_row(p, a) for p, a in results_in(out_dir).items()]
    csv_path = out_dir / "metrics.csv"
    if everything:
        try:
            write_csv(csv_path, everything)
        except OSError as err:  # a WriteError, naming the file
            print(f"melrecon: error: {' '.join(str(err).split())}", file=sys.stderr)
            return 2
    if rows:
        print_table(rows)
    print(f"{len(rows)} reconstructed, {len(failed)} failed"
          + (f"; metrics of {len(everything)} result(s) in {csv_path}" if everything else ""),
          file=sys.stderr if failed else sys.stdout)
    return 1 if failed else 0


def _trained_depth_metrics(trained: nn.Module | None, path: Path, dm: Any, device: torch.device,
                           batch_size: int, result: ScanResult) -> dict[str, float]:
    """Metrics of the network at its trained depth on the same file and masks (``--num-unrolls``
    changed the depth and the file has a target), else ``{}``."""
    if trained is None or not result.has_target:
        return {}
    dataset = eval_dataset(dm, [path])
    try:
        return reconstruct_scan(trained, dataset, device, batch_size).metrics
    finally:
        dataset.close()
