"""CPU tier of Batch-Channel Normalization: the batch stage on ATen's ``F.batch_norm`` and the channel stage on
``F.group_norm``, both run in fp32 (fp64 for fp64 input) so that the output is rounded once, as in the reference.

The batch stage is exactly ``F.batch_norm``'s math (biased variance to normalize, the unbiased one into the running
variance, the same ``momentum`` rule); EstBN's update (``estimate=True``) is the reference's, after which the batch
stage is ``F.batch_norm`` in eval mode on the updated estimates. The group affine (one value per group) is the
per-channel affine of ``F.group_norm`` with each value repeated over its group's channels.

bf16/fp16 input with no gradient to compute (inference; eager mode) takes another route, with no fp32 copy of the
activation and one rounding (chaining ATen's reduced-precision ``F.batch_norm`` and ``F.group_norm`` would round
the intermediate and double the reference's error). Both stages are per-channel affine maps of ``x`` whose
statistics follow from the per-(sample, channel) mean ``m`` and biased variance ``v`` of ``x`` (law of total
variance over equal-sized parts: no cancellation):

    batch:  μ_c = mean_n m_nc,  σ²_c = mean_n (v_nc + (m_nc − μ_c)²);  u = a_c·x + b_c
    group:  μ_ng = mean_{c∈g} (a_c·m_nc + b_c),  σ²_ng = mean_{c∈g} (a_c²·v_nc + (a_c·m_nc + b_c − μ_ng)²)

so ``y = A_nc·x + B_nc``. ``m`` and ``v`` come from ATen's mixed-type group norm with one channel per group (fp32
statistics of bf16 values), ``y`` from its eval batch norm over the ``N·C`` planes with fp32 ``A``, ``B`` (computed
in fp32, rounded once). With a gradient to compute the fp32 path above runs.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from normlayers._dtypes import compute_dtype
from normlayers.cpu._common import LOW_PRECISION, params_like
from normlayers.reference import batch_channel as _ref_batch_channel

__all__ = ["batch_channel_norm", "supports"]


def supports(momentum: Optional[float], sync: object) -> bool:
    """Whether this tier runs the call: not with synced statistics (the reference gathers them) nor with
    ``momentum=None``, whose rate ``1/num_batches_tracked`` would have to be read back to the host for ATen."""
    return sync is None and momentum is not None


def _runs_low_precision_forward(x: Tensor, training: bool, *params: Optional[Tensor]) -> bool:
    """bf16/fp16 input in eager mode with no gradient to compute (inference, or a no-grad statistics pass), and more
    than one value per channel in training (else ``F.batch_norm``'s error). With a gradient the fp32 path runs: a
    backward on fp32 saved tensors beats this forward plus one that first rebuilds them (measured in
    docs/backend.md)."""
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *params))
    return (x.dtype in LOW_PRECISION and not needs_grad and not torch.compiler.is_compiling()
            and (not training or x.numel() > x.shape[1]))


def _in(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return None if t is None else t.to(dtype)


def batch_channel_norm(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                       bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], weight: Optional[Tensor],
                       bias: Optional[Tensor], *, training: bool, momentum: float, eps: float, num_groups: int,
                       bn_eps: float, estimate: bool, estimate_rate: Union[float, Tensor],
                       num_batches_tracked: Optional[Tensor]) -> Tensor:
    """As :func:`normlayers.reference.batch_channel.batch_channel_norm`, for a call :func:`supports` accepts."""
    if _runs_low_precision_forward(x, training, bn_weight, bn_bias, weight, bias):
        out = _low_precision_forward(x, running_mean, running_var, bn_weight, bn_bias, weight, bias,
                                     training=training, momentum=momentum, eps=eps, num_groups=num_groups,
                                     bn_eps=bn_eps, estimate=estimate, estimate_rate=estimate_rate,
                                     num_batches_tracked=num_batches_tracked)
        if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            out = out.contiguous(memory_format=torch.channels_last)
        return out
    dtype = compute_dtype(x.dtype)
    xf = x.to(dtype)
    if estimate:
        if training:
            with torch.no_grad():
                var, mean = torch.var_mean(xf, dim=(0, 2, 3), correction=0)
            _ref_batch_channel.estimate_update_(running_mean, running_var, mean, var, estimate_rate)
        stats, batch_stats = (running_mean.to(dtype), running_var.to(dtype)), False
    else:
        stats, batch_stats = (_in(running_mean, dtype), _in(running_var, dtype)), training
        if training and num_batches_tracked is not None:
            num_batches_tracked.add_(1)
    u = F.batch_norm(xf, *stats, _in(bn_weight, dtype), _in(bn_bias, dtype), batch_stats, momentum, bn_eps)
    if batch_stats and running_mean is not None and running_mean.dtype != dtype:
        with torch.no_grad():  # F.batch_norm updated the opmath copies: store them in the buffers' own dtype
            running_mean.copy_(stats[0])
            running_var.copy_(stats[1])
    channels_per_group = x.shape[1] // num_groups
    group_weight, group_bias = (None if t is None else t.to(dtype).reshape(num_groups).repeat_interleave(
        channels_per_group) for t in (weight, bias))
    out = F.group_norm(u, num_groups, group_weight, group_bias, eps).to(x.dtype)
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def _plane_moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and biased variance (fp32, ``(N, C)``) of each (sample, channel) plane of bf16/fp16 ``x``: the saved
    statistics of ATen's group norm with one channel per group beside an fp32 weight (the mixed-type path; the pure
    bf16 one rounds its statistics). ``eps = 0``, so ``v = rstd⁻²`` (a constant plane: ``rstd = inf``, ``v = 0``); the
    normalized output is dropped."""
    n, c = x.shape[:2]
    ones = torch.ones(c, dtype=torch.float32, device=x.device)
    _, mean, rstd = torch.ops.aten.native_group_norm(x, ones, None, n, c, x.numel() // max(n * c, 1), c, 0.0)
    return mean.view(n, c), rstd.view(n, c).pow(-2)


def _low_precision_forward(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                           bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], weight: Optional[Tensor],
                           bias: Optional[Tensor], *, training: bool, momentum: float, eps: float, num_groups: int,
                           bn_eps: float, estimate: bool, estimate_rate: Union[float, Tensor],
                           num_batches_tracked: Optional[Tensor]) -> Tensor:
    """The bf16/fp16 route of the module docstring (no autograd graph); running buffers updated as the reference
    does (in fp32, stored in their own dtype)."""
    n, c = x.shape[:2]
    x = x.contiguous()
    plane_mean, plane_var = _plane_moments(x)
    batch_mean = plane_mean.mean(0)
    batch_var = (plane_var + (plane_mean - batch_mean).square()).mean(0)
    if training and estimate:
        _ref_batch_channel.estimate_update_(running_mean, running_var, batch_mean, batch_var, estimate_rate)
    elif training and running_mean is not None:
        _ref_batch_channel.update_batch_running_stats_(running_mean, running_var, num_batches_tracked, batch_mean,
                                                       batch_var, count=x.numel() // c, momentum=momentum)
    elif training and num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    if not training or estimate:
        batch_mean, batch_var = running_mean.float(), running_var.float()
    bn_weight, bn_bias, weight, bias = params_like(x, bn_weight, bn_bias, weight, bias)
    scale = torch.rsqrt(batch_var + bn_eps)  # u = scale·x + shift, per channel
    if bn_weight is not None:
        scale = scale * bn_weight
    shift = -batch_mean * scale if bn_bias is None else bn_bias - batch_mean * scale
    u_mean = (plane_mean * scale + shift).view(n, num_groups, -1)
    u_var = (plane_var * scale.square()).view(n, num_groups, -1)
    group_mean = u_mean.mean(-1, keepdim=True)
    group_scale = torch.rsqrt((u_var + (u_mean - group_mean).square()).mean(-1, keepdim=True) + eps)
    if weight is not None:
        group_scale = group_scale * weight.view(1, num_groups, 1)
    plane_scale = (group_scale * scale.view(num_groups, -1)).reshape(n * c)
    plane_shift = group_scale * (shift.view(num_groups, -1) - group_mean)
    if bias is not None:
        plane_shift = plane_shift + bias.view(1, num_groups, 1)
    # y = plane_scale·x + plane_shift as ATen's eval batch norm over the N·C planes: in fp32, rounded once
    zeros, ones = torch.zeros_like(plane_scale), torch.ones_like(plane_scale)
    return F.batch_norm(x.view(1, n * c, -1), zeros, ones, plane_scale, plane_shift.reshape(n * c), False, 0.0,
                        0.0).view(x.shape)
