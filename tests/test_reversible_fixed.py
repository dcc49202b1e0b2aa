"""Fixed-point streams of the reversible network (``state_precision="fixed"``, issue 16):
bit-exact inversion at N = 100 for any damping, initial and trained; gradients bitwise equal
to standard backprop; overflow refused naming the unroll; a forced MEL fallback at N = 100
holds O(sqrt N) states (probe), not N.

Sizes are tiny (CPU): cine (T, X, Y) = (2, 8, 8), 2 coils, CNNs of width 6 and depth 3.
"""

from __future__ import annotations

import math

import pytest
import torch

from helpers import grads_of_step, make_sense_problem
from melrecon.mel import MemoryProbe
from melrecon.models import ConvStack, ReversibleUnrolledNet
from melrecon.models import reversible as rev
from melrecon.models.dc import SenseData

SMALL = dict(width=6, depth=3)
SHAPE = (2, 8, 8)


def build(n: int, gamma_decay: float = 1.0, seed: int = 1, **kw) -> ReversibleUnrolledNet:
    torch.manual_seed(seed)
    r = ConvStack(4, 2, conv_dim=3, out_scale=0.1, **SMALL)
    q = ConvStack(2, 2, conv_dim=3, out_scale=0.1, **SMALL)
    return ReversibleUnrolledNet(r, q, None, n, gamma_init=0.5, gamma_decay=gamma_decay, **kw)


def problem():
    return make_sense_problem("cine", SHAPE, coils=2)


def train(net: ReversibleUnrolledNet, prob, steps: int) -> None:
    """Adam steps under pure MEL (the training the issue measured drift after)."""
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(steps):
        grads_of_step(net, prob)
        opt.step()
    assert net.log_stats()["mel/fallbacks"] == 0


def invert_whole_chain(net: ReversibleUnrolledNet, prob) -> tuple[tuple, tuple]:
    """(stored chain input, the input recomputed by inverting all N unrolls), no grad."""
    data = SenseData.from_kspace(prob.op, prob.kspace)
    with torch.no_grad():
        state = net.to_state(prob.x0)
        y = state
        for u in net.unrolls:
            y = u(y, data)
        for u in reversed(net.unrolls):
            y = u.inverse(y, data).x
    return state, y


@pytest.mark.parametrize(
    "decay,steps",
    [(1.0, 0), (0.9, 0), (0.8, 0),
     pytest.param(1.0, 30, marks=pytest.mark.slow), pytest.param(0.9, 30, marks=pytest.mark.slow),
     pytest.param(0.8, 30, marks=pytest.mark.slow)],
)
def test_fixed_streams_bitwise_n100(decay, steps, recwarn):
    """Done-when: float32 input, N = 100, gamma_decay 1.0/0.9/0.8, initial and after 30 Adam
    steps: the recomputed chain input equals the stored one bitwise, MEL's drift is exactly 0
    (no fallback even at drift_tol = 1e-30), and MEL and checkpoint gradients (input and
    every parameter) equal standard backprop bitwise."""
    prob = problem()
    net = build(100, decay, memory="mel", drift_tol=1e-30, state_precision="fixed")
    train(net, prob, steps)
    stored, recomputed = invert_whole_chain(net, prob)
    assert stored[0].dtype == torch.complex128 and len(stored) == 3
    assert all(torch.equal(a, b) for a, b in zip(stored, recomputed))
    got, out = grads_of_step(net, prob)
    st = net.log_stats()
    assert out.dtype == torch.complex64
    assert st["mel/drift"] == 0.0 and st["mel/fallbacks"] == 0 and st["mel/anchors"] == 0
    for mode in ("standard", "checkpoint"):
        net.chain.memory = mode
        ref, out_ref = grads_of_step(net, prob)
        assert torch.equal(out, out_ref), mode
        assert len(ref) == len(got) and all(torch.equal(a, b) for a, b in zip(got, ref)), mode
    assert any(float(g.abs().max()) > 0 for g in got[1:])  # the gradients are not trivially zero


def test_fixed_streams_lie_on_their_grid_and_the_grid_follows_data_and_damping():
    """Every stream value is an integer multiple of its grid step, below the range limit;
    the grid steps are powers of two set by max|x0| and sum 1/gamma_n (damping coarsens v)."""
    prob = problem()
    data = SenseData.from_kspace(prob.op, prob.kspace)
    net = build(10, 0.8, state_precision="fixed")
    with torch.no_grad():
        y = net.to_state(prob.x0)
        for u in net.unrolls:
            y = u(y, data)
    x, v, scales = y
    for t, sc in ((torch.view_as_real(x), scales[0]), (v, scales[1])):
        m = t * sc
        assert torch.equal(m, torch.round(m)) and float(m.abs().max()) < 2.0**53
        assert math.log2(float(sc)).is_integer()
    assert float(v.abs().max()) > 0  # the latent moved (the check above is not vacuous)
    s = float(torch.view_as_real(prob.x0).abs().max())
    gammas = [float(u.gamma) for u in net.unrolls]
    sc2, s2, inv_gamma = rev.fixed_point_grid(prob.x0, gammas)
    assert torch.equal(sc2, scales) and s2 == s and inv_gamma == pytest.approx(sum(1 / g for g in gammas))
    assert 2.0**53 / float(scales[0]) >= 2 * 2.0**rev.HEADROOM_BITS_X * s  # range >= twice the bound
    assert 2.0**53 / float(scales[1]) >= 2 * 2.0**rev.HEADROOM_BITS_V * s * inv_gamma
    # 16x the data: both grids 16x coarser; 2x the damping sum: only v's grid, 2x
    sc16, _, _ = rev.fixed_point_grid(16 * prob.x0, gammas)
    assert torch.equal(scales / sc16, torch.tensor([16.0, 16.0], dtype=torch.float64))
    sc_d, _, _ = rev.fixed_point_grid(prob.x0, [g / 2 for g in gammas])
    assert torch.equal(scales / sc_d, torch.tensor([1.0, 2.0], dtype=torch.float64))


def test_fixed_overflow_is_refused_naming_the_unroll():
    prob = problem()
    net = build(6, 1.0, state_precision="fixed")
    with torch.no_grad():
        net.unrolls[3].eta_raw.fill_(1e12)  # unroll 3's update leaves any data-scaled range
    with pytest.raises(rev.FixedPointOverflow, match="unroll 3: stream v"):
        net(prob.x0, prob.kspace, prob.maps, prob.mask)


def test_coarse_grid_warns():
    """0.8 at N = 100 (gamma spans 0.8^-99 ~ 4e9): the latent grid is coarser than float32 for
    the first unrolls; the network says so (and stays exact, test above)."""
    prob = problem()
    with pytest.warns(RuntimeWarning, match="coarser than float32"):
        build(100, 0.8, state_precision="fixed")(prob.x0, prob.kspace, prob.maps, prob.mask)


def test_forced_fallback_n100_holds_sqrt_n_states(monkeypatch):
    """Done-when: an inversion that reports converged=False at N = 100 makes the engine redo
    the chain with sub-anchors every ceil(sqrt(100)) = 10 unrolls: the probe's peak exceeds
    pure MEL's by at most ~2 sqrt(N) states (checkpoint's by ~N), gradients stay bitwise."""
    prob = problem()
    net = build(100, 1.0, memory="standard", state_precision="fixed")
    ref, _ = grads_of_step(net, prob)

    def peak(mode: str) -> int:
        net.chain.memory = mode
        with MemoryProbe() as probe:
            got, _ = grads_of_step(net, prob)
        assert all(torch.equal(a, b) for a, b in zip(got, ref)), mode
        return probe.peak_bytes

    mel, ckpt = peak("mel"), peak("checkpoint")
    last = net.unrolls[-1]
    fused = last.inverse_and_backward
    monkeypatch.setattr(last, "inverse_and_backward", lambda *a: fused(*a)._replace(converged=False))
    with pytest.warns(RuntimeWarning, match="sub-anchors every 10 layers"):
        forced = peak("mel")
    st = net.log_stats()
    assert st["mel/fallbacks"] == 1 and st["mel/fallback_spacing"] == 10
    x = prob.x0
    state_bytes = x.numel() * 16 + math.prod(net.layout.latent_shape(x.shape, 2)) * 8  # complex128 x + float64 v
    assert ckpt - mel >= 90 * state_bytes  # checkpoint holds ~N states (sanity of the probe)
    print(f"\nforced fallback at N = 100: +{(forced - mel) / state_bytes:.1f} states over pure MEL, checkpoint +{(ckpt - mel) / state_bytes:.1f}")
    assert forced - mel <= (2 * 10 + 2) * state_bytes, (forced - mel) / state_bytes
