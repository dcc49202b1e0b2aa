"""Tiled CNN evaluation wired into the networks: ``ConvStack(tile=...)``, ``ResidualCNN(tile=...)``
and ``model.regularizer.tile``.  Float64, small volumes; tiles cut every convolved axis."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import grads_of_step, make_sense_problem, max_rel_error, model_config, rel_error
from hydra.utils import instantiate

from melrecon.models import ConvStack, ProximalDC, ResidualCNN, ReversibleUnrolledNet, UnrolledNet

D = torch.float64
SHAPE = (5, 7, 6)  # slab (X, Y, Z): odd sizes, and a tile of 3 x 4 x 2 cuts every axis unevenly
TILE = (3, 4, 2)


def modl(tile, memory: str) -> UnrolledNet:
    torch.manual_seed(0)
    reg = ResidualCNN(conv_dim=3, width=4, depth=3, lipschitz=0.9, tile=tile)
    return UnrolledNet(reg, ProximalDC(lam_init=0.5), 3, True, memory, anchor_every=None).double()


def rev(tile, memory: str, share: bool = True) -> ReversibleUnrolledNet:
    torch.manual_seed(0)
    r = ConvStack(4, 3, width=4, depth=3, conv_dim=3, out_scale=0.1, tile=tile)
    q = ConvStack(3, 2, width=4, depth=3, conv_dim=3, out_scale=0.1, tile=tile)
    return ReversibleUnrolledNet(r, q, ProximalDC(lam_init=0.5), 3, share, memory).double()


def step(net, prob):
    grads_of_step(net, prob)  # the first call starts the norm estimates (one step in both nets)
    return grads_of_step(net, prob)


def test_tile_is_a_setting_not_state():
    """Same parameters, same state-dict keys; the tile can be set after construction."""
    plain, tiled = ResidualCNN(3, 4, 3, tile=None), ResidualCNN(3, 4, 3, tile=TILE)
    assert list(plain.state_dict()) == list(tiled.state_dict())
    tiled.load_state_dict(plain.state_dict())
    assert tiled.cnn.tile == TILE and tiled.cnn.halo == (3, 3, 3)
    tiled.cnn.tile = [None, 4, 4]  # Hydra gives lists
    assert tiled.cnn.tile == (None, 4, 4)
    assert "tile=(None, 4, 4)" in repr(tiled)


@pytest.mark.parametrize("bad, match", [((4, 4), "one entry per convolved axis"), ((4, 0, 4), "tile must be"),
                                        ("444", "tile must be")])  # fmt: skip
def test_bad_tile_is_refused_naming_the_option(bad, match):
    with pytest.raises(ValueError, match=match):
        ResidualCNN(3, 4, 3, tile=bad)


@pytest.mark.parametrize("memory", ["standard", "checkpoint", "mel"])
@pytest.mark.parametrize("family", ["modl", "rev"])
def test_tiled_equals_untiled_standard(family, memory):
    """MoDL (shared ResidualCNN, spectral norm frozen per step, fixed-point inverse in the MEL
    backward) and reversible unrolls (R and Q tiled in the forward pass and in the fused
    inverse-and-backward of MEL): the tiled network's output and gradients (input and
    parameters) equal untiled standard backprop."""
    build, seed = {"modl": (modl, 3), "rev": (rev, 4)}[family]
    prob = make_sense_problem("slab", SHAPE, coils=2, dtype=torch.complex128, seed=seed)
    ref, net = build(None, "standard"), build(TILE, memory)
    g_ref, y_ref = step(ref, prob)
    g, y = step(net, prob)
    assert rel_error([y], [y_ref]) < 1e-10
    assert max_rel_error(g, g_ref) < 1e-9
    if family == "modl" and memory == "mel":
        stats = net.log_stats()
        assert stats["mel/fallbacks"] == 0 and stats["mel/inv_iters"] > 0


def test_fixed_point_inverse_through_tiled_residual_cnn_matches_untiled():
    torch.manual_seed(5)
    plain = ResidualCNN(3, 4, 3, lipschitz=0.9).double()
    tiled = copy.deepcopy(plain)
    tiled.cnn.tile = TILE
    y = torch.randn(1, *SHAPE, dtype=torch.complex128)
    with torch.no_grad():
        plain(y)  # start the norm estimate for this volume; the loaded copy keeps the same scale
        tiled.load_state_dict(plain.state_dict())
        inv_plain, inv_tiled = plain.inverse(y), tiled.inverse(y)
        assert inv_plain.converged and inv_tiled.converged and inv_plain.iterations == inv_tiled.iterations
        assert rel_error([inv_tiled.x], [inv_plain.x]) < 1e-11
        assert rel_error([tiled(inv_tiled.x)], [y]) < 1e-11


def test_2d_stack_tiles_its_two_axes():
    """conv_dim=2 (slice by slice): the tile has two entries, over the last two axes."""
    torch.manual_seed(6)
    plain = ResidualCNN(2, 4, 3, lipschitz=None).double()
    tiled = copy.deepcopy(plain)
    tiled.cnn.tile = (3, 4)
    x = torch.randn(2, 3, 7, 9, dtype=torch.complex128, requires_grad=True)
    y0, y1 = plain(x), tiled(x)
    g0 = torch.autograd.grad(y0.abs().pow(2).sum(), [x, *plain.parameters()])
    g1 = torch.autograd.grad(y1.abs().pow(2).sum(), [x, *tiled.parameters()])
    assert rel_error([y1.detach()], [y0.detach()]) < 1e-12 and max_rel_error(g1, g0) < 1e-10


@pytest.mark.parametrize("family", ["modl3d_slab", "rev3d_slab"])
def test_config_tile_reaches_every_cnn(family):
    cfg = model_config(family)
    cfg.num_unrolls, cfg.regularizer.width = 2, 4
    cfg.regularizer.tile = [8, None, 16]
    net = instantiate(cfg)
    stacks = [m for m in net.modules() if isinstance(m, ConvStack)]
    assert stacks and all(s.tile == (8, None, 16) for s in stacks)


@pytest.mark.parametrize("family", ["modl", "rev"])
def test_dc_chunks_and_tiles_together_equal_the_plain_network(family):
    """Whole-volume settings (tiled CNNs, SENSE in chunks of 2 readout positions) under MEL:
    the same output and gradients as the plain network with standard backprop."""
    prob = make_sense_problem("slab", SHAPE, coils=2, dtype=torch.complex128, seed=7)
    build = modl if family == "modl" else rev
    ref, net = build(None, "standard"), build(TILE, "mel")
    net.dc_chunk = 2
    g_ref, y_ref = step(ref, prob)
    g, y = step(net, prob)
    assert rel_error([y], [y_ref]) < 1e-10 and max_rel_error(g, g_ref) < 1e-9


def test_bad_dc_chunk_is_refused_naming_the_option():
    with pytest.raises(ValueError, match="model.dc_chunk"):
        UnrolledNet(ResidualCNN(3, 4, 3), ProximalDC(), 2, dc_chunk=0)
