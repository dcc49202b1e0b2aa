"""FFT convention, SENSE adjointness, A^H A = I, autograd and shape errors."""

import numpy as np
import pytest
import torch

from melrecon.physics import SenseOperator, birdcage_maps, fftc, ifftc


def _rand(shape, dtype, gen):
    real = torch.randn(shape, generator=gen, dtype=torch.float64)
    imag = torch.randn(shape, generator=gen, dtype=torch.float64)
    return torch.complex(real, imag).to(dtype)


@pytest.mark.parametrize("shape", [(7, 5), (8, 6), (3, 9, 4), (6, 5, 7)])
def test_fftc_matches_numpy_reference(shape):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape) + 1j * rng.standard_normal(shape)
    dims = tuple(range(-min(len(shape), 2), 0)) if len(shape) == 2 else (0, 2)
    ref = np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(x, axes=dims), axes=dims, norm="ortho"), axes=dims)
    ref_inv = np.fft.fftshift(np.fft.ifftn(np.fft.ifftshift(x, axes=dims), axes=dims, norm="ortho"), axes=dims)
    xt = torch.from_numpy(x)
    np.testing.assert_allclose(fftc(xt, dims).numpy(), ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ifftc(xt, dims).numpy(), ref_inv, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ifftc(fftc(xt, dims), dims).numpy(), x, atol=1e-12)


@pytest.mark.parametrize("n", [7, 8])
def test_dc_sits_at_n_over_2(n):
    k = fftc(torch.ones(n, n, dtype=torch.complex128))
    assert abs(k[n // 2, n // 2].item() - n) < 1e-12  # sqrt(N) with N = n*n
    assert float(k.abs().sum() - k[n // 2, n // 2].abs()) < 1e-10


def test_fftc_rejects_bad_dims():
    with pytest.raises(ValueError, match="out of range"):
        fftc(torch.zeros(4, 4, dtype=torch.complex64), (0, 3))


def _slab_problem(batch, dtype, gen, maps_batch=None):
    b_maps = batch if maps_batch is None else maps_batch
    x_shape, c = (batch, 3, 6, 5), 4
    maps = _rand((b_maps, c, 3, 6, 5), dtype, gen)
    mask = (torch.rand((batch, 1, 1, 6, 5), generator=gen) > 0.5).float()
    return x_shape, maps, mask, (batch, c, 3, 6, 5)


def _cine_problem(batch, dtype, gen, maps_batch=None):
    b_maps = batch if maps_batch is None else maps_batch
    x_shape, c = (batch, 4, 7, 6), 3
    maps = _rand((b_maps, c, 1, 7, 6), dtype, gen)
    mask = (torch.rand((batch, 1, 4, 1, 6), generator=gen) > 0.5).float()
    return x_shape, maps, mask, (batch, c, 4, 7, 6)


@pytest.mark.parametrize("layout", [_slab_problem, _cine_problem])
@pytest.mark.parametrize("dtype,tol", [(torch.complex64, 1e-5), (torch.complex128, 1e-12)])
@pytest.mark.parametrize("batch,maps_batch", [(1, None), (3, None), (2, 1)])
def test_adjoint_dot_product(layout, dtype, tol, batch, maps_batch):
    gen = torch.Generator().manual_seed(batch * 7 + (maps_batch or 0))
    x_shape, maps, mask, k_shape = layout(batch, dtype, gen, maps_batch)
    op = SenseOperator(maps, mask)
    x, k = _rand(x_shape, dtype, gen), _rand(k_shape, dtype, gen)
    lhs = torch.vdot(op.forward(x).flatten(), k.flatten())
    rhs = torch.vdot(x.flatten(), op.adjoint(k).flatten())
    assert abs(lhs - rhs) / abs(lhs) < tol
    np.testing.assert_allclose(
        op.normal(x).numpy(), op.adjoint(op.forward(x)).numpy(), rtol=tol * 10, atol=tol * 10
    )


def test_full_sampling_with_birdcage_maps_is_identity():
    gen = torch.Generator().manual_seed(1)
    maps3d = birdcage_maps((8, 4, 12, 10), dtype=torch.complex128)  # (C, X, Y, Z)
    op = SenseOperator(maps3d[None], torch.ones(1, 1, 1, 12, 10, dtype=torch.float64))
    x = _rand((1, 4, 12, 10), torch.complex128, gen)
    torch.testing.assert_close(op.normal(x), x, rtol=1e-12, atol=1e-12)
    maps2d = birdcage_maps((6, 10, 9), dtype=torch.complex128)  # cine: (C, X, Y)
    op = SenseOperator(maps2d[None, :, None], torch.ones(1, 1, 5, 1, 9, dtype=torch.float64))
    x = _rand((1, 5, 10, 9), torch.complex128, gen)
    torch.testing.assert_close(op.normal(x), x, rtol=1e-12, atol=1e-12)


def test_gradcheck_forward_and_adjoint():
    gen = torch.Generator().manual_seed(2)
    for layout in (_slab_problem, _cine_problem):
        x_shape, maps, mask, k_shape = layout(2, torch.complex128, gen)
        op = SenseOperator(maps, mask)
        x = _rand(x_shape, torch.complex128, gen).requires_grad_()
        k = _rand(k_shape, torch.complex128, gen).requires_grad_()
        assert torch.autograd.gradcheck(op.forward, (x,))
        assert torch.autograd.gradcheck(op.adjoint, (k,))
        # the maps are differentiable too (needed for learned-map extensions)
        m = maps.clone().requires_grad_()
        assert torch.autograd.gradcheck(lambda mm: SenseOperator(mm, mask).forward(x.detach()), (m,))


def test_autograd_of_forward_is_adjoint():
    gen = torch.Generator().manual_seed(3)
    x_shape, maps, mask, k_shape = _cine_problem(2, torch.complex128, gen)
    op = SenseOperator(maps, mask)
    x = _rand(x_shape, torch.complex128, gen).requires_grad_()
    k = _rand(k_shape, torch.complex128, gen)
    (g,) = torch.autograd.grad(op.forward(x), x, grad_outputs=k)
    torch.testing.assert_close(g, op.adjoint(k))


def test_shape_and_dtype_mismatches_name_both_shapes():
    gen = torch.Generator().manual_seed(4)
    x_shape, maps, mask, k_shape = _slab_problem(2, torch.complex64, gen)
    op = SenseOperator(maps, mask)
    with pytest.raises(ValueError, match=r"\(2, 3, 6, 4\).*\(2, 4, 3, 6, 5\)"):
        op.forward(torch.zeros(2, 3, 6, 4, dtype=torch.complex64))
    with pytest.raises(ValueError, match="image shape"):
        op.forward(torch.zeros(2, 1, 6, 5, dtype=torch.complex64))  # would broadcast along X
    with pytest.raises(ValueError, match="image shape"):
        op.forward(torch.zeros(3, 3, 6, 5, dtype=torch.complex64))  # batch 3 vs maps batch 2
    with pytest.raises(ValueError, match="dtype"):
        op.forward(torch.zeros(x_shape, dtype=torch.complex128))
    with pytest.raises(ValueError, match="k-space shape"):
        op.adjoint(torch.zeros(2, 5, 3, 6, 5, dtype=torch.complex64))  # 5 coils vs 4
    with pytest.raises(ValueError, match=r"mask shape \(2, 1, 1, 6, 4\)"):
        SenseOperator(maps, torch.ones(2, 1, 1, 6, 4)).forward(torch.zeros(x_shape, dtype=torch.complex64))
    with pytest.raises(ValueError, match="mask shape"):
        SenseOperator(maps, torch.ones(6, 5))
    with pytest.raises(ValueError, match="maps must be complex"):
        SenseOperator(maps.real, mask)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sense_on_cuda_matches_cpu():
    gen = torch.Generator().manual_seed(5)
    x_shape, maps, mask, k_shape = _cine_problem(2, torch.complex64, gen)
    x = _rand(x_shape, torch.complex64, gen)
    cpu = SenseOperator(maps, mask)
    gpu = SenseOperator(maps.cuda(), mask.cuda())
    torch.testing.assert_close(gpu.normal(x.cuda()).cpu(), cpu.normal(x), rtol=1e-5, atol=1e-5)
