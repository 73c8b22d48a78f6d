r"""CPU tier of PowerNorm (Shen et al., ICML 2020) and Unified Normalization (Yang et al., ACM MM 2022): the
reference's math (:mod:`normlayers.reference.power_norm`, :mod:`normlayers.reference.unified_norm`, whose on-device
per-channel steps it shares) with each layer's backward written out and few passes over the tokens.

**GroupScaling** (``u = x·ρ`` per group of ``S`` channels, ``ρ = 1/sqrt(mean(x²) + eps)``) is its own
:class:`torch.autograd.Function`:

.. math:: \frac{\partial L}{\partial x} = \rho\,\Big(\frac{\partial L}{\partial u} - u\,\frac{1}{S}\sum_{group}
    \frac{\partial L}{\partial u}\,u\Big)

**Training steps** (``z = u·scale``): PowerNorm's approximate backward ``du = (dy·γ − k·z)·grad_scale`` with
``k = (1 − α_bkw)·ema_gz`` is ``(dy·γ − u·(k·scale))·grad_scale``, a multiply-add and a multiply in the buffer
that first held ``dy·u`` (summed per channel for ``Σdy·z``), and ``ema_gz += (γ·Σdy·z − k·Σz²) / R``; UnifiedNorm's
``dx = (dy·γ·r − c·z)·inv_std`` likewise.

**Statistics.** The reference takes every mean of squares (GroupScaling's over a group, the training step's over
the tokens) of values scaled by a power of two (docs/reliability.md), which differs from the unscaled statistic
only where that overflows or underflows. Eagerly the unscaled one is taken, one vectorized ``vector_norm`` pass with
no temporary, and checked (one host sync): an overflow shows as a zero ``ρ`` or a non-finite sum, and then the
scaled form runs; an underflow cannot matter beside ``eps ≥ 2^-60``.

**Under torch.compile** the tier is the reference itself: inductor fuses its formulation into fewer passes than this
one's (which saves ``u`` between two Functions and takes ``max|x|`` as two reductions), e.g. PowerNorm's training step
at ViT-B shapes took 1.22× the compiled reference's time through this closed form, and the same graph through the
reference.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from normlayers._autograd import differentiable_backward, refuse_double_backward, wants_double_backward
from normlayers._dtypes import compute_dtype
from normlayers.cpu._common import MIN_UNSCALED_EPS, all_positive_finite
from normlayers.reference import power_norm as _ref_power
from normlayers.reference import unified_norm as _ref_unified
from normlayers.reference.power_norm import Step
from normlayers.reference.row_norms import _max_scale_exponent, scale_exponent_cap

__all__ = ["power_norm", "unified_norm"]


def _host_values_readable(t: Tensor) -> bool:
    """Whether the (eager) tier may read ``t``'s values on the host: not a tensor subclass, not under a dispatch mode
    (e.g. fake tensors, which have no values)."""
    return type(t) is Tensor and _get_current_dispatch_mode() is None


def _step_of(iters: Tensor) -> Step:
    """This step's number after ``iters += 1``: an int (the decisions from it are Python branches, see
    :data:`normlayers.reference.power_norm.Step`); where the value is not at hand (a tensor subclass or a dispatch
    mode, e.g. fake tensors) a ``(1,)`` tensor through the opaque ``step_snapshot``, as the reference's."""
    iters.add_(1)
    if not _host_values_readable(iters):
        return _ref_power.step_snapshot([iters])[0]
    return int(iters)


def _power_of_two_scale_of_max(max_abs: Tensor, eps: float) -> Tensor:
    """:func:`normlayers.reference.row_norms.power_of_two_scale_of_max` in four ops: ``mantissa / max`` is NaN
    exactly where that is 1 (a zero, infinite or NaN maximum), and ``inf`` only where it clamps to the cap."""
    mantissa, _ = torch.frexp(max_abs)
    scale = torch.div(mantissa, max_abs).nan_to_num_(1.0)
    return scale.clamp_(2.0 ** -_max_scale_exponent(max_abs.dtype), 2.0 ** scale_exponent_cap(eps, max_abs.dtype))


def _max_abs(t: Tensor, dim: int, keepdim: bool = False) -> Tensor:
    """``max |t|`` along ``dim`` (NaN where one is NaN), without a temporary ``|t|``: ``max(amax, −amin)``."""
    return torch.maximum(t.amax(dim, keepdim), t.amin(dim, keepdim).neg())


def _group_factor(grouped: Tensor) -> Tensor:
    """GroupScaling's ``ρ = 1/sqrt(mean(x²) + eps)`` ``(R, G, 1)`` of the groups ``(R, G, S)``: eagerly unscaled,
    checked by :func:`normlayers.cpu._common.all_positive_finite` (an overflow, a NaN or an infinity in a group gives
    0 or NaN; module docstring), else the reference's scaled form."""
    eps, size = _ref_power.GROUP_SCALING_EPS, grouped.shape[-1]
    if grouped.numel() > 0 and _host_values_readable(grouped):
        factor = torch.linalg.vector_norm(grouped, dim=-1, keepdim=True).square_().div_(size).add_(eps).rsqrt_()
        if all_positive_finite(factor):
            return factor
    scale = _power_of_two_scale_of_max(_max_abs(grouped, -1, keepdim=True), eps)
    mean_square = torch.linalg.vector_norm(grouped * scale, dim=-1, keepdim=True).square_() / size
    return scale / torch.sqrt(mean_square + eps * scale * scale)  # ρ, from the scaled group


def _group_scaled(rows: Tensor, groups: int, in_place: bool = False) -> tuple[Tensor, Tensor]:
    """``(u, ρ)``: the group-scaled rows ``(R, G, C/G)`` (written over ``rows`` if ``in_place``) and the factor
    ``ρ`` ``(R, G, 1)`` of each group."""
    grouped = rows.reshape(rows.shape[0], groups, rows.shape[1] // groups)
    factor = _group_factor(grouped)
    return (grouped.mul_(factor) if in_place else grouped * factor), factor


class _GroupScaling(torch.autograd.Function):
    """``GroupScaling`` of token rows ``(R, C)`` in ``G`` groups (``mask_powernorm.py`` L28–37)."""

    @staticmethod
    def forward(ctx, rows: Tensor, groups: int) -> Tensor:
        u, factor = _group_scaled(rows, groups)
        ctx.save_for_backward(rows, u, factor)
        ctx.groups = groups
        return u.view(rows.shape)

    @staticmethod
    def backward(ctx, du: Tensor):
        rows, u, factor = ctx.saved_tensors
        if wants_double_backward():
            (dx,) = differentiable_backward(lambda r: _ref_power.group_scaling(r, ctx.groups), (rows,), (du,), (True,))
            return dx, None
        du = du.reshape(u.shape)
        dx = torch.mul(du, u)  # du·u, summed per group, then overwritten by dx
        mean_duu = dx.sum(-1, keepdim=True).div_(u.shape[-1])
        return torch.addcmul(du, u, mean_duu, value=-1.0, out=dx).mul_(factor).view(rows.shape), None


def _checked_column_square_sum(t: Tensor) -> Optional[Tensor]:
    """``Σ_rows t²`` per column of ``(R, C)`` ``t`` from one vectorized ``vector_norm`` pass with no temporary, where
    it is finite in every column (checked: one host sync); ``None`` where it overflowed (or a value is not finite) or
    cannot be read (:func:`_host_values_readable`): the caller's scaled form then."""
    if t.shape[0] == 0 or not _host_values_readable(t):
        return None
    total = torch.linalg.vector_norm(t, dim=0).square_()
    return total if bool(torch.isfinite(total).all()) else None


def _channel_mean_square(u: Tensor, valid: Optional[Tensor], eps: float) -> tuple[Tensor, Optional[Tensor],
                                                                                  Optional[Tensor]]:
    """:func:`normlayers.reference.power_norm.masked_square_mean`: ``(q·s², s, count)``. As for GroupScaling's
    factor (:func:`_group_factor`), the sum of squares is taken unscaled (``s = None``, which the reference's
    statistics accept: its synced form) where that is exact (module docstring), else the reference's scaled form."""
    selected = u if valid is None else torch.where(valid[:, None], u, 0.0)  # select: a NaN in a pad must not leak
    total = _checked_column_square_sum(selected) if eps >= MIN_UNSCALED_EPS else None
    scale = None
    if u.shape[0] == 0:
        total = selected.sum(0)
    elif total is None:
        scale = _power_of_two_scale_of_max(_max_abs(selected, 0), eps)
        total = (selected * scale).square_().sum(0)
    q, count = _ref_power.mean_over_valid(total, u.shape[0], valid)
    return q, scale, count


class _PowerNormStep(torch.autograd.Function):
    """PowerNorm's training step on (group-scaled) token rows ``u`` ``(R, C)``, with the approximate backward."""

    @staticmethod
    def forward(ctx, u: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_phi: Tensor,
                ema_gz: Tensor, t: Step, valid: Optional[Tensor], eps: float, alpha_fwd: float, alpha_bkw: float,
                warmup_iters: int, backward_denominator: str) -> Tensor:
        q, q_scale, count = _channel_mean_square(u, valid, eps)
        scale, grad_scale = _ref_power.power_norm_statistics_(q, q_scale, count, running_phi, t, eps=eps,
                                                              alpha_fwd=alpha_fwd, warmup_iters=warmup_iters,
                                                              backward_denominator=backward_denominator)
        ctx.save_for_backward(u, weight, scale, grad_scale)
        ctx.ema_gz, ctx.alpha_bkw, ctx.bias_dtype = ema_gz, alpha_bkw, None if bias is None else bias.dtype
        gain = scale if weight is None else scale * weight.to(scale.dtype)
        return u * gain if bias is None else torch.addcmul(bias.to(u.dtype), u, gain)

    @staticmethod
    def backward(ctx, dy: Tensor):
        refuse_double_backward("PowerNorm's training backward (the method's approximate one, which updates ema_gz)")
        u, weight, scale, grad_scale = ctx.saved_tensors
        dy = dy.to(u.dtype)
        w = torch.ones_like(scale) if weight is None else weight.to(scale.dtype)
        k = (1 - ctx.alpha_bkw) * ctx.ema_gz.to(scale.dtype)
        du = torch.mul(dy, u)  # dy·u, summed per channel, then overwritten by du
        sum_dyz = du.sum(0).mul_(scale)  # Σ dy·z, z = u·scale
        with torch.no_grad():
            # mean over all rows of (g − k·z)·z, g = dy·w (0 for no rows)
            sum_uu = _checked_column_square_sum(u)
            sum_zz = (u * scale).square_().sum(0) if sum_uu is None else sum_uu.mul_(scale * scale)
            ctx.ema_gz.add_((w * sum_dyz - k * sum_zz) / max(u.shape[0], 1))
        # du = (g − k·z)·grad_scale = (dy·w − u·(k·scale))·grad_scale (scale·grad_scale may underflow)
        torch.mul(dy, w, out=du).addcmul_(u, k * scale, value=-1.0).mul_(grad_scale)
        dweight = None if weight is None else sum_dyz.to(weight.dtype)
        dbias = None if ctx.bias_dtype is None else dy.sum(0).to(ctx.bias_dtype)
        return (du, dweight, dbias) + (None,) * 9


def power_norm(x: Tensor, running_phi: Tensor, ema_gz: Tensor, iters: Tensor, weight: Optional[Tensor],
               bias: Optional[Tensor], pad_mask: Optional[Tensor] = None, *, training: bool, eps: float,
               alpha_fwd: float, alpha_bkw: float, warmup_iters: int, group_num: Optional[int],
               batch_first: bool = False, backward_denominator: str = "batch") -> Tensor:
    """:func:`normlayers.reference.power_norm.power_norm` (no synced statistics) on the CPU tier."""
    if torch.compiler.is_compiling():  # inductor fuses the reference's own formulation better (module docstring)
        return _ref_power.power_norm(x, running_phi, ema_gz, iters, weight, bias, pad_mask, training=training, eps=eps,
                                     alpha_fwd=alpha_fwd, alpha_bkw=alpha_bkw, warmup_iters=warmup_iters,
                                     group_num=group_num, batch_first=batch_first,
                                     backward_denominator=backward_denominator)
    xf = x.to(compute_dtype(x.dtype))
    rows = xf.reshape(-1, x.shape[-1])
    graph = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    own_rows = xf is not x and not graph  # rows of our own, no graph: overwritten in place (fewer fresh tensors)
    if group_num is None:
        u = rows
    elif graph:
        u = _GroupScaling.apply(rows, group_num)
    else:
        u, own_rows = _group_scaled(rows, group_num, in_place=own_rows)[0].view(rows.shape), True
    if training:
        _, valid = _ref_power.token_rows(x, pad_mask, time_major=not batch_first)
        y = _PowerNormStep.apply(u, weight, bias, running_phi.view(-1), ema_gz.view(-1), _step_of(iters), valid, eps,
                                 alpha_fwd, alpha_bkw, warmup_iters, backward_denominator)
    else:
        gain = torch.rsqrt(running_phi.reshape(-1).to(u.dtype) + eps)
        if weight is not None:
            gain = gain * weight.to(gain.dtype)
        if own_rows:  # in place: two passes, no fresh tensor
            y = u.mul_(gain) if bias is None else u.mul_(gain).add_(bias.to(u.dtype))
        else:
            y = u * gain if bias is None else torch.addcmul(bias.to(u.dtype), u, gain)
    return y.reshape(x.shape).to(x.dtype)


class _UnifiedNormStep(torch.autograd.Function):
    """UnifiedNorm's training step on token rows ``x`` ``(R, C)`` (opmath), with the method's own backward."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, running_var: Tensor, ema_gz: Tensor,
                buffer_x2: Tensor, buffer_gz: Tensor, skip_counter: Tensor, t: Step, valid: Optional[Tensor],
                eps: float, momentum: float, warmup_iters: int, outlier_filtration: bool,
                grad_compensation: bool) -> Tensor:
        q, q_scale, count = _channel_mean_square(x, valid, eps)
        inv_std, r, skip = _ref_unified.unified_norm_statistics_(
            q, q_scale, count, running_var, buffer_x2, skip_counter, t, eps=eps, momentum=momentum,
            warmup_iters=warmup_iters, outlier_filtration=outlier_filtration, grad_compensation=grad_compensation)
        # t and skip are tensors under a dispatch mode (saved), else Python values (kept on ctx)
        ctx.save_for_backward(x, weight, inv_std, r, *(v for v in (t, skip) if isinstance(v, Tensor)))
        ctx.step_values = [None if isinstance(v, Tensor) else v for v in (t, skip)]
        ctx.ema_gz, ctx.buffer_gz, ctx.momentum, ctx.warmup_iters = ema_gz, buffer_gz, momentum, warmup_iters
        return torch.addcmul(bias.to(x.dtype), x, inv_std * weight.to(x.dtype))

    @staticmethod
    def backward(ctx, dy: Tensor):
        refuse_double_backward("UnifiedNorm's training backward (the method's own, which updates ema_gz and "
                               "buffer_gz)")
        x, weight, inv_std, r, *saved = ctx.saved_tensors
        saved_step = iter(saved)
        t, skip = (next(saved_step) if v is None else v for v in ctx.step_values)
        dy = dy.to(x.dtype)
        wr = weight.to(x.dtype) * r
        dx = torch.mul(dy, x)  # dy·x, summed per channel, then overwritten by dx
        sum_dyz = dx.sum(0).mul_(inv_std)  # Σ dy·z, z = x·inv_std
        gz = wr * sum_dyz / max(x.shape[0], 1)  # mean over all rows of g·z, g = dy·w·r (0 for no rows)
        c = _ref_unified.unified_norm_backward_statistics_(gz, ctx.ema_gz, ctx.buffer_gz, t, skip,
                                                           momentum=ctx.momentum, warmup_iters=ctx.warmup_iters)
        # dx = (g − c·z)·inv_std = (dy·(w·r) − x·(c·inv_std))·inv_std (inv_std² may underflow)
        torch.mul(dy, wr, out=dx).addcmul_(x, c * inv_std, value=-1.0).mul_(inv_std)
        return (dx, (r * sum_dyz).to(weight.dtype), dy.sum(0).to(weight.dtype)) + (None,) * 12


def unified_norm(x: Tensor, running_var: Tensor, ema_gz: Tensor, buffer_x2: Tensor, buffer_gz: Tensor,
                 iters: Tensor, skip_counter: Tensor, weight: Tensor, bias: Tensor,
                 pad_mask: Optional[Tensor] = None, *, training: bool, eps: float, momentum: float,
                 warmup_iters: int, outlier_filtration: bool, grad_compensation: bool = True) -> Tensor:
    """:func:`normlayers.reference.unified_norm.unified_norm` (no synced statistics) on the CPU tier."""
    if torch.compiler.is_compiling():  # inductor fuses the reference's own formulation better (module docstring)
        return _ref_unified.unified_norm(x, running_var, ema_gz, buffer_x2, buffer_gz, iters, skip_counter, weight,
                                         bias, pad_mask, training=training, eps=eps, momentum=momentum,
                                         warmup_iters=warmup_iters, outlier_filtration=outlier_filtration,
                                         grad_compensation=grad_compensation)
    xf = x.to(compute_dtype(x.dtype))
    if not training:  # a per-channel affine of every token, padding included
        if xf is not x:  # bf16/fp16: ATen's batch_norm computes in fp32 without an fp32 copy of x (half the time)
            rows = x.reshape(-1, x.shape[-1])
            var, gain, shift = (t.to(xf.dtype) for t in (running_var, weight, bias))  # all of one dtype
            return F.batch_norm(rows, torch.zeros_like(var), var, gain, shift, False, 0.0, eps).view(x.shape)
        return torch.addcmul(bias.to(xf.dtype), xf, torch.rsqrt(running_var.to(xf.dtype) + eps)
                             * weight.to(xf.dtype)).to(x.dtype)
    rows, valid = _ref_power.token_rows(xf, pad_mask, time_major=False)
    y = _UnifiedNormStep.apply(rows, weight, bias, running_var, ema_gz, buffer_x2, buffer_gz, skip_counter,
                               _step_of(iters),
                               valid, eps, momentum, warmup_iters, outlier_filtration, grad_compensation)
    return y.reshape(x.shape).to(x.dtype)
