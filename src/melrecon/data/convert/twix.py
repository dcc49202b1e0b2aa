"""Siemens raw data (twix ``.dat``, VB or VD/VE) -> volume3d or cine layout, through twixtools.

``twixtools.read_twix`` parses the protocol header and the measurement data blocks (MDBs): one
readout line (coils, samples) each, with the loop counters of its MDH (measurement data
header). The last measurement of a multi-RAID file is converted (the earlier ones are
adjustment scans). Only imaging lines are kept (``Mdb.is_image_scan``: noise, phase-correction,
phase-stabilisation, feedback and PAT reference-only lines are dropped; PATREFANDIMASCAN lines
are image lines). Lines are placed in k-space by their counters, as OCMR's reader does for
ISMRMRD:

- readout: lines flagged ``REFLECT`` are reversed; an asymmetric echo is placed by
  ``CenterCol`` on a readout of length ``2 * max(CenterCol, samples - CenterCol)`` (the missing
  early samples stay zero); the oversampling (``Dicom.flReadoutOSFactor``, Siemens default 2) is
  removed by an inverse FFT along the readout and a centre crop (``readout_crop`` overrides the
  size);
- phase encoding ``Lin`` and partition ``Par``: line ``l`` goes to ``l + N // 2 - CenterLin``
  (``CenterPar``) on a grid of ``N = sKSpace.lPhaseEncodingLines`` (``lPartitions``), grown if
  the data reach beyond it, so partial Fourier is zero-filled;
- averages (``Ave``) and any repeated line are averaged; ``Eco``, ``Rep``, ``Set`` and ``Ida`` ..
  ``Ide`` must be single-valued (otherwise the lowest value is kept, with a warning).

Modes (``auto`` picks ``3d`` when ``Par`` takes several values, ``cine`` when ``Phs`` does,
``2d`` otherwise):

- ``3d``: volume3d (C, X, Y=ky, Z=kz), the readout X inverse Fourier transformed (hybrid space);
- ``2d`` (multi-slice): volume3d (C, X=slice, Y=readout kx, Z=ky), the 2D slice stack of the
  fastMRI converter (one slab position per slice; train with ``mask_type: lines``);
- ``cine`` (segmented or not: each line carries its cardiac phase ``Phs``): cine
  (S, C, T, X=readout kx, Y=ky).

When the protocol states the field of view, the file gets ``voxel_size_mm``: the spacing in mm
along the target's spatial axes in the target's order (volume3d: X, Y, Z; cine: slice, X, Y):
readout ``dReadoutFOV * OS factor / oversampled samples`` (so also after ``readout_crop``),
phase ``dPhaseFOV / ky`` (phase oversampling is not accounted for), 3D partitions ``dThickness`` over
``lImagesPerSlab`` (else the partition count), 2D slices ``dThickness * (1 + dDistFact)``
(centre-to-centre distance). Orientation is not converted. ``RAWDATACORRECTION`` factors are not
applied (twixtools does not apply them by default either). Lines missing inside the sampled
range (iPAT) are left zero with a warning: the layout expects fully sampled k-space.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from melrecon.data.convert.common import finish_cine, finish_volume
from melrecon.data.npfft import fftc_np, ifftc_np

MODES = ("auto", "2d", "3d", "cine")
#: MDH counters that must be single-valued (the lowest value is kept otherwise).
_SINGLE = ("Eco", "Rep", "Set", "Ida", "Idb", "Idc", "Idd", "Ide")
_DEFAULT_OS = 2.0  # Siemens readout oversampling when the header does not say


@dataclass
class TwixLines:
    """The imaging lines of one measurement, with their MDH counters (data not read yet).

    ``mdbs[i]`` is line ``i`` (a twixtools ``Mdb``, which reads its samples from the file on
    access: :meth:`data`); ``counters[name][i]`` its counter ``name`` (``Lin``, ``Par``, ``Sli``,
    ``Phs``, ``Ave``, ...); ``channels``, ``samples``, ``center_col/lin/par`` and ``reflect``
    come from its MDH.
    """

    path: Path
    mdbs: list[Any]
    counters: dict[str, np.ndarray]
    channels: np.ndarray
    samples: np.ndarray
    center_col: np.ndarray
    center_lin: np.ndarray
    center_par: np.ndarray
    reflect: np.ndarray
    header: dict[str, Any]

    def data(self, i: int) -> np.ndarray:
        """Samples of line ``i``: (C, samples) complex64, reversed when flagged ``REFLECT``."""
        try:
            line = np.atleast_2d(np.asarray(self.mdbs[i].data, dtype=np.complex64))
        except Exception as err:  # noqa: BLE001 - a truncated file fails inside twixtools in many ways
            raise ValueError(f"{self.path}: field 'mdb': cannot read line {i} (truncated file?): {err}") from None
        if line.shape != (self.channels[i], self.samples[i]):
            raise ValueError(f"{self.path}: field 'mdb': line {i} holds {line.shape}, its MDH says "
                             f"({self.channels[i]}, {self.samples[i]}) (truncated file?)")
        return line[:, ::-1] if self.reflect[i] else line

    def subset(self, idx: np.ndarray) -> TwixLines:
        """The lines ``idx`` only."""
        return TwixLines(
            path=self.path, mdbs=[self.mdbs[i] for i in idx], counters={k: v[idx] for k, v in self.counters.items()},
            channels=self.channels[idx], samples=self.samples[idx], center_col=self.center_col[idx],
            center_lin=self.center_lin[idx], center_par=self.center_par[idx], reflect=self.reflect[idx],
            header=self.header,
        )


def _hdr(header: dict[str, Any], *keys: str | int) -> Any:
    """``header[k0][k1]...`` or None when any level is missing."""
    node: Any = header
    for key in keys:
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):
            return None
    return node


def read_twix_lines(path: str | os.PathLike) -> TwixLines:
    """Imaging lines and header of the last measurement of a twix file (MDHs only; the samples
    are read line by line later, so memory holds the output, not the raw file).

    Raises:
        ValueError: naming the file, when it cannot be parsed or holds no imaging line.
    """
    import twixtools

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: field 'file': no such file")
    try:
        # geometry and PMU parsing need protocol fields that not every file has; not needed here
        # (ACQEND kept: a measurement that does not end with it was cut short)
        scans = twixtools.read_twix(str(path), verbose=False, parse_pmu=False, parse_geometry=False,
                                    keep_acqend=True)
        scan = scans[-1]
        complete = bool(scan["mdb"]) and scan["mdb"][-1].is_flag_set("ACQEND")
        mdbs = [m for m in scan["mdb"] if m.is_image_scan()]
    except Exception as err:  # noqa: BLE001 - twixtools raises many types (struct, index, value) on non-twix input
        raise ValueError(f"{path}: field 'file': cannot read as Siemens twix: {type(err).__name__}: {err}") from None
    if mdbs and not complete:
        raise ValueError(f"{path}: field 'mdb': the measurement does not end with an ACQEND block (truncated file?)")
    if not mdbs:
        raise ValueError(f"{path}: field 'mdb': no imaging lines (only noise/reference/feedback scans?)")

    def mdh(name: str) -> np.ndarray:
        return np.array([getattr(m.mdh, name) for m in mdbs], dtype=np.int64)

    names = ("Lin", "Par", "Sli", "Phs", "Ave", "Seg", *_SINGLE)
    return TwixLines(
        path=path,
        mdbs=mdbs,
        counters={n: np.array([getattr(m.mdh.Counter, n) for m in mdbs], dtype=np.int64) for n in names},
        channels=mdh("UsedChannels"),
        samples=mdh("SamplesInScan"),
        center_col=mdh("CenterCol"),
        center_lin=mdh("CenterLin"),
        center_par=mdh("CenterPar"),
        reflect=np.array([m.is_flag_set("REFLECT") for m in mdbs], dtype=bool),
        header=scan.get("hdr", {}),
    )


def _keep_single_valued(lines: TwixLines) -> TwixLines:
    keep = np.ones(len(lines.mdbs), dtype=bool)
    for name in _SINGLE:
        values = np.unique(lines.counters[name][keep])
        if len(values) > 1:
            warnings.warn(f"{lines.path}: {len(values)} values of counter {name}; keeping the first ({values[0]})",
                          stacklevel=3)
            keep &= lines.counters[name] == values[0]
    return lines.subset(np.flatnonzero(keep))


def _grid(index: np.ndarray, center: np.ndarray, header_size: Any, name: str, path: Path) -> tuple[int, np.ndarray]:
    """Grid size and grid position of each line along one phase-encoding axis.

    Line ``i`` goes to ``index[i] + N // 2 - center[i]``. ``N`` is the header's matrix size;
    without one, or when the lines do not fit in it (warned), the smallest even grid that holds
    every line: ``N / 2 >= center - index`` and ``N / 2 > index - center`` for all lines.
    """
    need = 2 * int(max((center - index).max(), (index - center).max() + 1, 1))
    size = int(header_size) if header_size else need
    pos = index + size // 2 - center
    if pos.min() < 0 or pos.max() >= size:
        if header_size:
            warnings.warn(f"{path}: counter {name}: the lines do not fit the header's {size} positions around "
                          f"the centre; using {need}", stacklevel=3)
        size = need
        pos = index + size // 2 - center
    return size, pos


def _check_sampled(sampled: np.ndarray, path: Path) -> None:
    """Warn when (ky, kz) positions inside the sampled range are missing in some slice/frame.

    ``sampled``: (S, T, ky, kz) bool. The range is the bounding box of all sampled positions,
    so zero-filled partial Fourier outside it is not reported; iPAT gaps inside it are.
    """
    union = sampled.any(axis=(0, 1))
    ys, zs = np.flatnonzero(union.any(axis=1)), np.flatnonzero(union.any(axis=0))
    box = sampled[:, :, ys[0]:ys[-1] + 1, zs[0]:zs[-1] + 1]
    missing = int((~box).sum())
    if missing:
        warnings.warn(f"{path}: {missing} of {box.size} phase-encoding positions (over slices and frames) inside "
                      "the sampled range are missing (iPAT / undersampled / arrhythmia-rejected?); they stay "
                      "zero, but the layout expects fully sampled k-space", stacklevel=3)


def _os_factor(lines: TwixLines) -> float:
    """Readout oversampling factor: ``Dicom.flReadoutOSFactor``, else the Siemens default 2."""
    factor = _hdr(lines.header, "Dicom", "flReadoutOSFactor")
    factor = float(factor) if factor else _DEFAULT_OS
    if not factor >= 1:
        raise ValueError(f"{lines.path}: field 'Dicom.flReadoutOSFactor': must be >= 1, got {factor}")
    return factor


def _voxel_size(lines: TwixLines, mode: str, readout_spacing_fraction: float, ny: int, nz: int) -> list[float] | None:
    """Spacing (mm) along the target's spatial axes (see the module doc), or None if unknown.

    ``readout_spacing_fraction`` is (OS factor / full readout samples): the readout spacing is
    ``dReadoutFOV`` times it, whatever crop is applied afterwards.
    """
    sl = _hdr(lines.header, "MeasYaps", "sSliceArray", "asSlice", 0)
    ro, pe, th = (_hdr(sl, k) for k in ("dReadoutFOV", "dPhaseFOV", "dThickness")) if sl else (None,) * 3
    if not (ro and pe and th):
        return None
    dx, dy = float(ro) * readout_spacing_fraction, float(pe) / ny
    if mode == "3d":
        images = _hdr(lines.header, "MeasYaps", "sKSpace", "lImagesPerSlab") or nz
        return [dx, dy, float(th) / float(images)]
    dist = _hdr(lines.header, "MeasYaps", "sGroupArray", "asGroup", 0, "dDistFact") or 0.0
    return [float(th) * (1.0 + float(dist)), dx, dy]


def _readout(line: np.ndarray, x0: int, nx: int, nx_out: int, image: bool) -> np.ndarray:
    """One line (C, samples) placed at ``x0`` on a readout of ``nx`` samples, oversampling removed.

    Inverse FFT along the readout, centre crop to ``nx_out`` (index ``nx // 2 - nx_out // 2``
    on, as :func:`melrecon.data.convert.common.crop_readout`); returned in image space
    (``image``) or transformed back to k-space. (C, nx_out) complex64.
    """
    full = np.zeros((line.shape[0], nx), np.complex64)
    full[:, x0:x0 + line.shape[1]] = line
    start = nx // 2 - nx_out // 2
    img = ifftc_np(full, axes=(1,))[:, start:start + nx_out]
    return img if image else fftc_np(img, axes=(1,))


def read_twix(
    path: str | os.PathLike, mode: str = "auto", readout_crop: int | None = None, progress: bool = False,
) -> tuple[np.ndarray, str, dict[str, Any]]:
    """k-space of one twix file in the layout, the mode used and extra file attributes.

    Args:
        path: a Siemens ``.dat`` file.
        mode: ``auto``, ``2d``, ``3d`` or ``cine`` (module doc).
        readout_crop: readout size after oversampling removal (default: samples / OS factor).
        progress: show a progress bar over the lines.

    Returns:
        ``(kspace, mode, attrs)``: kspace complex64 — ``3d``: (C, X, Y, Z) hybrid;
        ``2d``: (C, slices, X, Y); ``cine``: (S, C, T, X, Y) — and attributes for the file
        (``voxel_size_mm`` when the header knows the field of view).
    """
    path = Path(path)
    if mode not in MODES:
        raise ValueError(f"twix mode must be one of {MODES}, got {mode!r}")
    lines = _keep_single_valued(read_twix_lines(path))
    cnt = lines.counters
    if len(np.unique(lines.channels)) != 1:
        raise ValueError(f"{path}: field 'mdh.UsedChannels': lines have different coil counts "
                         f"{np.unique(lines.channels).tolist()}")
    nc = int(lines.channels[0])
    n_par, n_phs = len(np.unique(cnt["Par"])), len(np.unique(cnt["Phs"]))
    if mode == "auto":
        if n_par > 1 and n_phs > 1:
            raise ValueError(f"{path}: counters Par and Phs both vary (3D cine); not supported")
        mode = "3d" if n_par > 1 else ("cine" if n_phs > 1 else "2d")
    if mode != "3d" and n_par > 1:
        raise ValueError(f"{path}: counter Par takes {n_par} values: a 3D acquisition, not {mode!r}")
    if mode != "cine" and n_phs > 1:
        raise ValueError(f"{path}: counter Phs takes {n_phs} values: cardiac phases, use mode 'cine'")

    nx = int(2 * max(lines.center_col.max(), (lines.samples - lines.center_col).max()))
    x0 = nx // 2 - lines.center_col
    ny, y = _grid(cnt["Lin"], lines.center_lin, _hdr(lines.header, "MeasYaps", "sKSpace", "lPhaseEncodingLines"),
                  "Lin", path)
    nz, z = (_grid(cnt["Par"], lines.center_par, _hdr(lines.header, "MeasYaps", "sKSpace", "lPartitions"), "Par", path)
             if mode == "3d" else (1, np.zeros_like(y)))
    ns, nt = int(cnt["Sli"].max()) + 1, int(cnt["Phs"].max()) + 1
    if mode == "3d" and ns > 1:
        raise ValueError(f"{path}: counter Sli takes {ns} values in a 3D acquisition (multi-slab); not supported")

    factor = _os_factor(lines)
    nx_out = int(readout_crop) if readout_crop is not None else int(round(nx / factor))
    if not 1 <= nx_out <= nx:
        raise ValueError(f"{path}: readout size {nx_out} after oversampling removal must be in [1, {nx}]")
    # one accumulator for all modes: (S, T, C, X, ky, kz); the layouts are views of it below.
    # Each line's readout is transformed (and its oversampling cropped) before it is placed, so
    # the accumulator never holds the oversampled readout.
    kspace = np.zeros((ns, nt, nc, nx_out, ny, nz), np.complex64)
    counts = np.zeros((ns, nt, 1, 1, ny, nz), np.int64)
    for i in tqdm(range(len(lines.mdbs)), desc=f"read {path.name}", disable=not progress, leave=False):
        s, t = cnt["Sli"][i], cnt["Phs"][i]
        kspace[s, t, :, :, y[i], z[i]] += _readout(lines.data(i), int(x0[i]), nx, nx_out, image=mode == "3d")
        counts[s, t, 0, 0, y[i], z[i]] += 1
    kspace /= np.maximum(counts, 1)  # the average over Ave (and any repeated line)
    _check_sampled(counts[:, :, 0, 0] > 0, path)

    attrs: dict[str, Any] = {"twix_mode": mode}
    voxel = _voxel_size(lines, mode, factor / nx, ny, nz)
    if voxel is not None:
        attrs["voxel_size_mm"] = np.asarray(voxel, dtype=np.float64)
    if mode == "3d":
        out = kspace[0, 0]  # (C, X, ky, kz), readout already in image space
    elif mode == "2d":
        out = kspace[:, 0, :, :, :, 0].transpose(1, 0, 2, 3)  # (C, S, kx, ky)
    else:
        out = kspace[..., 0].transpose(0, 2, 1, 3, 4)  # (S, C, T, kx, ky)
    return np.ascontiguousarray(out), mode, attrs


def convert_twix(
    path: str | os.PathLike, out: str | os.PathLike, maps: np.ndarray | None = None,
    calib: int = 24, progress: bool = True, mode: str = "auto", readout_crop: int | None = None,
) -> Path:
    """Convert one twix file; ``maps`` in the output geometry skips ESPIRiT.

    ``maps`` shapes: ``3d`` / ``2d`` (C, X, Y, Z) as the kspace; ``cine`` (S, C, X, Y).
    """
    kspace, mode, attrs = read_twix(path, mode, readout_crop, progress)
    source = f"Siemens twix {Path(path).name} ({mode}; melrecon.data.convert twix)"
    finish = finish_cine if mode == "cine" else finish_volume
    return finish(kspace, out, source, maps=maps, calib=calib, progress=progress, extra_attrs=attrs)
