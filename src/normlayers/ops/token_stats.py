"""``torch.library`` custom ops for PowerNorm and UnifiedNorm on the shared token-statistics kernels.

**Fused layers** (the usual path; docs/power_unified.md, "Kernels"): ``token_moments``, ``power_norm_finalize`` /
``unified_norm_finalize`` (which update the running buffers and step counters in place) and ``token_affine``
forward; ``token_grad``, ``power_norm_finalize_bwd`` / ``unified_norm_finalize_bwd`` (which update ``ema_gz`` and
``buffer_gz``) and ``unified_norm_dx`` backward, composed by :class:`_PowerNormFused` and :class:`_UnifiedNormFused`;
eval is one ``token_affine`` (differentiable).

**The composition** (synced statistics, non-contiguous buffers): ops on token rows ``(R, C)`` (any
strides) and per-channel ``(C,)`` vectors, with the reference's per-channel steps as torch ops between them:

* ``token_square_sum(x, valid) -> (C,)``: ``Σ x²`` over the rows where ``valid`` (all rows when ``None``); fp32
  (fp64 for fp64 ``x``); not differentiable (the statistics carry no gradient in either method).
* ``token_grad_sums(dy, x, p, q) -> ((3, C), dx)``: ``[Σ x², Σ dy·x, Σ dy]`` over all rows, and, when ``p``/``q``
  are given, ``dx = dy·p[c] + x·q[c]`` from the same pass (in ``x``'s dtype; else an empty tensor).
* ``channel_affine(x, scale, shift, out_dtype) -> x·scale + shift`` (differentiable: the eval path) and
  ``channel_affine2(dy, p, x, q) -> dy·p + x·q`` (the input gradients of both methods).
* ``power_norm_train(u, weight, bias, scale, grad_scale, ema_gz, alpha_bkw, out_dtype) -> y = u·scale·weight +
  bias`` (in ``out_dtype``: ``u`` is GroupScaling's fp32 output for fp16/bf16 activations), whose
  registered backward is PowerNorm's approximate one (docs/power_unified.md): it updates ``ema_gz`` in place.
* ``unified_norm_train(x, weight, bias, inv_std, r, ema_gz, buffer_gz, t, skip, momentum, warmup_iters) -> y``
  likewise for UnifiedNorm (official ``UN1d`` backward): its backward updates ``ema_gz`` and ``buffer_gz`` in place.

Both ``*_train`` ops take an optional ``sync_group`` (a process group's name, ``sync_stats=True``): their backward
then all-reduces the per-channel sum behind the gradient statistic (and the row count) before the mean, so every
rank updates ``ema_gz``/``buffer_gz`` alike and computes its rows of the input gradient of the global batch.

:func:`power_norm` and :func:`unified_norm` (at the end) choose between the two.

The two ``*_train`` ops are pure functions of their inputs in the forward; the buffer updates of the backward happen
in the registered backward (as the official ``autograd.Function``s do), through the same on-device helpers as the
reference (:mod:`normlayers.reference.power_norm`, :mod:`normlayers.reference.unified_norm`).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from normlayers._autograd import differentiable_backward, refuse_double_backward, wants_double_backward
from normlayers._dtypes import compute_dtype
from normlayers.ops.row_norms import row_norm
from normlayers.reference import power_norm as _ref_power
from normlayers.reference import unified_norm as _ref_unified
from normlayers.reference.power_norm import mean_over_rows
from normlayers.reference.unified_norm import unified_norm_backward_statistics_

__all__ = ["token_square_sum", "token_grad_sums", "channel_affine", "channel_affine2", "power_norm_train",
           "unified_norm_train", "power_norm", "unified_norm"]


def _kernels():
    # Triton is imported lazily: the reference path and the package import must work without it.
    from normlayers.kernels import token_stats

    return token_stats


@torch.library.custom_op("normlayers::token_square_sum", mutates_args=())
def token_square_sum(x: Tensor, valid: Optional[Tensor]) -> Tensor:
    """Per-channel ``Σ x²`` over the rows of ``x`` ``(R, C)`` where ``valid`` ``(R,)`` is True (all when ``None``)."""
    return _kernels().token_sums(x, None, valid)[0][0]


@token_square_sum.register_fake
def _token_square_sum_fake(x, valid):
    return x.new_empty(x.shape[1], dtype=compute_dtype(x.dtype))


@torch.library.custom_op("normlayers::token_grad_sums", mutates_args=())
def token_grad_sums(dy: Tensor, x: Tensor, p: Optional[Tensor], q: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """``[Σ x², Σ dy·x, Σ dy]`` per channel over all rows, ``(3, C)``; and ``dy·p + x·q`` (like ``x``) when ``p``
    and ``q`` are given, else an empty tensor."""
    return _kernels().token_sums(x, dy, None, p, q)


@token_grad_sums.register_fake
def _token_grad_sums_fake(dy, x, p, q):
    dx = x.new_empty(x.shape if p is not None and q is not None else (0,))
    return x.new_empty((3, x.shape[1]), dtype=compute_dtype(x.dtype)), dx


@torch.library.custom_op("normlayers::channel_affine2", mutates_args=())
def channel_affine2(dy: Tensor, p: Tensor, x: Tensor, q: Tensor) -> Tensor:
    """``dy·p[c] + x·q[c]`` in ``x``'s dtype (computed in fp32, fp64 for fp64 ``x``): the gradient of ``x``."""
    return _kernels().channel_affine(dy, p, None, x, q, out_dtype=x.dtype)


@channel_affine2.register_fake
def _channel_affine2_fake(dy, p, x, q):
    return x.new_empty(dy.shape)


@torch.library.custom_op("normlayers::channel_affine", mutates_args=())
def channel_affine(x: Tensor, scale: Tensor, shift: Optional[Tensor], out_dtype: torch.dtype) -> Tensor:
    """``x·scale[c] + shift[c]`` in ``out_dtype`` (computed in fp32, fp64 for fp64 ``x``)."""
    return _kernels().channel_affine(x, scale, shift, out_dtype=out_dtype)


@channel_affine.register_fake
def _channel_affine_fake(x, scale, shift, out_dtype):
    return x.new_empty(x.shape, dtype=out_dtype)


def _channel_affine_setup_context(ctx, inputs, output):
    x, scale, shift, _out_dtype = inputs
    ctx.save_for_backward(x, scale)
    ctx.shift_dtype = shift.dtype if shift is not None else None


def _channel_affine_formula(x: Tensor, scale: Tensor, shift: Optional[Tensor]) -> Tensor:
    y = x.to(scale.dtype) * scale
    return y + shift if shift is not None else y


def _channel_affine_backward(ctx, dy):
    x, scale = ctx.saved_tensors
    if wants_double_backward():
        # shift enters additively: a zero stand-in gives its gradient (shift itself is not saved).
        shift = torch.zeros_like(scale) if ctx.shift_dtype is not None else None
        return (*differentiable_backward(_channel_affine_formula, (x, scale, shift), (dy,), ctx.needs_input_grad[:3]),
                None)
    sums, _ = token_grad_sums(dy, x, None, None)
    dx = channel_affine(dy, scale, None, x.dtype) if ctx.needs_input_grad[0] else None
    dshift = sums[2].to(ctx.shift_dtype) if ctx.shift_dtype is not None else None
    return dx, sums[1].to(scale.dtype), dshift, None


channel_affine.register_autograd(_channel_affine_backward, setup_context=_channel_affine_setup_context)


def _param_or_ones(weight: Optional[Tensor], like: Tensor) -> Tensor:
    return weight.to(like.dtype) if weight is not None else torch.ones_like(like)


# ----------------------------------------------------------------------------------------------------------------------
# PowerNorm
# ----------------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("normlayers::power_norm_train", mutates_args=())
def power_norm_train(u: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], scale: Tensor, grad_scale: Tensor,
                     ema_gz: Tensor, alpha_bkw: float, out_dtype: torch.dtype,
                     sync_group: Optional[str] = None) -> Tensor:
    """PowerNorm's training forward on group-scaled rows ``u``: ``y = u·scale·weight + bias`` in ``out_dtype``
    (``scale`` = ``1/sqrt(d + eps)``, :mod:`normlayers.reference.power_norm`). ``grad_scale`` and ``ema_gz`` are for the
    backward."""
    return _kernels().channel_affine(u, scale * _param_or_ones(weight, scale), bias, out_dtype=out_dtype)


@power_norm_train.register_fake
def _power_norm_train_fake(u, weight, bias, scale, grad_scale, ema_gz, alpha_bkw, out_dtype, sync_group=None):
    return u.new_empty(u.shape, dtype=out_dtype)


def _power_norm_setup_context(ctx, inputs, output):
    u, weight, bias, scale, grad_scale, ema_gz, alpha_bkw, _out_dtype, sync_group = inputs
    ctx.save_for_backward(u, weight, scale, grad_scale)
    ctx.sync_group = sync_group
    ctx.ema_gz = ema_gz  # the buffer, read and updated when backward runs
    ctx.alpha_bkw = alpha_bkw
    ctx.has_bias = bias is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _power_norm_backward(ctx, dy):
    refuse_double_backward("PowerNorm's training backward (the method's approximate one, which updates ema_gz)")
    u, weight, scale, grad_scale = ctx.saved_tensors
    ema_gz = ctx.ema_gz
    w = _param_or_ones(weight, scale)
    k = (1 - ctx.alpha_bkw) * ema_gz.to(scale.dtype)
    # du = (dy·w − k·u·scale)·grad_scale needs only the old ema_gz, so it comes from the reductions' pass.
    sums, du = token_grad_sums(dy, u, w * grad_scale, -k * scale * grad_scale)
    sum_uu, sum_dyu, sum_dy = sums.unbind(0)
    sum_dyz = sum_dyu * scale
    # mean over all R rows (of every rank when synced) of (g − k·z)·z, with g = dy·w and z = u·scale.
    with torch.no_grad():
        ema_gz.copy_(ema_gz + mean_over_rows(w * sum_dyz - k * scale.square() * sum_uu, u.shape[0], ctx.sync_group))
    dweight = sum_dyz.to(weight.dtype) if weight is not None else None
    dbias = sum_dy.to(ctx.bias_dtype) if ctx.has_bias else None
    return du, dweight, dbias, None, None, None, None, None, None


power_norm_train.register_autograd(_power_norm_backward, setup_context=_power_norm_setup_context)


# ----------------------------------------------------------------------------------------------------------------------
# UnifiedNorm
# ----------------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("normlayers::unified_norm_train", mutates_args=())
def unified_norm_train(x: Tensor, weight: Tensor, bias: Tensor, inv_std: Tensor, r: Tensor, ema_gz: Tensor,
                       buffer_gz: Tensor, t: Tensor, skip: Tensor, momentum: float, warmup_iters: int,
                       sync_group: Optional[str] = None) -> Tensor:
    """UnifiedNorm's training forward: ``y = x·inv_std·weight + bias`` (:mod:`normlayers.reference.unified_norm`; ``r``
    is not applied in the forward). ``r``, ``ema_gz``, ``buffer_gz``, ``t`` and ``skip`` are for the backward."""
    return _kernels().channel_affine(x, inv_std * weight.to(inv_std.dtype), bias)


@unified_norm_train.register_fake
def _unified_norm_train_fake(x, weight, bias, inv_std, r, ema_gz, buffer_gz, t, skip, momentum, warmup_iters,
                             sync_group=None):
    return x.new_empty(x.shape)


def _unified_norm_setup_context(ctx, inputs, output):
    x, weight, bias, inv_std, r, ema_gz, buffer_gz, t, skip, momentum, warmup_iters, sync_group = inputs
    ctx.save_for_backward(x, weight, inv_std, r, t, skip)
    ctx.ema_gz, ctx.buffer_gz = ema_gz, buffer_gz  # updated when backward runs
    ctx.momentum, ctx.warmup_iters, ctx.sync_group = momentum, warmup_iters, sync_group
    ctx.bias_dtype = bias.dtype


def _unified_norm_backward(ctx, dy):
    refuse_double_backward("UnifiedNorm's training backward (the method's own, which updates ema_gz and buffer_gz)")
    x, weight, inv_std, r, t, skip = ctx.saved_tensors
    sums, _ = token_grad_sums(dy, x, None, None)
    _sum_xx, sum_dyx, sum_dy = sums.unbind(0)
    wr = weight.to(inv_std.dtype) * r
    sum_dyz = sum_dyx * inv_std
    # gz = mean over all rows (of every rank when synced) of g·z, g = dy·weight·r
    gz = mean_over_rows(wr * sum_dyz, x.shape[0], ctx.sync_group)
    c = unified_norm_backward_statistics_(gz, ctx.ema_gz, ctx.buffer_gz, t, skip, momentum=ctx.momentum,
                                          warmup_iters=ctx.warmup_iters)
    # dx = (g − c·z)·inv_std = dy·(w·r·inv_std) − x·(c·inv_std²)
    dx = channel_affine2(dy, wr * inv_std, x, -c * inv_std.square())
    return (dx, (r * sum_dyz).to(weight.dtype), sum_dy.to(ctx.bias_dtype), *([None] * 9))


unified_norm_train.register_autograd(_unified_norm_backward, setup_context=_unified_norm_setup_context)


# ----------------------------------------------------------------------------------------------------------------------
# The fused layers (kernels/token_stats.py): forward token_moments → *_finalize → token_affine; backward token_grad →
# *_finalize_bwd (→ unified_norm_dx); eval token_affine alone. Every op takes the layer's input as it is (2-D or
# 3-D); the finalize ops update the running buffers in place, so the layers' autograd is a torch.autograd.Function.
# ----------------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("normlayers::token_moments", mutates_args=())
def token_moments(x: Tensor, pad_mask: Optional[Tensor], time_major: bool, groups: Optional[int],
                  eps: float) -> Tensor:
    """Partial rows ``(P, 2C + 1)`` of the second moment over the non-pad tokens of ``GroupScaling(x)`` (of ``x``
    without ``groups``), scaled by a power of two per channel (``kernels.token_stats.token_moments``)."""
    return _kernels().token_moments(x, pad_mask, time_major, groups, eps)


@token_moments.register_fake
def _token_moments_fake(x, pad_mask, time_major, groups, eps):
    channels = x.shape[-1]
    programs = _kernels().reduction_programs(x.numel() // max(channels, 1), channels, groups or 1, x.device)
    return x.new_empty((programs, 2 * channels + 1), dtype=compute_dtype(x.dtype))


@torch.library.custom_op("normlayers::power_norm_finalize", mutates_args=("running_phi", "iters"))
def power_norm_finalize(partials: Tensor, running_phi: Tensor, iters: Tensor, eps: float, alpha_fwd: float,
                        warmup_iters: int, grad_from_batch: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``(scale, grad_scale, step)`` of a PowerNorm training step from :func:`token_moments`; increments ``iters`` and
    updates ``running_phi`` (flat ``(C,)``) in place (``mask_powernorm.py`` L56–70)."""
    return _kernels().power_norm_finalize(partials, running_phi, iters, eps=eps, alpha_fwd=alpha_fwd,
                                          warmup_iters=warmup_iters, grad_from_batch=grad_from_batch)


@power_norm_finalize.register_fake
def _power_norm_finalize_fake(partials, running_phi, iters, eps, alpha_fwd, warmup_iters, grad_from_batch):
    channels = running_phi.shape[0]
    return (partials.new_empty(channels), partials.new_empty(channels), torch.empty_like(iters))


@torch.library.custom_op("normlayers::unified_norm_finalize",
                         mutates_args=("running_var", "buffer_x2", "skip_counter", "iters"))
def unified_norm_finalize(partials: Tensor, running_var: Tensor, buffer_x2: Tensor, skip_counter: Tensor,
                          iters: Tensor, eps: float, momentum: float, warmup_iters: int, outlier_filtration: bool,
                          grad_compensation: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(inv_std, r, step, skip)`` of a UnifiedNorm training step from :func:`token_moments`; updates the running
    buffers and counters in place (``unified_normalization.py`` L27–73)."""
    return _kernels().unified_norm_finalize(partials, running_var, buffer_x2, skip_counter, iters, eps=eps,
                                            momentum=momentum, warmup_iters=warmup_iters,
                                            outlier_filtration=outlier_filtration,
                                            grad_compensation=grad_compensation)


@unified_norm_finalize.register_fake
def _unified_norm_finalize_fake(partials, running_var, buffer_x2, skip_counter, iters, eps, momentum, warmup_iters,
                                outlier_filtration, grad_compensation):
    channels = running_var.shape[0]
    return (partials.new_empty(channels), partials.new_empty(channels), torch.empty_like(iters),
            iters.new_empty(1, dtype=torch.int8))


@torch.library.custom_op("normlayers::token_affine", mutates_args=())
def token_affine(x: Tensor, scale: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], groups: Optional[int],
                 running_eps: Optional[float], out_dtype: torch.dtype) -> Tensor:
    """``GroupScaling(x)·scale·weight + bias`` per channel (no GroupScaling without ``groups``) in ``out_dtype``; with
    ``running_eps`` the factor is ``rsqrt(scale + running_eps)`` of a running statistic ``scale`` (eval)."""
    return _kernels().token_affine(x, scale, weight, bias, groups, running_eps, out_dtype)


@token_affine.register_fake
def _token_affine_fake(x, scale, weight, bias, groups, running_eps, out_dtype):
    return x.new_empty(x.shape, dtype=out_dtype)


def _token_affine_formula(x: Tensor, scale: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                          groups: Optional[int], running_eps: Optional[float]) -> Tensor:
    u = x.to(compute_dtype(x.dtype))
    if groups is not None:
        u = _ref_power.group_scaling(u, groups)
    factor = torch.rsqrt(scale.to(u.dtype) + running_eps) if running_eps is not None else scale.to(u.dtype)
    y = u * factor
    if weight is not None:
        y = y * weight.to(y.dtype)
    return y + bias.to(y.dtype) if bias is not None else y


def _token_affine_setup_context(ctx, inputs, output):
    x, scale, weight, bias, groups, running_eps, _out_dtype = inputs
    ctx.save_for_backward(x, scale, weight, bias)
    ctx.groups, ctx.running_eps = groups, running_eps


def _token_affine_backward(ctx, dy):
    """The eval layer's gradient (the running statistic is a constant): ``token_grad`` with ``k = 0``."""
    x, scale, weight, bias = ctx.saved_tensors
    if wants_double_backward():
        grads = differentiable_backward(
            lambda x, weight, bias: _token_affine_formula(x, scale, weight, bias, ctx.groups, ctx.running_eps),
            (x, weight, bias), (dy,), (ctx.needs_input_grad[0], *ctx.needs_input_grad[2:4]))
        return grads[0], None, grads[1], grads[2], None, None, None
    factor = scale.to(compute_dtype(x.dtype))
    if ctx.running_eps is not None:
        factor = torch.rsqrt(factor + ctx.running_eps)
    dx, partials = token_grad(x, dy, factor, weight, None, 0.0, factor, ctx.groups)
    sums = partials.view(partials.shape[0], 3, -1).sum(0)
    dweight = sums[0].to(weight.dtype) if weight is not None else None
    dbias = sums[1].to(bias.dtype) if bias is not None else None
    return dx, None, dweight, dbias, None, None, None


token_affine.register_autograd(_token_affine_backward, setup_context=_token_affine_setup_context)


@torch.library.custom_op("normlayers::token_grad", mutates_args=())
def token_grad(x: Tensor, dy: Tensor, scale: Tensor, weight: Optional[Tensor], ema_gz: Optional[Tensor],
               ema_factor: float, grad_scale: Optional[Tensor], groups: Optional[int]) -> tuple[Tensor, Tensor]:
    """``(dx, partials)``: partial rows ``(P, 3C)`` of ``(Σ dy·z, Σ dy, Σ (g − k·z)·z)`` over every token, with
    ``z = GroupScaling(x)·scale``, ``g = dy·weight``, ``k = ema_factor·ema_gz``; with ``grad_scale`` also
    ``dx`` = GroupScaling's backward of ``(g − k·z)·grad_scale`` (PowerNorm's approximate backward), else empty."""
    return _kernels().token_grad(x, dy, scale, weight, ema_gz, ema_factor, grad_scale, groups)


@token_grad.register_fake
def _token_grad_fake(x, dy, scale, weight, ema_gz, ema_factor, grad_scale, groups):
    channels = x.shape[-1]
    programs = _kernels().reduction_programs(x.numel() // max(channels, 1), channels, groups or 1, x.device)
    return (x.new_empty(x.shape if grad_scale is not None else (0,)),
            x.new_empty((programs, 3 * channels), dtype=compute_dtype(x.dtype)))


@torch.library.custom_op("normlayers::power_norm_finalize_bwd", mutates_args=("ema_gz",))
def power_norm_finalize_bwd(partials: Tensor, ema_gz: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                            rows: int) -> tuple[Tensor, Tensor]:
    """``(dweight, dbias)`` from :func:`token_grad`'s partials (empty for a missing parameter); adds the mean over
    ``rows`` of ``(g − k·z)·z`` to ``ema_gz`` in place (``mask_powernorm.py`` L74–95)."""
    return _kernels().power_norm_finalize_bwd(partials, ema_gz, weight, bias, rows)


@power_norm_finalize_bwd.register_fake
def _power_norm_finalize_bwd_fake(partials, ema_gz, weight, bias, rows):
    return tuple(torch.empty_like(p) if p is not None else partials.new_empty(0) for p in (weight, bias))


@torch.library.custom_op("normlayers::unified_norm_finalize_bwd", mutates_args=("ema_gz", "buffer_gz"))
def unified_norm_finalize_bwd(partials: Tensor, weight: Tensor, r: Tensor, step: Tensor, skip: Tensor,
                              ema_gz: Tensor, buffer_gz: Tensor, rows: int, momentum: float,
                              warmup_iters: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(c, dweight, dbias)`` from :func:`token_grad`'s partials; updates ``ema_gz`` and ``buffer_gz`` in place
    (``unified_normalization.py`` L76–110)."""
    return _kernels().unified_norm_finalize_bwd(partials, weight, r, step, skip, ema_gz, buffer_gz, rows,
                                                momentum=momentum, warmup_iters=warmup_iters)


@unified_norm_finalize_bwd.register_fake
def _unified_norm_finalize_bwd_fake(partials, weight, r, step, skip, ema_gz, buffer_gz, rows, momentum, warmup_iters):
    return torch.empty_like(r), torch.empty_like(weight), torch.empty_like(weight)


@torch.library.custom_op("normlayers::unified_norm_dx", mutates_args=())
def unified_norm_dx(x: Tensor, dy: Tensor, inv_std: Tensor, weight: Tensor, r: Tensor, coeff: Tensor) -> Tensor:
    """``dx = (dy·weight·r − c·z)·inv_std`` with ``z = x·inv_std``, in ``x``'s dtype."""
    return _kernels().unified_norm_dx(x, dy, inv_std, weight, r, coeff)


@unified_norm_dx.register_fake
def _unified_norm_dx_fake(x, dy, inv_std, weight, r, coeff):
    return torch.empty_like(x)


class _PowerNormFused(torch.autograd.Function):
    """PowerNorm's training step in three launches forward, two backward (the method's approximate backward, which
    updates ``ema_gz``)."""

    @staticmethod
    def forward(ctx, input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_phi: Tensor,
                ema_gz: Tensor, iters: Tensor, pad_mask: Optional[Tensor], time_major: bool, groups: Optional[int],
                eps: float, alpha_fwd: float, alpha_bkw: float, warmup_iters: int,
                backward_denominator: str) -> Tensor:
        partials = token_moments(input, pad_mask, time_major, groups, eps)
        scale, grad_scale, _step = power_norm_finalize(partials, running_phi, iters, eps, alpha_fwd, warmup_iters,
                                                       backward_denominator == "batch")
        ctx.save_for_backward(input, weight, bias, scale, grad_scale)
        ctx.ema_gz = ema_gz  # the buffer, read and updated when backward runs (as the official ctx does)
        ctx.alpha_bkw, ctx.groups = alpha_bkw, groups
        return token_affine(input, scale, weight, bias, groups, None, input.dtype)

    @staticmethod
    def backward(ctx, dy: Tensor):
        refuse_double_backward("PowerNorm's training backward (the method's approximate one, which updates ema_gz)")
        input, weight, bias, scale, grad_scale = ctx.saved_tensors
        dx, partials = token_grad(input, dy, scale, weight, ctx.ema_gz, 1.0 - ctx.alpha_bkw, grad_scale, ctx.groups)
        dweight, dbias = power_norm_finalize_bwd(partials, ctx.ema_gz, weight, bias, dy.numel() // dy.shape[-1])
        return (dx, dweight if weight is not None else None, dbias if bias is not None else None) + (None,) * 11


class _UnifiedNormFused(torch.autograd.Function):
    """UnifiedNorm's training step in three launches each way (the method's own backward, which updates ``ema_gz``
    and ``buffer_gz``)."""

    @staticmethod
    def forward(ctx, input: Tensor, weight: Tensor, bias: Tensor, running_var: Tensor, ema_gz: Tensor,
                buffer_x2: Tensor, buffer_gz: Tensor, skip_counter: Tensor, iters: Tensor, pad_mask: Optional[Tensor],
                eps: float, momentum: float, warmup_iters: int, outlier_filtration: bool,
                grad_compensation: bool) -> Tensor:
        partials = token_moments(input, pad_mask, False, None, eps)
        inv_std, r, step, skip = unified_norm_finalize(partials, running_var, buffer_x2, skip_counter, iters, eps,
                                                       momentum, warmup_iters, outlier_filtration, grad_compensation)
        ctx.save_for_backward(input, weight, inv_std, r, step, skip)
        ctx.ema_gz, ctx.buffer_gz = ema_gz, buffer_gz  # updated when backward runs
        ctx.momentum, ctx.warmup_iters = momentum, warmup_iters
        return token_affine(input, inv_std, weight, bias, None, None, input.dtype)

    @staticmethod
    def backward(ctx, dy: Tensor):
        refuse_double_backward("UnifiedNorm's training backward (the method's own, which updates ema_gz and "
                               "buffer_gz)")
        input, weight, inv_std, r, step, skip = ctx.saved_tensors
        _, partials = token_grad(input, dy, inv_std, None, None, 0.0, None, None)
        coeff, dweight, dbias = unified_norm_finalize_bwd(partials, weight, r, step, skip, ctx.ema_gz, ctx.buffer_gz,
                                                          dy.numel() // dy.shape[-1], ctx.momentum, ctx.warmup_iters)
        return (unified_norm_dx(input, dy, inv_std, weight, r, coeff), dweight, dbias) + (None,) * 12


def _fusable(sync_group: Optional[str], *buffers: Tensor) -> bool:
    """Whether a call runs the fused kernels: no synced statistics, and buffers the finalize kernels can index as
    contiguous ``(C,)``/``(M, C)`` arrays (they update them in place). (DTensor inputs never get here: the functionals
    run them on their local shards, with synced statistics.)"""
    return sync_group is None and all(b.is_contiguous() for b in buffers)


def power_norm(input: Tensor, running_phi: Tensor, ema_gz: Tensor, iters: Tensor, weight: Optional[Tensor],
               bias: Optional[Tensor], pad_mask: Optional[Tensor], *, training: bool, eps: float,
               alpha_fwd: float, alpha_bkw: float, warmup_iters: int, group_num: Optional[int],
               batch_first: bool, backward_denominator: str, sync_group: Optional[str]) -> Tensor:
    """PowerNorm on the Triton ops: fused (:class:`_PowerNormFused`, GroupScaling recomputed inside each pass; in
    eval one :func:`token_affine`), or (see :func:`_fusable`) a composition: GroupScaling as the
    RMSNorm row kernel over groups (eps 1e-5), the token statistics, the reference's on-device per-channel steps."""
    if _fusable(sync_group, running_phi, ema_gz):
        if training:
            return _PowerNormFused.apply(input, weight, bias, running_phi.view(-1), ema_gz.view(-1), iters, pad_mask,
                                         not batch_first, group_num, eps, alpha_fwd, alpha_bkw, warmup_iters,
                                         backward_denominator)
        return token_affine(input, running_phi.view(-1), weight, bias, group_num, eps, input.dtype)
    channels = input.shape[-1]
    u = input
    if group_num is not None:
        # GroupScaling's output u (and its gradient) in fp32 for fp16/bf16 activations, so the layer rounds once, at
        # its output, as the reference does (an fp16/bf16 u would add a rounding to every later step).
        grouped = input.reshape(*input.shape[:-1], group_num, channels // group_num)
        grouped = grouped.to(compute_dtype(input.dtype))
        u = row_norm(grouped, (channels // group_num,), None, None, "rms",
                     _ref_power.GROUP_SCALING_EPS)[0].reshape(input.shape)
    rows, valid = _ref_power.token_rows(u, pad_mask, time_major=not batch_first)
    if training:
        iters.add_(1)
        (step,) = _ref_power.step_snapshot([iters.reshape(1)])
        q, count = _ref_power.mean_over_valid(token_square_sum(rows.detach(), valid), rows.shape[0], valid,
                                              sync_group)
        scale, grad_scale = _ref_power.power_norm_statistics_(
            q, None, count, running_phi.view(-1), step, eps=eps, alpha_fwd=alpha_fwd, warmup_iters=warmup_iters,
            backward_denominator=backward_denominator)
        y = power_norm_train(rows, weight, bias, scale, grad_scale, ema_gz.view(-1), alpha_bkw, input.dtype,
                             sync_group)
    else:
        scale = torch.rsqrt(running_phi.reshape(-1).to(compute_dtype(input.dtype)) + eps)
        if weight is not None:
            scale = scale * weight.to(scale.dtype)
        y = channel_affine(rows, scale, bias, input.dtype)
    return y.view(input.shape)


def unified_norm(input: Tensor, running_var: Tensor, ema_gz: Tensor, buffer_x2: Tensor, buffer_gz: Tensor,
                 iters: Tensor, skip_counter: Tensor, weight: Tensor, bias: Tensor,
                 pad_mask: Optional[Tensor], *, training: bool, eps: float, momentum: float,
                 warmup_iters: int, outlier_filtration: bool, grad_compensation: bool,
                 sync_group: Optional[str]) -> Tensor:
    """UnifiedNorm on the Triton ops: fused (:class:`_UnifiedNormFused`; in eval one :func:`token_affine`), or, with
    synced statistics or non-contiguous buffers, the token ops composed with the reference's
    on-device helpers."""
    if _fusable(sync_group, running_var, ema_gz, buffer_x2, buffer_gz):
        if training:
            return _UnifiedNormFused.apply(input, weight, bias, running_var, ema_gz, buffer_x2, buffer_gz,
                                           skip_counter, iters, pad_mask, eps, momentum, warmup_iters,
                                           outlier_filtration, grad_compensation)
        return token_affine(input, running_var, weight, bias, None, eps, input.dtype)
    rows, valid = _ref_power.token_rows(input, pad_mask, time_major=False)
    if training:
        iters.add_(1)
        (step,) = _ref_power.step_snapshot([iters.reshape(1)])
        q, count = _ref_power.mean_over_valid(token_square_sum(rows.detach(), valid), rows.shape[0], valid,
                                              sync_group)
        inv_std, r, skip = _ref_unified.unified_norm_statistics_(
            q, None, count, running_var, buffer_x2, skip_counter, step, eps=eps, momentum=momentum,
            warmup_iters=warmup_iters, outlier_filtration=outlier_filtration, grad_compensation=grad_compensation)
        y = unified_norm_train(rows, weight, bias, inv_std, r, ema_gz, buffer_gz, step, skip,
                               momentum, warmup_iters, sync_group)
    else:
        scale = torch.rsqrt(running_var.to(compute_dtype(input.dtype)) + eps) * weight
        y = channel_affine(rows, scale, bias, input.dtype)
    return y.view(input.shape)
