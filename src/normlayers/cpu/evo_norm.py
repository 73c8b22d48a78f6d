r"""CPU tier of EvoNorm (Liu et al., NeurIPS 2020; timm's ``timm/layers/evo_norm.py`` semantics): one
closed-form ``autograd.Function`` per sub-family, each computing its statistics in few passes (the mean, then the
squared ``vector_norm`` of the deviations) and its output as one fresh tensor updated in place, with the backward
written out instead of autograd through a dozen elementwise ops. Each forward saves its statistics (B also the max
``m``), so the first-order backward needs no second pass of statistics and works in place on its temporaries; a double
backward (grad mode on inside the backward) recomputes everything from ``x`` with differentiable ops. Under
``torch.compile`` EvoNorm B is the reference itself (:func:`evo_norm_b`).

**S** (``y = a(x) / d_g · γ + β``, ``d_g`` the group std or RMS over ``K = C/G·H·W`` values, ``t = dy·γ/d_g``):

.. math:: \frac{\partial L}{\partial x} = t\,a'(x) - \frac{\sum_{group} t\,a(x)}{K\,d_g^2}\,(x - \mu_g)

(``x`` in place of ``x − μ_g`` for the RMS), with ``a(x) = x·σ(vx)`` (S0), SiLU or the identity.

**B** (``y = x / m · γ + β``, ``m = max(l, r)``, ``l = sqrt(σ²_c + eps)``, ``r`` the per-(sample, channel) side):
with ``gm = −dy·γ·x/m²`` split as torch.maximum splits it (all to the larger side, half each at a tie) into
``gl + gr``, ``dx = dy·γ/m + ∂r/∂x·gr + ∂l/∂x·gl``; ``l`` has a gradient only in training, through the batch
variance, ``Σ_c gl / l_c · (x − μ_c) / (N·H·W)``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from normlayers._dtypes import compute_dtype
from normlayers.cpu._common import var_mean
from normlayers.reference import evo_norm as _ref_evo

__all__ = ["evo_norm_b", "evo_norm_s", "supports_s"]

_HW = (2, 3)
_NHW = (0, 2, 3)


def _channel(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return None if t is None else t.to(dtype).view(1, -1, 1, 1)


def _grad_of(t: Optional[Tensor], grad: Tensor) -> Optional[Tensor]:
    return None if t is None else grad.to(t.dtype)


# ----------------------------------------------------------------------------------------------------------------------
# S0 / S1 / S2 (and timm's "a" variants)
# ----------------------------------------------------------------------------------------------------------------------


def _is_silu(activation: Optional[Callable[[Tensor], Tensor]]) -> bool:
    return activation is F.silu or type(activation) is torch.nn.SiLU


def supports_s(variant: str, activation: Optional[Callable[[Tensor], Tensor]], apply_act: bool) -> bool:
    """The closed form knows S0's ``x·σ(vx)``, SiLU (``F.silu`` or an ``nn.SiLU``) and the identity; any other
    activation runs the reference."""
    return not apply_act or variant == "s0" or activation is None or _is_silu(activation)


def _group_stats(xf: Tensor, groups: int, rms: bool, eps: float) -> tuple[Tensor, Optional[Tensor]]:
    """``(1/d_g, μ_g)`` per (sample, group), each ``(N, G, 1)`` (``μ_g = None`` for the RMS)."""
    grouped = xf.reshape(xf.shape[0], groups, -1)
    if rms:
        return torch.rsqrt(_square_sum(grouped) / grouped.shape[-1] + eps), None
    mean = grouped.mean(-1, keepdim=True)
    return torch.rsqrt(_square_sum(grouped - mean) / grouped.shape[-1] + eps), mean


def _square_sum(t: Tensor) -> Tensor:
    """``Σ t²`` over the last dim, keepdim: ``vector_norm`` squared, one vectorized pass with no temporary
    (``vecdot(t, t)`` multiplies into a fresh tensor first on CPU)."""
    return torch.linalg.vector_norm(t, dim=-1, keepdim=True).square()  # not in place: the double backward's graph


def _deviation(xf: Tensor, mean: Tensor, dims: tuple[int, ...]) -> Tensor:
    """``x − E[x]`` over ``dims`` (``mean`` broadcast against ``xf``) to the rounding of ``x`` itself: ``x − mean`` less
    its own mean, which is ``mean``'s rounding error. On a plane of nearly equal values far from zero (100 ± 1e-3)
    that error is not small next to ``x − E[x]``, and the dx terms proportional to it would be off by 1e-3 relative;
    the reference's autograd removes the same error through the gradient of the mean."""
    centred = xf - mean
    return centred.sub_(centred.mean(dims, keepdim=True))


def _per_channel(per_group: Tensor, channels: int) -> Tensor:
    """``(N, G, 1)`` → ``(N, C, 1, 1)``, each group's value on each of its channels."""
    n, groups, _ = per_group.shape
    return per_group.expand(n, groups, channels // groups).reshape(n, channels, 1, 1)


def _numerator(xf: Tensor, numerator: str, v: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
    """``(a(x), σ)`` where ``σ`` is the sigmoid inside ``a`` (``None`` for the identity)."""
    if numerator == "identity":
        return xf, None
    sig = torch.sigmoid(xf * v if numerator == "sigmoid_v" else xf)
    return xf * sig, sig


class _EvoSFunction(torch.autograd.Function):
    """Returns ``(y, 1/d_g, μ_g)`` per (sample, group); the last two (``μ_g`` a 0-d zero for the RMS) are saved for
    the first-order backward and are not differentiable."""

    @staticmethod
    def forward(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], v: Optional[Tensor], groups: int,
                numerator: str, rms: bool, eps: float) -> tuple[Tensor, Tensor, Tensor]:
        dtype = compute_dtype(x.dtype)
        xf = x.to(dtype)
        inv, mean = _group_stats(xf, groups, rms, eps)
        scale = _per_channel(inv, x.shape[1])
        if weight is not None:
            scale = scale * _channel(weight, dtype)
        # One fresh tensor, then in place: on CPU a fresh activation-sized allocation costs as much as a pass
        if numerator == "identity":
            y = torch.mul(xf, scale)
        else:
            y = F.silu(xf) if numerator == "silu" else torch.mul(xf, _channel(v, dtype)).sigmoid_().mul_(xf)
            y = y.mul_(scale)
        if bias is not None:
            y = y.add_(_channel(bias, dtype))
        return y.to(x.dtype), inv, inv.new_zeros(()) if mean is None else mean

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        x, weight, bias, v, groups, numerator, rms, eps = inputs
        _, inv, mean = output
        ctx.mark_non_differentiable(inv, mean)
        ctx.save_for_backward(x, weight, v, inv, mean)
        ctx.groups, ctx.numerator, ctx.rms, ctx.eps, ctx.has_bias = groups, numerator, rms, eps, bias is not None

    @staticmethod
    def backward(ctx: Any, grad: Tensor, *unused: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
        if torch.is_grad_enabled():
            return _evo_s_backward_differentiable(ctx, grad)
        x, weight, v, inv, mean = ctx.saved_tensors
        dtype = compute_dtype(x.dtype)
        xf, gf = x.to(dtype), grad.to(dtype)
        n, channels = x.shape[:2]
        groups = ctx.groups
        v_c = _channel(v, dtype)
        inv_c = _per_channel(inv, channels)
        scale = inv_c if weight is None else inv_c * _channel(weight, dtype)
        dbias = gf.sum(_NHW).to(x.dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        dv = None
        if ctx.numerator == "identity":
            ga = _plane_dot(gf, xf)  # Σ_hw dy·a, (N, C, 1, 1)
            dx = gf * scale
        else:
            sig = (xf * v_c if ctx.numerator == "sigmoid_v" else xf).sigmoid()
            a = xf * sig
            ga = _plane_dot(gf, a)
            t = gf * scale
            # a'(x) = σ + u·x·σ(1 − σ) = σ + u·q with q = a·(1 − σ), u = v (S0) or 1 (SiLU); ∂a/∂v = x·q
            tq = torch.addcmul(a, a, sig, value=-1).mul_(t)
            if ctx.numerator == "sigmoid_v":
                if ctx.needs_input_grad[3]:
                    dv = _plane_dot(tq, xf).sum((0, 2, 3)).to(v.dtype)
                dx = t.mul_(sig).addcmul_(tq, v_c)
            else:
                dx = t.mul_(sig).add_(tq)
        dweight = _grad_of(weight, (ga * inv_c).sum(_NHW)) if ctx.needs_input_grad[1] else None
        # Σ over the group of t·a with t = dy·γ/d_g, times 1/(K·d_g²): the statistic's share of dx
        group_sum = (ga * scale).reshape(n, groups, -1).sum(-1, keepdim=True)
        coef = _per_channel(group_sum * inv.square() / (xf[0].numel() // groups), channels)
        # x − μ first (no cancellation of coef·x − coef·μ), and to x's own rounding
        centred = xf if ctx.rms else _deviation(xf.reshape(n, groups, -1), mean, (-1,)).view(xf.shape)
        dx = dx.addcmul_(centred, coef, value=-1)
        return dx.to(x.dtype), dweight, dbias, dv, None, None, None, None


def _evo_s_backward_differentiable(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], ...]:
    """The S backward recomputed from ``x`` with differentiable ops, for a double backward (the saved statistics hold
    no graph)."""
    x, weight, v, _, _ = ctx.saved_tensors
    dtype = compute_dtype(x.dtype)
    xf, gf = x.to(dtype), grad.to(dtype)
    n, channels = x.shape[:2]
    groups = ctx.groups
    inv, mean = _group_stats(xf, groups, ctx.rms, ctx.eps)
    v_c = _channel(v, dtype)
    a, sig = _numerator(xf, ctx.numerator, v_c)
    ga = (gf * a).sum(_HW, keepdim=True)
    inv_c = _per_channel(inv, channels)
    scale = inv_c if weight is None else inv_c * _channel(weight, dtype)
    dweight = _grad_of(weight, (ga * inv_c).sum(_NHW)) if ctx.needs_input_grad[1] else None
    dbias = gf.sum(_NHW).to(x.dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
    group_sum = (ga * scale).reshape(n, groups, -1).sum(-1, keepdim=True)
    coef = _per_channel(group_sum * inv.square() / (xf[0].numel() // groups), channels)
    t = gf * scale
    dv = None
    if sig is None:
        dx = t
    else:
        slope = xf * sig * (1 - sig)
        if ctx.numerator == "sigmoid_v":
            if ctx.needs_input_grad[3]:
                dv = (t * xf * slope).sum(_NHW).to(v.dtype)
            slope = slope * v_c
        dx = t * (sig + slope)
    centred = xf if mean is None else _deviation(xf.reshape(n, groups, -1), mean, (-1,)).view(xf.shape)
    dx = dx - coef * centred
    return dx.to(x.dtype), dweight, dbias, dv, None, None, None, None


def evo_norm_s(x: Tensor, groups: int, weight: Optional[Tensor], bias: Optional[Tensor], v: Optional[Tensor], *,
               variant: str, activation: Optional[Callable[[Tensor], Tensor]], eps: float, apply_act: bool) -> Tensor:
    """As :func:`normlayers.reference.evo_norm.evo_norm_s` for a call that normalizes (``apply_act``, or an "a"
    variant without it) and that :func:`supports_s` accepts."""
    if not apply_act:
        numerator = "identity"
    elif variant == "s0":
        numerator = "sigmoid_v"
    else:
        numerator = "silu" if _is_silu(activation) else "identity"
    function = _EvoSFunction.apply if _records_graph(x, weight, bias, v) else _EvoSFunction.forward
    return function(x, weight, bias, v, groups, numerator, variant == "s2", eps)[0]


# ----------------------------------------------------------------------------------------------------------------------
# B0 / B1 / B2
# ----------------------------------------------------------------------------------------------------------------------


def _side_from_stat(xf: Tensor, variant: str, v_c: Optional[Tensor], stat: Tensor) -> Tensor:
    """The right side of the max from the per-(sample, channel) statistic: ``v·x + s`` (B0), ``(x + 1)·q`` (B1),
    ``q − x`` (B2); a fresh tensor."""
    if variant == "b0":
        return torch.mul(xf, v_c).add_(stat)  # not addcmul: its two broadcast operands make it slower on CPU
    return torch.add(xf, 1.0).mul_(stat) if variant == "b1" else torch.sub(stat, xf)


def _instance_side(xf: Tensor, variant: str, v_c: Optional[Tensor], eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(r, stat, mean)``: the right side of the max, the per-(sample, channel) statistic it uses (the instance std
    for B0, the instance RMS for B1/B2) and, for B0, the instance mean (else an unused 0-d zero: a distinct tensor,
    as the Function returns both)."""
    plane = xf.reshape(xf.shape[0], xf.shape[1], -1)
    if variant == "b0":
        mean = plane.mean(-1, keepdim=True)
        squares, mean = _square_sum(plane - mean), mean.unsqueeze(-1)
    else:
        squares = _square_sum(plane)
    stat = torch.sqrt(squares.view(xf.shape[0], xf.shape[1], 1, 1) / plane.shape[-1] + eps)
    if variant != "b0":
        mean = stat.new_zeros(())
    return _side_from_stat(xf, variant, v_c, stat), stat, mean


def _plane_dot(a: Tensor, b: Tensor) -> Tensor:
    """``Σ_hw a·b`` per (sample, channel), ``(N, C, 1, 1)`` (``vecdot``: on CPU a product, then its sum)."""
    n, channels = a.shape[:2]
    return torch.linalg.vecdot(a.reshape(n, channels, -1), b.reshape(n, channels, -1)).view(n, channels, 1, 1)


def _evo_b_forward(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], v: Optional[Tensor], var: Tensor,
                   variant: str, eps: float, keep_max: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(y, m, stat, mean)`` as :class:`_EvoBFunction` returns them; without ``keep_max`` (no backward to come)
    ``y`` is written over ``m``."""
    dtype = compute_dtype(x.dtype)
    xf = x.to(dtype)
    left = torch.sqrt(var.to(dtype) + eps).view(1, -1, 1, 1)
    right, stat, inst_mean = _instance_side(xf, variant, _channel(v, dtype), eps)
    m = right.clamp_min_(left)  # max(l, r), in place: r is a fresh temporary
    # then in place: on CPU a fresh activation-sized allocation costs as much as a pass
    y = torch.div(xf, m) if keep_max else torch.div(xf, m, out=m)
    if weight is not None:
        y = y.mul_(_channel(weight, dtype))
    if bias is not None:
        y = y.add_(_channel(bias, dtype))
    return y.to(x.dtype), m, stat, inst_mean


def _records_graph(*tensors: Optional[Tensor]) -> bool:
    """Whether autograd records this call (else a Function's forward runs bare: no saving, no apply overhead)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class _EvoBFunction(torch.autograd.Function):
    """Returns ``(y, m, stat, mean)``; the last three (the max and the instance side's statistics) are saved for the
    first-order backward and are not differentiable."""

    @staticmethod
    def forward(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], v: Optional[Tensor], var: Tensor,
                batch_mean: Optional[Tensor], variant: str, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return _evo_b_forward(x, weight, bias, v, var, variant, eps, keep_max=True)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        x, weight, bias, v, var, batch_mean, variant, eps = inputs
        _, m, stat, inst_mean = output
        ctx.mark_non_differentiable(m, stat, inst_mean)
        ctx.save_for_backward(x, weight, v, var, batch_mean, m, stat, inst_mean)
        ctx.variant, ctx.eps, ctx.has_bias = variant, eps, bias is not None

    @staticmethod
    def backward(ctx: Any, grad: Tensor, *unused: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
        if torch.is_grad_enabled():
            return _evo_b_backward_differentiable(ctx, grad)
        x, weight, v, var, batch_mean, m, stat, inst_mean = ctx.saved_tensors
        dtype = compute_dtype(x.dtype)
        xf, gf = x.to(dtype), grad.to(dtype)
        n, channels, height, width = xf.shape
        hw = height * width
        v_c = _channel(v, dtype)
        e = gf / m
        dweight = _grad_of(weight, _plane_dot(e, xf).sum((0, 2, 3))) if ctx.needs_input_grad[1] else None
        dbias = gf.sum(_NHW).to(x.dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        left = torch.sqrt(var.to(dtype) + ctx.eps).view(1, -1, 1, 1)
        right = _side_from_stat(xf, ctx.variant, v_c, stat)
        # torch.maximum's rule: the larger side takes the gradient, each side half of it at a tie
        # (in place, and dropped once used: the backward's peak memory stays below the reference's)
        to_right = right.sub_(left).heaviside_(right.new_full((), 0.5))
        # ∂L/∂m = −dy·γ·x/m² = −γ·h; h_r = h on the right side's share
        h = torch.mul(e, xf).div_(m)
        h_sum = h.sum(_NHW, keepdim=True) if batch_mean is not None else None
        h_right = h.mul_(to_right)
        del right, to_right
        hr_plane = h_right.sum(_HW, keepdim=True)
        gamma = None if weight is None else _channel(weight, dtype)

        def times_gamma(t: Tensor) -> Tensor:
            return t if gamma is None else t * gamma

        # dx = γ·(e − ρ·h_r) + plane·(x − shift) + coef·(x − μ_c) with ρ = ∂r/∂x_j's per-element part; the centred
        # terms are formed as x − μ first (a plane of nearly equal values would cancel in plane·x − plane·μ)
        dv = None
        if ctx.variant == "b0":
            # r = v·x + s, s the instance std: ∂r/∂x_j = v + (x_j − μ)/(H·W·s)
            if ctx.needs_input_grad[3]:
                dv = (-times_gamma(_plane_dot(h_right, xf))).sum((0, 2, 3)).to(v.dtype)
            plane = -times_gamma(hr_plane) / (stat * hw)
            e = e.addcmul_(h_right, -v_c)
            centred = _deviation(xf, inst_mean, _HW)
        elif ctx.variant == "b1":
            # r = (x + 1)·q, q the instance RMS: ∂r/∂x_j = q + Σ(x + 1)·x_j/(H·W·q)
            plane = -times_gamma(_plane_dot(h_right, xf) + hr_plane) / (stat * hw)
            e = e.addcmul_(h_right, -stat)
            centred = xf
        else:
            # r = q − x: ∂r/∂x_j = −1 + x_j/(H·W·q)
            plane = -times_gamma(hr_plane) / (stat * hw)
            e = e.add_(h_right)
            centred = xf
        if batch_mean is not None:
            # training: l depends on x through the batch variance; Σ ∂L/∂l = −γ·Σ(h − h_r)
            count = xf.numel() // channels
            coef = -times_gamma(h_sum - h_right.sum(_NHW, keepdim=True)) / (left * count)
        dx = e if gamma is None else e.mul_(gamma)
        dx = dx.addcmul_(centred, plane)
        if batch_mean is not None:
            dx = dx.addcmul_(_deviation(xf, batch_mean.to(dtype).view(1, -1, 1, 1), _NHW), coef)
        return dx.to(x.dtype), dweight, dbias, dv, None, None, None, None


def _evo_b_backward_differentiable(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], ...]:
    """The B backward recomputed from ``x`` with differentiable ops, for a double backward (the saved max and
    statistics hold no graph)."""
    x, weight, v, var, batch_mean, _, _, _ = ctx.saved_tensors
    dtype = compute_dtype(x.dtype)
    xf, gf = x.to(dtype), grad.to(dtype)
    v_c = _channel(v, dtype)
    if batch_mean is not None:
        var, batch_mean = var_mean(xf, _NHW)
    left = torch.sqrt(var.to(dtype) + ctx.eps).view(1, -1, 1, 1)
    right, stat, inst_mean = _instance_side(xf, ctx.variant, v_c, ctx.eps)
    inv_m = torch.maximum(left, right).reciprocal()
    normed = xf * inv_m
    dweight = _grad_of(weight, (gf * normed).sum(_NHW)) if ctx.needs_input_grad[1] else None
    dbias = gf.sum(_NHW).to(x.dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
    gy = gf if weight is None else gf * _channel(weight, dtype)
    dx = gy * inv_m
    gm = -dx * normed  # ∂L/∂m
    to_left = (left > right).to(dtype) + 0.5 * (left == right).to(dtype)
    g_left = gm * to_left
    g_right = gm - g_left
    if batch_mean is not None:  # training: l depends on x through the batch variance
        count = xf.numel() // xf.shape[1]
        coef = (g_left.sum(_NHW, keepdim=True) / (left * count))
        dx = dx + coef * _deviation(xf, batch_mean.to(dtype).view(1, -1, 1, 1), _NHW)
    hw = xf.shape[2] * xf.shape[3]
    dv = None
    if ctx.variant == "b0":
        if ctx.needs_input_grad[3]:
            dv = (g_right * xf).sum(_NHW).to(v.dtype)
        plane_coef = g_right.sum(_HW, keepdim=True) / (stat * hw)
        dx = dx + g_right * v_c + plane_coef * _deviation(xf, inst_mean, _HW)
    elif ctx.variant == "b1":
        plane_coef = (g_right * (xf + 1.0)).sum(_HW, keepdim=True) / (stat * hw)
        dx = dx + g_right * stat + plane_coef * xf
    else:
        plane_coef = g_right.sum(_HW, keepdim=True) / (stat * hw)
        dx = dx - g_right + plane_coef * xf
    return dx.to(x.dtype), dweight, dbias, dv, None, None, None, None


def evo_norm_b(x: Tensor, running_var: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
               v: Optional[Tensor], *, variant: str, training: bool, momentum: float, eps: float) -> Tensor:
    """As :func:`normlayers.reference.evo_norm.evo_norm_b` with ``apply_act=True`` and no synced statistics
    (``running_var`` updated in place in training by the reference's rule)."""
    if torch.compiler.is_compiling():
        # inductor fuses the reference's autograd into fewer activation-sized temporaries than this Function's
        # backward (bf16 training steps at 8x256x14x14 took 1.3-1.6x the compiled reference's time through it)
        return _ref_evo.evo_norm_b(x, running_var, weight, bias, v, variant=variant, training=training,
                                   momentum=momentum, eps=eps, apply_act=True)
    if not training:
        if not _records_graph(x, weight, bias, v):
            return _evo_b_forward(x, weight, bias, v, running_var, variant, eps, keep_max=False)[0]
        return _EvoBFunction.apply(x, weight, bias, v, running_var, None, variant, eps)[0]
    with torch.no_grad():
        var, mean = var_mean(x.to(compute_dtype(x.dtype)), _NHW)
    if running_var is not None:
        _ref_evo.update_running_var_(running_var, var, x.numel() // x.shape[1], momentum)
    return _EvoBFunction.apply(x, weight, bias, v, var, mean, variant, eps)[0]
