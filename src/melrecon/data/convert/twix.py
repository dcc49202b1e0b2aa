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
- the centre is then checked against the data: the k-space energy peak must sit at the grid
  centre (within ``max(1, N // 16)`` lines). When header, MDH centre and data disagree (a clear
  peak elsewhere), the lines are placed again around the line holding the peak, with a warning
  naming the file; when the lines do not fit the header around the MDH centre and the data show
  no clear peak, the file is refused (a wrong centre converts to a wrong image that
  ``validate`` passes, since the target is consistent with the wrongly placed k-space);
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


def _grid(index: np.ndarray, center: np.ndarray, header_size: Any) -> tuple[int, np.ndarray, bool]:
    """Grid size, grid position of each line along one phase-encoding axis, and whether the
    lines fit the header's grid.

    Line ``i`` goes to ``index[i] + N // 2 - center[i]``. ``N`` is the header's matrix size;
    without one, or when the lines do not fit in it (``False``), the smallest even grid that
    holds every line: ``N / 2 >= center - index`` and ``N / 2 > index - center`` for all lines.
    """
    need = 2 * int(max((center - index).max(), (index - center).max() + 1, 1))
    size = int(header_size) if header_size else need
    pos = index + size // 2 - center
    if pos.min() < 0 or pos.max() >= size:
        return need, index + need // 2 - center, not header_size
    return size, pos, True


#: A k-space energy profile has a clear centre when its peak is this many times its median.
_PEAK_RATIO = 4.0


def _centre_tolerance(size: int) -> int:
    """Lines by which the energy peak may sit off the grid centre (real k-space peaks at DC)."""
    return max(1, size // 16)


@dataclass
class _Axis:
    """One phase-encoding axis: counter name, the lines' counter values and MDH centres, the
    header's matrix size, and the grid (size, positions, whether the lines fit the header)."""

    name: str
    index: np.ndarray
    center: np.ndarray
    header_size: Any
    size: int = 0
    pos: np.ndarray | None = None
    fits_header: bool = True

    def place(self, center: np.ndarray) -> None:
        self.size, self.pos, self.fits_header = _grid(self.index, center, self.header_size)


def _peak(profile: np.ndarray) -> tuple[int, bool]:
    """Position of the energy peak of ``profile`` and whether it is clear (:data:`_PEAK_RATIO`
    times the median over the sampled positions)."""
    sampled = profile[profile > 0]
    peak = int(np.argmax(profile))
    clear = sampled.size > 0 and profile[peak] >= _PEAK_RATIO * float(np.median(sampled))
    return peak, bool(clear)


def _recentre(axis: _Axis, profile: np.ndarray, path: Path) -> bool:
    """Check that the k-space energy peak along ``axis`` sits at its grid centre.

    When the peak is clear and off the centre (header, MDH centre and data disagree), the lines
    are placed again around the line that holds the peak (the data decide), said in a warning,
    and True is returned. When header and MDH disagree and the data show no clear peak, the file
    is refused. Otherwise the placement stands (False); lines that did not fit the header's
    grid are then said in a warning.
    """
    peak, clear = _peak(profile)
    centre = axis.size // 2
    off = abs(peak - centre) > _centre_tolerance(axis.size)
    mdh = int(np.bincount(axis.center - axis.center.min()).argmax() + axis.center.min())  # the usual MDH centre
    header = f"{int(axis.header_size)} lines" if axis.header_size else "no size"
    if clear and off:
        line = int(axis.index[np.flatnonzero(axis.pos == peak)[0]])
        axis.place(np.full_like(axis.index, line))
        warnings.warn(f"{path}: counter {axis.name}: header ({header}), MDH centre ({mdh}) and data disagree: the "
                      f"k-space energy peaks at line {line}; centring on it (the data), on a grid of {axis.size}",
                      stacklevel=3)
        return True
    if not axis.fits_header:
        if not clear:
            raise ValueError(f"{path}: field 'mdh.Center{axis.name}': the lines do not fit the header's "
                             f"{header} around the MDH centre {mdh}, and the data show no clear k-space centre "
                             "(no energy peak); refusing to guess where the centre is")
        warnings.warn(f"{path}: counter {axis.name}: the lines do not fit the header's {header} around the "
                      f"centre; using {axis.size} (the k-space energy peak sits at the centre)", stacklevel=3)
    return False


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


def _assemble(lines: TwixLines, axes: list[_Axis], mode: str, nx: int, x0: np.ndarray, nx_out: int,
              progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """Every line placed on the grid: k-space (S, T, C, X, ky, kz) complex64 (averaged over
    repeats) and the count of lines per position (S, T, 1, 1, ky, kz).

    One accumulator for all modes; the layouts are views of it. Each line's readout is
    transformed (and its oversampling cropped) before it is placed, so the accumulator never
    holds the oversampled readout.
    """
    cnt = lines.counters
    y = axes[0].pos
    ny = axes[0].size
    z, nz = (axes[1].pos, axes[1].size) if len(axes) > 1 else (np.zeros_like(y), 1)
    ns, nt, nc = int(cnt["Sli"].max()) + 1, int(cnt["Phs"].max()) + 1, int(lines.channels[0])
    kspace = np.zeros((ns, nt, nc, nx_out, ny, nz), np.complex64)
    counts = np.zeros((ns, nt, 1, 1, ny, nz), np.int64)
    for i in tqdm(range(len(lines.mdbs)), desc=f"read {lines.path.name}", disable=not progress, leave=False):
        s, t = cnt["Sli"][i], cnt["Phs"][i]
        kspace[s, t, :, :, y[i], z[i]] += _readout(lines.data(i), int(x0[i]), nx, nx_out, image=mode == "3d")
        counts[s, t, 0, 0, y[i], z[i]] += 1
    kspace /= np.maximum(counts, 1)  # the average over Ave (and any repeated line)
    return kspace, counts


def _energy(kspace: np.ndarray) -> np.ndarray:
    """Energy per (ky, kz) position of the accumulator (S, T, C, X, ky, kz), one coil at a time
    (a float copy of one coil, not of the whole k-space). (ky, kz) float64."""
    out = np.zeros(kspace.shape[-2:], np.float64)
    for c in range(kspace.shape[2]):
        out += (np.abs(kspace[:, :, c]) ** 2).sum(axis=(0, 1, 2), dtype=np.float64)
    return out


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
    axes = [_Axis("Lin", cnt["Lin"], lines.center_lin, _hdr(lines.header, "MeasYaps", "sKSpace", "lPhaseEncodingLines"))]
    if mode == "3d":
        axes.append(_Axis("Par", cnt["Par"], lines.center_par, _hdr(lines.header, "MeasYaps", "sKSpace", "lPartitions")))
    for axis in axes:
        axis.place(axis.center)
    ns = int(cnt["Sli"].max()) + 1
    if mode == "3d" and ns > 1:
        raise ValueError(f"{path}: counter Sli takes {ns} values in a 3D acquisition (multi-slab); not supported")

    factor = _os_factor(lines)
    nx_out = int(readout_crop) if readout_crop is not None else int(round(nx / factor))
    if not 1 <= nx_out <= nx:
        raise ValueError(f"{path}: readout size {nx_out} after oversampling removal must be in [1, {nx}]")
    kspace, counts = _assemble(lines, axes, mode, nx, x0, nx_out, progress)
    # the k-space centre: header, MDH and data must agree (a wrong centre converts to a wrong
    # image that validate passes); where they do not, the energy peak decides, or the file is refused
    energy = _energy(kspace)
    moved = [_recentre(axis, energy.sum(axis=1 - k), path) for k, axis in enumerate(axes)]
    if any(moved):
        kspace, counts = _assemble(lines, axes, mode, nx, x0, nx_out, progress)
        energy = _energy(kspace)
        for k, axis in enumerate(axes):
            peak, _ = _peak(energy.sum(axis=1 - k))
            if abs(peak - axis.size // 2) > _centre_tolerance(axis.size):
                raise ValueError(f"{path}: counter {axis.name}: the k-space peak sits at {peak} of {axis.size}, "
                                 "not at the grid centre, after centring on the data; refusing the file")
    ny = axes[0].size
    nz = axes[1].size if mode == "3d" else 1
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
