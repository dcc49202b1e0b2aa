"""Regularizers (spectral bound, fixed-point inverse), DC layers (inverse, implicit backward),
UnrolledNet construction and option validation."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from helpers import make_sense_problem, model_config
from melrecon.models import BoundedConv, GradientStepDC, ProximalDC, ResidualCNN, SenseData, UnrolledNet
from melrecon.physics.cg import CGLog


def small_problem(dtype=torch.complex128, seed=0):
    """A tiny slab problem (image (1, 2, 6, 8), 3 coils) and its DC context."""
    p = make_sense_problem("slab", (2, 6, 8), coils=3, dtype=dtype, seed=seed)
    return p, SenseData.from_kspace(p.op, p.kspace)


def conv_operator_norm(conv: BoundedConv, spatial) -> float:
    """Exact operator norm of the scaled conv's linear part at this input size (dense matrix)."""
    w = conv.effective_weight().detach()
    f = F.conv3d if conv.conv_dim == 3 else F.conv2d
    n_in = w.shape[1] * int(torch.tensor(spatial).prod())
    basis = torch.eye(n_in, dtype=w.dtype).reshape(n_in, w.shape[1], *spatial)
    mat = f(basis, w, padding=conv.padding).reshape(n_in, -1)
    return float(torch.linalg.matrix_norm(mat, ord=2))


def trained_looking(reg: ResidualCNN, gain: float = 20.0) -> ResidualCNN:
    """Inflate the weights so that every conv hits its bound (a network trained against it)."""
    with torch.no_grad():
        for c in reg.cnn.convs:
            c.weight.mul_(gain)
            c.u = torch.zeros(0, dtype=c.weight.dtype)  # re-estimate on next use
    return reg


@pytest.mark.parametrize("conv_dim,shape", [(3, (1, 4, 5, 6)), (2, (2, 3, 8, 7))])
def test_spectral_bound_keeps_lipschitz_below_c(conv_dim, shape):
    torch.manual_seed(0)
    c = 0.9
    reg = trained_looking(ResidualCNN(conv_dim, width=4, depth=4, lipschitz=c))
    x = torch.randn(shape, dtype=torch.complex64)
    reg(x)  # initialises the power-iteration estimates at this input size
    spatial = shape[1:] if conv_dim == 3 else shape[2:]
    norms = [conv_operator_norm(cv, spatial) for cv in reg.cnn.convs]
    bound = c ** (1 / 4)
    # the estimate (Lanczos, then power iteration) converges from below: allow its error
    assert all(n <= bound * (1 + 1e-4) for n in norms), norms
    assert all(n > 0.99 * bound for n in norms)  # inflated weights: the bound is active
    prod = torch.tensor(norms).prod().item()
    assert prod <= c * (1 + 4e-4)
    # Jacobian power iteration of R at random points (R is piecewise linear): below c
    for seed in range(2):
        x0 = torch.randn(shape, dtype=torch.complex64, generator=torch.Generator().manual_seed(seed))
        v = torch.randn(shape, dtype=torch.complex64)
        for _ in range(30):
            v = v / v.norm()
            _, jv = torch.func.jvp(reg.residual, (x0,), (v,))
            _, vjp = torch.func.vjp(reg.residual, x0)
            (v,) = vjp(jv)
        lip = float(jv.detach().norm())
        assert lip < c


def test_fixed_point_inverse_reaches_1e_6_single_precision():
    torch.manual_seed(0)
    reg = trained_looking(ResidualCNN(3, width=8, depth=5, lipschitz=0.9))
    x = torch.randn(2, 4, 8, 8, dtype=torch.complex64)
    with torch.no_grad():
        y = reg(x)
        res = reg.inverse(y)
        plain_iters = res.iterations
        assert res.converged and res.residual <= 1e-6
        assert (res.x - x).norm() / x.norm() < 1e-5
        reg.anderson = 5
        acc = reg.inverse(y)
    assert acc.converged and acc.residual <= 1e-6 and acc.iterations <= plain_iters


def test_regularizer_2d_is_slice_by_slice_and_3d_is_not():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 6, 6, dtype=torch.complex64)
    dx = torch.zeros_like(x)
    dx[:, 1, 3, 3] = 1.0
    for conv_dim, other_slices_change in ((2, False), (3, True)):
        reg = ResidualCNN(conv_dim, width=4, depth=3)
        with torch.no_grad():
            d = reg(x + dx) - reg(x)
        changed = d[:, [0, 2]].abs().max() > 0
        assert bool(changed) == other_slices_change


def test_proximal_dc_solve_inverse_and_implicit_backward():
    prob, data = small_problem()
    dc = ProximalDC(lam_init=0.3).double()
    assert abs(float(dc.lam.detach()) - 0.3) < 1e-7 and abs(float(ProximalDC(0.3, positivity="exp").lam.detach()) - 0.3) < 1e-7
    z = torch.randn(data.aty.shape, dtype=torch.complex128)
    y = dc(z, data)
    lam = float(dc.lam)
    resid = data.op.normal(y) + lam * y - (data.aty + lam * z)
    assert resid.norm() / (data.aty + lam * z).norm() < 1e-12
    assert (dc.inverse(y, data).x - z).norm() / z.norm() < 1e-10
    # implicit backward (second CG solve) against finite differences, for z and raw lam
    zr = z.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda zz, rl: _prox(dc, zz, rl, data), (zr, dc.raw_lam.detach().clone().requires_grad_()), eps=1e-6, atol=1e-6)


def _prox(dc, z, raw, data):
    from melrecon.models.dc import _ProxSolve

    return _ProxSolve.apply(z, F.softplus(raw), data.op, data.aty, 1e-13, 100, CGLog())


def test_gradient_step_dc_inverse():
    prob, data = small_problem()
    dc = GradientStepDC(step_init=0.7).double()
    x = torch.randn(data.aty.shape, dtype=torch.complex128)
    y = dc(x, data)
    res = dc.inverse(y, data)
    assert res.converged and (res.x - x).norm() / x.norm() < 1e-10


def test_gradient_step_net_logs_its_step_not_a_lam():
    prob, _ = small_problem(torch.complex64)
    net = UnrolledNet(ResidualCNN(3, width=4, depth=3), GradientStepDC(step_init=0.4), 3, False, "mel", None)
    x0 = prob.x0.clone().requires_grad_()
    net(x0, *prob[1:4]).abs().sum().backward()
    s = net.log_stats()
    assert s["dc/step"] == pytest.approx(0.4) and s["dc/step_min"] == pytest.approx(0.4)
    assert "dc/lam" not in s and "dc/cg_iters" not in s and s["mel/inv_iters"] > 0


@pytest.mark.parametrize("conv_dim,shape", [(3, (2, 3, 4, 5)), (2, (2, 3, 4, 5)), (2, (2, 4, 5)), (3, (1, 2, 3, 4, 5))])
def test_conv_layout_round_trip(conv_dim, shape):
    from melrecon.models import ConvLayout

    layout = ConvLayout(conv_dim)
    x = torch.randn(shape, dtype=torch.complex64)
    t = layout.to_channels(x)
    assert t.shape == layout.latent_shape(shape, 2) and torch.equal(t[:, 0].reshape(shape), x.real)
    assert torch.equal(layout.from_channels(t, shape), x)
    with pytest.raises(ValueError, match="conv_dim"):  # one spatial axis too few
        layout.check(torch.zeros((2,) + (4,) * (conv_dim - 1), dtype=torch.complex64))
    with pytest.raises(ValueError, match="complex"):
        layout.check(x.real)


def test_shared_and_unshared_weights():
    reg, dc = ResidualCNN(3, width=4, depth=3), ProximalDC(0.05)
    shared = UnrolledNet(reg, dc, num_unrolls=3, share_weights=True, memory="checkpoint")
    assert len({id(p) for p in shared.parameters()}) == len(list(reg.parameters())) + 1
    torch.manual_seed(0)
    sep = UnrolledNet(ResidualCNN(3, width=4, depth=3), ProximalDC(0.05), num_unrolls=3, share_weights=False, memory="checkpoint")
    w = [r.cnn.convs[0].weight for r in sep.regularizers]
    assert len(w) == 3 and not torch.equal(w[0], w[1]) and not torch.equal(w[1], w[2])  # independent init
    assert all(abs(float(d.lam) - 0.05) < 1e-7 for d in sep.dcs)


def test_log_stats_keys():
    prob, data = small_problem(torch.complex64)
    net = UnrolledNet(ResidualCNN(3, width=4, depth=3), ProximalDC(0.5), 3, True, "mel", "auto")
    x0 = data.aty.clone().requires_grad_()
    net(x0, *prob[1:4]).abs().sum().backward()
    s = net.log_stats()
    for k in ("dc/lam", "mel/drift", "mel/anchors", "mel/inv_iters", "mel/fallbacks", "mel/anchor_every"):
        assert isinstance(s[k], float)
    assert abs(s["dc/lam"] - 0.5) < 1e-6 and s["mel/inv_iters"] > 0


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda: UnrolledNet(ResidualCNN(3, 4, 3, lipschitz=1.0), ProximalDC(), memory="mel"), "lipschitz"),
        (lambda: UnrolledNet(ResidualCNN(3, 4, 3, lipschitz=None), ProximalDC(), memory="mel"), "lipschitz"),
        (lambda: ProximalDC(lam_init=0.0), "lam_init"),
        (lambda: ProximalDC(lam_init=-0.1), "lam_init"),
        (lambda: UnrolledNet(ResidualCNN(3, 4, 3), ProximalDC(), num_unrolls=0), "num_unrolls"),
        (lambda: UnrolledNet(ResidualCNN(3, 4, 3), ProximalDC(), memory="lowmem"), "memory"),
        (lambda: UnrolledNet(ResidualCNN(3, 4, 3), ProximalDC(), anchor_every=-2), "anchor_every"),
        (lambda: UnrolledNet(ResidualCNN(3, 4, 3), ProximalDC(), drift_tol=-1.0), "drift_tol"),
        (lambda: ResidualCNN(3, 4, 3, lipschitz=-0.5), "lipschitz"),
        (lambda: ResidualCNN(4, 4, 3), "conv_dim"),
        (lambda: GradientStepDC(step_init=1.5), "step_init"),
    ],
)
def test_invalid_settings_name_the_option(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_c_above_one_allowed_without_mel():
    # a bound >= 1 is a legitimate (non-invertible) regularizer for standard/checkpoint
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        UnrolledNet(ResidualCNN(3, 4, 3, lipschitz=2.0), ProximalDC(), memory="checkpoint")


def test_bad_input_shapes_raise():
    prob, data = small_problem(torch.complex64)
    net = UnrolledNet(ResidualCNN(3, width=4, depth=3), ProximalDC(0.5), 2, True, "standard")
    with pytest.raises(ValueError, match="x0"):
        net(data.aty.real, *prob[1:4])
    with pytest.raises(ValueError, match="x0 shape"):
        net(data.aty[..., :-1], *prob[1:4])


@pytest.mark.parametrize("name,kind", [("modl3d_slab", "slab"), ("modl2d_slice", "slab"), ("modl_cine", "cine")])
def test_model_configs_instantiate_and_run(name, kind):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = model_config(name)
    for key in ("num_unrolls", "memory", "share_weights", "anchor_every", "drift_tol", "regularizer.width", "dc.lam_init"):
        assert OmegaConf.select(cfg, key) is not None, key
    assert (cfg.num_unrolls, cfg.regularizer.width, cfg.regularizer.depth, cfg.dc.lam_init) == (5, 64, 5, 0.05)
    cfg.merge_with_dotlist(["regularizer.width=2", "regularizer.depth=2", "num_unrolls=2", "dc.lam_init=0.5"])
    net = instantiate(cfg)
    assert isinstance(net, UnrolledNet) and net.memory == "mel" and abs(float(net.dcs[0].lam.detach()) - 0.5) < 1e-6
    prob = make_sense_problem(kind, (3, 6, 5), coils=2)
    x0, k, maps, mask = prob.x0.requires_grad_(), prob.kspace, prob.maps, prob.mask
    out = net(x0, k, maps, mask)
    assert out.shape == x0.shape and out.dtype == x0.dtype
    out.abs().sum().backward()
    assert x0.grad is not None and all(p.grad is not None for p in net.parameters())


def test_bounded_conv_estimate_advances_once_per_training_step():
    prob, data = small_problem(torch.complex64)
    torch.manual_seed(0)
    net = UnrolledNet(ResidualCNN(3, width=4, depth=3), ProximalDC(0.5), 4, True, "mel", None)
    conv = net.regularizers[0].cnn.convs[1]
    x0 = data.aty.clone().requires_grad_()
    net(x0, *prob[1:4]).abs().sum().backward()  # initialises u
    u0 = conv.u.clone()
    calls = []
    orig = conv.power_iteration
    conv.power_iteration = lambda iters: (calls.append(iters), orig(iters))[1]
    net(x0, *prob[1:4]).abs().sum().backward()  # 4 unrolls + recompute
    assert calls == [1] and not torch.equal(conv.u, u0)  # exactly one step-level update
    net.eval()
    with torch.no_grad():
        net(x0, *prob[1:4])
    assert calls == [1]  # no update in eval mode


def test_loaded_network_computes_what_it_computed_when_saved():
    """The spectral-norm scale travels with the weights, so a checkpoint reproduces its outputs
    bit for bit (validation after reload equals validation during training)."""
    torch.manual_seed(0)
    reg = ResidualCNN(3, width=4, depth=3, lipschitz=0.9)
    x = torch.randn(1, 4, 10, 12, dtype=torch.complex64)
    reg(x)
    with torch.no_grad():  # a training step: weights move after the estimate was refreshed
        for conv in reg.cnn.convs:
            conv.refresh_()
            conv.weight.mul_(1.3)
    expected = reg(x)
    fresh = ResidualCNN(3, width=4, depth=3, lipschitz=0.9)
    fresh.load_state_dict(reg.state_dict())
    assert torch.equal(fresh(x), expected)
    # an estimate is only kept when one was saved: a never-run network re-estimates on first use
    blank = ResidualCNN(3, width=4, depth=3, lipschitz=0.9)
    blank.load_state_dict(ResidualCNN(3, width=4, depth=3, lipschitz=0.9).state_dict())
    blank(x)
    assert all(float(m.sigma) > 0 for m in blank.modules() if isinstance(m, BoundedConv))


def test_unconverged_cg_is_reported_and_triggers_the_mel_fallback():
    prob, data = small_problem()
    dc = ProximalDC(lam_init=0.01, cg_max_iter=2).double()
    z = torch.randn(data.aty.shape, dtype=torch.complex128, requires_grad=True)
    with pytest.warns(UserWarning, match="cg_max_iter=2"):
        y = dc(z, data)
    y.abs().pow(2).sum().backward()
    assert data.cg.converged is False and data.cg.residual > 1e-6  # forward and backward solves logged
    assert data.cg.solves == 2 and data.cg.iterations == 4
    assert not dc.inverse(y.detach(), data).converged  # the engine recomputes instead of trusting it
    net = UnrolledNet(ResidualCNN(3, width=4, depth=3), ProximalDC(0.01, cg_max_iter=2), 2, True, "mel", None).double()
    with pytest.warns(UserWarning):
        net(data.aty, *prob[1:4]).abs().sum().backward()
    stats = net.log_stats()
    assert stats["dc/cg_converged"] == 0.0 and stats["mel/fallbacks"] >= 1


def test_proximal_dc_refuses_double_backward():
    prob, data = small_problem()
    dc = ProximalDC(lam_init=0.3).double()
    z = torch.randn(data.aty.shape, dtype=torch.complex128, requires_grad=True)
    (g,) = torch.autograd.grad(dc(z, data).abs().pow(2).sum(), z, create_graph=True)
    with pytest.raises(RuntimeError):
        (g.abs().pow(2).sum() + dc.raw_lam).backward()


def test_shared_weights_are_saved_once_and_load_into_another_depth():
    torch.manual_seed(0)
    nets = {n: UnrolledNet(ResidualCNN(3, width=4, depth=3), ProximalDC(0.3), n, True, "mel", None).double()
            for n in (2, 6)}
    assert list(nets[2].state_dict()) == list(nets[6].state_dict())  # no per-unroll copies
    prob, data = small_problem()
    nets[2](data.aty, *prob[1:4])  # estimates the spectral norms
    nets[6].load_state_dict(nets[2].state_dict())  # strict: the aliases are restored on load
    for a, b in zip(nets[2].parameters(), nets[6].parameters()):
        assert torch.equal(a, b)
    deep = nets[6].chain.layers[5].parts[0].cnn.convs[0]  # the shared CNN as the 6th unroll sees it
    assert deep is nets[6].regularizers[0].cnn.convs[0] and torch.equal(deep.sigma, nets[2].regularizers[0].cnn.convs[0].sigma)
    # separate weights keep one entry per unroll
    sep = UnrolledNet(ResidualCNN(3, width=4, depth=3), ProximalDC(0.3), 3, False, "mel", None)
    assert sum(k.endswith("raw_lam") for k in sep.state_dict()) == 3
