"""LightningDataModule over melrecon-layout files (3D slabs or cine), with synthetic first run.

``KspaceDataModule(kind="volume3d" | "cine", root=..., ...)`` reads ``root/<split>`` folders (or
split files listing paths) and serves batches of type :class:`melrecon.data.batch.ReconBatch`
(collated by torch's ``default_collate``: a leading batch axis B on every field).

``prepare_data()`` generates the synthetic dataset (``synthetic`` section) when ``root`` is
missing or has no ``.h5`` file, so a new user's first run needs no download; with
``synthetic=None`` it runs the config's ``build`` function if it names one (a dataset that a
command rebuilds, e.g. the brain study dataset), else raises one error naming the folder.
Generation is locked (a second process waits and reuses the set); a generated folder that lost
files is refused, not used partially.

``setup()`` checks every file of the splits it builds once (:mod:`melrecon.data.check`:
readable HDF5, layout, finite values, target = S^H F^H k, unit maps, ``max``; cached by path,
size and mtime), that no file content is in two splits (content hashes, cached the same way;
a generated folder must also hold no file its ``synthetic.json`` does not list), and that the
items can be batched and scored (one item shape per split when the
batch size is > 1; evaluation images at least the SSIM window), refusing with one line naming
file and field.

Training uses a :class:`~melrecon.data.samplers.KeyedSampler` (a DistributedSampler yielding
(epoch, index) keys: shuffling and every random choice of an item are functions of (seed,
epoch, index), so a resumed run reproduces the uninterrupted one). Under DDP (torch.distributed
initialised; the trainer config sets ``use_distributed_sampler: false``) it shards the training
items, and validation/test use a
:class:`~melrecon.data.samplers.VolumeSampler`, which keeps all slabs of a volume on one rank
for per-volume metrics.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from melrecon.data.check import check_files, file_hashes
from melrecon.data.datasets import CineDataset, SlabDataset
from melrecon.data.h5 import LayoutError, ScanInfo, find_files
from melrecon.data.locks import file_lock
from melrecon.data.samplers import KeyedSampler, VolumeSampler
from melrecon.data.synthetic import MARKER, describe, ensure_dataset, expected_files, lock_path, resolve_preset
from melrecon.metrics import SSIM_WIN

log = logging.getLogger("melrecon")

_SYNTHETIC_KIND = {"volume3d": "knee3d", "cine": "cine"}
_DEFAULT_MASK = {"volume3d": "poisson", "cine": "vd_kt"}


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class KspaceDataModule(pl.LightningDataModule):
    """DataModule for one kind of data.

    Args:
        kind: ``"volume3d"`` (slabs) or ``"cine"``.
        root: dataset folder.
        train_split, val_split, test_split: a folder name under ``root`` (all ``.h5`` below it)
            or a ``.txt`` file (absolute, or relative to ``root``) listing one file per line
            (paths relative to ``root`` unless absolute).
        batch_size: training batch size.
        val_batch_size: validation/test batch size (1: the last slab of a volume may be short).
        num_workers, pin_memory, persistent_workers: DataLoader options.
        slab_size: S, readout positions per slab (volume3d; 1 = 2D slice baseline; None =
            whole volumes, one item per file).
        accelerations: a number or a list to sample from per training item.
        eval_acceleration: fixed R for validation/test (default: per file from the list).
        calib: calibration box (Poisson) or number of central lines (line / k-t masks).
        mask_type: ``poisson``/``lines`` (volume3d) or ``vd_kt``/``interleaved_kt`` (cine);
            default ``poisson`` / ``vd_kt``.
        mask_pool: training mask seeds drawn from ``range(mask_pool)`` (``None``: unlimited).
        crop: cine image-domain centre crop (X, Y) or ``None``.
        normalize: divide each item by its file's ``max`` attribute.
        synthetic: ``None`` (no generation) or a mapping with ``preset`` (tiny/small/medium),
            ``seed`` and optional preset overrides (``num_train``, ``shape``, ``coils``, ...).
        build: for a dataset that a command rebuilds (not synthetic): the dotted name of a
            function ``build(root)`` that writes it into a missing or empty ``root``, run by
            ``prepare_data`` under the generation lock (``melrecon.data.brain3d.build``).
        seed: data seed: training order, slab starts, accelerations and masks are functions of
            (seed, epoch, index) (data/base.yaml sets it to the run's ``seed``).
    """

    def __init__(
        self,
        kind: str,
        root: str | os.PathLike,
        train_split: str = "train",
        val_split: str = "val",
        test_split: str = "test",
        batch_size: int = 1,
        val_batch_size: int = 1,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        slab_size: int | None = 8,
        accelerations: Sequence[float] | float = 8.0,
        eval_acceleration: float | None = None,
        calib: int = 24,
        mask_type: str | None = None,
        mask_pool: int | None = None,
        crop: Sequence[int] | None = None,
        normalize: bool = True,
        synthetic: Mapping[str, Any] | None = None,
        seed: int = 0,
        build: str | None = None,
    ) -> None:
        super().__init__()
        if kind not in _SYNTHETIC_KIND:
            raise ValueError(f"data kind must be 'volume3d' or 'cine', got {kind!r}")
        if int(batch_size) < 1 or int(val_batch_size) < 1:
            raise ValueError(f"batch_size and val_batch_size must be >= 1, got {batch_size}, {val_batch_size}")
        if int(num_workers) < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.kind = kind
        self.root = Path(root)
        self.splits = {"train": train_split, "val": val_split, "test": test_split}
        self.batch_size = int(batch_size)
        self.val_batch_size = int(val_batch_size)
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory)
        self.persistent_workers = bool(persistent_workers) and self.num_workers > 0
        self.slab_size = None if slab_size is None else int(slab_size)
        self.accelerations = [float(accelerations)] if isinstance(accelerations, (int, float)) else [float(a) for a in accelerations]
        self.eval_acceleration = eval_acceleration
        self.calib = int(calib)
        self.mask_type = mask_type or _DEFAULT_MASK[kind]
        self.mask_pool = mask_pool
        self.crop = None if crop is None else tuple(int(c) for c in crop)
        self.normalize = normalize
        if isinstance(synthetic, DictConfig):  # from Hydra: plain types (lists) for JSON and h5 attrs
            synthetic = OmegaConf.to_container(synthetic, resolve=True)
        self.synthetic = None if synthetic is None else dict(synthetic)
        if self.synthetic is not None and build:  # e.g. debug=smoke on a built dataset's config
            raise ValueError(f"data.synthetic and data.build are both set for {self.root}: one folder cannot hold "
                             "a synthetic dataset and a built one; set data.synthetic=null (or data.build=null)")
        self.seed = int(seed)
        self.build = build
        self.datasets: dict[str, Dataset] = {}
        self._splits_checked = False

    # ------------------------------------------------------------------ files
    def split_files(self, split: str) -> list[Path]:
        """Files of ``split`` (``train``/``val``/``test``); ValueError naming the folder/file."""
        spec = self.splits[split]
        path = Path(spec)
        if not path.is_absolute():
            path = self.root / spec
        if path.suffix == ".txt":
            if not path.is_file():
                raise ValueError(f"{split}_split file {path} does not exist")
            lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
            files = [Path(ln) if Path(ln).is_absolute() else self.root / ln for ln in lines]
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise ValueError(f"{split}_split file {path} lists missing files: {missing[:5]}")
        else:
            if not path.is_dir():
                raise ValueError(f"{split} folder {path} does not exist (data.root={self.root}, data.{split}_split={spec!r})")
            files = find_files(path)
        if not files:
            raise ValueError(f"{split} split {path} has no .h5 files")
        return files

    def prepare_data(self) -> None:
        """Generate the synthetic dataset if ``root`` has no ``.h5`` file (rank 0 only), under a
        lock; check that a generated folder is the one configured and complete."""
        if self.synthetic is None:
            if self.build and not (self.root.is_dir() and find_files(self.root)):
                self._build()
            if not (self.root.is_dir() and find_files(self.root)):
                raise ValueError(
                    f"data folder {self.root} is missing or holds no .h5 files, and synthetic generation is "
                    "disabled for this data config: set data.root=/path/to/converted/data "
                    "(see data/README.md; convert with python -m melrecon.data.convert)"
                )
            return
        options = dict(self.synthetic)
        preset = options.pop("preset", "small")
        seed = options.pop("seed", 0)
        # a bar redrawn with carriage returns is noise in a SLURM log: only on a terminal
        options.setdefault("progress", sys.stderr.isatty())
        ensure_dataset(self.root, _SYNTHETIC_KIND[self.kind], preset=preset, seed=seed, **options)
        self._check_synthetic_marker()

    def _build(self) -> None:
        """Run ``build(root)`` under the generation lock, unless another process built it meanwhile."""
        module, _, name = str(self.build).rpartition(".")
        try:
            build = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError, ValueError):
            raise ValueError(f"data.build={self.build!r}: no such function (module.function)") from None
        self.root.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(lock_path(self.root)):
            if not (self.root.is_dir() and find_files(self.root)):
                log.info("building %s with %s", self.root, self.build)
                build(self.root)

    def _requested_synthetic(self) -> dict[str, Any]:
        options = {k: v for k, v in dict(self.synthetic or {}).items() if k != "progress"}
        preset = options.pop("preset", "small")
        seed = options.pop("seed", 0)
        kind = _SYNTHETIC_KIND[self.kind]
        return describe(kind, preset, seed, resolve_preset(kind, preset, options))

    def _check_synthetic_marker(self) -> None:
        """A generated folder must match the configured synthetic section (e.g. a `tiny` test
        run must not be silently reused by a `small` training run) and hold every file it was
        generated with (a partial set would train on fewer files than the config says)."""
        marker = self.root / MARKER
        if self.synthetic is None or not marker.is_file():
            return  # real data, or a folder the user filled: use as is
        found = json.loads(marker.read_text())
        wanted = self._requested_synthetic()
        if found != wanted:
            raise ValueError(
                f"data folder {self.root} holds a synthetic dataset made with {found}, but the config asks "
                f"for {wanted}: delete the folder to regenerate, or point data.root elsewhere"
            )
        def shown(names: list[str]) -> str:
            return ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")

        for split, names in expected_files(found["kind"], found["params"]).items():
            missing = [n for n in names if not (self.root / split / n).is_file()]
            if missing:
                raise ValueError(
                    f"synthetic dataset {self.root} is incomplete: {split} has {len(names) - len(missing)} of "
                    f"{len(names)} files that {MARKER} lists (missing: {shown(missing)}); refusing to use a partial "
                    "set: delete the folder to regenerate it"
                )
            extra = sorted(p.relative_to(self.root).as_posix() for p in find_files(self.root / split)
                           if p.relative_to(self.root / split).as_posix() not in names)
            if extra:
                raise ValueError(
                    f"synthetic dataset {self.root}: {split} holds {len(extra)} file(s) that {MARKER} does not list "
                    f"({shown(extra)}); refusing to use them (a file copied from another split would train on test "
                    "data): remove them, or delete the folder to regenerate it"
                )

    def dataset(self, files: Sequence[str | os.PathLike], train: bool) -> Dataset:
        """The dataset this module builds over ``files``: training (random slabs and masks) or
        evaluation (tiling, masks fixed per file), with this module's options."""
        common = dict(
            train=train, accelerations=self.accelerations, calib=self.calib, mask_type=self.mask_type,
            mask_pool=self.mask_pool, eval_acceleration=self.eval_acceleration, normalize=self.normalize,
            seed=self.seed,
        )
        if self.kind == "volume3d":
            return SlabDataset(files, slab_size=self.slab_size, **common)
        return CineDataset(files, crop=self.crop, **common)

    def _dataset(self, split: str) -> Dataset:
        files = self.split_files(split)
        self.check_items(split, check_files(files))
        return self.dataset(files, train=split == "train")

    def item_shape(self, info: ScanInfo) -> tuple[int, ...]:
        """Shape of one item's k-space without the slab axis: volume3d (C, Y, Z) (every training
        slab has ``slab_size`` positions; whole volumes, ``slab_size: null``, keep X: (C, X, Y, Z)),
        cine (C, T, X, Y) after the crop."""
        if self.kind == "volume3d":
            c, x, y, z = info.shape
            return (c, x, y, z) if self.slab_size is None else (c, y, z)
        c, t, x, y = info.shape[-4:]
        return (c, t, *(self.crop or (x, y)))

    def check_items(self, split: str, infos: Sequence[ScanInfo]) -> None:
        """Refuse files whose items cannot be batched or scored, naming file and shape:
        the wrong kind, fewer readout positions than a training slab, item shapes that differ
        within a split whose batch size is > 1 (torch.stack would fail mid-epoch), evaluation
        images smaller than the SSIM window (validation would fail after the first epoch)."""
        batch = self.batch_size if split == "train" else self.val_batch_size
        ref: tuple[ScanInfo, tuple[int, ...]] | None = None
        for info in infos:
            if info.kind != self.kind:
                raise LayoutError(info.path, "kind", f"data.kind is {self.kind!r}, the file is {info.kind!r}")
            shape = self.item_shape(info)
            if (split == "train" and self.kind == "volume3d" and self.slab_size is not None
                    and info.shape[1] < self.slab_size):
                raise LayoutError(info.path, "kspace", f"shape {info.shape}: {info.shape[1]} readout positions < "
                                  f"data.slab_size {self.slab_size}")
            if split != "train" and min(shape[-2:]) < SSIM_WIN:
                raise LayoutError(info.path, "kspace", f"shape {info.shape}: images {shape[-2:]} are smaller than the "
                                  f"{SSIM_WIN}x{SSIM_WIN} SSIM window of the {split} metrics")
            if ref is None:
                ref = (info, shape)
            elif batch > 1 and shape != ref[1]:
                raise LayoutError(info.path, "kspace", f"shape {info.shape} gives items of shape {shape}, but "
                                  f"{ref[0].path} gives {ref[1]}; {split} batch_size={batch} stacks items of one "
                                  "shape: use files of one shape, or a batch size of 1")

    def check_disjoint_splits(self) -> None:
        """Refuse a file whose content is in two splits (the same file listed twice, or a copy),
        naming both: a test file copied into train would make the test scores meaningless.
        Content hashes are cached with the file checks (:func:`melrecon.data.check.file_hashes`),
        so a folder is read once, not at every set-up. Splits that do not exist are skipped."""
        seen: dict[str, tuple[str, Path]] = {}
        for split in self.splits:
            try:
                files = self.split_files(split)
            except ValueError:
                continue  # a split this data has not (e.g. no test folder): set-up says so when it is used
            for path, digest in zip(files, file_hashes(files)):
                if digest in seen and seen[digest][0] != split:
                    other_split, other = seen[digest]
                    raise LayoutError(path, "file", f"its content is also in the {other_split} split ({other}); "
                                      "a file must be in one split only")
                seen.setdefault(digest, (split, path))

    def setup(self, stage: str | None = None) -> None:
        if not self._splits_checked:
            self.check_disjoint_splits()
            self._splits_checked = True
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for split in wanted.get(stage, ("train", "val", "test")) if stage else ("train", "val", "test"):
            if split not in self.datasets:
                self.datasets[split] = self._dataset(split)

    # ------------------------------------------------------------------ loaders
    def _loader(self, split: str, batch_size: int, sampler, shuffle: bool) -> DataLoader:
        if split not in self.datasets:
            self.setup({"train": "fit", "val": "validate", "test": "test"}[split])
        return DataLoader(
            self.datasets[split],
            batch_size=batch_size,
            shuffle=shuffle if sampler is None else False,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
        )

    def train_dataloader(self) -> DataLoader:
        if "train" not in self.datasets:
            self.setup("fit")
        # (epoch, index) keys: order, masks and slabs are functions of (seed, epoch, index), so a
        # resumed run is exact; also the per-rank shard under DDP
        sampler = KeyedSampler(self.datasets["train"], shuffle=True, seed=self.seed)
        return self._loader("train", self.batch_size, sampler, shuffle=True)

    def _eval_loader(self, split: str) -> DataLoader:
        if split not in self.datasets:
            self.setup("validate" if split == "val" else "test")
        sampler = VolumeSampler(self.datasets[split]) if _distributed() else None
        return self._loader(split, self.val_batch_size, sampler, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")
