"""Tiled CNN evaluation (melrecon.mel.tiled): exact output and gradients, memory, errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from melrecon.mel import InvertibleChain, MemoryProbe, StepFreezer
from melrecon.mel.invertible import InvertibleLayer, InvertResult, default_tolerance, invert_residual_map
from melrecon.mel.tiled import NonLocalModuleError, TiledModule, receptive_halo, tile_grid, tiled_forward
from melrecon.models.regularizers import BoundedConv, ResidualCNN

D = torch.float64


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


class Stack(nn.Module):
    """conv, ReLU, ..., conv over BoundedConvs (ResidualCNN's R on real channels)."""

    def __init__(self, convs: nn.ModuleList) -> None:
        super().__init__()
        self.convs = convs

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, conv in enumerate(self.convs):
            h = conv(h)
            if i < len(self.convs) - 1:
                h = F.relu(h)
        return h


def bounded_stack(conv_dim: int, width: int = 4, depth: int = 3, bound: float | None = 0.9 ** (1 / 3)) -> Stack:
    chans = [2] + [width] * (depth - 1) + [2]
    convs = nn.ModuleList(BoundedConv(conv_dim, chans[i], chans[i + 1], 3, True, bound) for i in range(depth))
    return Stack(convs).double()


def plain_stack_3d() -> nn.Module:
    """Plain torch convs with dilation and an anisotropic kernel: halo (1+2+1, 1+2+0, 1+2+1)."""
    return nn.Sequential(
        nn.Conv3d(2, 4, 3, padding=1), nn.ReLU(),
        nn.Conv3d(4, 4, 3, padding=2, dilation=2), nn.Tanh(),
        nn.Conv3d(4, 2, (3, 1, 3), padding="same"),
    ).double()  # fmt: skip


def plain_stack_2d() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.LeakyReLU(0.1),
        nn.Conv2d(4, 4, 5, padding=4, dilation=2), nn.ReLU(),
        nn.Conv2d(4, 3, 3, padding="same"),
    ).double()  # fmt: skip


def grads(net: nn.Module, fn, x: torch.Tensor, g: torch.Tensor):
    """Output, input gradient and every parameter's gradient of fn(x) against g."""
    x = x.detach().requires_grad_(True)
    y = fn(x)
    params = list(net.parameters())
    gs = torch.autograd.grad(y, [x, *params], g)
    return y.detach(), gs[0], gs[1:]


def assert_same(net: nn.Module, x: torch.Tensor, tile, tol: float = 1e-10, reference=None) -> None:
    ref_fn = reference if reference is not None else net
    y0 = ref_fn(x.detach())
    g = torch.randn(y0.shape, dtype=y0.dtype, generator=torch.Generator().manual_seed(5))
    y0, gx0, gp0 = grads(net, ref_fn, x, g)
    y1, gx1, gp1 = grads(net, lambda t: tiled_forward(net, t, tile), x, g)
    assert rel(y1, y0) < tol
    assert rel(gx1, gx0) < tol
    assert len(gp0) > 0
    for a, b in zip(gp1, gp0):
        assert rel(a, b) < tol


# --------------------------------------------------------------------------- halo and grid


def test_receptive_halo_sums_reach_per_axis():
    assert receptive_halo(plain_stack_3d()) == (4, 3, 4)
    assert receptive_halo(plain_stack_2d()) == (6, 6)  # 1 + 2*2 + 1
    assert receptive_halo(bounded_stack(3, depth=4)) == (4, 4, 4)  # BoundedConv declares kernel // 2
    assert receptive_halo(ResidualCNN(conv_dim=3, width=4, depth=5, kernel_size=5)) == (10, 10, 10)
    assert receptive_halo(nn.Sequential(nn.ReLU(), nn.Identity())) == ()  # pointwise: no halo
    # 'same' with an even span pads asymmetrically (one more on the right): the halo covers it
    assert receptive_halo(nn.Conv2d(1, 1, 2, padding="same")) == (1, 1)


@pytest.mark.parametrize(
    "spatial,tile,halo", [((7, 5, 9), (3, 2, 4), (2, 1, 3)), ((10, 6), (4, 6), (2, 2)), ((5,), 5, (1,))]
)
def test_tile_grid_covers_volume_once(spatial, tile, halo):
    tiles = tile_grid(spatial, tile, halo)
    count = torch.zeros(spatial, dtype=torch.int64)
    for t in tiles:
        count[t.out] += 1
        for o, e, c, r, s in zip(t.out, t.ext, t.crop, halo, spatial):
            assert e.start == max(0, o.start - r) and e.stop == min(s, o.stop + r)  # halo cut at the border
            assert (c.start + e.start, c.stop + e.start) == (o.start, o.stop)
    assert torch.all(count == 1)


# --------------------------------------------------------------------------- exactness


@pytest.mark.parametrize(
    "shape,tile",
    [
        ((2, 2, 11, 9, 7), (4, 3, 5)),  # every axis cut, odd sizes, tiles not dividing the sizes
        ((1, 2, 9, 9, 9), 2),  # tiles smaller than the halo
        ((1, 2, 12, 5, 8), (5, None, 3)),  # one axis not cut
    ],
)
def test_plain_3d_stack_tiled_equals_untiled(shape, tile):
    torch.manual_seed(0)
    net = plain_stack_3d()
    assert_same(net, torch.randn(shape, dtype=D), tile)


def test_plain_2d_stack_tiled_equals_untiled():
    torch.manual_seed(1)
    net = plain_stack_2d()
    assert_same(net, torch.randn(3, 2, 13, 10, dtype=D), (4, 3))


@pytest.mark.parametrize("conv_dim,shape,tile", [(3, (2, 2, 9, 7, 11), (3, 4, 5)), (2, (2, 2, 11, 9), (4, 5))])
def test_spectrally_normalised_stack_under_step_freezer(conv_dim, shape, tile):
    """ResidualCNN-style stack (BoundedConv with a norm bound), training mode, inside a
    StepFreezer: the tiles use the whole volume's norm estimate (tiles are smaller than the
    probe, so their own probe would start another estimate)."""
    torch.manual_seed(2)
    net = bounded_stack(conv_dim, bound=0.5).train()
    x = torch.randn(shape, dtype=D)
    net(x)  # starts the estimate for this volume
    freezer = StepFreezer([net])
    freezer.begin()  # one power iteration, as at the start of a training step
    sigma = [c.sigma.clone() for c in net.convs]
    u_shape = [tuple(c.u.shape) for c in net.convs]
    with freezer.active():
        assert_same(net, x, tile)
    assert all(torch.equal(c.sigma, s) for c, s in zip(net.convs, sigma))  # no tile changed the estimate
    assert [tuple(c.u.shape) for c in net.convs] == u_shape
    assert all(c.scale() < 1 for c in net.convs)  # the bound is active, so sigma matters


def test_bounded_stack_first_call_tiled_starts_volume_estimate():
    """A fresh network called first on tiles computes what a fresh untiled call computes."""
    torch.manual_seed(3)
    a = bounded_stack(3, bound=0.5)
    b = copy.deepcopy(a)
    x = torch.randn(1, 2, 9, 8, 7, dtype=D)
    y_tiled = tiled_forward(a, x, (3, 3, 3))
    y_plain = b(x)
    assert all(c.scale() < 1 for c in a.convs)
    assert rel(y_tiled, y_plain) < 1e-10
    assert all(torch.equal(ca.sigma, cb.sigma) for ca, cb in zip(a.convs, b.convs))


def test_torch_spectral_norm_in_training_mode_advances_once():
    """torch's spectral_norm: a tiled call advances the power iteration once, like an untiled
    call, and the backward recompute sees the same weight; the real parameter gets the gradient."""
    torch.manual_seed(4)
    sn = nn.utils.parametrizations.spectral_norm
    net = nn.Sequential(sn(nn.Conv3d(2, 3, 3, padding=1)), nn.ReLU(), sn(nn.Conv3d(3, 2, 3, padding=1))).double()
    net.train()
    ref = copy.deepcopy(net)
    x = torch.randn(1, 2, 7, 6, 5, dtype=D)
    g = torch.randn(1, 2, 7, 6, 5, dtype=D)
    y0, gx0, gp0 = grads(ref, ref, x, g)
    y1, gx1, gp1 = grads(net, lambda t: tiled_forward(net, t, (3, 2, 4)), x, g)
    assert rel(y1, y0) < 1e-10 and rel(gx1, gx0) < 1e-10
    names = [n for n, _ in net.named_parameters()]
    assert any("original" in n for n in names)  # the real parameter behind the computed weight
    for a, b in zip(gp1, gp0):
        assert rel(a, b) < 1e-10
    for m, r in zip(net.modules(), ref.modules()):
        if type(m).__name__ == "_SpectralNorm":
            assert torch.equal(m._u, r._u)  # advanced exactly as often as the untiled call


def test_batchnorm_in_eval_mode_is_local():
    torch.manual_seed(5)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 3, padding=1))
    net = net.double()
    net(torch.randn(4, 2, 8, 8, dtype=D))  # non-trivial running statistics
    net.eval()
    assert_same(net, torch.randn(2, 2, 9, 7, dtype=D), (4, 3))


def test_plain_call_when_not_tiled_and_wrapper_is_drop_in():
    torch.manual_seed(6)
    net = plain_stack_3d()
    x = torch.randn(1, 2, 6, 5, 4, dtype=D)
    y = net(x)
    assert torch.equal(tiled_forward(net, x, None), y)
    assert torch.equal(tiled_forward(net, x, (6, 8, 100)), y)  # tile >= volume: one tile
    wrapped = TiledModule(net, tile=(2, 2, 2))
    assert wrapped.halo == (4, 3, 4) and "tile=(2, 2, 2)" in repr(wrapped)
    assert rel(wrapped(x), y) < 1e-12
    assert set(dict(wrapped.named_parameters())) == {f"net.{k}" for k, _ in net.named_parameters()}


def test_no_grad_loops_without_function_and_backward_is_deterministic():
    torch.manual_seed(7)
    net = plain_stack_3d()
    x = torch.randn(1, 2, 8, 7, 6, dtype=D, requires_grad=True)
    with torch.no_grad():
        y = tiled_forward(net, x, 3)
    assert y.grad_fn is None and rel(y, net(x).detach()) < 1e-12
    g = torch.randn_like(y)
    runs = [torch.autograd.grad(tiled_forward(net, x, 3), [x, *net.parameters()], g) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))  # bitwise: fixed tile order
    y = tiled_forward(net, x, 3)
    assert "TiledFunction" in type(y.grad_fn).__name__
    with pytest.raises(RuntimeError):  # once_differentiable: no double backward through tiles
        (gx,) = torch.autograd.grad(y, x, g, create_graph=True)
        gx.sum().backward()


def test_gradcheck_tiny():
    torch.manual_seed(8)
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.Conv2d(2, 1, 3, padding=2, dilation=2)).double()
    x = torch.randn(1, 1, 5, 4, dtype=D, requires_grad=True)
    params = list(net.parameters())  # perturbed in place by gradcheck; the module reads them
    assert torch.autograd.gradcheck(lambda x, *ps: tiled_forward(net, x, (2, 3)), (x, *params))


# --------------------------------------------------------------------------- inside MEL


class TiledResidual(InvertibleLayer):
    """y = x + R(x) with R a spectrally bounded conv stack evaluated in tiles (tile=None: plain)."""

    lipschitz = 0.9

    def __init__(self, stack: Stack, tile) -> None:
        super().__init__()
        self.stack, self.tile = stack, tile

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        return tiled_forward(self.stack, x, self.tile)

    def forward(self, x, data=None):
        return x + self.residual(x)

    def inverse(self, y, data=None):
        r = invert_residual_map(self.residual, y, default_tolerance(y.dtype), 200)
        return InvertResult(r.x, r.residual, r.iterations, r.converged)


@pytest.mark.parametrize("memory", ["standard", "checkpoint", "mel"])
def test_inside_mel_chain_equals_untiled_standard(memory):
    """Shared-weight residual layers in the MEL engine (StepFreezer, recompute, fixed-point
    inverse through the tiled CNN): gradients equal untiled standard backprop."""
    torch.manual_seed(9)
    stack = bounded_stack(3, width=3)
    x = torch.randn(1, 2, 7, 6, 5, dtype=D)
    stack(x)  # estimate for this volume
    ref_stack = copy.deepcopy(stack)
    out = {}
    for name, s, tile, mode in (("ref", ref_stack, None, "standard"), ("tiled", stack, (3, 4, 2), memory)):
        chain = InvertibleChain([TiledResidual(s, tile)] * 3, memory=memory if name == "tiled" else mode,
                                anchor_every=None)
        xx = x.clone().requires_grad_(True)
        y = chain(xx)
        (y * y).sum().backward()
        out[name] = (y.detach(), xx.grad, [p.grad.clone() for p in s.parameters()], chain.stats)
    y0, gx0, gp0, _ = out["ref"]
    y1, gx1, gp1, stats = out["tiled"]
    assert rel(y1, y0) < 1e-10 and rel(gx1, gx0) < 1e-9
    assert all(rel(a, b) < 1e-9 for a, b in zip(gp1, gp0))
    if memory == "mel":
        assert stats.fallbacks == 0 and stats.inv_iters > 0


def test_fixed_point_inverse_through_tiled_cnn_matches_untiled():
    torch.manual_seed(10)
    stack = bounded_stack(3)
    y = torch.randn(1, 2, 8, 7, 6, dtype=D)
    stack(y)
    with torch.no_grad():
        plain = TiledResidual(stack, None).inverse(y)
        tiled = TiledResidual(stack, (3, 3, 3)).inverse(y)
    assert plain.converged and tiled.converged and tiled.iterations == plain.iterations
    assert rel(tiled.x, plain.x) < 1e-11


# --------------------------------------------------------------------------- memory


def test_memory_grows_with_tile_not_volume():
    """Probe peak of a tiled forward+backward = the volume-sized tensors (saved input, output
    gradient, input gradient) + one tile's graph, the same for 1x, 2x, 4x volumes at a fixed
    tile; untiled, it grows with the volume."""
    torch.manual_seed(11)
    width = 6
    net = nn.Sequential(nn.Conv3d(2, width, 3, padding=1), nn.ReLU(), nn.Conv3d(width, width, 3, padding=1), nn.ReLU(),
                        nn.Conv3d(width, 2, 3, padding=1)).double()  # fmt: skip
    tile, halo = (4, 4, 4), 3  # interior tiles + halo: 10^3 voxels, present in every volume below

    def peak(spatial, tile):
        x = torch.randn(1, 2, *spatial, dtype=D, requires_grad=True)
        g = torch.randn(1, 2, *spatial, dtype=D)
        with MemoryProbe() as probe:
            tiled_forward(net, x, tile).backward(g)
        return probe.peak_bytes, x.numel() * 8

    beyond, plain = [], []
    for spatial in ((12, 12, 12), (24, 12, 12), (24, 24, 12)):
        p, vol = peak(spatial, tile)
        beyond.append(p - 3 * vol)  # saved input + output gradient + input gradient (2 channels each)
        plain.append(peak(spatial, None)[0])
    weights = sum(p.numel() for n, p in net.named_parameters() if n.endswith("weight")) * 8
    tile_graph = 2 * width * (tile[0] + 2 * halo) ** 3 * 8 + weights  # two ReLU outputs + weights
    assert beyond[0] == tile_graph  # the accounting is exact ...
    assert max(beyond) <= 1.1 * min(beyond)  # ... and the same at 2x and 4x the volume
    assert plain[2] > 3 * plain[0]  # the untiled graph grows with the volume


# --------------------------------------------------------------------------- errors


class Unknown(nn.Module):
    def forward(self, x):
        return x


@pytest.mark.parametrize(
    "net,match",
    [
        (nn.Sequential(nn.Conv3d(2, 2, 3, padding=1), nn.MaxPool3d(2)), r"'1' \(MaxPool3d\).*pooling"),
        (nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.Upsample(scale_factor=2)), r"'1' \(Upsample\).*upsampling"),
        (nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4)), r"'1' \(GroupNorm\).*statistics"),
        (nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.InstanceNorm2d(2)), r"InstanceNorm2d"),
        (nn.ModuleDict({"att": nn.MultiheadAttention(4, 2)}), r"'att' \(MultiheadAttention\).*attention"),
        (nn.Sequential(nn.Conv2d(2, 2, 3, stride=2, padding=1)), r"'0' \(Conv2d\).*stride"),
        (nn.Sequential(nn.Conv2d(2, 2, 3, padding=0)), r"'0' \(Conv2d\).*not 'same'"),
        (nn.Sequential(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect")), r"padding_mode='reflect'"),
        (nn.Sequential(nn.ConvTranspose2d(2, 2, 3, padding=1)), r"transposed"),
        (nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), Unknown()), r"'1' \(Unknown\).*unknown layer"),
        (nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.Conv3d(2, 2, 3, padding=1)), r"'1'.*3 spatial axes"),
    ],
)
def test_non_local_layers_are_refused_by_name(net, match):
    with pytest.raises(NonLocalModuleError, match=match):
        receptive_halo(net)
    with pytest.raises(NonLocalModuleError, match=match):
        TiledModule(net, tile=2)


def test_training_mode_layers_refused_at_call_time():
    x = torch.randn(2, 2, 6, 6)
    bn = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2))
    tiled = TiledModule(bn, tile=3)  # fine to build: in eval mode batch norm is pointwise
    with pytest.raises(NonLocalModuleError, match=r"'1' \(BatchNorm2d\).*training mode"):
        tiled(x)
    bn.eval()
    tiled(x)
    drop = TiledModule(nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.Dropout(0.5)), tile=3)
    with pytest.raises(NonLocalModuleError, match=r"'1' \(Dropout.*random mask"):
        drop(x)
    # an explicit halo vouches for unknown layers, not for known non-local ones
    TiledModule(nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), Unknown()), tile=3, halo=(1, 1))(x)
    with pytest.raises(NonLocalModuleError, match="pooling"):
        TiledModule(nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.AvgPool2d(1)), tile=3, halo=(1, 1))(x)


def test_bad_tiles_and_shape_changing_modules():
    net = plain_stack_2d()
    for bad in (0, -1, True, (2, 0), (2.5, 2), "4"):
        with pytest.raises(ValueError, match="tile"):
            TiledModule(net, tile=bad)
    x = torch.randn(1, 2, 6, 6, dtype=D)
    with pytest.raises(ValueError, match=r"tile \(2, 2, 2\) has 3 entries for 2 spatial axes"):
        tiled_forward(net, x, (2, 2, 2))
    with pytest.raises(ValueError, match=r"halo \(1, 1, 1\) has 3 entries"):
        tiled_forward(net, x, 2, halo=(1, 1, 1))
    with pytest.raises(ValueError, match=r"\(N, C, \*spatial\)"):
        tiled_forward(net, torch.randn(2, 6, dtype=D), 2)

    class Crop(nn.Module):
        def receptive_halo(self):
            return (0, 0)

        def forward(self, t):
            return t[..., 1:]

    with pytest.raises(NonLocalModuleError, match="keeps the batch and spatial shape"):
        tiled_forward(Crop(), x, 3)
