"""FFT convention, SENSE adjointness and operator algebra, A^H A = I, autograd and shape errors."""

import numpy as np
import pytest
import torch

from helpers import assert_adjoint, make_sense_problem, rand_complex
from melrecon.physics import SenseOperator, birdcage_maps, fftc, ifftc


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


# hand-sized problems: odd and even FFT sizes, several batch sizes; image axes after B
SHAPES = {"slab": (3, 6, 5), "cine": (4, 7, 6)}
COILS = {"slab": 4, "cine": 3}


def _problem(layout, batch, dtype, seed=0):
    return make_sense_problem(layout, SHAPES[layout], COILS[layout], dtype, seed=seed, batch=batch)


@pytest.mark.parametrize("layout", ["slab", "cine"])
@pytest.mark.parametrize("dtype,tol", [(torch.complex64, 1e-5), (torch.complex128, 1e-12)])
@pytest.mark.parametrize("batch,maps_batch", [(1, None), (3, None), (2, 1)])
def test_adjoint_dot_product(layout, dtype, tol, batch, maps_batch):
    p = _problem(layout, batch, dtype, seed=batch * 7 + (maps_batch or 0))
    maps = p.maps if maps_batch is None else p.maps[:maps_batch]  # maps broadcast over the batch
    op = SenseOperator(maps, p.mask)
    assert_adjoint(op, p.x0.shape, dtype, tol)
    assert_adjoint(op.H, p.kspace.shape, dtype, tol)  # the adjoint operator's adjoint is A
    x = rand_complex(p.x0.shape, dtype, seed=3)
    np.testing.assert_allclose(op.normal(x).numpy(), op.adjoint(op.forward(x)).numpy(), rtol=tol * 10, atol=tol * 10)
    np.testing.assert_allclose(op.gram(x).numpy(), (op.H @ op)(x).numpy(), rtol=tol * 10, atol=tol * 10)


def test_operator_algebra_matches_its_definition():
    """``op.gram + lam``, ``c * op``, ``1 - a * gram``, ``@`` and ``.H`` apply what they say, and
    every combination passes the dot-product test against its own adjoint."""
    p = _problem("cine", 2, torch.complex128)
    op, x = p.op, rand_complex(p.x0.shape, torch.complex128, seed=5)
    lam = torch.tensor(0.3, dtype=torch.complex128)
    torch.testing.assert_close((op.gram + lam)(x), op.normal(x) + 0.3 * x, rtol=1e-14, atol=0)
    torch.testing.assert_close((lam + op.gram)(x), op.normal(x) + 0.3 * x, rtol=1e-14, atol=0)
    torch.testing.assert_close((1 - 0.5 * op.gram)(x), x - 0.5 * op.normal(x), rtol=1e-14, atol=0)
    torch.testing.assert_close((op.gram - op.gram)(x), torch.zeros_like(x), rtol=0, atol=0)
    torch.testing.assert_close((2j * op)(x), 2j * op(x), rtol=1e-14, atol=0)
    assert op.H.H is op
    for combo in (op.gram + lam, 2j * op, op.H @ op, 1 - 0.5 * op.gram, -op, op + op):  # image -> ...
        assert_adjoint(combo, p.x0.shape, torch.complex128, 1e-12)
    assert_adjoint(1j * op.H, p.kspace.shape, torch.complex128, 1e-12)  # adjoint of c A^H is conj(c) A


def test_full_sampling_with_birdcage_maps_is_identity():
    maps3d = birdcage_maps((8, 4, 12, 10), dtype=torch.complex128)  # (C, X, Y, Z)
    op = SenseOperator(maps3d[None], torch.ones(1, 1, 1, 12, 10, dtype=torch.float64))
    x = rand_complex((1, 4, 12, 10), seed=1)
    torch.testing.assert_close(op.normal(x), x, rtol=1e-12, atol=1e-12)
    maps2d = birdcage_maps((6, 10, 9), dtype=torch.complex128)  # cine: (C, X, Y)
    op = SenseOperator(maps2d[None, :, None], torch.ones(1, 1, 5, 1, 9, dtype=torch.float64))
    x = rand_complex((1, 5, 10, 9), seed=2)
    torch.testing.assert_close(op.normal(x), x, rtol=1e-12, atol=1e-12)


def test_gradcheck_forward_and_adjoint():
    for layout in ("slab", "cine"):
        p = _problem(layout, 2, torch.complex128, seed=2)
        op, maps, mask = p.op, p.maps, p.mask
        x = rand_complex(p.x0.shape, seed=3).requires_grad_()
        k = rand_complex(p.kspace.shape, seed=4).requires_grad_()
        assert torch.autograd.gradcheck(op.forward, (x,))
        assert torch.autograd.gradcheck(op.adjoint, (k,))
        # the maps are differentiable too (needed for learned-map extensions)
        m = maps.clone().requires_grad_()
        assert torch.autograd.gradcheck(lambda mm: SenseOperator(mm, mask).forward(x.detach()), (m,))


def test_autograd_of_forward_is_adjoint():
    p = _problem("cine", 2, torch.complex128, seed=3)
    op = p.op
    x = rand_complex(p.x0.shape, seed=4).requires_grad_()
    k = rand_complex(p.kspace.shape, seed=5)
    (g,) = torch.autograd.grad(op.forward(x), x, grad_outputs=k)
    torch.testing.assert_close(g, op.adjoint(k))


def test_shape_and_dtype_mismatches_name_both_shapes():
    p = _problem("slab", 2, torch.complex64, seed=4)
    x_shape, maps, mask, op = p.x0.shape, p.maps, p.mask, p.op
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
    p = _problem("cine", 2, torch.complex64, seed=5)
    x = rand_complex(p.x0.shape, torch.complex64, seed=6)
    cpu = p.op
    gpu = SenseOperator(p.maps.cuda(), p.mask.cuda())
    torch.testing.assert_close(gpu.normal(x.cuda()).cpu(), cpu.normal(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout,shape,chunk", [("slab", (7, 6, 5), 3), ("slab", (7, 6, 5), 1), ("slab", (4, 6, 4), 9),
                                                ("cine", (5, 7, 6), 2)])  # fmt: skip
def test_chunks_along_the_first_image_axis_equal_one_piece(layout, shape, chunk):
    """``chunk``: adjoint, normal and gram over pieces of the readout X (slab; cine: the
    frames, where the maps broadcast) equal the whole operator; the chunked adjoint is still
    the adjoint of the forward; autograd through the chunks gives the same gradient."""
    p = make_sense_problem(layout, shape, 3, torch.complex128, seed=5, batch=2)
    whole, parts = SenseOperator(p.maps, p.mask), SenseOperator(p.maps, p.mask, chunk=chunk)
    x = rand_complex(p.x0.shape, seed=1)
    k = rand_complex(p.kspace.shape, seed=2)
    for a, b in ((parts.adjoint(k), whole.adjoint(k)), (parts.normal(x), whole.normal(x)),
                 ((parts.gram + 0.3)(x), (whole.gram + 0.3)(x))):
        assert a.shape == b.shape and float((a - b).abs().max()) <= 1e-14 * float(b.abs().max())
    assert_adjoint(parts, p.x0.shape, torch.complex128, 1e-12)
    xg = x.clone().requires_grad_()
    (g_parts,) = torch.autograd.grad(parts.normal(xg).abs().pow(2).sum(), xg)
    (g_whole,) = torch.autograd.grad(whole.normal(xg).abs().pow(2).sum(), xg)
    assert float((g_parts - g_whole).abs().max()) <= 1e-13 * float(g_whole.abs().max())


def test_chunk_errors_name_the_option():
    p = make_sense_problem("slab", (4, 6, 4), 2, torch.complex64)
    with pytest.raises(ValueError, match="chunk must be a positive integer"):
        SenseOperator(p.maps, p.mask, chunk=0)
    with pytest.raises(ValueError, match="Fourier encoded"):
        SenseOperator(p.maps, p.mask, fft_dims=(-3, -2, -1), chunk=2)
