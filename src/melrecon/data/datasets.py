"""Datasets over files in the melrecon layout: 3D slabs and cine series.

Every item is a :class:`melrecon.data.batch.ReconBatch` (its docstring lists the fields with
their shapes, dtypes and units). Items are divided by the file's ``max`` attribute
(``normalize=True``) so targets are O(1) and ``max`` is 1 (cine with ``crop``: the cropped
series' maximum). A file with a stored ``mask`` (prospectively undersampled, data/README.md) is
sampled with that mask rather than a drawn one; it cannot be used for training, and when it has
no ``target`` the item's ``target`` is NaN (nothing to score). Files are opened lazily, once per worker process, and only the slab / slice
is read (h5py hyperslab; the layout chunks one readout position per chunk).
"""

from __future__ import annotations

import bisect
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from melrecon.data.batch import ReconBatch
from melrecon.data.h5 import ScanInfo, open_scan, read_info
from melrecon.data.npfft import fftc_np, ifftc_np
from melrecon.data.subsample import MaskSampler, check_mask_options, cine_mask, stable_seed, volume_mask
from melrecon.physics.sense import SenseOperator


def _x0(kspace: torch.Tensor, maps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A^H y for one item (y already masked), with the network's own operator."""
    return SenseOperator(maps[None], mask[None], fft_dims=(-2, -1)).adjoint(kspace[None])[0]


class _H5Dataset(Dataset):
    """File list, metadata and per-worker file handles shared by the two datasets."""

    kind: str = ""

    def __init__(
        self,
        files: Sequence[str | os.PathLike],
        train: bool,
        accelerations: Sequence[float] | float,
        calib: int,
        mask_type: str,
        mask_pool: int | None = None,
        eval_acceleration: float | None = None,
        normalize: bool = True,
        mask_per_position: bool = False,
        seed: int = 0,
    ) -> None:
        self.files = [str(f) for f in files]
        self.seed = int(seed)
        if not self.files:
            raise ValueError(f"{type(self).__name__}: no files given")
        accelerations = [accelerations] if isinstance(accelerations, (int, float)) else list(accelerations)
        check_mask_options(self.kind, mask_type, accelerations, calib)
        self.train = bool(train)
        self.calib = int(calib)
        self.mask_type = mask_type
        self.normalize = normalize
        self.masks = MaskSampler(accelerations, train, mask_pool, eval_acceleration, mask_per_position)
        self.infos: list[ScanInfo] = []
        for path in self.files:
            with open_scan(path) as f:  # unreadable files and
                info = read_info(f, path)  # shapes, dtypes, attributes: errors name file and field
            if info.kind != self.kind:
                raise ValueError(f"{path}: field 'kind': {type(self).__name__} needs {self.kind!r}, file is {info.kind!r}")
            if self.train and info.has_mask:
                raise ValueError(f"{path}: field 'mask': a prospectively undersampled file cannot be used for "
                                 "training (it has no fully-sampled k-space)")
            self.infos.append(info)
        self._handles: dict[int, h5py.File] = {}

    def _open(self, path: str) -> h5py.File:
        """Open one file for reading (a hook: tests wrap it to count bytes read)."""
        return h5py.File(path, "r")

    def _file(self, i: int) -> h5py.File:
        if i not in self._handles:
            self._handles[i] = self._open(self.files[i])
        return self._handles[i]

    def __getstate__(self) -> dict[str, Any]:
        # h5py handles cannot cross process boundaries: each DataLoader worker opens its own
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles = {}

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: nothing useful to do
            pass

    def file_index(self, index: int) -> int:
        """Index into ``self.files`` of item ``index`` (used by the volume sampler)."""
        raise NotImplementedError

    def stored_mask(self, fi: int) -> torch.Tensor | None:
        """The file's stored ``mask`` (float32, as stored) or None when masks are drawn."""
        if not self.infos[fi].has_mask:
            return None
        return torch.from_numpy(self._file(fi)["mask"][()])

    def _target(self, f: h5py.File, sel: Any, shape: tuple[int, ...]) -> np.ndarray:
        """``target[sel]``, or NaN of ``shape`` for a prospective file without one."""
        if "target" in f:
            return f["target"][sel]
        return np.full(shape, np.nan, dtype=np.complex64)

    def _key(self, key: int | tuple[int, int]) -> tuple[int, torch.Generator | None]:
        """``(index, generator)`` of an item key: an int (index; training draws from torch's
        global RNG), or ``(epoch, index)`` from :class:`melrecon.data.samplers.KeyedSampler`
        (training draws from a generator seeded by (seed, epoch, index): exact resume)."""
        if isinstance(key, tuple):
            epoch, index = (int(k) for k in key)
            if not self.train:
                return index, None
            return index, torch.Generator().manual_seed(stable_seed("train", self.seed, epoch, index))
        return int(key), None

    def _item(
        self, kspace: np.ndarray, maps: np.ndarray, target: np.ndarray, mask: torch.Tensor,
        vmax: float, scale: float, file: str, position: int,
    ) -> ReconBatch:
        maps_t = torch.from_numpy(np.ascontiguousarray(maps))
        # one pass over the (large) k-space: scale folded into the small broadcast mask
        y = torch.from_numpy(np.ascontiguousarray(kspace)) * (mask * scale)
        return ReconBatch(
            kspace=y,
            mask=mask,
            maps=maps_t,
            x0=_x0(y, maps_t, mask),
            target=torch.from_numpy(np.ascontiguousarray(target)) * scale,
            max=torch.tensor(vmax * scale, dtype=torch.float32),
            file=file,
            position=torch.tensor(position, dtype=torch.long),
            acceleration=torch.tensor(float(mask.numel() / mask.sum().clamp_min(1)), dtype=torch.float32),
        )


class SlabDataset(_H5Dataset):
    """Slabs of ``slab_size`` consecutive readout positions from ``volume3d`` files.

    Training (``train=True``): ``sum_f ceil(X_f / S)`` items per epoch, item i belongs to a file
    by the cumulative counts and takes a uniformly random start in ``[0, X - S]``.
    Evaluation: deterministic tiling, starts 0, S, 2S, ... covering every readout position
    exactly once; the last slab of a volume may be shorter (batch size 1 then, or equal X % S).
    ``slab_size=1`` is the 2D slice baseline (image (1, Y, Z)).  ``slab_size=None``: whole
    volumes, one item per file covering all its readout positions (image (X, Y, Z), start 0),
    in training and evaluation alike; volumes of different X then need batch size 1.

    Args:
        files: volume3d files.
        slab_size: S >= 1, or None for whole volumes.
        train: random slabs and masks if True; tiling and per-file masks otherwise.
        accelerations: one value or a list sampled per item (training).
        calib: calibration box / lines.
        mask_type: ``"poisson"`` or ``"lines"``.
        mask_pool: training mask seeds from ``range(mask_pool)`` (``None``: unlimited).
        eval_acceleration: fixed R in evaluation (default: per file from the list).
        normalize: divide by the file's ``max`` attribute.
        seed: the data seed of ``(epoch, index)`` item keys (training: slab start and mask are
            functions of (seed, epoch, index); see :class:`melrecon.data.samplers.KeyedSampler`).
    """

    kind = "volume3d"

    def __init__(
        self,
        files: Sequence[str | os.PathLike],
        slab_size: int | None,
        train: bool,
        accelerations: Sequence[float] | float = 8.0,
        calib: int = 24,
        mask_type: str = "poisson",
        mask_pool: int | None = None,
        eval_acceleration: float | None = None,
        normalize: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(files, train, accelerations, calib, mask_type, mask_pool, eval_acceleration, normalize,
                         seed=seed)
        if slab_size is not None and (isinstance(slab_size, bool) or int(slab_size) != slab_size or slab_size < 1):
            raise ValueError(f"slab_size must be an integer >= 1 or None (whole volumes), got {slab_size!r}")
        self.slab_size = None if slab_size is None else int(slab_size)
        counts = []
        self.tiles: list[tuple[int, int, int]] = []  # (file index, start, stop) in evaluation
        for i, info in enumerate(self.infos):
            nx = info.shape[1]
            if self.slab_size is None:  # whole volume: one item, in training too
                counts.append(1)
                self.tiles.append((i, 0, nx))
                continue
            if train and nx < self.slab_size:
                raise ValueError(f"{info.path}: field 'kspace': {nx} readout positions < slab_size {self.slab_size}")
            counts.append(math.ceil(nx / self.slab_size))
            self.tiles.extend((i, s, min(s + self.slab_size, nx)) for s in range(0, nx, self.slab_size))
        self._cum = np.cumsum(counts).tolist()

    def __len__(self) -> int:
        return self._cum[-1]

    def file_index(self, index: int) -> int:
        return bisect.bisect_right(self._cum, index)

    def slab_bounds(self, index: int, generator: torch.Generator | None = None) -> tuple[int, int, int]:
        """(file index, start, stop) of item ``index``; random start in training (from ``generator``)."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} slabs")
        if not self.train or self.slab_size is None:
            return self.tiles[index]
        fi = self.file_index(index)
        nx = self.infos[fi].shape[1]
        start = int(torch.randint(nx - self.slab_size + 1, (), generator=generator).item())
        return fi, start, start + self.slab_size

    def __getitem__(self, key: int | tuple[int, int]) -> ReconBatch:
        index, gen = self._key(key)
        fi, start, stop = self.slab_bounds(index, gen)
        info = self.infos[fi]
        f = self._file(fi)
        kspace = f["kspace"][:, start:stop]  # hyperslab read: only these readout positions
        maps = f["maps"][:, start:stop]
        target = self._target(f, np.s_[start:stop], (stop - start, *info.shape[2:4]))
        stored = self.stored_mask(fi)
        if stored is not None:
            mask = stored.reshape(1, 1, *info.shape[2:4]).contiguous()
        else:
            accel, seed = self.masks(Path(info.path).name, start, gen)
            mask = volume_mask(info.shape[2:4], accel, self.calib, self.mask_type, seed)
        scale = 1.0 / info.max if self.normalize else 1.0
        return self._item(kspace, maps, target, mask, info.max, scale, info.path, start)


def _center_crop(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Centre crop of the last two axes (the k-space centre convention: index N // 2 kept)."""
    out = x
    for axis, n in zip((-2, -1), size):
        full = x.shape[axis]
        if n > full:
            raise ValueError(f"crop {size} larger than the image {x.shape[-2:]}")
        start = full // 2 - n // 2
        out = np.take(out, np.arange(start, start + n), axis=axis)
    return out


class CineDataset(_H5Dataset):
    """Whole cine series (one item per file and slice) from ``cine`` files.

    Args:
        files: cine files.
        train: random masks per item if True; fixed per file otherwise.
        accelerations, calib, mask_pool, eval_acceleration, normalize, seed: as :class:`SlabDataset`.
        mask_type: ``"vd_kt"`` or ``"interleaved_kt"``.
        crop: optional (X, Y) image-domain centre crop. The coil images F^H k are cropped and
            transformed back, so k-space, maps and target stay consistent (the crop removes
            readout oversampling / background; signal outside the crop is discarded).
    """

    kind = "cine"

    def __init__(
        self,
        files: Sequence[str | os.PathLike],
        train: bool,
        accelerations: Sequence[float] | float = 8.0,
        calib: int = 8,
        mask_type: str = "vd_kt",
        mask_pool: int | None = None,
        eval_acceleration: float | None = None,
        normalize: bool = True,
        crop: Sequence[int] | None = None,
        seed: int = 0,
    ) -> None:
        # each slice of a multi-slice series is its own 2D+t acquisition: its own mask
        super().__init__(files, train, accelerations, calib, mask_type, mask_pool, eval_acceleration, normalize,
                         mask_per_position=True, seed=seed)
        if crop is not None:
            crop = tuple(int(c) for c in crop)
            if len(crop) != 2 or min(crop) < 1:
                raise ValueError(f"crop must be null or two positive sizes (X, Y), got {crop}")
        self.crop = crop
        self.items = [(i, s) for i, info in enumerate(self.infos) for s in range(info.positions)]
        self._crop_max: dict[int, float] = {}

    def _volume_max(self, fi: int, f: h5py.File) -> float:
        """Data range of the file: max |target| over all its slices, after the crop if any."""
        if self.crop is None:
            return self.infos[fi].max
        if fi not in self._crop_max:
            if "target" not in f:  # prospective file: its stored max (of the zero-filled image) is all there is
                return self.infos[fi].max
            self._crop_max[fi] = float(np.abs(_center_crop(f["target"][()], self.crop)).max())
        return self._crop_max[fi]

    def __len__(self) -> int:
        return len(self.items)

    def file_index(self, index: int) -> int:
        return self.items[index][0]

    def __getitem__(self, key: int | tuple[int, int]) -> ReconBatch:
        index, gen = self._key(key)
        fi, s = self.items[index]
        info = self.infos[fi]
        f = self._file(fi)
        sel = (s,) if info.has_slice_axis else ()
        kspace = f["kspace"][sel]  # (C, T, X, Y)
        maps = f["maps"][sel][:, None]  # (C, 1, X, Y)
        target = self._target(f, sel, kspace.shape[1:])  # (T, X, Y)
        vmax = self._volume_max(fi, f)
        stored = self.stored_mask(fi)
        if self.crop is not None and stored is not None and self.crop[1] != kspace.shape[-1]:
            # a crop along Y would resample the phase-encode grid the stored mask refers to
            raise ValueError(f"{info.path}: field 'mask': data.crop {list(self.crop)} crops the phase-encode axis Y "
                             f"({kspace.shape[-1]}); with a stored mask only the readout X may be cropped")
        if self.crop is not None:
            kspace = fftc_np(_center_crop(ifftc_np(kspace), self.crop)).astype(np.complex64)
            maps = _center_crop(maps, self.crop)
            target = _center_crop(target, self.crop)
        if stored is not None:
            mask = stored[sel].reshape(1, kspace.shape[1], 1, kspace.shape[-1]).contiguous()
        else:
            accel, seed = self.masks(Path(info.path).name, s, gen)
            mask = cine_mask(kspace.shape[1], kspace.shape[-1], accel, self.calib, self.mask_type, seed)
        scale = 1.0 / info.max if self.normalize else 1.0
        return self._item(kspace, maps, target, mask, vmax, scale, info.path, s)
