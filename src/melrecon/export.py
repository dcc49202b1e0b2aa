"""Images out of melrecon: NIfTI volumes, PNG previews, cine GIFs and labelled comparison strips.

Image arrays are in the layout's axis order (complex or magnitude):

- ``volume3d``: (X, Y, Z);
- ``cine``: (S, T, X, Y), or (T, X, Y) for a single-slice series.

NIfTI (:func:`write_nifti`, nibabel) stores the magnitude as float32 (or the complex image as
complex64): volume3d as (X, Y, Z), cine as (X, Y, S, T). The voxel size comes from the
``voxel_size_mm`` attribute of the source file when it has one (:func:`voxel_size_of`; data
docs/real-data.md), 1 mm otherwise. Orientation is not known to melrecon, so the q-form and s-form codes
are 0 ("unknown": array axes, no patient orientation) and the affine only scales by the voxel
size; the header's description field states both facts.

PNG previews (:func:`write_previews`, matplotlib) show magnitudes on a gray scale from 0 to the
image maximum, with titles: the three centre planes of a 3D volume; for cine the frames of the
centre slice as a strip and an x-t profile (the centre column along X, over time). Cine series
are also written as an animated GIF of the centre slice (:func:`write_gif`, Pillow). Pixels are
drawn square (voxel aspect ratios are not applied).

:func:`comparison_strip` draws zero-filled / reconstruction / target / error panels with their
PSNR as an RGB uint8 array (H, W, 3) for PNG files, TensorBoard and W&B; a stack of them per
cine frame makes a labelled GIF (:func:`write_gif`).

Every file is written to a temporary name in its folder and renamed when complete
(:func:`melrecon.atomic.atomic_path`): a failed write (a full disk) leaves no partial file and
raises :class:`melrecon.atomic.WriteError` naming the output file.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from melrecon.atomic import all_or_none, atomic_path

KINDS = ("volume3d", "cine")
_MIN_PANEL_PX = 128  # small images are magnified (integer factor) so that titles fit above them
_TITLE_PX = 30  # height of the title band above the panels (two lines of 7-point text)
_MAX_FIGURE_PX = 4096  # bound on a drawing's panel width and height, whatever the array shapes
_MAX_MAGNIFIED_PX = 1024  # magnification stops where a panel's long side would pass this
_DPI = 100


# ---------------------------------------------------------------------- geometry
def _check(image: np.ndarray, kind: str) -> np.ndarray:
    image = np.asarray(image)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    ok = image.ndim == 3 if kind == "volume3d" else image.ndim in (3, 4)
    if not ok:
        want = "(X, Y, Z)" if kind == "volume3d" else "(S, T, X, Y) or (T, X, Y)"
        raise ValueError(f"a {kind} image must be {want}, got shape {image.shape}")
    return image


def voxel_size_of(path: str | os.PathLike) -> tuple[float, ...] | None:
    """``voxel_size_mm`` of a layout file, or of the ``source_file`` a reconstruction names.

    Returns the spacing along the target's spatial axes (volume3d: X, Y, Z; cine: slice, X, Y)
    or None when neither file carries it (or the source file is gone).
    """
    import h5py

    with h5py.File(path, "r") as f:
        if "voxel_size_mm" in f.attrs:
            return tuple(float(v) for v in np.ravel(f.attrs["voxel_size_mm"]))
        source = f.attrs.get("source_file")
    if source is None:
        return None
    source = Path(source.decode() if isinstance(source, bytes) else str(source))
    if not source.is_file() or source.resolve() == Path(path).resolve():
        return None
    return voxel_size_of(source)


def nifti_array(image: np.ndarray, kind: str) -> np.ndarray:
    """The image in NIfTI axis order: volume3d (X, Y, Z); cine (X, Y, S, T)."""
    image = _check(image, kind)
    if kind == "volume3d":
        return image
    if image.ndim == 3:
        image = image[None]
    return np.transpose(image, (2, 3, 0, 1))


def write_nifti(
    path: str | os.PathLike, image: np.ndarray, kind: str, voxel_size_mm: Sequence[float] | None = None,
    frame_time_ms: float | None = None, magnitude: bool = True,
) -> Path:
    """Write one image as NIfTI-1 (``.nii`` or ``.nii.gz``).

    Args:
        image: volume3d (X, Y, Z) or cine (S, T, X, Y) / (T, X, Y), complex or real.
        voxel_size_mm: spacing along the target's spatial axes (volume3d X, Y, Z; cine slice,
            X, Y), e.g. from :func:`voxel_size_of`; None: 1 mm, said in the description.
        frame_time_ms: cine frame spacing; None leaves it 1 with unknown time units.
        magnitude: write |image| as float32 (default) or the complex image as complex64.
    """
    import nibabel as nib

    data = nifti_array(image, kind)
    data = np.abs(data).astype(np.float32) if magnitude else data.astype(np.complex64)
    known = voxel_size_mm is not None
    if known:
        v = [float(x) for x in voxel_size_mm]
        if len(v) != 3 or not all(x > 0 and math.isfinite(x) for x in v):
            raise ValueError(f"voxel_size_mm must be 3 positive numbers, got {voxel_size_mm}")
        spatial = v if kind == "volume3d" else [v[1], v[2], v[0]]  # cine: (slice, X, Y) -> X, Y, slice
    else:
        spatial = [1.0, 1.0, 1.0]
    affine = np.diag([*spatial, 1.0])
    img = nib.Nifti1Image(data, affine)
    # no patient orientation is known: code 0 ("unknown") for both forms; pixdim keeps the size
    img.set_qform(affine, code=0)
    img.set_sform(affine, code=0)
    zooms = spatial + ([float(frame_time_ms) if frame_time_ms else 1.0] if data.ndim == 4 else [])
    img.header.set_zooms(zooms)
    img.header.set_xyzt_units("mm" if known else "unknown", "msec" if frame_time_ms else "unknown")
    desc = f"melrecon {'magnitude' if magnitude else 'complex'}; axes {'XYZ' if kind == 'volume3d' else 'XYST'}; "
    desc += ("voxel size from source file" if known else "voxel size unknown (1)") + "; orientation unknown"
    img.header["descrip"] = desc[:80].encode()  # the NIfTI-1 field holds 80 bytes
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:  # the temporary name ends in .nii.gz: nibabel compresses it
        nib.save(img, str(tmp))
    return path


# ---------------------------------------------------------------------- drawing
def panel_layout(shapes: Sequence[tuple[int, ...]], scale: int | None = None) -> tuple[int, int]:
    """``(step, scale)`` for drawing 2D images of ``shapes`` side by side within
    :data:`_MAX_FIGURE_PX` pixels in width and height: each image is subsampled by ``step``
    (``im[::step, ::step]``; 1 unless the images are larger than the bound) and then magnified
    ``scale`` times (default: the smallest factor that makes the shortest side >= 128 pixels,
    but no more than keeps every panel's long side within :data:`_MAX_MAGNIFIED_PX`; always
    reduced so that the drawing stays within the bound; at least 1).

    The bound holds for any shapes, 1-pixel-thin planes of a one-slice volume included: without
    it a (1, 230) plane asked for a 128x magnification, a figure of 29440 x 23040 pixels.
    """
    heights, widths = [s[0] for s in shapes], [s[1] for s in shapes]
    step = max(1, math.ceil(max(max(heights), sum(widths)) / _MAX_FIGURE_PX))
    if step > 1:  # images larger than the bound: drawn subsampled, pixel for pixel
        heights = [math.ceil(h / step) for h in heights]
        widths = [math.ceil(w / step) for w in widths]
    if scale is None:  # magnify small images, but a thin plane must not blow up the others
        longest = max(max(heights), max(widths))
        scale = min(math.ceil(_MIN_PANEL_PX / min(min(heights), min(widths))), _MAX_MAGNIFIED_PX // longest)
    fits = min(_MAX_FIGURE_PX // max(heights), _MAX_FIGURE_PX // sum(widths))
    return step, max(1, min(int(scale), fits))


def labelled_panels(images: Sequence[np.ndarray], titles: Sequence[str], vmax: Sequence[float] | float | None = None,
                    scale: int | None = None) -> np.ndarray:
    """Draw 2D real images side by side with a title above each; RGB uint8 (H, W, 3).

    Each image is shown on a gray scale from 0 to its ``vmax`` (default: its own maximum),
    magnified by the integer ``scale`` (default: the smallest factor that makes the shortest
    panel side >= 128 pixels), pixel for pixel (nearest neighbour), within
    :data:`_MAX_FIGURE_PX` pixels in each direction (:func:`panel_layout`; larger images are
    subsampled). The array is ``(_TITLE_PX + scale * max height, scale * sum of widths)``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    images = [np.asarray(im, dtype=np.float64) for im in images]
    if len(images) != len(titles) or not images:
        raise ValueError(f"labelled_panels: {len(images)} images and {len(titles)} titles")
    if any(im.ndim != 2 for im in images):
        raise ValueError(f"labelled_panels: images must be 2D, got shapes {[im.shape for im in images]}")
    vmaxs = list(vmax) if isinstance(vmax, Sequence) else [vmax] * len(images)
    vmaxs = [float(vm) if vm is not None else float(im.max()) for im, vm in zip(images, vmaxs)]
    step, scale = panel_layout([im.shape for im in images], scale)
    images = [im[::step, ::step] for im in images]
    height = scale * max(im.shape[0] for im in images)
    width = scale * sum(im.shape[1] for im in images)
    total_h = height + _TITLE_PX
    fig = Figure(figsize=(width / _DPI, total_h / _DPI), dpi=_DPI, facecolor="black")
    canvas = FigureCanvasAgg(fig)
    left = 0
    for im, title, vm in zip(images, titles, vmaxs):
        h, w = scale * im.shape[0], scale * im.shape[1]
        ax = fig.add_axes((left / width, (height - h) / total_h, w / width, h / total_h))
        top = vm
        ax.imshow(im, cmap="gray", vmin=0.0, vmax=top if top > 0 else 1.0, interpolation="nearest",
                  aspect="auto")
        ax.set_axis_off()
        fig.text((left + w / 2) / width, 1 - 2 / total_h, title, color="white", fontsize=7,
                 ha="center", va="top")
        left += w
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def comparison_titles(zero_filled: np.ndarray, reconstruction: np.ndarray, target: np.ndarray,
                      data_range: float, error_gain: float | None = None, over: str | None = None,
                      psnrs: tuple[float, float] | None = None) -> list[str]:
    """The four panel titles of :func:`comparison_strip`; every PSNR names what it is computed over.

    ``psnrs`` (zero-filled, reconstruction) in dB, computed elsewhere over ``over`` (e.g. the
    volume metric that ``metrics.csv`` reports); None: computed here on the images given, over
    ``over`` (default "this slice").
    """
    import torch

    from melrecon.metrics import volume_metrics

    if psnrs is None:
        zf, rec, tgt = (np.abs(np.asarray(a)).astype(np.float64) for a in (zero_filled, reconstruction, target))
        psnrs = tuple(volume_metrics(torch.from_numpy(a), torch.from_numpy(tgt), data_range)["psnr"] for a in (zf, rec))
    where = over or "this slice"
    return [f"zero-filled\nPSNR {psnrs[0]:.2f} dB ({where})", f"reconstruction\nPSNR {psnrs[1]:.2f} dB ({where})",
            "target", f"|error| x{error_gain:g}" if error_gain else "|error|\n(own scale)"]


def comparison_strip(zero_filled: np.ndarray, reconstruction: np.ndarray, target: np.ndarray,
                     data_range: float | None = None, error_gain: float | None = None,
                     scale: int | None = None, series: bool = False, over: str | None = None,
                     psnrs: tuple[float, float] | None = None) -> np.ndarray:
    """Zero-filled | reconstruction | target | error panels of one 2D slice; RGB uint8 (H, W, 3).

    Args:
        zero_filled, reconstruction, target: (H, W) complex or magnitude images.
        data_range: gray-scale maximum and PSNR data range (default: max |target|; pass the
            volume maximum to match the volume metrics' convention).
        error_gain: the error panel |rec| - |target| in absolute value is shown up to
            ``data_range / error_gain``; None: up to its own maximum ("own scale").

    The zero-filled and reconstruction titles carry their PSNR and what it is computed over
    (:func:`comparison_titles`): on this slice (the project's metric,
    :func:`melrecon.metrics.volume_metrics`) unless ``psnrs`` computed over ``over`` are given.
    ``series``: the inputs are (T, H, W); the PSNR is that of the whole series and the panels
    show frame 0 (:func:`comparison_frames`).
    """
    zf, rec, tgt = (np.abs(np.asarray(a)).astype(np.float64) for a in (zero_filled, reconstruction, target))
    if not zf.shape == rec.shape == tgt.shape or tgt.ndim != (3 if series else 2):
        raise ValueError(f"comparison_strip: three {'(T, H, W)' if series else '(H, W)'} images of one shape, "
                         f"got {zf.shape}, {rec.shape}, {tgt.shape}")
    dr = float(data_range) if data_range is not None else float(tgt.max())
    err = np.abs(rec - tgt)
    err_max = dr / error_gain if error_gain else float(err.max())
    titles = comparison_titles(zf, rec, tgt, dr, error_gain, over or ("series" if series else None), psnrs)
    if series:  # titles of the series, panels of frame 0
        err = err[0]
        err_max = dr / error_gain if error_gain else float(err.max())
        zf, rec, tgt = zf[0], rec[0], tgt[0]
    return labelled_panels([zf, rec, tgt, err], titles, [dr, dr, dr, err_max], scale)


def comparison_frames(zero_filled: np.ndarray, reconstruction: np.ndarray, target: np.ndarray,
                      data_range: float | None = None) -> np.ndarray:
    """A :func:`comparison_strip` per frame of a cine series, RGB uint8 (T, H', W', 3), for a GIF.

    zero_filled, reconstruction, target: (T, H, W) complex or magnitude. The titles carry the
    PSNR of the whole series (the volume metric) and are drawn once with matplotlib; the panels
    of every frame are then filled in with NumPy (the same gray scale, magnification and
    nearest-neighbour pixels), which keeps a validation epoch's GIFs cheap.
    """
    zf, rec, tgt = (np.abs(np.asarray(a)).astype(np.float64) for a in (zero_filled, reconstruction, target))
    if not zf.shape == rec.shape == tgt.shape or tgt.ndim != 3:
        raise ValueError(f"comparison_frames: three (T, H, W) series of one shape, got {zf.shape}, {rec.shape}, "
                         f"{tgt.shape}")
    dr = float(data_range) if data_range is not None else float(tgt.max())
    first = comparison_strip(zf, rec, tgt, data_range=dr, series=True)
    step, scale = panel_layout([tgt.shape[1:]] * 4)  # the layout labelled_panels used
    h, w = tgt[0, ::step, ::step].shape
    out = np.repeat(first[None], tgt.shape[0], axis=0)
    for t in range(tgt.shape[0]):
        err = np.abs(rec[t] - tgt[t])
        for i, (full, top) in enumerate(((zf[t], dr), (rec[t], dr), (tgt[t], dr), (err, float(err.max())))):
            im = full[::step, ::step]
            # matplotlib's 256-entry gray lookup: level floor(256 v), v in [0, 1]
            gray = np.minimum(np.floor(np.clip(im / (top if top > 0 else 1.0), 0.0, 1.0) * 256.0), 255.0)
            big = gray.astype(np.uint8).repeat(scale, axis=0).repeat(scale, axis=1)
            out[t, _TITLE_PX:_TITLE_PX + h * scale, i * w * scale:(i + 1) * w * scale] = big[..., None]
    return out


PNG_DESCRIPTION_KEY = "Description"
"""PNG text keyword under which :func:`save_png` stores ``description`` (a standard keyword)."""


def save_png(path: str | os.PathLike, rgb: np.ndarray, description: str | None = None) -> Path:
    """Write an RGB uint8 array (H, W, 3) as PNG (folders created); ``description`` goes into the
    PNG's ``Description`` text chunk (read back with ``PIL.Image.open(path).info``)."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = None
    if description is not None:
        info = PngInfo()
        info.add_itxt(PNG_DESCRIPTION_KEY, description)  # iTXt: UTF-8 (file names may not be Latin-1)
    with atomic_path(path) as tmp:
        Image.fromarray(rgb).save(tmp, format="PNG", pnginfo=info)
    return path


def write_gif(path: str | os.PathLike, frames: np.ndarray, fps: float = 10.0, vmax: float | None = None,
              scale: int = 1) -> Path:
    """Animated GIF (looping), each frame magnified ``scale`` times.

    ``frames``: magnitudes (T, H, W) of real or complex values, drawn on a gray scale from 0 to
    ``vmax`` (default: their maximum); or ready RGB frames (T, H, W, 3) uint8, e.g. a
    :func:`comparison_strip` per cine frame.
    """
    from PIL import Image

    frames = np.asarray(frames)
    if frames.ndim == 4 and frames.shape[-1] == 3 and frames.dtype == np.uint8:
        u8 = frames
    elif frames.ndim == 3:
        mag = np.abs(frames).astype(np.float64)
        top = float(vmax) if vmax else float(mag.max()) or 1.0
        u8 = (np.clip(mag / top, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    else:
        raise ValueError(f"write_gif: frames must be (T, H, W) or (T, H, W, 3) uint8, got {frames.shape} "
                         f"{frames.dtype}")
    if u8.shape[0] < 1:
        raise ValueError("write_gif: no frames")
    u8 = u8.repeat(scale, axis=1).repeat(scale, axis=2)
    imgs = [Image.fromarray(f) for f in u8]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        imgs[0].save(tmp, format="GIF", save_all=True, append_images=imgs[1:], duration=int(round(1000 / fps)),
                     loop=0)
    return path


def write_previews(out_dir: str | os.PathLike, stem: str, image: np.ndarray, kind: str,
                   fps: float = 10.0, max_frames: int = 12) -> list[Path]:
    """PNG previews (and the cine GIF) of one image; returns the paths written.

    volume3d: ``<stem>_planes.png`` (centre X, Y and Z planes). cine: ``<stem>_frames.png``
    (the centre slice's frames, at most ``max_frames`` evenly spaced), ``<stem>_xt.png`` (x-t profile
    through the centre column, each frame repeated ``round(X / T)`` times along time),
    ``<stem>.gif``.
    """
    image = np.abs(_check(image, kind)).astype(np.float64)
    out = Path(out_dir)
    vmax = float(image.max())
    if kind == "volume3d":
        x, y, z = (n // 2 for n in image.shape)
        panels = [image[x], image[:, y], image[:, :, z]]
        titles = [f"X = {x}\n(Y, Z)", f"Y = {y}\n(X, Z)", f"Z = {z}\n(X, Y)"]
        return [save_png(out / f"{stem}_planes.png", labelled_panels(panels, titles, vmax))]
    series = image if image.ndim == 3 else image[image.shape[0] // 2]  # (T, X, Y) of the centre slice
    step, scale = panel_layout([series.shape[1:]])  # the GIF: one frame, bounded like a drawing
    t, _, ny = series.shape
    shown = np.unique(np.linspace(0, t - 1, min(t, max_frames)).round().astype(int))
    frames = labelled_panels([series[i] for i in shown], [f"t = {i}" for i in shown], vmax)
    # (X, T): time runs left to right, each frame repeated so that the panel is about square
    xt = np.repeat(series[:, :, ny // 2].T, max(1, round(series.shape[1] / t)), axis=1)
    profile = labelled_panels([xt], [f"x-t profile, Y = {ny // 2}\n(time ->)"], vmax)
    with all_or_none() as written:  # the previews of one image are kept all or none
        written.append(save_png(out / f"{stem}_frames.png", frames))
        written.append(save_png(out / f"{stem}_xt.png", profile))
        written.append(write_gif(out / f"{stem}.gif", series[:, ::step, ::step], fps=fps, vmax=vmax, scale=scale))
    return written


def export_image(out_dir: str | os.PathLike, stem: str, image: np.ndarray, kind: str,
                 formats: Sequence[str] = ("nifti", "png"), voxel_size_mm: Sequence[float] | None = None,
                 fps: float = 10.0) -> list[Path]:
    """Write one image in the requested formats (``nifti``: ``<stem>.nii.gz``; ``png``: the
    previews of :func:`write_previews`); returns the paths written (all of them, or on failure none)."""
    unknown = sorted(set(formats) - {"nifti", "png"})
    if unknown:
        raise ValueError(f"unknown export format(s) {unknown}; choose from nifti, png")
    with all_or_none() as paths:  # a failure removes the formats already written
        if "nifti" in formats:
            paths.append(write_nifti(Path(out_dir) / f"{stem}.nii.gz", image, kind, voxel_size_mm))
        if "png" in formats:
            paths += write_previews(out_dir, stem, image, kind, fps)
    return paths
