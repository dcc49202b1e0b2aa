"""Pin the fastMRI metric definitions against an independent NumPy/SciPy implementation.

Reference formulas: fastMRI ``evaluate.py`` (``ssim`` = skimage ``structural_similarity``
per slice with ``data_range = gt.max()`` of the volume; volume PSNR and NMSE), and skimage's
SSIM (uniform 7x7 filter, sample covariance NP/(NP-1), K1=0.01, K2=0.03, border crop of 3).
"""

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import uniform_filter

from melrecon.metrics import VolumeAccumulator, as_slices, ssim_loss, ssim_map, ssim_slices, volume_metrics


def ref_ssim_2d(x: np.ndarray, y: np.ndarray, data_range: float, win: int = 7) -> float:
    """skimage.metrics.structural_similarity(x, y, data_range=...) defaults, re-derived."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    np_ = win * win
    cov = np_ / (np_ - 1)
    ux, uy = uniform_filter(x, win), uniform_filter(y, win)
    uxx, uyy, uxy = uniform_filter(x * x, win), uniform_filter(y * y, win), uniform_filter(x * y, win)
    vx, vy, vxy = cov * (uxx - ux * ux), cov * (uyy - uy * uy), cov * (uxy - ux * uy)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    p = (win - 1) // 2
    return float(s[p:-p, p:-p].mean())


def ref_volume_metrics(gt: np.ndarray, pred: np.ndarray) -> dict:
    """fastMRI evaluate.py on a magnitude volume (S, H, W)."""
    maxval = gt.max()
    mse = np.mean((gt - pred) ** 2)
    return {
        "psnr": 10 * np.log10(maxval**2 / mse),
        "nmse": np.linalg.norm(gt - pred) ** 2 / np.linalg.norm(gt) ** 2,
        "ssim": np.mean([ref_ssim_2d(gt[i], pred[i], maxval) for i in range(gt.shape[0])]),
    }


def phantom(shape, seed):
    """Complex smooth blobs plus texture: structured enough that SSIM is neither ~0 nor ~1."""
    g = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    img = np.zeros(shape, complex)
    for _ in range(6):
        c = g.uniform(-0.6, 0.6, len(shape))
        r = g.uniform(0.15, 0.5)
        d2 = sum((gr - ci) ** 2 for gr, ci in zip(grids, c))
        img += g.uniform(0.3, 1.0) * np.exp(1j * g.uniform(0, 2 * np.pi)) * (d2 < r**2)
    return img + 0.05 * (g.standard_normal(shape) + 1j * g.standard_normal(shape))


def noisy(img, seed, sigma=0.15):
    g = np.random.default_rng(seed)
    return img + sigma * (g.standard_normal(img.shape) + 1j * g.standard_normal(img.shape))


def test_ssim_matches_skimage_formula():
    gt = np.abs(phantom((3, 24, 20), 0))
    pred = np.abs(noisy(phantom((3, 24, 20), 0), 1))
    L = gt.max()
    ours = ssim_slices(torch.tensor(pred), torch.tensor(gt), L).numpy()
    ref = np.array([ref_ssim_2d(gt[i], pred[i], L) for i in range(3)])
    assert 0.1 < ref.mean() < 0.95  # a non-trivial case
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-10)
    # identical images score exactly 1
    np.testing.assert_allclose(ssim_slices(torch.tensor(gt), torch.tensor(gt), L).numpy(), 1.0, atol=1e-12)


def test_torchmetrics_ssim_lacks_sample_covariance():
    """Why ssim_slices exists: torchmetrics' uniform-window SSIM is not the fastMRI number."""
    from torchmetrics.functional.image import structural_similarity_index_measure as tm_ssim

    gt = np.abs(phantom((1, 24, 24), 2))
    pred = np.abs(noisy(phantom((1, 24, 24), 2), 3))
    L = float(gt.max())
    tm = float(tm_ssim(torch.tensor(pred)[:, None], torch.tensor(gt)[:, None], gaussian_kernel=False,
                       kernel_size=7, data_range=L))
    ref = ref_ssim_2d(gt[0], pred[0], L)
    assert abs(tm - ref) > 1e-4


def test_volume_psnr_nmse_match_fastmri():
    gt = np.abs(phantom((4, 16, 16), 4))
    pred = np.abs(noisy(phantom((4, 16, 16), 4), 5))
    ref = ref_volume_metrics(gt, pred)
    got = volume_metrics(torch.tensor(pred), torch.tensor(gt), float(gt.max()))
    assert math.isclose(got["psnr"], ref["psnr"], rel_tol=1e-10)
    assert math.isclose(got["nmse"], ref["nmse"], rel_tol=1e-10)
    assert math.isclose(got["ssim"], ref["ssim"], rel_tol=1e-10)
    # complex input: magnitudes are scored
    phase = np.exp(1j * np.random.default_rng(6).uniform(0, 2 * np.pi, gt.shape))
    assert volume_metrics(torch.tensor(pred * phase), torch.tensor(gt), float(gt.max())) == pytest.approx(got, rel=1e-12)


@pytest.mark.parametrize("layout", ["slab3d", "cine"])
def test_accumulator_tiles_any_order_equals_whole_volume(layout):
    """Tiles (last one shorter), shuffled, batched, complex: per-volume values equal fastMRI's."""
    torch.manual_seed(0)
    vols = {}
    for f in ("a.h5", "b.h5"):
        tgt = phantom((7, 16, 12), hash(f) % 100)
        vols[f] = (tgt, noisy(tgt, 7))
    tile = 3  # 7 = 3 + 3 + 1 along the leading axis (X for slabs; for cine, items are whole volumes)
    items = []
    for f, (tgt, pred) in vols.items():
        data_range = np.abs(tgt).max()
        starts = range(0, 7, tile) if layout == "slab3d" else [0]
        for s in starts:
            e = s + tile if layout == "slab3d" else 7
            items.append((f, s, tgt[s:e], pred[s:e], data_range))
    rng = np.random.default_rng(0)
    acc = VolumeAccumulator()
    for i in rng.permutation(len(items)):
        f, s, t, p, dr = items[i]
        acc.update(torch.tensor(p[None], dtype=torch.complex64), torch.tensor(t[None], dtype=torch.complex64),
                   torch.tensor([dr]), [f], torch.tensor([s]))
    got = acc.compute()
    assert sorted(got) == sorted(vols)
    for f, (tgt, pred) in vols.items():
        # complex64 inputs: compare at float32 precision
        ref = ref_volume_metrics(np.abs(tgt.astype(np.complex64)), np.abs(pred.astype(np.complex64)))
        for k in ("psnr", "nmse", "ssim"):
            assert math.isclose(got[f][k], ref[k], rel_tol=1e-6), (f, k, got[f][k], ref[k])


def test_accumulator_rejects_duplicate_tile_and_bad_range():
    acc = VolumeAccumulator()
    x = torch.ones(1, 2, 8, 8, dtype=torch.complex64)
    acc.update(x, x, torch.tensor([1.0]), ["v.h5"], torch.tensor([0]))
    with pytest.raises(ValueError, match="seen twice"):
        acc.update(x, x, torch.tensor([1.0]), ["v.h5"], torch.tensor([0]))
    with pytest.raises(ValueError, match="data range"):
        acc.update(x, x, torch.tensor([0.0]), ["w.h5"], torch.tensor([0]))
    with pytest.raises(ValueError, match="smaller than"):
        ssim_slices(torch.ones(1, 5, 5), torch.ones(1, 5, 5), 1.0)


def test_as_slices_layouts():
    assert as_slices(torch.zeros(5, 6, 7)).shape == (5, 6, 7)   # 3D slab: X planes of (Y, Z)
    assert as_slices(torch.zeros(6, 7)).shape == (1, 6, 7)      # 2D
    with pytest.raises(ValueError):
        as_slices(torch.zeros(5))


def test_small_slices_have_no_ssim_and_validation_refuses_them():
    """A whole-volume score of slices below the 7x7 window gives SSIM NaN (reconstruct still
    reports PSNR and NMSE); the validation accumulator raises instead of logging NaN."""
    x = torch.rand(3, 5, 6)
    got = volume_metrics(x, x + 0.1, 1.0)
    assert math.isnan(got["ssim"]) and math.isclose(got["psnr"], 20.0, rel_tol=1e-6) and got["nmse"] > 0
    with pytest.raises(ValueError, match="smaller than"):
        VolumeAccumulator().update(x[None], x[None], torch.tensor([1.0]), ["v.h5"])
    with pytest.raises(ValueError, match="data range"):
        volume_metrics(x, x, 0.0)


def test_ssim_loss_is_one_minus_the_metric_and_differentiable():
    """The loss and the metric are one formula: per-item data ranges, slices of every item."""
    g = torch.Generator().manual_seed(0)
    pred = torch.rand(2, 3, 9, 8, generator=g, dtype=torch.float64)
    tgt = torch.rand(2, 3, 9, 8, generator=g, dtype=torch.float64)
    dr = torch.tensor([1.0, 2.0], dtype=torch.float64)
    per_slice = torch.cat([ssim_slices(pred[b], tgt[b], float(dr[b])) for b in range(2)])
    assert math.isclose(float(ssim_loss(pred, tgt, dr)), 1 - float(per_slice.mean()), rel_tol=1e-5)  # float32 loss
    x = pred.reshape(6, 9, 8).clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda a: ssim_map(a, tgt.reshape(6, 9, 8), dr.repeat_interleave(3)), (x,))
