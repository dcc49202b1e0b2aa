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

There is no fixed-point iteration and no division. In floating point the sums still round
(``(x + G) - G != x`` in general) and damping amplifies that rounding in the inverse; with
fixed-point streams (``state_precision="fixed"``, the default: both streams on a power-of-two
grid, every coupling term rounded to it before it is added, :func:`fixed_point_grid`) every
sum is exact and the inverse is bit-exact at any depth and damping.

The inverse and the backward pass are fused (RevNet): ``inverse_and_backward`` evaluates
``G_n(v')`` *with* its graph, uses the value to recover ``x`` and the graph to backpropagate,
then does the same with ``F_n(x)``; every half is evaluated once during the backward pass, so a
MEL step costs what a checkpointed step costs. The network is an
:class:`~melrecon.models.base.UnrolledBase` whose chain state is ``(x, v)``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from melrecon.mel.invertible import FusedResult, InvertibleLayer, InvertResult, State
from melrecon.models.base import UnrolledBase
from melrecon.models.dc import ProximalDC, SenseData, inverse_positive
from melrecon.models.regularizers import ConvLayout, ConvStack

__all__ = ["sense_direction", "ReversibleUnroll", "ReversibleUnrolledNet", "FixedPointOverflow", "fixed_point_grid"]

STATE_PRECISIONS = ("fixed", "double", "input")
MANTISSA_BITS = 53  # float64: every integer multiple m * 2^-k with |m| < 2^53 is exact
HEADROOM_BITS_X = 16  # image stream: range 2^16 x max|x0| (its resolution stays ~1e-11 of it)
HEADROOM_BITS_V = 6  # latent stream: 64 x max|x0| x sum_n 1/gamma_n (the bound of |v_N|)


class FixedPointOverflow(RuntimeError):
    """A stream of a ``state_precision="fixed"`` chain left its fixed-point range."""


class _GridRound(torch.autograd.Function):
    """``round(t * scale) / scale`` (real and imaginary parts) with an identity gradient.

    ``scale`` is a power of two, so the product and the quotient are exact in float64: the
    result is the nearest multiple of ``1 / scale``. The gradient passes straight through
    (the derivative of the unrounded term; the rounding moves the value by at most half a
    grid step), identically in every memory mode, so the modes' gradients agree bitwise.
    """

    @staticmethod
    def forward(ctx, t: Tensor, scale: Tensor) -> Tensor:  # noqa: ARG004
        r = torch.view_as_real(t) if t.is_complex() else t
        q = torch.round(r * scale) / scale
        return torch.view_as_complex(q) if t.is_complex() else q

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # noqa: ARG004
        return grad, None


def _on_grid(t: Tensor, scale: Tensor) -> Tensor:
    return _GridRound.apply(t, scale)


def _max_abs(t: Tensor) -> Tensor:
    return (torch.view_as_real(t) if t.is_complex() else t).detach().abs().amax()


def fixed_point_grid(x0: Tensor, gammas: Sequence[float]) -> tuple[Tensor, float, float]:
    """The fixed-point scales of the two streams for one call: ``(scales, S, sum 1/gamma)``.

    ``scales`` is a float64 tensor ``[2^k_x, 2^k_v]`` (powers of two, on x0's device): a
    stream value is a multiple of ``2^-k`` below ``2^(53-k)`` in magnitude. The range of
    each stream is chosen from the data and the damping so that the chain cannot reach it
    except in pathological cases (which are refused, see :class:`FixedPointOverflow`):
    ``x``: ``2^16 S`` with ``S = max|Re x0|, |Im x0|`` (1 if x0 = 0); ``v``: ``2^6 S
    sum_n 1/gamma_n`` (``v_N`` is the sum of the updates ``F_n``, each about image scale
    divided by ``gamma_n``, so damping (``gamma_decay^-N``) widens the range and coarsens the
    resolution ``2^-k_v``). The range limit is the next power of two >= twice the bound.
    """
    s = float(_max_abs(x0)) or 1.0
    inv_gamma = float(sum(1.0 / g for g in gammas))
    exps = [math.ceil(math.log2(s * 2.0**HEADROOM_BITS_X)), math.ceil(math.log2(s * 2.0**HEADROOM_BITS_V * inv_gamma))]
    # the limit 2^(53-k) = 2^(e+1) >= 2 * bound
    scales = torch.tensor([2.0 ** (MANTISSA_BITS - 1 - e) for e in exps], dtype=torch.float64, device=x0.device)
    return scales, s, inv_gamma


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
        index: the unroll's position in its chain (for error messages).

    State: ``(x, v)`` or ``(x, v, scales)``. ``x`` complex (B, *spatial); ``v`` real,
    ``layout.latent_shape(x.shape, K)``. With the third part (float64 ``[2^k_x, 2^k_v]``,
    :func:`fixed_point_grid`) the streams are fixed-point numbers: each coupling term is
    rounded to its stream's grid before it is added, so every addition and its inverse
    subtraction are exact and the inverse is bit-exact; a stream value reaching its range
    limit ``2^(53-k)`` raises :class:`FixedPointOverflow` naming the unroll. The scales pass
    through unchanged (and receive no gradient).
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
        index: int = 0,
    ) -> None:
        super().__init__()
        self.index = index  # position in the chain (named in overflow errors)
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

    # the coupling terms in the streams' arithmetic -----------------------------------------
    def term_f(self, x: Tensor, v: Tensor, data: SenseData, scales: Sequence[Tensor]) -> Tensor:
        """``F(x)`` in v's dtype, on v's fixed-point grid when ``scales`` (the state's third
        part) is given."""
        f = self.half_f(x, data).to(v.dtype)
        return _on_grid(f, scales[0][1]) if scales else f

    def term_g(self, v: Tensor, x: Tensor, scales: Sequence[Tensor]) -> Tensor:
        """``G(v)`` in x's dtype, on x's fixed-point grid when ``scales`` is given."""
        g = self.half_g(v, x.shape).to(x.dtype)
        return _on_grid(g, scales[0][0]) if scales else g

    def _check_range(self, x: Tensor, v: Tensor, scales: Tensor) -> None:
        """Refuse a fixed-point state that reached its range limit ``2^53`` grid steps (one
        check, one host sync per unroll). Checking the sums suffices: every finite float64
        of magnitude >= the limit is itself a multiple of the grid step, so a sum below the
        limit is exact whatever its terms; a sum that reached it may have been rounded.
        Non-finite values are refused too."""
        steps = torch.stack([_max_abs(x) * scales[0], _max_abs(v) * scales[1]])
        if bool((steps < 2.0**MANTISSA_BITS).all()):
            return
        stream = 1 if not bool(steps[1] < 2.0**MANTISSA_BITS) else 0  # v is updated first
        worst, limit = float(steps[stream] / scales[stream]), float(2.0**MANTISSA_BITS / scales[stream])
        name = "x (image)" if stream == 0 else "v (latent)"
        raise FixedPointOverflow(
            f"state_precision='fixed': unroll {self.index}: stream {name} reached {worst:.4g}, its "
            f"fixed-point range limit {limit:.4g} (grid 2^{-int(math.log2(float(scales[stream])))}, chosen "
            "from max|x0| and sum 1/gamma_n); the sums would no longer be exact. The network's updates "
            "outgrew the data scale: use state_precision='double', a larger gamma_decay or fewer unrolls"
        )

    # the contract ------------------------------------------------------------------------
    def forward(self, state: tuple[Tensor, ...], data: SenseData) -> tuple[Tensor, ...]:
        x, v, *scales = state
        v = v + self.term_f(x, v, data, scales)
        x = x + self.term_g(v, x, scales)
        if scales:
            self._check_range(x, v, scales[0])
        return (x, v, *scales)

    def inverse(self, state: tuple[Tensor, ...], data: SenseData) -> InvertResult:
        """Closed form: ``x = x' - G(v')``, ``v = v' - F(x)`` (exact up to rounding; bit-exact
        with fixed-point streams)."""
        xp, vp, *scales = state
        x = xp - self.term_g(vp, xp, scales)
        v = vp - self.term_f(x, vp, data, scales)
        return InvertResult((x, v, *scales), 0.0, 0, True)

    def inverse_and_backward(
        self, state: tuple[Tensor, Tensor], grad_state: Sequence[Tensor | None], data: SenseData
    ) -> FusedResult:
        """Invert and backpropagate in one pass (RevNet): each half is evaluated once, with
        its graph; its value recovers the input, its graph gives the vector-Jacobian product.

        ``grad_state = (dL/dx', dL/dv'[, dL/dscales])`` (``None`` = zero). Returns ``(x, v
        [, scales])``, ``(dL/dx, dL/dv[, dL/dscales])`` and the gradients of this unroll's
        parameters.
        """
        xp, vp, *scales = (t.detach() for t in state)
        gxp, gvp, *gscales = grad_state
        gxp = torch.zeros_like(xp) if gxp is None else gxp
        gvp = torch.zeros_like(vp) if gvp is None else gvp
        with torch.enable_grad():
            # x' = x + G(v'): G's input v' is known; its graph backpropagates dL/dx'
            vl = vp.requires_grad_()
            g_out = self.term_g(vl, xp, scales)
            x = xp - g_out.detach()
            pg = self._params_g()
            grads = torch.autograd.grad(g_out, [vl, *pg], gxp, allow_unused=True)
            del g_out
            gv = gvp + grads[0]
            pairs = list(zip(pg, grads[1:]))
            # v' = v + F(x): F's input x was just recovered; its graph backpropagates dL/dv'
            xl = x.requires_grad_()
            f_out = self.term_f(xl, vp, data, scales)
            v = vp.detach() - f_out.detach()
            pf = self._params_f()
            grads = torch.autograd.grad(f_out, [xl, *pf], gv, allow_unused=True)
            del f_out
            gx = gxp + grads[0]
            pairs += list(zip(pf, grads[1:]))
        return FusedResult((x.detach(), v, *scales), (gx, gv, *gscales), pairs, 0.0, 0, True)


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
            unrolls). Damping is paid for in the inverse (the coupling has determinant 1, so
            v grows as ``gamma_decay**-n``): with ``"fixed"`` streams it coarsens the grid of
            v (see ``state_precision``), with ``"double"``/``"input"`` it amplifies rounding
            by about ``gamma_decay**-N``.
        state_precision: how the two streams (only they: the additions of the coupling) are
            held; CNNs, FFTs and CG always run in the input's precision on the state cast
            down.

            ``"fixed"`` (default): float64/complex128 tensors whose values are multiples of a
            power-of-two grid ``2^-k`` (fixed-point numbers with a 53-bit integer part, one
            ``k`` per stream and call, :func:`fixed_point_grid`). Each coupling term is
            rounded to the grid (exact for a power-of-two scale) before it is added, so every
            sum is exact while ``|value| < 2^(53-k)``, and the inverse subtracts the identical
            numbers: the recomputed states are bit-exact for every N, ``gamma_decay`` and
            training state (drift 0), given that the CNN and physics return bitwise the same
            output for the same input (CPU: yes; CUDA: the engine pins cuDNN's algorithms for
            the forward pass and its recompute, :mod:`melrecon.mel.backward`). Gradients
            pass through the rounding as the identity. Range: x up to ``2^17 S``
            (``S = max|x0|``), resolution ``~2^-36 S``; v up to ``2^7 S sum_n 1/gamma_n``,
            resolution ``~2^-46 S sum_n 1/gamma_n`` (with ``gamma_init = 1``: ``7.5e-9 S``
            for ``gamma_decay = 0.9`` at N = 100 and for 0.8 at N = 50, but ``5e-4 S`` for
            0.8 at N = 100: damping past ``gamma_decay^N ~ 1e-9`` makes the early
            updates coarser than float32 rounding, which warns; the chain stays exact). A
            stream reaching its limit raises :class:`FixedPointOverflow` naming the unroll.
            int64 streams would give 10 more bits but no autograd; this keeps autograd.

            ``"double"``: plain float64 streams: exact to ~1e-15 undamped, but rounding of
            the sums is amplified by damping. ``"input"``: the streams in the input's
            precision. Measured recomputed-input drift (pure MEL, float32 input, N = 100,
            tiny cine, DESIGN.md "Reversible unrolls"): ``fixed`` 0 for ``gamma_decay`` 1,
            0.9, 0.8, at initialisation and after 30 Adam steps; ``double`` and ``input``:
            see the table there.
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
        state_precision: str = "fixed",
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
        if state_precision not in STATE_PRECISIONS:
            raise ValueError(f"state_precision must be one of {STATE_PRECISIONS}, got {state_precision!r}")
        self.state_precision = state_precision
        self._warned_grid = False
        self.layout = ConvLayout(regularizer.conv_dim)
        self.latent_channels = regularizer.out_channels
        self.set_unrolls([
            ReversibleUnroll(r, q, self.layout, eta_init, gamma_init * gamma_decay**n, learn_steps, d, index=n)
            for n, (r, q, d) in enumerate(self.replicate(regularizer, step_net, dc))
        ])

    @property
    def physics(self) -> str:
        """``"proximal"`` (d = P_lam(x) - x) or ``"gradient"`` (d = A^H b - A^H A x)."""
        return "gradient" if self.unrolls[0].dc is None else "proximal"

    def to_state(self, x0: Tensor) -> State:
        """``(x0, v0 = 0)``: the image stream in double precision for ``"double"``; for
        ``"fixed"`` x0 rounded to the image grid (a ~2^-36 relative change; identity
        gradient) and the grid scales as a third part, chosen for this call."""
        self.layout.check(x0)
        xs = x0
        if self.state_precision in ("double", "fixed") and x0.dtype == torch.complex64:
            xs = x0.to(torch.complex128)
        v0 = xs.real.new_zeros(self.layout.latent_shape(x0.shape, self.latent_channels))
        if self.state_precision != "fixed":
            return xs, v0
        with torch.no_grad():
            gammas = [float(u.gamma) for u in self.unrolls]
        scales, s, inv_gamma = fixed_point_grid(x0, gammas)
        self._warn_coarse_grid(float(scales[1]), s, max(gammas), inv_gamma)
        return _on_grid(xs, scales[0]), v0, scales

    def _warn_coarse_grid(self, scale_v: float, s: float, gamma_max: float, inv_gamma: float) -> None:
        """Warn once if v's grid quantizes the largest-step updates coarser than float32."""
        rel = gamma_max / (scale_v * s)  # image-scale effect of one grid step of v, relative to S
        if rel > 2.0**-24 and not self._warned_grid:
            self._warned_grid = True
            warnings.warn(
                f"state_precision='fixed': the latent grid quantizes the early unrolls' updates to {rel:.2g} of "
                f"max|x0| (coarser than float32 rounding) because sum_n gamma_max / gamma_n = "
                f"{gamma_max * inv_gamma:.3g} (damping gamma_decay^-N over "
                f"{self.num_unrolls} unrolls) sets the range of v. The chain stays exactly invertible; a larger gamma_decay or fewer "
                "unrolls restores the resolution",
                RuntimeWarning,
                stacklevel=3,
            )

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
