"""Exports: NIfTI round trips through nibabel (shape, axes, voxel size, values); PNG previews
and GIFs are readable with the expected sizes and frame counts; comparison strips carry the
images and PSNR labels."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from melrecon import export
from melrecon import reconstruct as rc
from melrecon.data.h5 import write_scan


def _complex(rng, shape):
    return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)


def test_nifti_volume_round_trip_with_voxel_size(tmp_path):
    import nibabel as nib

    img = _complex(np.random.default_rng(0), (5, 6, 7))
    path = export.write_nifti(tmp_path / "v.nii.gz", img, "volume3d", voxel_size_mm=(0.5, 0.7, 1.2))
    nii = nib.load(path)
    assert nii.shape == (5, 6, 7)
    assert nii.header.get_zooms() == pytest.approx((0.5, 0.7, 1.2))
    assert nii.header.get_xyzt_units()[0] == "mm"
    assert int(nii.header["qform_code"]) == int(nii.header["sform_code"]) == 0
    np.testing.assert_allclose(np.asarray(nii.dataobj), np.abs(img), rtol=1e-6)
    desc = nii.header["descrip"].item().decode()
    assert "voxel size from source file" in desc and "orientation unknown" in desc
    # complex export keeps the phase
    path = export.write_nifti(tmp_path / "c.nii", img, "volume3d", magnitude=False)
    np.testing.assert_array_equal(np.asarray(nib.load(path).dataobj), img)


def test_nifti_cine_axes_and_unknown_voxel_size(tmp_path):
    import nibabel as nib

    img = _complex(np.random.default_rng(1), (2, 4, 6, 5))  # (S, T, X, Y)
    path = export.write_nifti(tmp_path / "cine.nii.gz", img, "cine", voxel_size_mm=(8.0, 1.5, 1.25),
                              frame_time_ms=40.0)
    nii = nib.load(path)
    assert nii.shape == (6, 5, 2, 4)  # (X, Y, S, T)
    assert nii.header.get_zooms() == pytest.approx((1.5, 1.25, 8.0, 40.0))
    data = np.asarray(nii.dataobj)
    np.testing.assert_allclose(data[:, :, 1, 3], np.abs(img[1, 3]), rtol=1e-6)
    # single-slice series, no voxel size known: 1 mm, said in the description
    path = export.write_nifti(tmp_path / "one.nii.gz", img[0], "cine")
    nii = nib.load(path)
    assert nii.shape == (6, 5, 1, 4) and nii.header.get_zooms() == pytest.approx((1, 1, 1, 1))
    assert "voxel size unknown" in nii.header["descrip"].item().decode()
    with pytest.raises(ValueError, match="voxel_size_mm"):
        export.write_nifti(tmp_path / "bad.nii", img, "cine", voxel_size_mm=(1.0, -1.0, 1.0))
    with pytest.raises(ValueError, match="shape"):
        export.write_nifti(tmp_path / "bad.nii", img, "volume3d")


def test_voxel_size_from_layout_file_and_from_a_reconstruction(tmp_path):
    rng = np.random.default_rng(2)
    target = _complex(rng, (3, 8, 8))
    src = write_scan(tmp_path / "scan.h5", target[None], np.ones((1, 3, 8, 8), np.complex64), target, "volume3d",
                     source="test", extra_attrs={"voxel_size_mm": np.array([1.0, 0.5, 0.25])})
    res = rc.ScanResult(reconstruction=target, zero_filled=target, target=target, mask=np.ones((8, 8), np.float32),
                        data_range=1.0, acceleration=1.0, acceleration_requested=1.0)
    (tmp_path / "rec").mkdir()
    rec = rc.write_result(tmp_path / "rec" / "scan.h5", res, {"source_file": str(src.resolve())})
    assert export.voxel_size_of(src) == (1.0, 0.5, 0.25)
    assert export.voxel_size_of(rec) == (1.0, 0.5, 0.25)
    plain = write_scan(tmp_path / "plain.h5", target[None], np.ones((1, 3, 8, 8), np.complex64), target, "volume3d",
                       source="test")
    assert export.voxel_size_of(plain) is None


def test_volume_previews_png(tmp_path):
    img = _complex(np.random.default_rng(3), (10, 12, 14))
    (path,) = export.write_previews(tmp_path, "vol", img, "volume3d")
    assert path.name == "vol_planes.png"
    png = Image.open(path)
    scale = int(np.ceil(128 / 10))  # the smallest panel side (10) magnified to >= 128 pixels
    # panels (Y, Z) = (12, 14), (X, Z) = (10, 14), (X, Y) = (10, 12) side by side, title band on top
    assert png.size == (scale * (14 + 14 + 12), scale * 12 + export._TITLE_PX)
    assert png.mode == "RGB"


def test_cine_previews_png_and_gif(tmp_path):
    img = _complex(np.random.default_rng(4), (3, 5, 16, 20))  # (S, T, X, Y)
    paths = export.write_previews(tmp_path, "cine", img, "cine", fps=5)
    assert [p.name for p in paths] == ["cine_frames.png", "cine_xt.png", "cine.gif"]
    scale = 8  # 128 / 16
    assert Image.open(paths[0]).size == (scale * 20 * 5, scale * 16 + export._TITLE_PX)  # 5 frames in a row
    # x-t profile (X, T) with each frame repeated round(16 / 5) = 3 times: (16, 15), magnified 9x
    assert Image.open(paths[1]).size == (9 * 15, 9 * 16 + export._TITLE_PX)
    gif = Image.open(paths[2])
    assert gif.n_frames == 5 and gif.size == (scale * 20, scale * 16) and gif.info["duration"] == 200
    # the GIF frames are the centre slice's magnitude scaled to the series maximum
    gif.seek(2)
    frame = np.asarray(gif.convert("L"))[::scale, ::scale].astype(float)
    mag = np.abs(img)
    np.testing.assert_allclose(frame, np.round(np.abs(img[1, 2]) / mag.max() * 255), atol=1)


def test_comparison_strip_labels_and_panels():
    rng = np.random.default_rng(5)
    tgt = np.abs(_complex(rng, (16, 16))) + 1.0
    rec = tgt + 0.01 * rng.standard_normal(tgt.shape)
    zf = tgt + 0.3 * rng.standard_normal(tgt.shape)
    strip = export.comparison_strip(zf, rec, tgt, data_range=float(tgt.max()), error_gain=5, scale=8)
    assert strip.dtype == np.uint8 and strip.shape == (8 * 16 + export._TITLE_PX, 4 * 8 * 16, 3)
    # the target panel (third) shows the target on the gray scale [0, data range]
    panel = strip[export._TITLE_PX:, 2 * 128:3 * 128, 0][4::8, 4::8].astype(float)
    np.testing.assert_allclose(panel, tgt / tgt.max() * 255, atol=1.5)
    # title band holds text (not uniformly black) above every panel
    for i in range(4):
        assert strip[:export._TITLE_PX, i * 128:(i + 1) * 128].max() > 100
    with pytest.raises(ValueError, match="one shape"):
        export.comparison_strip(zf, rec[:8], tgt)


def test_gif_of_labelled_strips(tmp_path):
    """A cine GIF of comparison strips (RGB frames), as the image callback will write it."""
    rng = np.random.default_rng(7)
    series = np.abs(_complex(rng, (3, 16, 16))) + 1
    strips = np.stack([export.comparison_strip(s + 0.1, s, s, scale=8) for s in series])
    gif = Image.open(export.write_gif(tmp_path / "strips.gif", strips, fps=4))
    assert gif.n_frames == 3 and gif.size == (strips.shape[2], strips.shape[1])
    with pytest.raises(ValueError, match="frames"):
        export.write_gif(tmp_path / "bad.gif", strips.astype(np.float32))


def test_export_image_formats(tmp_path):
    img = _complex(np.random.default_rng(6), (4, 8, 8))
    paths = export.export_image(tmp_path, "scan", img, "volume3d", formats=("nifti", "png"), voxel_size_mm=(1, 1, 2))
    assert sorted(p.name for p in paths) == ["scan.nii.gz", "scan_planes.png"]
    assert all(p.is_file() for p in paths)
    with pytest.raises(ValueError, match="tiff"):
        export.export_image(tmp_path, "scan", img, "volume3d", formats=("tiff",))


def test_comparison_frames_match_per_frame_strips():
    """The GIF frames drawn with NumPy show what comparison_strip draws for each frame; the
    title band (series PSNR) is the same on every frame."""
    rng = np.random.default_rng(8)
    tgt = np.abs(_complex(rng, (3, 12, 12))) + 1.0
    rec = tgt + 0.05 * rng.standard_normal(tgt.shape)
    zf = tgt + 0.4 * rng.standard_normal(tgt.shape)
    dr = float(tgt.max())
    frames = export.comparison_frames(zf, rec, tgt, data_range=dr)
    assert frames.dtype == np.uint8 and frames.shape[0] == 3
    band = frames[:, :export._TITLE_PX]
    assert (band == band[0]).all() and band.max() > 100
    for t in range(3):
        ref = export.comparison_strip(zf[t], rec[t], tgt[t], data_range=dr)
        assert ref.shape == frames[t].shape
        diff = np.abs(ref[export._TITLE_PX:].astype(int) - frames[t, export._TITLE_PX:].astype(int))
        assert diff.max() <= 1  # one gray level: matplotlib normalises in float32 before its lookup
    with pytest.raises(ValueError, match="three"):
        export.comparison_frames(zf[0], rec[0], tgt[0])
