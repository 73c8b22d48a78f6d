"""Batch-Channel Normalization on the per-plane kernels: three launches forward in training, two in eval, three
backward.

Forward: ``normlayers::plane_moments`` (each plane's mean and variance), ``normlayers::batch_channel_finalize`` (all
the ``(N, C)`` math in one kernel: the batch stage's statistics and running-buffer updates, the group combination,
each plane's ``scale``/``shift``; ``kernels/batch_channel.py``), ``normlayers::plane_affine``. In eval the running
statistics need no reduction over the batch, so ``normlayers::batch_channel_eval`` does each plane's finalize math
inside the elementwise pass (from the moments of the planes of its sample's group). Backward:
``normlayers::plane_affine_bwd`` (``dx`` of the affine pass and each plane's ``dscale``/``dshift``),
``normlayers::batch_channel_finalize_bwd`` (the hand-derived gradient of the finalize math), and
``normlayers::plane_moments_bwd``, which adds the statistics' share of ``dx`` to the affine pass's.

The finalize op updates the running buffers in place, and torch refuses ``register_autograd`` for an op that
mutates its inputs; so the layer's autograd is a :class:`torch.autograd.Function` over the ops (``torch.compile``
traces it with ``fullgraph=True``). Synced statistics (:mod:`normlayers.distributed`) need the batch moments before
they are used, so that path keeps a composition of ``(N, C)`` torch ops between the two plane ops.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

from normlayers._autograd import recomputed_backward, wants_double_backward
from normlayers._dtensor import is_dtensor
from normlayers.distributed import MomentSync
from normlayers.ops.channel_stats import (
    batch_moments_from_planes,
    plane_affine,
    plane_affine_bwd,
    plane_moments,
    plane_moments_bwd,
)
from normlayers.reference import batch_channel as _ref_batch_channel

__all__ = ["batch_channel_norm", "batch_channel_finalize", "batch_channel_finalize_bwd", "batch_channel_eval"]


def _kernels():
    # Triton is imported lazily: the reference path and the package import must work without it.
    from normlayers.kernels import batch_channel

    return batch_channel


@torch.library.custom_op("normlayers::batch_channel_finalize",
                         mutates_args=("running_mean", "running_var", "num_batches_tracked"))
def batch_channel_finalize(plane_mean: Tensor, plane_var: Tensor, running_mean: Optional[Tensor],
                           running_var: Optional[Tensor], num_batches_tracked: Optional[Tensor],
                           estimate_rate: Optional[Tensor], bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                           weight: Optional[Tensor], bias: Optional[Tensor], statistics: int,
                           momentum: Optional[float], estimate_rate_value: float, count: int, eps: float,
                           bn_eps: float, num_groups: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(scale, shift, mean, var)`` of BCN from the planes' ``(N, C)`` moments: ``y = (x − plane_mean)·scale +
    shift`` per plane, and the per-channel statistics the batch stage used. ``statistics`` is one of
    ``kernels.batch_channel``'s ``BATCH_STATISTICS`` (training; updates the running buffers if given),
    ``RUNNING_STATISTICS`` (eval) and ``ESTIMATED_STATISTICS`` (EstBN in training; updates the estimates at
    ``estimate_rate``, a one-element tensor, or else ``estimate_rate_value``). ``count`` is ``N·H·W``."""
    return _kernels().batch_channel_finalize_fwd(
        plane_mean, plane_var, running_mean, running_var, num_batches_tracked, estimate_rate, bn_weight, bn_bias,
        weight, bias, statistics=statistics, momentum=momentum, estimate_rate_value=estimate_rate_value, count=count,
        eps=eps, bn_eps=bn_eps, num_groups=num_groups)


@batch_channel_finalize.register_fake
def _batch_channel_finalize_fake(plane_mean, plane_var, running_mean, running_var, num_batches_tracked,
                                 estimate_rate, bn_weight, bn_bias, weight, bias, statistics, momentum,
                                 estimate_rate_value, count, eps, bn_eps, num_groups):
    channels = plane_mean.shape[1]
    return (torch.empty_like(plane_mean), torch.empty_like(plane_mean), plane_mean.new_empty(channels),
            plane_mean.new_empty(channels))


@torch.library.custom_op("normlayers::batch_channel_finalize_bwd", mutates_args=())
def batch_channel_finalize_bwd(dscale: Tensor, dshift: Tensor, plane_mean: Tensor, plane_var: Tensor, mean: Tensor,
                               var: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                               weight: Optional[Tensor], bias: Optional[Tensor], batch_gradient: bool, eps: float,
                               bn_eps: float, num_groups: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(dplane_mean, dplane_var, dbn_weight, dbn_bias, dweight, dbias)`` of :func:`batch_channel_finalize` followed
    by ``plane_affine`` centred at ``plane_mean``, from that pass's per-plane ``(dscale, dshift)``. A parameter's
    gradient has its shape and dtype (empty for a missing parameter); ``batch_gradient`` when ``mean``/``var`` are
    the planes' batch moments (training on batch statistics)."""
    return _kernels().batch_channel_finalize_bwd(dscale, dshift, plane_mean, plane_var, mean, var, bn_weight,
                                                 bn_bias, weight, bias, batch_gradient=batch_gradient, eps=eps,
                                                 bn_eps=bn_eps, num_groups=num_groups)


@batch_channel_finalize_bwd.register_fake
def _batch_channel_finalize_bwd_fake(dscale, dshift, plane_mean, plane_var, mean, var, bn_weight, bn_bias, weight,
                                     bias, batch_gradient, eps, bn_eps, num_groups):
    grads = [plane_mean.new_empty(0) if p is None else p.new_empty(p.shape) for p in (bn_weight, bn_bias, weight, bias)]
    return (torch.empty_like(plane_mean), torch.empty_like(plane_mean), *grads)


@torch.library.custom_op("normlayers::batch_channel_eval", mutates_args=())
def batch_channel_eval(input: Tensor, plane_mean: Tensor, plane_var: Tensor, running_mean: Tensor,
                       running_var: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                       weight: Optional[Tensor], bias: Optional[Tensor], eps: float, bn_eps: float, num_groups: int,
                       store_coefficients: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """BCN in eval from the planes' moments, the finalize math done inside the elementwise pass: ``(y, scale, shift,
    mean, var)`` with ``scale``/``shift``/``mean``/``var`` those of :func:`batch_channel_finalize` on the running
    statistics when ``store_coefficients`` (the backward's), else empty."""
    return _kernels().batch_channel_eval_fwd(input, plane_mean, plane_var, running_mean, running_var, bn_weight,
                                             bn_bias, weight, bias, eps=eps, bn_eps=bn_eps, num_groups=num_groups,
                                             store_coefficients=store_coefficients)


@batch_channel_eval.register_fake
def _batch_channel_eval_fake(input, plane_mean, plane_var, running_mean, running_var, bn_weight, bn_bias, weight,
                             bias, eps, bn_eps, num_groups, store_coefficients):
    channels = plane_mean.shape[1]
    stored = (plane_mean.shape, plane_mean.shape, (channels,), (channels,)) if store_coefficients else ((0,),) * 4
    return (torch.empty_like(input), *(plane_mean.new_empty(shape) for shape in stored))


class _BatchChannelNorm(torch.autograd.Function):
    """BCN of ``input`` with gradients for ``input`` and the four parameters (None where a parameter is None)."""

    @staticmethod
    def forward(ctx, input: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], weight: Optional[Tensor],
                bias: Optional[Tensor], running_mean: Optional[Tensor], running_var: Optional[Tensor],
                num_batches_tracked: Optional[Tensor], estimate_rate: Optional[Tensor], statistics: int,
                momentum: Optional[float], estimate_rate_value: float, eps: float, bn_eps: float,
                num_groups: int) -> Tensor:
        plane_mean, plane_var = plane_moments(input)
        ctx.batch_gradient = statistics == _kernels().BATCH_STATISTICS
        ctx.epsilons, ctx.num_groups = (eps, bn_eps), num_groups
        if statistics == _kernels().RUNNING_STATISTICS:
            # Eval: nothing reduces over the batch, so the finalize math runs inside the elementwise pass (two
            # launches); it writes the backward's coefficients only when a backward can follow.
            needs_grad = any(ctx.needs_input_grad[:5])
            output, scale, shift, mean, var = batch_channel_eval(
                input, plane_mean, plane_var, running_mean, running_var, bn_weight, bn_bias, weight, bias, eps,
                bn_eps, num_groups, needs_grad)
        else:
            count = input.shape[0] * math.prod(input.shape[2:])
            scale, shift, mean, var = batch_channel_finalize(
                plane_mean, plane_var, running_mean, running_var, num_batches_tracked, estimate_rate, bn_weight,
                bn_bias, weight, bias, statistics, momentum, estimate_rate_value, count, eps, bn_eps, num_groups)
            output = plane_affine(input, plane_mean, scale, shift)
        ctx.save_for_backward(input, plane_mean, plane_var, scale, mean, var, bn_weight, bn_bias, weight, bias)
        return output

    @staticmethod
    def backward(ctx, dy: Tensor):
        input, plane_mean, plane_var, scale, mean, var, bn_weight, bn_bias, weight, bias = ctx.saved_tensors
        if wants_double_backward():
            # The reference on the statistics the forward used: the batch's (recomputed; no running buffers, so no
            # update) or the running ones as they were then (finalize's mean/var, constants as in the forward).
            eps, bn_eps = ctx.epsilons
            statistics = (None, None) if ctx.batch_gradient else (mean, var)

            def layer(x, *parameters):
                return _ref_batch_channel.batch_channel_norm(
                    x, *statistics, *parameters, training=ctx.batch_gradient, momentum=None, eps=eps,
                    num_groups=ctx.num_groups, bn_eps=bn_eps)

            return recomputed_backward(ctx, layer, (input, bn_weight, bn_bias, weight, bias), dy)
        dx_affine, dscale, dshift = plane_affine_bwd(dy, input, plane_mean, scale)
        dplane_mean, dplane_var, *parameter_grads = batch_channel_finalize_bwd(
            dscale, dshift, plane_mean, plane_var, mean, var, bn_weight, bn_bias, weight, bias, ctx.batch_gradient,
            *ctx.epsilons, ctx.num_groups)
        dx = plane_moments_bwd(input, plane_mean, dplane_mean, dplane_var, dx_affine)
        parameter_grads = [g if p is not None else None
                           for g, p in zip(parameter_grads, (bn_weight, bn_bias, weight, bias))]
        return (dx, *parameter_grads) + (None,) * 10


def batch_channel_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                       bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], weight: Optional[Tensor],
                       bias: Optional[Tensor], *, training: bool, momentum: Optional[float], eps: float,
                       num_groups: int, bn_eps: float, estimate: bool, estimate_rate: Union[float, Tensor],
                       num_batches_tracked: Optional[Tensor], sync: Optional[MomentSync]) -> Tensor:
    """BCN through the plane kernels (module docstring); same semantics as the reference, buffers included. A DTensor
    input takes the unfused composition, whose per-plane statistics DTensor reduces over the whole batch."""
    if sync is not None or is_dtensor(input):
        return _synced_batch_channel_norm(input, running_mean, running_var, bn_weight, bn_bias, weight, bias,
                                          training=training, momentum=momentum, eps=eps, num_groups=num_groups,
                                          bn_eps=bn_eps, estimate=estimate, estimate_rate=estimate_rate,
                                          num_batches_tracked=num_batches_tracked, sync=sync)
    kernels = _kernels()
    statistics = (kernels.RUNNING_STATISTICS if not training else
                  kernels.ESTIMATED_STATISTICS if estimate else kernels.BATCH_STATISTICS)
    rate_tensor = estimate_rate.reshape(()) if isinstance(estimate_rate, Tensor) else None
    rate_value = 0.0 if isinstance(estimate_rate, Tensor) else float(estimate_rate)
    return _BatchChannelNorm.apply(input, bn_weight, bn_bias, weight, bias, running_mean, running_var,
                                   num_batches_tracked, rate_tensor, statistics, momentum, rate_value, eps, bn_eps,
                                   num_groups)


def _synced_batch_channel_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                               bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], weight: Optional[Tensor],
                               bias: Optional[Tensor], *, training: bool, momentum: Optional[float], eps: float,
                               num_groups: int, bn_eps: float, estimate: bool, estimate_rate: Union[float, Tensor],
                               num_batches_tracked: Optional[Tensor], sync: Optional[MomentSync]) -> Tensor:
    """BCN with synced batch statistics: :func:`~normlayers.ops.channel_stats.plane_moments`, the statistics as
    ``(N, C)`` torch ops that autograd differentiates (the batch moments are synced before they are used), then
    :func:`~normlayers.ops.channel_stats.plane_affine`. Not fused: the sync sits between the reduction and the
    finalize math."""
    n, channels = input.shape[:2]
    plane_mean, plane_var = plane_moments(input)
    opmath = plane_mean.dtype
    if training:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not estimate):
            mean, var = batch_moments_from_planes(plane_mean, plane_var)
            count: Union[int, Tensor] = n * math.prod(input.shape[2:])
            if sync is not None:
                mean, var, count = sync(mean, var, count)
    if training and not estimate:
        if running_mean is not None and running_var is not None:
            _ref_batch_channel.update_batch_running_stats_(running_mean, running_var, num_batches_tracked, mean, var,
                                                   count=count, momentum=momentum)
    else:
        if training:
            _ref_batch_channel.estimate_update_(running_mean, running_var, mean, var, estimate_rate)
        mean, var = running_mean.to(opmath), running_var.to(opmath)
    # Batch stage, per channel: u = (x − mean)·a + bn_bias. Each plane's moments after it:
    a = torch.rsqrt(var + bn_eps)
    if bn_weight is not None:
        a = a * bn_weight.to(opmath)
    u_mean = (plane_mean - mean) * a
    if bn_bias is not None:
        u_mean = u_mean + bn_bias.to(opmath)
    u_var = plane_var * a.square()
    # Group stage: the planes' moments combined over the C/G channels of each (sample, group).
    per_group = (n, num_groups, channels // num_groups)
    u_mean, u_var = u_mean.view(per_group), u_var.view(per_group)
    group_mean = u_mean.mean(-1, keepdim=True)
    group_var = u_var.mean(-1, keepdim=True) + (u_mean - group_mean).square().mean(-1, keepdim=True)
    group_scale = torch.rsqrt(group_var + eps)
    if weight is not None:
        group_scale = group_scale * weight.to(opmath).reshape(1, num_groups, 1)
    # y = (x − plane_mean)·scale + shift, centred at the plane mean so that nothing cancels (see plane_affine).
    scale = a.view(1, num_groups, channels // num_groups) * group_scale
    shift = (u_mean - group_mean) * group_scale
    if bias is not None:
        shift = shift + bias.to(opmath).reshape(1, num_groups, 1)
    return plane_affine(input, plane_mean, scale.reshape(n, channels), shift.reshape(n, channels))
