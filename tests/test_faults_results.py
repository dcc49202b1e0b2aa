"""Faults in what melrecon writes and compares: previews of extreme shapes, evaluate over unequal
volume sets, reconstruct depths mixed in one output folder."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from melrecon import export


# ---------------------------------------------------------------------- previews of extreme shapes
BOUND = 4096  # pixels: the documented bound on a preview's panels (export._MAX_FIGURE_PX)


@pytest.mark.parametrize("shapes", [
    [(1, 40)],                          # a 1-pixel-thin plane: asked for a 128x magnification
    [(230, 180), (1, 180), (1, 230)],   # the three centre planes of a one-slice volume
    [(1, 1)],
    [(9000, 2), (3, 9000)],             # larger than the bound: subsampled
    [(2, 5000)] * 12,                    # many wide panels
])
def test_labelled_panels_stay_within_the_bound(shapes):
    images = [np.random.default_rng(0).random(s) for s in shapes]
    rgb = export.labelled_panels(images, [f"p{i}" for i in range(len(images))])
    assert rgb.shape[0] <= BOUND + export._TITLE_PX and rgb.shape[1] <= BOUND, rgb.shape
    assert rgb.shape[0] > export._TITLE_PX and rgb.shape[2] == 3


@pytest.mark.parametrize("shape,kind", [
    ((1, 230, 180), "volume3d"),   # a one-slice volume (the fastMRI-style file that exhausted memory)
    ((60, 1, 40), "volume3d"),
    ((1, 1, 1), "volume3d"),
    ((1, 1, 3, 2000), "cine"),     # one slice, one frame, a very long thin image
    ((12, 1, 80), "cine"),         # (T, X, Y) with X = 1
])
def test_previews_of_extreme_shapes_are_bounded_and_quick(tmp_path, shape, kind):
    image = np.random.default_rng(1).random(shape) + 1j
    t0 = time.perf_counter()
    paths = export.write_previews(tmp_path, "x", image, kind)
    assert time.perf_counter() - t0 < 20
    for p in paths:
        with Image.open(p) as im:
            assert im.size[0] <= BOUND and im.size[1] <= BOUND + export._TITLE_PX, (p.name, im.size)


def test_comparison_frames_of_thin_series_match_their_strip():
    rng = np.random.default_rng(2)
    zf, rec, tgt = (rng.random((3, 1, 50)) for _ in range(3))
    frames = export.comparison_frames(zf, rec, tgt)
    strip = export.comparison_strip(zf, rec, tgt, data_range=float(tgt.max()), series=True)
    assert frames.shape[1:] == strip.shape and frames.shape[2] <= BOUND


# ---------------------------------------------------------------------- evaluate: the same volumes
def test_evaluate_compares_methods_on_the_volumes_every_method_has(tmp_path, capsys):
    """A prediction folder missing one target's file: the summary used to show `modl | 2` next
    to `missing | 1` (means over different volumes) with exit status 0."""
    from test_evaluate import _layout_file, _prediction, _target

    from melrecon import evaluate as ev
    from melrecon.study.files import read_csv

    rng = np.random.default_rng(0)
    psnr = {}
    for i in range(3):
        target = _target(rng, (3, 10, 8))
        _layout_file(tmp_path / "targets" / f"v{i}.h5", target, "volume3d")
        psnr[i] = _prediction(tmp_path / "full" / f"v{i}.h5", target, rng, 0.05 * (i + 1), 0.5)["psnr"]
        if i != 1:
            _prediction(tmp_path / "partial" / f"v{i}.h5", target, rng, 0.1, 0.5)
    code = ev.main(["--target", str(tmp_path / "targets"), "--predictions", str(tmp_path / "full"),
                    str(tmp_path / "partial"), "--out", str(tmp_path / "eval")])
    err = capsys.readouterr().err
    assert code == 1
    warning = [ln for ln in err.splitlines() if "compared on" in ln]
    assert len(warning) == 1 and "2 volume(s)" in warning[0] and "partial lacks v1.h5" in warning[0]
    summary = {r["method"]: r for r in read_csv(tmp_path / "eval" / "summary.csv")}
    assert summary["full"]["n"] == summary["partial"]["n"] == "2"
    assert float(summary["full"]["psnr_mean"]) == pytest.approx((psnr[0] + psnr[2]) / 2, rel=1e-9)
    assert {r["n"] for r in read_csv(tmp_path / "eval" / "paired.csv")} == {"2"}
    # every volume scored is still listed per volume
    assert len(read_csv(tmp_path / "eval" / "per_volume.csv")) == 5
