"""melrecon.mel engine on small MRI-free layers: contract, modes, anchors, freezing, fallback."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from helpers import max_rel_error
from melrecon.mel import (
    FusedResult,
    InvertibleChain,
    InvertibleLayer,
    InvertResult,
    SequentialInvertible,
    invert_residual_map,
    relative_error,
)


D = torch.float64


class Contractive(InvertibleLayer):
    """y = x + s * tanh(x W) (+ optional dropout / batch norm inside), Lip(residual) < 1."""

    def __init__(self, n: int = 6, s: float = 0.4, dropout: float = 0.0, bn: bool = False, max_iter: int = 300):
        super().__init__()
        self.w = nn.Parameter(torch.randn(n, n, dtype=D) / math.sqrt(n) * 0.8)
        self.s = s
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()
        self.bn = nn.BatchNorm1d(n, dtype=D) if bn else nn.Identity()
        self.max_iter = max_iter
        self.inverse_calls = 0

    def residual(self, x):
        return self.s * torch.tanh(self.drop(self.bn(x)) @ self.w)

    def forward(self, x, data):
        return x + self.residual(x)

    def inverse(self, y, data):
        self.inverse_calls += 1
        r = invert_residual_map(self.residual, y, 1e-13, self.max_iter)
        return InvertResult(r.x, r.residual, r.iterations, r.converged)


class Coupling(InvertibleLayer):
    """Two-stream additive coupling: y1 = x1 + F(x2), y2 = x2 + G(y1)."""

    def __init__(self, n: int = 4, fused: bool = False):
        super().__init__()
        self.f = nn.Linear(n, n, dtype=D)
        self.g = nn.Linear(n, n, dtype=D)
        self.fused_calls = 0
        if fused:
            self.inverse_and_backward = self._inverse_and_backward

    def forward(self, x, data):
        x1, x2 = x
        y1 = x1 + torch.tanh(self.f(x2))
        return y1, x2 + torch.tanh(self.g(y1))

    def inverse(self, y, data):
        y1, y2 = y
        x2 = y2 - torch.tanh(self.g(y1))
        return InvertResult((y1 - torch.tanh(self.f(x2)), x2))

    def _inverse_and_backward(self, y, grad_y, data):
        # RevNet backward: rebuild each half's graph while inverting
        self.fused_calls += 1
        y1, y2 = (t.detach() for t in y)
        gy1, gy2 = grad_y
        y1r = y1.clone().requires_grad_()
        gout = torch.tanh(self.g(y1r))
        x2 = (y2 - gout).detach()
        pg = list(self.g.parameters())
        d = torch.autograd.grad(gout, [y1r, *pg], gy2)
        gy1_total = gy1 + d[0]
        x2r = x2.clone().requires_grad_()
        fout = torch.tanh(self.f(x2r))
        x1 = (y1 - fout).detach()
        pf = list(self.f.parameters())
        e = torch.autograd.grad(fout, [x2r, *pf], gy1_total)
        gx2 = gy2 + e[0]
        pairs = list(zip(pg, d[1:])) + list(zip(pf, e[1:]))
        return FusedResult((x1, x2), (gy1_total, gx2), pairs)


def grads_of(chain, x, loss_fn=lambda y: (y**2).sum()):
    chain.zero_grad(set_to_none=True)
    x = tuple(t.detach().clone().requires_grad_() for t in x) if isinstance(x, tuple) else x.detach().clone().requires_grad_()
    y = chain(x, None)
    ys = y if isinstance(y, tuple) else (y,)
    sum(loss_fn(t) for t in ys).backward()
    xs = x if isinstance(x, tuple) else (x,)
    return [t.grad.clone() for t in xs] + [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in chain.parameters()], y


def make_chain(mode, anchor_every=None, shared=False, n=6, seed=0, **layer_kw):
    torch.manual_seed(seed)
    if shared:
        layer = Contractive(**layer_kw)
        layers = [layer] * n
    else:
        layers = [Contractive(**layer_kw) for _ in range(n)]
    return InvertibleChain(layers, memory=mode, anchor_every=anchor_every)


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("mode,anchor", [("checkpoint", None), ("mel", None), ("mel", 2), ("mel", "auto")])
def test_modes_match_standard(mode, anchor, shared):
    x = torch.randn(5, 6, dtype=D, generator=torch.Generator().manual_seed(3))
    ref, yref = grads_of(make_chain("standard", shared=shared), x)
    chain = make_chain(mode, anchor, shared=shared)
    g, y = grads_of(chain, x)
    assert torch.equal(y, yref)  # same forward in every mode
    assert max_rel_error(g, ref) < 1e-10
    assert chain.stats.fallbacks == 0
    if mode == "mel" and anchor is None:
        assert chain.stats.anchors == 0 and chain.stats.inv_iters > 0


@pytest.mark.parametrize("fused", [False, True])
def test_tuple_state_and_fused_hook(fused):
    torch.manual_seed(0)
    layers = [Coupling(fused=fused) for _ in range(5)]
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(3, 4, dtype=D, generator=gen), torch.randn(3, 4, dtype=D, generator=gen))
    ref, yref = grads_of(InvertibleChain(layers, memory="standard"), x)
    for ae in (None, 2):
        chain = InvertibleChain(layers, memory="mel", anchor_every=ae)
        g, y = grads_of(chain, x)
        assert isinstance(y, tuple) and all(torch.equal(a, b) for a, b in zip(y, yref))
        assert max_rel_error(g, ref) < 1e-12
    if fused:
        assert layers[3].fused_calls > 0  # the engine used the hook


def test_sequential_invertible_roundtrip():
    torch.manual_seed(0)
    seq = SequentialInvertible(Contractive(), Contractive())
    x = torch.randn(4, 6, dtype=D)
    with torch.no_grad():
        res = seq.inverse(seq(x, None), None)
    assert res.converged and res.iterations > 0
    assert relative_error(res.x, x) < 1e-11


def test_anderson_converges_faster():
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(30, 30, dtype=D))
    w = q @ torch.diag(torch.linspace(-0.9, 0.9, 30, dtype=D)) @ q.T
    r = lambda x: x @ w + 0.05 * torch.tanh(x)  # noqa: E731  # Lip <= 0.95, slow plain iteration
    y = torch.randn(8, 30, dtype=D)
    plain = invert_residual_map(r, y, 1e-12, 2000)
    acc = invert_residual_map(r, y, 1e-12, 2000, anderson=5)
    assert plain.converged and acc.converged
    assert acc.iterations < plain.iterations / 2
    assert relative_error(acc.x + r(acc.x), y) < 1e-11


def test_nonconvergent_inverse_falls_back_with_one_warning():
    x = torch.randn(5, 6, dtype=D, generator=torch.Generator().manual_seed(3))
    ref, _ = grads_of(make_chain("standard"), x)
    chain = make_chain("mel", None, max_iter=2)  # the fixed point cannot reach 1e-13 in 2 steps
    with pytest.warns(RuntimeWarning, match="did not converge"):
        g, _ = grads_of(chain, x)
    assert chain.stats.fallbacks >= 1
    assert max_rel_error(g, ref) < 1e-12  # recomputed from the anchor: exact
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per chain: the second step is silent
        g2, _ = grads_of(chain, x)
    assert max_rel_error(g2, ref) < 1e-12


class Noisy(Contractive):
    """An inverse that is off by 1e-3: drift must be caught, never returned silently."""

    def inverse(self, y, data):
        r = super().inverse(y, data)
        return InvertResult(r.x * (1 + 1e-3), r.residual, r.iterations, True)


def test_drift_above_tolerance_is_recomputed():
    torch.manual_seed(0)
    layers = [Noisy() for _ in range(6)]
    x = torch.randn(5, 6, dtype=D, generator=torch.Generator().manual_seed(3))
    ref, _ = grads_of(InvertibleChain(layers, memory="standard"), x)
    chain = InvertibleChain(layers, memory="mel", anchor_every=3, drift_tol=1e-5)
    with pytest.warns(RuntimeWarning, match="drift"):
        g, _ = grads_of(chain, x)
    assert chain.stats.drift > 1e-5 and chain.stats.fallbacks == 2
    assert max_rel_error(g, ref) < 1e-12


def test_auto_controller_narrows_and_widens():
    torch.manual_seed(0)
    x = torch.randn(5, 6, dtype=D, generator=torch.Generator().manual_seed(3))
    noisy = InvertibleChain([Noisy() for _ in range(12)], memory="mel", anchor_every="auto", auto_start=4)
    grads_of(noisy, x)
    assert noisy.anchor_spacing < 4  # drift 1e-3 per layer: narrow
    for _ in range(3):
        grads_of(noisy, x)
    # cannot be met: anchors at every layer (checkpoint-like); only the top segment is still
    # inverted to keep measuring, and its drift is too large, so it alone is recomputed
    assert noisy.anchor_spacing == 1 and noisy.stats.anchors == 11 and noisy.stats.fallbacks == 1
    good = make_chain("mel", "auto", n=12)
    for _ in range(3):
        grads_of(good, x)
    assert good.anchor_spacing == 12 and good.stats.anchors == 0  # drift ~1e-13: pure MEL


def test_dropout_and_batchnorm_frozen_for_the_step():
    x = torch.randn(16, 6, dtype=D, generator=torch.Generator().manual_seed(3))
    out = {}
    for mode in ("standard", "checkpoint", "mel"):
        chain = make_chain(mode, None, shared=True, dropout=0.3, bn=True, n=4)
        torch.manual_seed(123)
        g, y = grads_of(chain, x)
        bn = chain.layers[0].bn
        out[mode] = (g, y, bn.running_mean.clone(), int(bn.num_batches_tracked))
    g0, y0, rm0, nb0 = out["standard"]
    assert nb0 == 4  # one update per forward call of the shared layer
    for mode in ("checkpoint", "mel"):
        g, y, rm, nb = out[mode]
        assert torch.equal(y, y0)
        assert max_rel_error(g, g0) < 1e-10
        assert nb == nb0 and torch.equal(rm, rm0)  # recompute/inversion did not touch the statistics


def test_torch_spectral_norm_advances_once_per_step():
    class SNLayer(Contractive):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.utils.parametrizations.spectral_norm(nn.Linear(6, 6, dtype=D))

        def residual(self, x):
            return 0.5 * torch.tanh(self.lin(x))

    torch.manual_seed(0)
    layer = SNLayer()
    chain = InvertibleChain([layer] * 5, memory="mel", anchor_every=None)
    u = layer.lin.parametrizations.weight[0]._u
    before = u.clone()
    seen = []
    orig = layer.forward
    layer.forward = lambda x, data: (seen.append(u.clone()), orig(x, data))[1]
    x = torch.randn(5, 6, dtype=D)
    grads_of(chain, x)
    assert not torch.equal(before, seen[0])  # advanced at the start of the step ...
    assert all(torch.equal(s, seen[0]) for s in seen)  # ... then frozen in forward and recompute
    assert len(seen) > 5  # the recompute happened
    del layer.forward
    # and the MEL gradient equals standard for the frozen function
    torch.manual_seed(0)
    l2 = SNLayer()
    g_ref, _ = grads_of(InvertibleChain([l2] * 5, memory="standard"), x)
    torch.manual_seed(0)
    l3 = SNLayer()
    g_mel, _ = grads_of(InvertibleChain([l3] * 5, memory="mel", anchor_every=None), x)
    assert max_rel_error(g_mel, g_ref) < 1e-10


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(memory="fast"), "memory"),
        (dict(anchor_every=0), "anchor_every"),
        (dict(anchor_every="often"), "anchor_every"),
        (dict(anchor_every=2.5), "anchor_every"),
        (dict(anchor_every=True), "anchor_every"),
        (dict(drift_tol=0.0), "drift_tol"),
        (dict(auto_start=0), "auto_start"),
    ],
)
def test_invalid_chain_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        InvertibleChain([Contractive()], **kwargs)


def test_chain_rejects_non_invertible_layer_and_grad_data():
    with pytest.raises(ValueError, match="inverse"):
        InvertibleChain([nn.Linear(2, 2)], memory="mel")
    chain = InvertibleChain([Contractive()], memory="mel")
    x = torch.randn(2, 6, dtype=D, requires_grad=True)
    with pytest.raises(ValueError, match="data"):
        chain(x, {"b": torch.ones(2, requires_grad=True)})


def _contractive_chain(memory, n_layers=4, **kw):
    torch.manual_seed(0)
    return InvertibleChain([Contractive() for _ in range(n_layers)], memory=memory, **kw)


@pytest.mark.parametrize("memory", ["standard", "checkpoint", "mel"])
def test_retained_graph_backpropagates_twice(memory):
    chain = _contractive_chain(memory, anchor_every=None)
    x = torch.randn(3, 6, dtype=D, requires_grad=True)
    loss = chain(x).pow(2).sum()
    (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
    loss.backward()
    torch.testing.assert_close(x.grad, g1, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("memory", ["checkpoint", "mel"])
def test_double_backward_is_refused_not_silently_wrong(memory):
    chain = _contractive_chain(memory, anchor_every=None)
    x = torch.randn(3, 6, dtype=D, requires_grad=True)
    (g,) = torch.autograd.grad(chain(x).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad|differentiable"):
        (g.pow(2).sum() + x.sum()).backward()


@pytest.mark.parametrize("memory", ["checkpoint", "mel"])
def test_requires_grad_toggled_between_forward_and_backward(memory):
    ref, chain = _contractive_chain("standard"), _contractive_chain(memory, anchor_every=None)
    x = torch.randn(3, 6, dtype=D, requires_grad=True)
    grads = []
    for net in (ref, chain):
        out = net(x).pow(2).sum()
        net.layers[0].w.requires_grad_(False)  # e.g. a callback freezing a layer mid-step
        (gx,) = torch.autograd.grad(out, x)
        grads.append(gx)
        net.layers[0].w.requires_grad_(True)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-9, atol=1e-12)


class FlagRecorder(InvertibleLayer):
    """Identity-plus-shift layer that records the cuDNN flags each call runs under."""

    def __init__(self) -> None:
        super().__init__()
        self.b = nn.Parameter(torch.zeros(()))
        self.seen: list[tuple[bool, bool]] = []

    def _record(self) -> None:
        self.seen.append((torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic))

    def forward(self, x, data):
        self._record()
        return x + self.b

    def inverse(self, y, data):
        self._record()
        return InvertResult(y - self.b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: cuDNN algorithm selection")
@pytest.mark.parametrize("memory", ["checkpoint", "mel"])
def test_forward_and_recompute_pin_cudnn_algorithms_on_cuda(memory):
    """With cudnn.benchmark on, a checkpoint/mel step runs its forward pass and its recompute
    with benchmark off and deterministic kernels (the same algorithm both times), and gives
    the user's flags back afterwards."""
    layers = [FlagRecorder().cuda() for _ in range(4)]
    chain = InvertibleChain(layers, memory=memory, anchor_every=math.inf)
    old = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = True, False
    try:
        x = torch.randn(3, device="cuda", requires_grad=True)
        chain(x, None).sum().backward()
        assert (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic) == (True, False)
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = old
    seen = [f for layer in layers for f in layer.seen]
    assert len(seen) > len(layers) and all(f == (False, True) for f in seen)

