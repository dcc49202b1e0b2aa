"""The one on-disk layout of melrecon: one HDF5 file per scan (documented in data/README.md).

Datasets (all complex64):

- ``volume3d`` (axes ``"coil,x,y,z"``): ``kspace`` (C, X, Y, Z) in hybrid x-ky-kz space (the
  readout X is already inverse Fourier transformed), ``maps`` (C, X, Y, Z), ``target`` (X, Y, Z).
- ``cine`` (axes ``"slice,coil,time,x,y"``): ``kspace`` (S, C, T, X, Y) in k-space on (X, Y),
  ``maps`` (S, C, X, Y), ``target`` (S, T, X, Y). A single-slice series may omit the slice axis
  (axes ``"coil,time,x,y"``, ``kspace`` (C, T, X, Y), ``maps`` (C, X, Y), ``target`` (T, X, Y)).

``target`` is the fully-sampled coil combination S^H F^H k. Optional ``mask`` (float32 0/1;
volume3d (Y, Z), cine (S, T, Y) or (T, Y)) marks a prospectively undersampled file: ``kspace``
holds the acquired samples (zero elsewhere), the mask is used as stored instead of drawing one,
and ``target`` may then be absent (no metrics; ``max`` is then max |S^H F^H k| of the
undersampled data, the zero-filled image). Attributes: ``kind``, ``axes``,
``max`` (max |target| over the file, the metric data range), ``source`` (free text provenance),
``layout_version``. Files are written to a temporary name and renamed, so a reader never sees a
half-written file. Readers check shapes, dtypes, finiteness, attributes and physical consistency
(:mod:`melrecon.data.consistency`) and raise :class:`LayoutError` (a ``ValueError``) naming the
file and the field.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from melrecon.atomic import atomic_path  # also imported from here by the data tools

LAYOUT_VERSION = 1
KINDS = ("volume3d", "cine")
AXES = {
    "volume3d": ("coil,x,y,z",),
    "cine": ("slice,coil,time,x,y", "coil,time,x,y"),
}
REQUIRED_ATTRS = ("kind", "axes", "max", "source", "layout_version")
FIELDS = ("kspace", "maps", "target")
MASK = "mask"  # optional: a prospectively undersampled file (see the module docstring)


class LayoutError(ValueError):
    """A file that does not follow the layout; ``path`` and ``field`` say where."""

    def __init__(self, path: str | os.PathLike, field: str, problem: str) -> None:
        self.path = str(path)
        self.field = field
        self.problem = problem
        super().__init__(f"{self.path}: field '{field}': {problem}")


@dataclass(frozen=True)
class ScanInfo:
    """Metadata of a validated file.

    ``shape`` is the kspace shape as stored. ``positions`` is the number of items along the
    slab/slice axis: X for volume3d, S for cine (1 when the slice axis is omitted).
    """

    path: str
    kind: str
    axes: str
    shape: tuple[int, ...]
    max: float
    source: str
    has_slice_axis: bool
    has_mask: bool = False
    has_target: bool = True

    @property
    def num_coils(self) -> int:
        return self.shape[1] if self.has_slice_axis else self.shape[0]

    @property
    def positions(self) -> int:
        if self.kind == "volume3d":
            return self.shape[1]
        return self.shape[0] if self.has_slice_axis else 1


def expected_shapes(kind: str, axes: str, kshape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """Shapes ``maps`` and ``target`` must have for a ``kspace`` of shape ``kshape``."""
    if axes == "coil,x,y,z":
        c, x, y, z = kshape
        return {"maps": (c, x, y, z), "target": (x, y, z)}
    if axes == "slice,coil,time,x,y":
        s, c, t, x, y = kshape
        return {"maps": (s, c, x, y), "target": (s, t, x, y)}
    if axes == "coil,time,x,y":
        c, t, x, y = kshape
        return {"maps": (c, x, y), "target": (t, x, y)}
    raise ValueError(f"unknown axes {axes!r} for kind {kind!r}")


def mask_shape(axes: str, kshape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of the optional stored ``mask``: volume3d (Y, Z); cine (S, T, Y) or (T, Y)."""
    if axes == "coil,x,y,z":
        return tuple(kshape[2:])
    if axes == "slice,coil,time,x,y":
        return (kshape[0], kshape[2], kshape[4])
    if axes == "coil,time,x,y":
        return (kshape[1], kshape[3])
    raise ValueError(f"unknown axes {axes!r}")


def zero_filled_max(kspace: np.ndarray, maps: np.ndarray, axes: str) -> float:
    """max |S^H F^H k| over the file (the ``max`` of a prospective file without a target)."""
    from melrecon.data.npfft import ifftc_np

    coil_axis = 0 if axes.startswith("coil") else 1
    m = maps if axes == "coil,x,y,z" else np.expand_dims(maps, coil_axis + 1)  # cine maps: no time axis
    return float(np.abs(np.sum(np.conj(m) * ifftc_np(kspace, axes=(-2, -1)), axis=coil_axis)).max())


def _chunks(axes: str, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    # Chunk so that one slab position / one cine slice is one contiguous run on disk: a slab read
    # then touches only its own chunks (tests count the bytes read).
    if axes == "coil,x,y,z":
        return (shape[0], 1) + tuple(shape[2:])
    if axes == "slice,coil,time,x,y":
        return (1,) + tuple(shape[1:])
    return None


def write_scan(
    path: str | os.PathLike,
    kspace: np.ndarray,
    maps: np.ndarray,
    target: np.ndarray | None,
    kind: str,
    source: str,
    axes: str | None = None,
    extra_attrs: dict[str, Any] | None = None,
    mask: np.ndarray | None = None,
) -> Path:
    """Write one scan atomically (temporary name in the same folder, then ``os.replace``).

    Args:
        path: destination ``.h5`` file; its folder is created.
        kspace, maps, target: arrays in the layout of ``kind`` (cast to complex64).
        kind: ``"volume3d"`` or ``"cine"``.
        source: provenance text (generator and seed, or converter and input file).
        axes: axis string; default ``"coil,x,y,z"`` / ``"slice,coil,time,x,y"`` (or
            ``"coil,time,x,y"`` for a 4-D cine kspace).
        extra_attrs: further attributes (numbers or strings) stored on the file.
        mask: a prospectively undersampled file's sampling mask (0/1, :func:`mask_shape`);
            ``kspace`` is stored multiplied by it. ``target`` may then be None.

    Returns:
        The path written. ``max`` is computed from ``target`` (without one: from the
        zero-filled image, :func:`zero_filled_max`).
    """
    path = Path(path)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    kspace = np.asarray(kspace, dtype=np.complex64)
    maps = np.asarray(maps, dtype=np.complex64)
    if target is None and mask is None:
        raise ValueError(f"{path}: a file without a target must carry its sampling mask (prospective data)")
    target = None if target is None else np.asarray(target, dtype=np.complex64)
    if axes is None:
        axes = "coil,x,y,z" if kind == "volume3d" else ("coil,time,x,y" if kspace.ndim == 4 else "slice,coil,time,x,y")
    if axes not in AXES[kind]:
        raise ValueError(f"axes {axes!r} not allowed for kind {kind!r}; use one of {AXES[kind]}")
    if kspace.ndim != len(axes.split(",")):
        raise ValueError(f"kspace shape {kspace.shape} does not match axes {axes!r}")
    want = expected_shapes(kind, axes, kspace.shape)
    if mask is not None:
        mask = np.asarray(mask, dtype=np.float32)
        want["mask"] = mask_shape(axes, kspace.shape)
        problem = _mask_problem(mask, want["mask"], kind == "cine")
        if problem:
            raise ValueError(f"mask: {problem}; refusing to write {path}")
        kspace = kspace * _mask_on_kspace(mask, axes)
    arrays = {"kspace": kspace, "maps": maps, "target": target, "mask": mask}
    for name in ("maps", "target"):
        if arrays[name] is not None and arrays[name].shape != want[name]:
            raise ValueError(f"{name} shape {arrays[name].shape} != expected {want[name]} for kspace {kspace.shape}")
    for name, arr in arrays.items():
        if arr is not None and not np.isfinite(arr).all():
            raise ValueError(f"{name} contains NaN or Inf; refusing to write {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("kspace", data=kspace, chunks=_chunks(axes, kspace.shape))
        f.create_dataset("maps", data=maps, chunks=_chunks(axes, kspace.shape) if axes == "coil,x,y,z" else None)
        if target is not None:
            f.create_dataset(
                "target", data=target, chunks=(1,) + target.shape[1:] if axes != "coil,time,x,y" else None
            )
        if mask is not None:
            f.create_dataset(MASK, data=mask)
        f.attrs["kind"] = kind
        f.attrs["axes"] = axes
        f.attrs["max"] = float(np.abs(target).max()) if target is not None else zero_filled_max(kspace, maps, axes)
        f.attrs["source"] = source
        f.attrs["layout_version"] = LAYOUT_VERSION
        for key, value in (extra_attrs or {}).items():
            f.attrs[key] = value
    return path


def _mask_problem(mask: np.ndarray, shape: tuple[int, ...], per_frame: bool) -> str:
    """What is wrong with a stored mask ('' if nothing): shape, values 0/1, a sample in every
    cine frame (``per_frame``: rows along the last axis) or in the volume's mask."""
    if tuple(mask.shape) != tuple(shape):
        return f"shape {tuple(mask.shape)} does not match kspace (expected {tuple(shape)})"
    if not np.isin(mask, (0.0, 1.0)).all():
        return "values must be 0 or 1"
    flat = mask.reshape(-1, mask.shape[-1]) if per_frame else mask.reshape(1, -1)
    if not (flat.sum(axis=-1) > 0).all():
        return "a frame (or the whole mask) has no sample"
    return ""


def _mask_on_kspace(mask: np.ndarray, axes: str) -> np.ndarray:
    """The stored mask broadcast against ``kspace`` of ``axes``."""
    if axes == "coil,x,y,z":
        return mask[None, None]  # (1, 1, Y, Z)
    if axes == "slice,coil,time,x,y":
        return mask[:, None, :, None, :]  # (S, 1, T, 1, Y)
    return mask[None, :, None, :]  # (1, T, 1, Y)


def _attr_str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def read_info(f: h5py.File, path: str | os.PathLike) -> ScanInfo:
    """Check attributes, dtypes and shapes of an open file (no data read); return its metadata.

    Raises:
        LayoutError: naming ``path`` and the first field at fault.
    """
    for name in REQUIRED_ATTRS:
        if name not in f.attrs:
            raise LayoutError(path, name, "missing attribute")
    kind = _attr_str(f.attrs["kind"])
    if kind not in KINDS:
        raise LayoutError(path, "kind", f"unknown kind {kind!r}; expected one of {KINDS}")
    axes = _attr_str(f.attrs["axes"])
    if axes not in AXES[kind]:
        raise LayoutError(path, "axes", f"axes {axes!r} not allowed for kind {kind!r} (use one of {AXES[kind]})")
    try:
        version = int(f.attrs["layout_version"])
    except (TypeError, ValueError):
        raise LayoutError(path, "layout_version", f"not an integer: {f.attrs['layout_version']!r}") from None
    if version != LAYOUT_VERSION:
        raise LayoutError(path, "layout_version", f"version {version}, this reader knows {LAYOUT_VERSION}")
    try:
        vmax = float(f.attrs["max"])
    except (TypeError, ValueError):
        raise LayoutError(path, "max", f"not a number: {f.attrs['max']!r}") from None
    if not np.isfinite(vmax) or vmax <= 0:
        raise LayoutError(path, "max", f"must be finite and > 0, got {vmax}")
    has_mask = MASK in f
    for name in FIELDS:
        if name not in f:
            if name == "target" and has_mask:
                continue  # prospective data: nothing to compare with
            raise LayoutError(path, name, "missing dataset" + (" (a file without a target needs its 'mask')"
                                                                if name == "target" else ""))
        if not isinstance(f[name], h5py.Dataset):
            raise LayoutError(path, name, "is a group, expected a dataset")
        if f[name].dtype != np.complex64:
            raise LayoutError(path, name, f"dtype {f[name].dtype}, expected complex64")
    kshape = tuple(f["kspace"].shape)
    ndim = len(axes.split(","))
    if len(kshape) != ndim:
        raise LayoutError(path, "kspace", f"shape {kshape} has {len(kshape)} axes, axes {axes!r} name {ndim}")
    if min(kshape) < 1:
        raise LayoutError(path, "kspace", f"empty shape {kshape}")
    want = expected_shapes(kind, axes, kshape)
    if has_mask:
        ds = f[MASK]
        if not isinstance(ds, h5py.Dataset) or ds.dtype != np.float32:
            raise LayoutError(path, MASK, f"expected a float32 dataset, got {getattr(ds, 'dtype', 'a group')}")
        problem = _mask_problem(ds[()], mask_shape(axes, kshape), kind == "cine")  # small: (Y, Z) or (S, T, Y)
        if problem:
            raise LayoutError(path, MASK, problem)
    for name in ("maps", "target"):
        if name not in f:
            continue
        got = tuple(f[name].shape)
        if got != want[name]:
            raise LayoutError(path, name, f"shape {got} does not match kspace {kshape} (expected {want[name]})")
    return ScanInfo(
        path=str(path),
        kind=kind,
        axes=axes,
        shape=kshape,
        max=vmax,
        source=_attr_str(f.attrs["source"]),
        has_slice_axis=axes.startswith("slice"),
        has_mask=has_mask,
        has_target="target" in f,
    )


def open_scan(path: str | os.PathLike) -> h5py.File:
    """Open ``path`` read-only; a missing, empty, truncated or non-HDF5 file is a
    :class:`LayoutError` with field ``file`` (h5py's own message names neither)."""
    try:
        return h5py.File(path, "r")
    except (OSError, RuntimeError) as err:
        problem = "empty file (0 bytes)" if Path(path).is_file() and Path(path).stat().st_size == 0 else (
            f"cannot open as HDF5 (truncated or not HDF5?): {' '.join(str(err).split())}")
        raise LayoutError(path, "file", problem) from None


def validate_file(path: str | os.PathLike, check_values: bool = True) -> ScanInfo:
    """Open ``path`` and check it against the layout.

    Args:
        path: an ``.h5`` file.
        check_values: also read every value (block by block) and check finiteness and physical
            consistency: target = S^H F^H k, unit-norm maps, ``max`` = max |target|, non-zero
            k-space of plausible magnitude (:mod:`melrecon.data.consistency`). Readers at
            training time get this once per file through :mod:`melrecon.data.check` (cached).

    Raises:
        LayoutError: naming the file and field (``field='file'`` when it is not readable HDF5).
    """
    from melrecon.data.consistency import check_values as _check_values

    with open_scan(path) as f:
        info = read_info(f, path)
        if check_values:
            _check_values(f, path, info.axes, info.max)
    return info


def read_scan(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], ScanInfo]:
    """Read a whole file (validated): ``({"kspace", "maps", "target"[, "mask"]}, info)``
    (``target`` only if the file has one, ``mask`` only if it has one)."""
    info = validate_file(path, check_values=True)
    with h5py.File(path, "r") as f:
        arrays = {name: f[name][()] for name in (*FIELDS, MASK) if name in f}
    return arrays, info


def find_files(folder: str | os.PathLike) -> list[Path]:
    """All ``.h5`` files below ``folder`` (recursive, sorted, hidden temporaries skipped)."""
    folder = Path(folder)
    return sorted(p for p in folder.rglob("*.h5") if not p.name.startswith("."))
