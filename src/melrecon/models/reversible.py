"""Reversible (additive-coupling) unrolled networks: exact inverses, flat memory, exact gradients.

One unroll maps a two-stream state ``(x, v)`` to ``(x', v')``:

    v' = v + F_n(x),   F_n(x) = (R_n([x, d(x)]) + eta_n [d(x), 0]) / gamma_n
    x' = x + G_n(v'),  G_n(v) = u[:, :2] + Q_n(u),  u = gamma_n v

where ``d(x)`` is the physics direction: the negative data gradient ``A^H b - A^H A x``
(``physics="gradient"``) or MoDL's proximal step ``P_lam(x) - x`` with
``P_lam(x) = (A^H A + lam I)^{-1}(A^H b + lam x)`` solved by CG (``physics="proximal"``).
Both are functions of ``x`` alone, so the coupling stays exactly invertible.

``x`` is the complex image (the layouts of DESIGN.md), ``v`` a real latent "velocity" with
``latent_channels`` channels in the CNN layout (see :class:`ConvLayout`). ``R_n`` and ``Q_n``
are plain CNNs (no Lipschitz bound needed), ``eta_n > 0`` and ``gamma_n > 0`` learned step
sizes. With ``v = 0`` an unroll is ``x' = x + s + Q(s)``, ``s = R(x, d) + eta d``: a
denoising plus data-consistency step; ``v`` adds momentum ``gamma_n / gamma_{n-1}`` (the
ratio of consecutive steps; ``gamma_decay`` < 1 damps it at initialisation). With
``R = Q = 0`` and the gradient direction it is a heavy-ball gradient method whose step sizes
may differ per unroll (three-term polynomial methods, Chebyshev included, are reachable). The inverse is closed form and costs one evaluation of each half:

    x = x' - G_n(v'),   v = v' - F_n(x)

There is no fixed-point iteration and no division, so nothing amplifies rounding beyond the
conditioning of the map itself (``det = 1``: the coupling preserves volume).

The inverse and the backward pass are fused (RevNet): ``inverse_and_backward`` evaluates
``G_n(v')`` *with* its graph, uses the value to recover ``x`` and the graph to backpropagate,
then does the same with ``F_n(x)``; every half is evaluated once during the backward pass, so a
MEL step costs what a checkpointed step costs. The chain runner is
:class:`melrecon.mel.function.InvertibleChain` (``standard | checkpoint | mel`` memory modes).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from melrecon.mel.function import InvertibleChain, check_depth_and_memory
from melrecon.mel.shared_state import deduplicate_state_dict
from melrecon.mel.invertible import FusedResult, InvertibleLayer, InvertResult
from melrecon.models.dc import ProximalDC, SenseData, dc_log_stats
from melrecon.models.regularizers import BoundedConv
from melrecon.physics.sense import SenseOperator

__all__ = [
    "ConvLayout",
    "ConvStack",
    "sense_direction",
    "ReversibleUnroll",
    "ReversibleUnrolledNet",
]


# ----------------------------------------------------------------------------- layout


class ConvLayout:
    """Converts complex images to real CNN channels and back.

    The image is ``(B, *spatial)``; the CNN convolves the last ``conv_dim`` spatial axes and
    folds the leading spatial axes into the batch (``conv_dim=2`` on a slab (B, X, Y, Z)
    gives slice-by-slice 2D convs on (Y, Z); on cine (B, T, X, Y) frame-by-frame convs on
    (X, Y); ``conv_dim=3`` convolves (X, Y, Z) or (T, X, Y) jointly).

    Channel layout: ``(B * prod(leading), 2, *conv_spatial)`` real, channels (real, imag).
    """

    def __init__(self, conv_dim: int) -> None:
        if conv_dim not in (2, 3):
            raise ValueError(f"regularizer.conv_dim must be 2 or 3, got {conv_dim!r}")
        self.conv_dim = conv_dim

    def check(self, image_shape: Sequence[int]) -> None:
        if len(image_shape) < 1 + self.conv_dim:
            raise ValueError(
                f"image shape {tuple(image_shape)} has fewer than conv_dim={self.conv_dim} "
                "spatial axes after the batch axis"
            )

    def to_channels(self, x: Tensor) -> Tensor:
        """Complex image (B, *spatial) -> real (B', 2, *conv_spatial)."""
        conv_sp = x.shape[x.ndim - self.conv_dim:]
        x = x.reshape(-1, *conv_sp)
        return torch.stack([x.real, x.imag], dim=1)

    def from_channels(self, t: Tensor, image_shape: Sequence[int]) -> Tensor:
        """Real (B', 2, *conv_spatial) -> complex image of ``image_shape``."""
        return torch.complex(t[:, 0], t[:, 1]).reshape(image_shape)

    def latent_shape(self, image_shape: Sequence[int], channels: int) -> tuple[int, ...]:
        """Shape of a ``channels``-channel latent in the CNN layout for this image shape."""
        lead = math.prod(image_shape[: len(image_shape) - self.conv_dim])
        return (lead, channels, *image_shape[len(image_shape) - self.conv_dim:])


class ConvStack(nn.Module):
    """Plain CNN ``in_channels -> out_channels``: ``depth`` convs, ReLU between them.

    Built from :class:`melrecon.models.regularizers.BoundedConv` without a bound: no
    normalisation, dropout or spectral norm, i.e. nothing that changes between the forward
    pass and the recompute, and no Lipschitz constraint (the coupling inverts in closed
    form). The last conv's weights are scaled by ``out_scale`` and its bias zeroed at
    construction, so a fresh network starts close to its physics part (a gradient method)
    and deep chains start well conditioned.

    Input/output: (B, C, *spatial) real with ``len(spatial) == conv_dim``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        width: int = 32,
        depth: int = 5,
        kernel_size: int = 3,
        conv_dim: int = 3,
        out_scale: float = 0.1,
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"regularizer.depth must be >= 1, got {depth}")
        if width < 1:
            raise ValueError(f"regularizer.width must be >= 1, got {width}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"regularizer.kernel_size must be a positive odd integer, got {kernel_size}")
        if conv_dim not in (2, 3):
            raise ValueError(f"regularizer.conv_dim must be 2 or 3, got {conv_dim!r}")
        chans = [in_channels] + [width] * (depth - 1) + [out_channels]
        self.convs = nn.ModuleList(
            BoundedConv(conv_dim, chans[i], chans[i + 1], kernel_size, bias=True, bound=None)
            for i in range(depth)
        )
        self.out_scale = float(out_scale)
        self._scale_last()

    def _scale_last(self) -> None:
        with torch.no_grad():
            self.convs[-1].weight.mul_(self.out_scale)
            self.convs[-1].bias.zero_()

    def reset_parameters(self) -> None:
        for c in self.convs:
            c.reset_parameters()
        self._scale_last()

    def forward(self, t: Tensor) -> Tensor:
        for i, conv in enumerate(self.convs):
            t = conv(t)
            if i < len(self.convs) - 1:
                t = F.relu(t)
        return t


# ----------------------------------------------------------------------------- data


def sense_direction(x: Tensor, data: SenseData) -> Tensor:
    """Negative gradient of ``||A x - b||^2 / 2``: ``A^H b - A^H A x`` (image shape)."""
    return data.aty - data.op.normal(x)


def _softplus_inv(y: float) -> float:
    if y <= 0:
        raise ValueError(f"a positive step size is required, got {y}")
    return y + math.log(-math.expm1(-y))


# ----------------------------------------------------------------------------- one unroll


class ReversibleUnroll(InvertibleLayer):
    """One additive-coupling unroll (module docstring); an ``InvertibleLayer`` on ``(x, v)``.

    Args:
        r_net: CNN ``4 -> latent_channels`` on ``[x, d(x)]`` (may be shared between unrolls).
        q_net: CNN ``latent_channels -> 2`` on ``u = gamma v`` (may be shared between unrolls).
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
        self.eta_raw = nn.Parameter(torch.tensor(_softplus_inv(eta_init)), requires_grad=learn_steps)
        self.gamma_raw = nn.Parameter(torch.tensor(_softplus_inv(gamma_init)), requires_grad=learn_steps)

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


REGULARIZER_DEFAULTS: dict[str, Any] = dict(conv_dim=3, width=64, depth=5, kernel_size=3, out_scale=0.1)


class ReversibleUnrolledNet(nn.Module):
    """A chain of ``num_unrolls`` reversible unrolls with a selectable memory mode.

    ``forward(x0, kspace, maps, mask) -> x_N`` (x0's shape and dtype). The latent starts at
    ``v_0 = 0``; only the image stream is returned.

    Args:
        num_unrolls: N >= 1.
        share_weights: one pair of CNNs for all unrolls (step sizes stay per unroll).
        memory: ``standard | checkpoint | mel``.
        anchor_every: ``mel`` anchors (None = pure MEL: the coupling needs none).
        drift_tol: relative drift above which the engine recomputes (it measures it at the
            chain input in pure MEL).
        regularizer: the two CNNs of every unroll (mapping; missing keys take defaults):
            ``conv_dim`` 3 (slabs, cine) or 2 (slice-by-slice / frame-by-frame), ``width``
            (hidden channels), ``depth`` (convs per CNN), ``kernel_size``, ``out_scale``
            (initial scale of each CNN's last conv).
        latent_channels: channels K of the latent stream v (>= 2; the first two carry the
            gradient step).
        eta_init, gamma_init: initial step sizes (> 0).
        learn_steps: train the step sizes.
        gamma_decay: unroll n starts at ``gamma_init * gamma_decay**n``, i.e. momentum
            ``gamma_decay`` at initialisation (< 1 damps; 0.3-0.5 trains best at 5-10
            unrolls). Damping is paid for in the inverse: rounding grows by about
            ``gamma_decay**-N``; keep ``gamma_decay**N >= 1e-10`` with double-precision
            streams (e.g. 0.8 at N = 50, 0.9 at N = 100) and ~1 with ``state_precision=input``.
        physics: ``"gradient"`` (d(x) = A^H b - A^H A x: one normal-operator application per
            unroll) or ``"proximal"`` (d(x) = P_lam(x) - x, MoDL's CG data consistency, lam
            learned; shared like the CNNs).
        dc: ``"proximal"`` only: keyword arguments of :class:`ProximalDC` (lam_init,
            learn_lam, positivity, cg_tol, cg_max_iter).
        state_precision: ``"double"`` keeps the two streams (only they: the additions of the
            coupling) in float64/complex128 while CNNs and physics run in the input's
            precision, so the recomputed inputs are exact to ~1e-15 however deep the chain;
            ``"input"`` keeps everything in the input's precision (drift ~ N^1.5 * eps).
        fft_dims: k-space axes of the SENSE operator.
    """

    def __init__(
        self,
        num_unrolls: int = 10,
        share_weights: bool = False,
        memory: str = "mel",
        anchor_every: Any = None,
        drift_tol: float = 1e-5,
        regularizer: Mapping[str, Any] | None = None,
        latent_channels: int = 2,
        eta_init: float = 1.0,
        gamma_init: float = 1.0,
        learn_steps: bool = True,
        gamma_decay: float = 1.0,
        physics: str = "proximal",
        dc: Mapping[str, Any] | None = None,
        state_precision: str = "double",
        fft_dims: Sequence[int] = (-2, -1),
    ) -> None:
        super().__init__()
        check_depth_and_memory(num_unrolls, memory)
        if latent_channels < 2:
            raise ValueError(f"latent_channels must be >= 2, got {latent_channels}")
        for name, val in (("eta_init", eta_init), ("gamma_init", gamma_init), ("gamma_decay", gamma_decay)):
            if not val > 0:
                raise ValueError(f"{name} must be > 0, got {val}")
        if state_precision not in ("double", "input"):
            raise ValueError(f"state_precision must be 'double' or 'input', got {state_precision!r}")
        if physics not in ("gradient", "proximal"):
            raise ValueError(f"physics must be 'gradient' or 'proximal', got {physics!r}")
        dc_kw = {k: v for k, v in dict(dc or {}).items() if k != "_target_"}
        if dc_kw and physics != "proximal":
            raise ValueError("dc settings are only used with physics='proximal'")
        spec = dict(REGULARIZER_DEFAULTS)
        for key, val in dict(regularizer or {}).items():
            if key not in REGULARIZER_DEFAULTS:
                raise ValueError(
                    f"regularizer.{key} is not a setting of the reversible CNNs; "
                    f"known: {sorted(REGULARIZER_DEFAULTS)}"
                )
            spec[key] = val
        self.state_precision = state_precision
        self.num_unrolls = num_unrolls
        self.share_weights = bool(share_weights)
        self.layout = ConvLayout(spec["conv_dim"])
        self.latent_channels = latent_channels
        self.fft_dims = tuple(fft_dims)

        def make_pair() -> tuple[nn.Module, nn.Module]:
            return ConvStack(4, latent_channels, **spec), ConvStack(latent_channels, 2, **spec)

        def make_dc() -> ProximalDC | None:
            return ProximalDC(**dc_kw) if physics == "proximal" else None

        self.physics = physics
        shared = (*make_pair(), make_dc()) if share_weights else None
        unrolls = []
        for n in range(num_unrolls):
            r_net, q_net, dc_n = shared if shared is not None else (*make_pair(), make_dc())
            g_n = gamma_init * gamma_decay**n
            unrolls.append(ReversibleUnroll(r_net, q_net, self.layout, eta_init, g_n, learn_steps, dc_n))
        self.chain = InvertibleChain(unrolls, memory=memory, anchor_every=anchor_every, drift_tol=drift_tol)
        deduplicate_state_dict(self)  # shared weights: one checkpoint entry, any number of unrolls

    @property
    def dcs(self) -> list[ProximalDC]:
        """The distinct proximal DC modules (empty for physics='gradient')."""
        seen: dict[int, ProximalDC] = {}
        for u in self.unrolls:
            if u.dc is not None:
                seen.setdefault(id(u.dc), u.dc)
        return list(seen.values())

    @property
    def unrolls(self) -> nn.ModuleList:
        return self.chain.layers

    @property
    def memory(self) -> str:
        return self.chain.memory

    def forward(self, x0: Tensor, kspace: Tensor, maps: Tensor, mask: Tensor) -> Tensor:
        """x0: complex image (B, *spatial); kspace, maps, mask: the SENSE layouts (DESIGN.md)."""
        if not torch.is_complex(x0):
            raise ValueError(f"x0 must be complex, got dtype {x0.dtype} (shape {tuple(x0.shape)})")
        self.layout.check(x0.shape)
        op = SenseOperator(maps.detach(), mask.detach(), fft_dims=self.fft_dims)
        kspace = kspace.detach()
        data = SenseData(op=op, kspace=kspace, aty=op.adjoint(kspace))
        if data.aty.shape != x0.shape:
            raise ValueError(f"x0 shape {tuple(x0.shape)} differs from the image shape "
                             f"{tuple(data.aty.shape)} of kspace/maps")
        for d in self.dcs:
            d.stats.clear()
        xs = x0
        if self.state_precision == "double" and x0.dtype == torch.complex64:
            xs = x0.to(torch.complex128)
        v0 = xs.real.new_zeros(self.layout.latent_shape(x0.shape, self.latent_channels))
        x, _ = self.chain((xs, v0), data)
        return x.to(x0.dtype)

    def log_stats(self) -> dict[str, float]:
        """MEL drift/anchors/iterations of the last step and the learned step sizes."""
        s = self.chain.stats
        with torch.no_grad():
            etas = torch.stack([u.eta for u in self.unrolls])
            gammas = torch.stack([u.gamma for u in self.unrolls])
        out = {
            "mel/drift": float(s.drift),
            "mel/anchors": float(s.anchors),
            "mel/inv_iters": float(s.inv_iters),
            "mel/fallbacks": float(s.fallbacks),
            "rev/eta_mean": float(etas.mean()),
            "rev/gamma_mean": float(gammas.mean()),
        }
        dcs = self.dcs
        if dcs:
            with torch.no_grad():
                out["dc/lam"] = float(torch.stack([d.lam.reshape(()) for d in dcs]).mean())
            out.update(dc_log_stats(dcs))
        return out
