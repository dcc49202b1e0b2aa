"""Reconstruct scans with a trained network: ``python -m melrecon.reconstruct``.

Usage::

    python -m melrecon.reconstruct RUN_OR_CKPT INPUT [INPUT ...] --out DIR
        [--ckpt NAME] [--config YAML] [--accel R] [--mask-type T] [--calib N]
        [--slab-size S] [--device cpu|cuda] [--batch-size B] [--num-unrolls N]
        [--format h5,nifti,png]

``RUN_OR_CKPT`` is a training run folder (``logs/train/runs/<time>/``; its
``checkpoints/last.ckpt`` is used unless ``--ckpt`` names another) or a ``.ckpt`` file inside
one. The network is rebuilt from the run's saved Hydra config (``<run>/.hydra/config.yaml``,
``hydra.utils.instantiate(cfg.model)``) and loaded from the checkpoint's ``state_dict``
(:class:`melrecon.lit.ReconModule` keeps the network under ``net.``). The data settings
(kind, mask type, calibration, slab size, normalisation, accelerations) come from the run's
``cfg.data`` (instantiated as :class:`melrecon.data.KspaceDataModule`); flags override them.

Every ``INPUT`` is an ``.h5`` file in the melrecon layout or a folder of them (recursive), or a
fastMRI test/challenge file (k-space with its ``mask``), which is converted on the fly into a
temporary layout file (ESPIRiT maps from the fully-sampled centre columns). Each file is
validated first; a bad file is reported by name and skipped, the others go on. A fully-sampled
file is undersampled retrospectively with the evaluation masks (the dataset validation builds,
so the same acceleration and masks as validation); a file with a stored ``mask``
(prospectively undersampled, data/README.md) is reconstructed with that mask, and without a
``target`` it gets no metrics. Every output line names the mask used and its acceleration.
``--num-unrolls N`` other than the trained depth is announced, and with a target the metrics
of the trained depth are printed beside the new ones. The network runs in eval mode under
``torch.no_grad`` over the whole scan: every slab tile of a 3D volume (stitched back at its
readout positions), every slice of a cine file.

Output per input, ``DIR/<stem>.h5`` (written to a temporary name, then renamed):

- ``reconstruction``, ``zero_filled`` (A^H y): complex64, the target's shape (volume3d
  (X, Y, Z); cine (S, T, X, Y) or (T, X, Y), cropped if the run's data config crops), in the
  source file's units (the dataset's per-file normalisation is undone);
- ``mask``: float32 0/1, volume3d (Y, Z); cine (S, T, Y) or (T, Y);
- attributes: ``checkpoint``, ``config``, ``source_file``, ``kind``, ``acceleration`` (achieved:
  mask size / samples), ``acceleration_requested`` (NaN for a stored mask), ``mask_type``
  (``stored`` for a stored mask), ``mask`` (the sentence printed), ``has_target``, ``calib``, ``slab_size``
  (volume3d), ``normalize``, ``data_range`` and the metrics ``psnr``, ``ssim``, ``nmse``, ``psnr_zf``,
  ``ssim_zf``, ``nmse_zf`` (:mod:`melrecon.metrics`, the fastMRI definitions validation uses).

``--format`` adds ``DIR/<stem>.nii.gz`` (``nifti``) and PNG previews (``png``; cine also a GIF;
with a target ``<stem>_comparison.png``), through :mod:`melrecon.export`; ``h5`` (the default)
is the result file above. The metrics are printed as a table and written to ``DIR/metrics.csv``. Exit status: 0 if every
file was reconstructed, 1 if any failed, 2 for a usage error (run folder, checkpoint, config,
device).

Parts: :mod:`.checkpoint` (the trained run: checkpoint, config, network, data settings),
:mod:`.stitch` (one scan through the network, stitched and scored), :mod:`.output` (result
files, ``metrics.csv``, the table), :mod:`.cli` (the command line).
"""

from melrecon.reconstruct.checkpoint import ReconstructError, data_settings, eval_dataset, find_run, load_network
from melrecon.reconstruct.cli import main
from melrecon.reconstruct.output import CSV_COLUMNS, print_table, write_csv, write_result
from melrecon.reconstruct.stitch import METRIC_KEYS, ScanResult, reconstruct_scan, run_network, scan_metrics

__all__ = ["main", "ReconstructError", "find_run", "load_network", "data_settings", "eval_dataset",
           "ScanResult", "reconstruct_scan", "run_network", "scan_metrics", "METRIC_KEYS", "CSV_COLUMNS",
           "write_result", "write_csv", "print_table"]
