"""Batch-Channel Normalization on the per-plane custom ops (``normlayers::plane_moments`` and ``plane_affine``)."""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

from normlayers.distributed import MomentSync
from normlayers.ops.channel_stats import batch_moments_from_planes, plane_affine, plane_moments
from normlayers.reference import batch_channel as _ref_batch_channel

__all__ = ["batch_channel_norm"]


def batch_channel_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                       bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], weight: Optional[Tensor],
                       bias: Optional[Tensor], *, training: bool, momentum: Optional[float], eps: float,
                       num_groups: int, bn_eps: float, estimate: bool, estimate_rate: Union[float, Tensor],
                       num_batches_tracked: Optional[Tensor], sync: Optional[MomentSync]) -> Tensor:
    """BCN through the plane kernels: both stages and the affines compose to one affine map per plane.

    One pass of :func:`~normlayers.ops.channel_stats.plane_moments` gives every plane's ``(mean, var)``; all the
    statistics BCN needs follow from them exactly (equal-count combinations: the mean of means, and the mean of the
    variances plus the variance of the means), in ``(N, C)`` torch ops that autograd differentiates; then one
    :func:`~normlayers.ops.channel_stats.plane_affine` pass. Same semantics as the reference, buffers included.
    """
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
