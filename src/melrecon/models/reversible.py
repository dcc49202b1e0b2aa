"""Reversible (additive-coupling) unrolled networks: exact inverses, flat memory, exact gradients.

One unroll maps a two-stream state ``(x, v)`` to ``(x', v')``:

    v' = v + F_n(x),   F_n(x) = (R_n([x, d(x)]) + eta_n [d(x), 0]) / gamma_n
    x' = x + G_n(v'),  G_n(v) = u[:, :2] + Q_n(u),  u = gamma_n v

where ``d(x)`` is the physics direction: the negative data gradient ``A^H b - A^H A x``
(``dc=None``) or MoDL's proximal step ``P_lam(x) - x`` with
``P_lam(x) = (A^H A + lam I)^{-1}(A^H b + lam x)`` solved by CG (``dc`` a ProximalDC).
Both are functions of ``x`` alone, so the coupling stays exactly invertible.

``x`` is the complex image (the layouts of DESIGN.md), ``v`` a real latent "velocity" with
K channels in the CNN layout (:class:`~melrecon.models.regularizers.ConvLayout`). ``R_n``
(4 -> K channels) and ``Q_n`` (K -> 2) are plain :class:`~melrecon.models.regularizers.ConvStack`
CNNs (no Lipschitz bound needed), ``eta_n > 0`` and ``gamma_n > 0`` learned step sizes.
With ``v = 0`` an unroll is ``x' = x + s + Q(s)``, ``s = R(x, d) + eta d``: a denoising plus
data-consistency step; ``v`` adds momentum ``gamma_n / gamma_{n-1}`` (the
ratio of consecutive steps; ``gamma_decay`` < 1 damps it at initialisation). With
``R = Q = 0`` and the gradient direction it is a heavy-ball gradient method whose step sizes
may differ per unroll (three-term polynomial methods, Chebyshev included, are reachable).
The inverse is closed form and costs one evaluation of each half:

    x = x' - G_n(v'),   v = v' - F_n(x)

There is no fixed-point iteration and no division, so nothing amplifies rounding beyond the
conditioning of the map itself (``det = 1``: the coupling preserves volume).

The inverse and the backward pass are fused (RevNet): ``inverse_and_backward`` evaluates
``G_n(v')`` *with* its graph, uses the value to recover ``x`` and the graph to backpropagate,
then does the same with ``F_n(x)``; every half is evaluated once during the backward pass, so a
MEL step costs what a checkpointed step costs. The network is an
:class:`~melrecon.models.base.UnrolledBase` whose chain state is ``(x, v)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from melrecon.mel.invertible import FusedResult, InvertibleLayer, InvertResult, State
from melrecon.models.base import UnrolledBase
from melrecon.models.dc import ProximalDC, SenseData, inverse_positive
from melrecon.models.regularizers import ConvLayout, ConvStack

__all__ = ["sense_direction", "ReversibleUnroll", "ReversibleUnrolledNet"]


# ----------------------------------------------------------------------------- data


def sense_direction(x: Tensor, data: SenseData) -> Tensor:
    """Negative gradient of ``||A x - b||^2 / 2``: ``A^H b - A^H A x`` (image shape)."""
    return data.aty - data.op.gram(x)


# ----------------------------------------------------------------------------- one unroll


class ReversibleUnroll(InvertibleLayer):
    """One additive-coupling unroll (module docstring); an ``InvertibleLayer`` on ``(x, v)``.

    Args:
        r_net: R, CNN ``4 -> K`` on ``[x, d(x)]`` (may be shared between unrolls).
        q_net: Q, CNN ``K -> 2`` on ``u = gamma v`` (may be shared between unrolls).
        layout: the complex <-> channel conversion.
        eta_init, gamma_init: initial step sizes (> 0), owned by this unroll.
        learn_steps: whether the step sizes are trained.
        dc: ``None`` for the gradient direction ``d(x) = A^H b - A^H A x``, or a
            :class:`ProximalDC` for the proximal direction ``d(x) = P_lam(x) - x`` with
            ``P_lam(x) = (A^H A + lam I)^{-1}(A^H b + lam x)`` (MoDL's DC as a function of
            x; CG with implicit backward; may be shared between unrolls).

    State: ``x`` complex (B, *spatial); ``v`` real, ``layout.latent_shape(x.shape, K)``.
    """

    def __init__(
        self,
        r_net: nn.Module,
        q_net: nn.Module,
        layout: ConvLayout,
        eta_init: float = 1.0,
        gamma_init: float = 0.5,
        learn_steps: bool = True,
        dc: ProximalDC | None = None,
    ) -> None:
        super().__init__()
        self.dc = dc
        self.r_net = r_net
        self.q_net = q_net
        self.layout = layout
        self.eta_raw = nn.Parameter(torch.tensor(inverse_positive(eta_init)), requires_grad=learn_steps)
        self.gamma_raw = nn.Parameter(torch.tensor(inverse_positive(gamma_init)), requires_grad=learn_steps)

    @property
    def eta(self) -> Tensor:
        return F.softplus(self.eta_raw)

    @property
    def gamma(self) -> Tensor:
        return F.softplus(self.gamma_raw)

    # the two halves ----------------------------------------------------------------------
    def half_f(self, x: Tensor, data: SenseData) -> Tensor:
        """``F(x) = (R([x, d(x)]) + eta [d(x), 0]) / gamma`` in the latent layout (d: the
        physics direction, see ``dc``). The division makes ``gamma v`` the image-scale
        update, so the step size does not rescale what R contributes (module docstring)."""
        x = x.to(data.aty.dtype)  # compute precision (a no-op unless the state is wider)
        d = sense_direction(x, data) if self.dc is None else self.dc(x, data) - x
        dc = self.layout.to_channels(d)
        out = self.r_net(torch.cat([self.layout.to_channels(x), dc], dim=1))
        step = self.eta.to(dc.dtype) * dc
        if out.shape[1] == 2:
            out = out + step
        else:
            out = torch.cat([out[:, :2] + step, out[:, 2:]], dim=1)
        return out / self.gamma.to(out.dtype)

    def half_g(self, v: Tensor, image_shape: Sequence[int]) -> Tensor:
        """``G(v) = u[:, :2] + Q(u)`` with ``u = gamma v``, as a complex image, in the CNN's
        precision."""
        u = self.gamma.to(self.gamma_raw.dtype) * v.to(self.gamma_raw.dtype)
        t = u[:, :2] + self.q_net(u)
        return self.layout.from_channels(t, image_shape)

    def _params_f(self) -> list[nn.Parameter]:
        dc = list(self.dc.parameters()) if self.dc is not None else []
        return [p for p in (*self.r_net.parameters(), *dc, self.eta_raw, self.gamma_raw) if p.requires_grad]

    def _params_g(self) -> list[nn.Parameter]:
        return [p for p in (*self.q_net.parameters(), self.gamma_raw) if p.requires_grad]

    # the contract ------------------------------------------------------------------------
    def forward(self, state: tuple[Tensor, Tensor], data: SenseData) -> tuple[Tensor, Tensor]:
        x, v = state
        v = v + self.half_f(x, data).to(v.dtype)
        x = x + self.half_g(v, x.shape).to(x.dtype)
        return x, v

    def inverse(self, state: tuple[Tensor, Tensor], data: SenseData) -> InvertResult:
        """Closed form: ``x = x' - G(v')``, ``v = v' - F(x)`` (exact up to rounding)."""
        xp, vp = state
        x = xp - self.half_g(vp, xp.shape).to(xp.dtype)
        v = vp - self.half_f(x, data).to(vp.dtype)
        return InvertResult((x, v), 0.0, 0, True)

    def inverse_and_backward(
        self, state: tuple[Tensor, Tensor], grad_state: Sequence[Tensor | None], data: SenseData
    ) -> FusedResult:
        """Invert and backpropagate in one pass (RevNet): each half is evaluated once, with
        its graph; its value recovers the input, its graph gives the vector-Jacobian product.

        ``grad_state = (dL/dx', dL/dv')`` (``None`` = zero). Returns ``(x, v)``, ``(dL/dx,
        dL/dv)`` and the gradients of this unroll's parameters.
        """
        xp, vp = (t.detach() for t in state)
        gxp, gvp = grad_state
        gxp = torch.zeros_like(xp) if gxp is None else gxp
        gvp = torch.zeros_like(vp) if gvp is None else gvp
        with torch.enable_grad():
            # x' = x + G(v'): G's input v' is known; its graph backpropagates dL/dx'
            vl = vp.requires_grad_()
            g_out = self.half_g(vl, xp.shape).to(xp.dtype)
            x = xp - g_out.detach()
            pg = self._params_g()
            grads = torch.autograd.grad(g_out, [vl, *pg], gxp, allow_unused=True)
            del g_out
            gv = gvp + grads[0]
            pairs = list(zip(pg, grads[1:]))
            # v' = v + F(x): F's input x was just recovered; its graph backpropagates dL/dv'
            xl = x.requires_grad_()
            f_out = self.half_f(xl, data).to(vp.dtype)
            v = vp.detach() - f_out.detach()
            pf = self._params_f()
            grads = torch.autograd.grad(f_out, [xl, *pf], gv, allow_unused=True)
            del f_out
            gx = gxp + grads[0]
            pairs += list(zip(pf, grads[1:]))
        return FusedResult((x.detach(), v), (gx, gv), pairs, 0.0, 0, True)


# ----------------------------------------------------------------------------- the network


class ReversibleUnrolledNet(UnrolledBase):
    """A chain of ``num_unrolls`` reversible unrolls with a selectable memory mode.

    ``forward(x0, kspace, maps, mask) -> x_N`` (x0's shape and dtype). The latent starts at
    ``v_0 = 0``; only the image stream is returned.

    Args:
        regularizer: R, a :class:`ConvStack` from 4 channels (``[x, d(x)]``, real and
            imaginary parts) to the K latent channels of v (K >= 2; the first two carry the
            physics step); the template of every unroll. Its ``conv_dim`` is the network's:
            3 (slabs, cine) or 2 (slice by slice / frame by frame).
        step_net: Q, a :class:`ConvStack` from K to 2 channels on the step ``u = gamma v``,
            with R's ``conv_dim``; the template of every unroll.
        dc: None for the gradient direction ``d(x) = A^H b - A^H A x`` (one normal-operator
            application per unroll), or a :class:`ProximalDC` for the proximal direction
            ``d(x) = P_lam(x) - x`` (MoDL's CG data consistency, lam learned); the template
            of every unroll.
        num_unrolls, share_weights, memory, anchor_every, drift_tol, auto_start, fft_dims, dc_chunk:
            see :class:`~melrecon.models.base.UnrolledBase`. ``share_weights``: one R, Q and
            DC for all unrolls (the step sizes stay per unroll). ``anchor_every``: None
            (pure MEL) needs no anchors here; the drift is measured at the chain input.
        eta_init, gamma_init: initial step sizes (> 0).
        learn_steps: train the step sizes.
        gamma_decay: unroll n starts at ``gamma_init * gamma_decay**n``, i.e. momentum
            ``gamma_decay`` at initialisation (< 1 damps; 0.3-0.5 trains best at 5-10
            unrolls). Damping is paid for in the inverse: rounding grows by about
            ``gamma_decay**-N``; keep ``gamma_decay**N >= 1e-10`` with double-precision
            streams (e.g. 0.8 at N = 50, 0.9 at N = 100) and ~1 with ``state_precision=input``.
        state_precision: ``"double"`` keeps the two streams (only they: the additions of the
            coupling) in float64/complex128 while CNNs and physics run in the input's
            precision, so the recomputed inputs are exact to ~1e-15 however deep the chain;
            ``"input"`` keeps everything in the input's precision (drift ~ N^1.5 * eps).
    """

    exact_inverse = True  # closed-form coupling inverse: exact under autocast too (UnrolledBase)

    def __init__(
        self,
        regularizer: ConvStack,
        step_net: ConvStack,
        dc: ProximalDC | None = None,
        num_unrolls: int = 10,
        share_weights: bool = False,
        memory: str = "mel",
        anchor_every: Any = None,
        drift_tol: float = 1e-5,
        eta_init: float = 1.0,
        gamma_init: float = 1.0,
        learn_steps: bool = True,
        gamma_decay: float = 1.0,
        state_precision: str = "double",
        auto_start: int = 4,
        fft_dims: Sequence[int] = (-2, -1),
        dc_chunk: int | None = None,
    ) -> None:
        super().__init__(num_unrolls, share_weights, memory, anchor_every, drift_tol, auto_start, fft_dims, dc_chunk)
        _check_cnns(regularizer, step_net)
        if dc is not None and not isinstance(dc, ProximalDC):
            raise ValueError(
                f"dc must be a ProximalDC (proximal direction) or None (gradient direction), "
                f"got {type(dc).__name__}; in a config, model.dc needs a _target_ or null"
            )
        for name, val in (("eta_init", eta_init), ("gamma_init", gamma_init), ("gamma_decay", gamma_decay)):
            if not val > 0:
                raise ValueError(f"{name} must be > 0, got {val}")
        if state_precision not in ("double", "input"):
            raise ValueError(f"state_precision must be 'double' or 'input', got {state_precision!r}")
        self.state_precision = state_precision
        self.layout = ConvLayout(regularizer.conv_dim)
        self.latent_channels = regularizer.out_channels
        self.set_unrolls([
            ReversibleUnroll(r, q, self.layout, eta_init, gamma_init * gamma_decay**n, learn_steps, d)
            for n, (r, q, d) in enumerate(self.replicate(regularizer, step_net, dc))
        ])

    @property
    def physics(self) -> str:
        """``"proximal"`` (d = P_lam(x) - x) or ``"gradient"`` (d = A^H b - A^H A x)."""
        return "gradient" if self.unrolls[0].dc is None else "proximal"

    def to_state(self, x0: Tensor) -> State:
        """``(x0, v0 = 0)``, the image stream in double precision if asked."""
        self.layout.check(x0)
        xs = x0
        if self.state_precision == "double" and x0.dtype == torch.complex64:
            xs = x0.to(torch.complex128)
        return xs, xs.real.new_zeros(self.layout.latent_shape(x0.shape, self.latent_channels))

    def to_image(self, state: State, x0: Tensor) -> Tensor:
        return state[0].to(x0.dtype)

    def family_stats(self) -> dict[str, float]:
        """The learned step sizes, averaged over the unrolls."""
        with torch.no_grad():
            return {
                "rev/eta_mean": float(torch.stack([u.eta for u in self.unrolls]).mean()),
                "rev/gamma_mean": float(torch.stack([u.gamma for u in self.unrolls]).mean()),
            }


def _check_cnns(r: nn.Module, q: nn.Module) -> None:
    """R maps 4 channels to K >= 2, Q maps K to 2, both over the same axes."""
    for name, net in (("regularizer", r), ("step_net", q)):
        if not all(hasattr(net, a) for a in ("in_channels", "out_channels", "conv_dim")):
            raise ValueError(
                f"{name} must be a ConvStack (in_channels, out_channels, conv_dim), got {type(net).__name__}"
            )
    if r.in_channels != 4:
        raise ValueError(f"regularizer.in_channels must be 4 ([x, d(x)] as real channels), got {r.in_channels}")
    if r.out_channels < 2:
        raise ValueError(f"regularizer.out_channels (the latent channels of v) must be >= 2, got {r.out_channels}")
    if (q.in_channels, q.out_channels) != (r.out_channels, 2):
        raise ValueError(
            f"step_net must map the {r.out_channels} latent channels to 2, got "
            f"{q.in_channels} -> {q.out_channels} (step_net.in_channels, step_net.out_channels)"
        )
    if q.conv_dim != r.conv_dim:
        raise ValueError(f"step_net.conv_dim ({q.conv_dim}) differs from regularizer.conv_dim ({r.conv_dim})")
