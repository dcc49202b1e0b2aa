"""Masks (acceleration, calibration, determinism, errors), ESPIRiT, CG-SENSE."""

import pytest
import torch

from helpers import make_sense_problem
from melrecon.physics import (
    SenseOperator,
    birdcage_maps,
    conjugate_gradient,
    espirit_maps,
    fftc,
    interleaved_kt,
    poisson_disc,
    rss,
    sense_combine,
    variable_density_kt,
)
from melrecon.physics import masks as masks_mod
from melrecon.physics.cg import cg_sense


@pytest.fixture()
def mask_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MELRECON_CACHE_DIR", str(tmp_path))
    masks_mod._poisson_cached.cache_clear()
    yield tmp_path
    masks_mod._poisson_cached.cache_clear()


@pytest.mark.parametrize("accel", [4, 8, 12])
def test_poisson_disc_acceleration_and_calibration(mask_cache, accel):
    res = poisson_disc((256, 320), accel, calib=24, seed=0)
    assert res.mask.shape == (256, 320) and res.mask.dtype == torch.float32
    assert abs(res.acceleration - accel) / accel < 0.05
    assert abs(res.mask.numel() / res.mask.sum().item() - res.acceleration) < 1e-9
    assert res.mask[128 - 12 : 128 + 12, 160 - 12 : 160 + 12].min() == 1


def test_poisson_disc_determinism_and_disk_cache(mask_cache):
    a = poisson_disc((48, 40), 5, calib=8, seed=3).mask
    assert len(list((mask_cache / "masks").glob("*.npy"))) == 1
    masks_mod._poisson_cached.cache_clear()  # a new worker process: served from disk
    torch.testing.assert_close(poisson_disc((48, 40), 5, calib=8, seed=3).mask, a)
    assert not torch.equal(poisson_disc((48, 40), 5, calib=8, seed=4).mask, a)


def test_kt_masks():
    m = variable_density_kt(192, 12, 8, calib=12, seed=1)
    assert m.mask.shape == (12, 192)
    assert abs(m.acceleration - 8) / 8 < 0.05
    assert m.mask[:, 96 - 6 : 96 + 6].min() == 1
    assert not torch.equal(m.mask[0], m.mask[1])  # a different pattern per frame
    torch.testing.assert_close(variable_density_kt(192, 12, 8, calib=12, seed=1).mask, m.mask)
    assert not torch.equal(variable_density_kt(192, 12, 8, calib=12, seed=2).mask, m.mask)
    # denser near the centre than at the edge
    prof = m.mask.mean(0)
    assert prof[60:90].mean() > prof[:30].mean()

    il = interleaved_kt(192, 12, 8, calib=12)
    assert abs(il.acceleration - 8) / 8 < 0.1
    # outside the centre, frame t+1 is frame t shifted by one line
    outer = torch.ones(192, dtype=torch.bool)
    outer[80:112] = False
    assert torch.equal(il.mask[0].roll(-1)[outer], il.mask[1][outer])


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: poisson_disc((64, 64), 1.0), "accel must be > 1"),
        (lambda: poisson_disc((64, 64), 4, calib=80), "does not fit"),
        (lambda: poisson_disc((64, 64), 40, calib=16), "unreachable"),
        (lambda: variable_density_kt(64, 8, 0.5), "accel must be > 1"),
        (lambda: variable_density_kt(64, 8, 4, calib=70), "does not fit"),
        (lambda: variable_density_kt(64, 8, 12, calib=16), "unreachable"),
        (lambda: interleaved_kt(64, 8, 12, calib=16), "unreachable"),
    ],
)
def test_mask_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def _phantom(n=64):
    import sigpy

    return torch.from_numpy(sigpy.shepp_logan((n, n))).to(torch.complex64)


def test_espirit_recovers_known_maps():
    img = _phantom(64)
    true_maps = birdcage_maps((8, 64, 64))
    ksp = fftc(true_maps * img, (-2, -1))
    est = espirit_maps(ksp, calib_width=24)
    inside = img.abs() > 0.05 * img.abs().max()
    cos = (est.conj() * true_maps).sum(0).abs() / (est.abs().pow(2).sum(0).sqrt() * true_maps.abs().pow(2).sum(0).sqrt() + 1e-12)
    assert cos[inside].min() >= 0.99
    with pytest.raises(ValueError, match="calib_width"):
        espirit_maps(ksp[:, :16, :16], calib_width=24)


def test_coil_combination_and_rss():
    img = _phantom(32)
    maps = birdcage_maps((4, 32, 32))
    coils = maps * img
    torch.testing.assert_close(sense_combine(coils, maps, coil_dim=0), img, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rss(coils, coil_dim=0), img.abs(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="coil count"):
        sense_combine(coils[:3], maps, coil_dim=0)


def test_cg_solves_batched_spd_system_and_reports_history():
    gen = torch.Generator().manual_seed(0)
    q = torch.linalg.qr(torch.randn(3, 20, 20, generator=gen, dtype=torch.float64))[0]
    eig = torch.linspace(1, 10, 20, dtype=torch.float64)
    mats = q @ torch.diag(eig) @ q.transpose(1, 2)
    b = torch.randn(3, 20, generator=gen, dtype=torch.float64)
    b[2] = 0  # a zero right-hand side converges at once to zero
    res = conjugate_gradient(lambda v: torch.einsum("bij,bj->bi", mats, v), b, tol=1e-10, max_iter=100)
    assert res.converged and res.residuals.shape == (res.iterations + 1, 3)
    torch.testing.assert_close(res.x[:2], torch.linalg.solve(mats[:2], b[:2]), rtol=1e-8, atol=1e-8)
    assert torch.all(res.x[2] == 0)
    capped = conjugate_gradient(lambda v: torch.einsum("bij,bj->bi", mats, v), b, tol=1e-14, max_iter=3)
    assert capped.iterations == 3 and not capped.converged


def test_cg_sense_beats_zero_filling():
    img = _phantom(64)
    maps = birdcage_maps((8, 64, 64))
    mask = poisson_disc((64, 64), 4, calib=12, seed=0).mask
    op = SenseOperator(maps[None, :, None], mask[None, None, None])  # slab layout, X = 1
    x_true = img[None, None]
    y = op.forward(x_true)
    zf = op.adjoint(y)
    rec = cg_sense(op, y, lam=1e-4, tol=1e-6, max_iter=100)

    def nrmse(a):
        return float((a - x_true).norm() / x_true.norm())

    assert nrmse(rec.x) * 2 <= nrmse(zf), (nrmse(rec.x), nrmse(zf))
    assert rec.residuals[-1].max() < rec.residuals[0].max()


@pytest.mark.parametrize("lam", [0.0, 0.1])
def test_cg_sense_solves_the_regularised_normal_equations(lam):
    """cg_sense (the CG-SENSE baseline) against a dense solve of (A^H A + lam I) x = A^H y."""
    p = make_sense_problem("slab", (1, 6, 8), coils=3, dtype=torch.complex128, seed=4)
    op, n = p.op, p.x0.numel()
    basis = torch.eye(n, dtype=torch.complex128).reshape(n, *p.x0.shape[1:])
    gram = torch.stack([op.normal(b[None]).flatten() for b in basis], dim=1)  # column j = A^H A e_j
    rhs = op.adjoint(p.kspace).flatten()
    # unsampled, unregularised directions are a null space: compare on the least-squares solution
    x_ref = torch.linalg.lstsq(gram + lam * torch.eye(n, dtype=gram.dtype), rhs[:, None]).solution[:, 0]
    res = cg_sense(op, p.kspace, lam=lam, tol=1e-12, max_iter=200)
    assert res.converged and res.x.shape == p.x0.shape
    torch.testing.assert_close(res.x.flatten(), x_ref, rtol=1e-8, atol=1e-8)
    with pytest.raises(ValueError, match="lam"):
        cg_sense(op, p.kspace, lam=-1.0)


def test_poisson_disc_unreachable_seed_raises_instead_of_hanging(mask_cache):
    # SigPy's own loop never ends for this grid and seed; ours stops and says why
    with pytest.raises(ValueError, match="seed 1"):
        poisson_disc((16, 16), 4, calib=4, seed=1)
    assert abs(poisson_disc((16, 16), 4, calib=4, seed=0).acceleration - 4) < 0.08 * 4
