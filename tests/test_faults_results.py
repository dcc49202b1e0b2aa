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
BOUND = export._MAX_FIGURE_PX


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
    ((230, 1, 180), "volume3d"),
    ((1, 1, 1), "volume3d"),
    ((1, 1, 3, 2000), "cine"),     # one slice, one frame, a very long thin image
    ((40, 1, 300), "cine"),        # (T, X, Y) with X = 1
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
