"""A third unrolled family in a few lines: the contract of UnrolledBase is all it needs.

``VarNet`` below is the example of DESIGN.md: a VarNet-style step ``x' = x + R(x) - eta A^H(A x - b)``
(regularizer and gradient step evaluated in parallel, as in Sriram et al. 2020), inverted by
the fixed point ``x = x' - R(x) + eta A^H(A x - b)``, a contraction while Lip(R) + eta ||A||^2 < 1.
The tests check that the base class gives it every memory mode with exact gradients, weight
sharing, state-dict deduplication and logging, and that it trains.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import grads_of_step, make_sense_problem, max_rel_error
from melrecon.mel import InvertibleLayer, InvertResult, default_tolerance, invert_residual_map
from melrecon.models import ResidualCNN, UnrolledBase


class VarNetStep(InvertibleLayer):
    """``x' = x + R(x) - eta (A^H A x - A^H b)`` with a learned step eta."""

    def __init__(self, cnn: ResidualCNN, eta: float = 0.2) -> None:
        super().__init__()
        self.cnn, self.eta = cnn, nn.Parameter(torch.tensor(eta))

    def update(self, x, data):
        return self.cnn.residual(x) - self.eta.to(x.dtype) * (data.op.gram(x) - data.aty)

    def forward(self, x, data):
        return x + self.update(x, data)

    def inverse(self, y, data):
        r = invert_residual_map(lambda x: self.update(x, data), y, default_tolerance(y.dtype), 200)
        return InvertResult(r.x, r.residual, r.iterations, r.converged)


class VarNet(UnrolledBase):
    def __init__(self, regularizer, num_unrolls=5, share_weights=False, memory="mel", anchor_every="auto", drift_tol=1e-5):
        super().__init__(num_unrolls, share_weights, memory, anchor_every, drift_tol)
        self.set_unrolls([VarNetStep(r) for (r,) in self.replicate(regularizer)])


def varnet(memory, share=False, n=4, anchor_every=None):
    torch.manual_seed(0)
    return VarNet(ResidualCNN(3, width=4, depth=3, lipschitz=0.5), n, share, memory, anchor_every).double()


@pytest.mark.parametrize("share", [False, True])
def test_third_family_gradients_match_standard_in_every_mode(share):
    prob = make_sense_problem("cine", (3, 8, 8), coils=2, dtype=torch.complex128, seed=2)
    ref, out_ref = grads_of_step(varnet("standard", share), prob)
    for memory, anchor_every, tol in (("checkpoint", None, 1e-12), ("mel", None, 1e-8), ("mel", "auto", 1e-8)):
        net = varnet(memory, share, anchor_every=anchor_every)
        got, out = grads_of_step(net, prob)
        assert torch.equal(out, out_ref)
        assert max_rel_error(got, ref) <= tol, (memory, anchor_every)
        stats = net.log_stats()
        assert stats["mel/fallbacks"] == 0 and "dc/cg_iters" not in stats  # no CG in this family
    assert net.log_stats()["mel/inv_iters"] > 0  # pure MEL really inverted the steps


def test_third_family_shares_weights_and_trains():
    shared, separate = varnet("mel", share=True), varnet("mel", share=False)
    n_cnn = sum(p.numel() for p in shared.unrolls[0].cnn.parameters())
    # the CNN is shared (one state-dict entry per tensor), the step eta is per unroll
    assert len(shared.state_dict()) == len(shared.unrolls[0].cnn.state_dict()) + 4
    assert sum(p.numel() for p in shared.parameters()) == n_cnn + 4
    assert sum(p.numel() for p in separate.parameters()) == 4 * (n_cnn + 1)  # 4 CNNs and 4 etas
    w = [u.cnn.cnn.convs[0].weight for u in separate.unrolls]
    assert not torch.equal(w[0], w[1])  # the copies are re-initialised
    prob = make_sense_problem("cine", (3, 8, 8), coils=2, dtype=torch.complex128, seed=3)
    opt = torch.optim.Adam(separate.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = (separate(*prob[:4]) - prob.target).abs().pow(2).sum()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.9 * losses[0] and separate.log_stats()["mel/fallbacks"] == 0
