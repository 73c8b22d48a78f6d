"""Functional Batch-Channel Normalization."""

from __future__ import annotations

import math
from typing import Any, Optional, Union

import torch
from torch import Tensor

from normlayers._checks import (
    FLOAT_DTYPE_SET,
    check_counter,
    check_float_tensor,
    check_nchw_input,
    check_positive_epsilon,
    check_positive_int,
    check_running_stats_without_grad,
    check_same_device,
    check_unit_interval,
    is_plain_float_tensor,
)
from normlayers.backends import tier
from normlayers.cpu import batch_channel as _cpu_batch_channel
from normlayers.distributed import moment_sync
from normlayers.functional._common import empty_batch_output
from normlayers.ops import batch_channel as _ops_batch_channel
from normlayers.reference import batch_channel as _ref_batch_channel

__all__ = ["batch_channel_norm"]


def _check_batch_channel_args(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                              bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], weight: Optional[Tensor],
                              bias: Optional[Tensor],
                              training: bool, momentum: Optional[float], eps: float, bn_eps: float, num_groups: int,
                              estimate: bool, estimate_rate: Union[float, Tensor],
                              num_batches_tracked: Optional[Tensor], *, local_batch: bool) -> None:
    per_channel = {"running_mean": running_mean, "running_var": running_var, "bn_weight": bn_weight,
                   "bn_bias": bn_bias}
    per_group = {"weight": weight, "bias": bias}
    check_nchw_input(input)
    channels = input.shape[1]
    check_positive_int("num_groups", num_groups)
    for name, t in per_channel.items():
        if t is not None and tuple(check_float_tensor(name, t).shape) != (channels,):
            raise ValueError(f"input (N, C, H, W) and {name} (C,) must agree on C = num_channels; got input of shape "
                             f"{list(input.shape)} and {name} of shape {list(t.shape)}")
    if channels % num_groups != 0:
        raise ValueError(f"num_groups ({num_groups}) must divide the number of channels (num_channels = input.shape[1]"
                         f" = {channels}); input has shape {list(input.shape)}")
    for name, t in per_group.items():
        if t is not None and check_float_tensor(name, t).numel() != num_groups:
            raise ValueError(f"{name} must hold one value per group (num_groups = {num_groups}; officially of shape "
                             f"(1, {num_groups}, 1)), got {name} of shape {list(t.shape)}")
    for name, t in {**per_channel, **per_group, "num_batches_tracked": num_batches_tracked}.items():
        if t is not None:
            check_same_device(name, t, input)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together (or both None)")
    if running_mean is None and (estimate or not training):
        raise ValueError("running_mean and running_var are required in eval mode and with estimate=True "
                         "(only training=True, estimate=False may run on batch statistics alone)")
    # With synced statistics only the global count matters, and reading it would be a host sync: not checked.
    if local_batch and training and not estimate and input.numel() // channels == 1:
        raise ValueError(f"Expected more than 1 value per channel when training (N·H·W = 1 for input of shape "
                         f"{list(input.shape)}): the batch stage's variance is undefined, as in torch.nn.BatchNorm2d;"
                         " use estimate=True or eval mode for single values")
    if momentum is None:
        if training and not estimate and running_mean is not None and num_batches_tracked is None:
            raise ValueError("momentum=None (a cumulative average of the batch statistics) needs num_batches_tracked")
    else:
        check_unit_interval("momentum", momentum)
    if num_batches_tracked is not None:
        check_counter("num_batches_tracked", num_batches_tracked)
    if isinstance(estimate_rate, Tensor):
        # A tensor rate (the module's estbn_moving_speed buffer) is not range-checked: that would read it back to
        # the host on every call.
        if estimate_rate.numel() != 1 or not estimate_rate.dtype.is_floating_point:
            raise TypeError(f"estimate_rate must be a float or a one-element floating tensor, got "
                            f"{estimate_rate.dtype} of shape {list(estimate_rate.shape)}")
    else:
        check_unit_interval("estimate_rate", estimate_rate)
    check_positive_epsilon("eps", eps)
    check_positive_epsilon("bn_eps", bn_eps)
    check_running_stats_without_grad(training, running_mean=running_mean, running_var=running_var)


def _is_plain_batch_channel_call(input: object, running_mean: object, running_var: object, bn_weight: object,
                                 bn_bias: object, weight: object, bias: object, training: bool, momentum: object,
                                 eps: object, bn_eps: object, num_groups: object, estimate: bool, estimate_rate: object,
                                 num_batches_tracked: object) -> bool:
    """Whether the arguments are valid in the plain form a module's call passes (tensors of the right shapes on the
    input's device, ``float`` rates and epsilons, an ``int`` group count): it passes only calls that the full checks
    of :func:`_check_batch_channel_args` (with local statistics) pass too, in a third of their time (their ~8 µs,
    run right after the previous layer's kernel, cost several times that on a 2-core CPU)."""
    if not (isinstance(input, Tensor) and input.dtype in FLOAT_DTYPE_SET and input.dim() == 4
            and type(num_groups) is int and num_groups > 0 and type(momentum) is float and 0.0 <= momentum <= 1.0
            and type(eps) is float and 0.0 < eps < math.inf and type(bn_eps) is float and 0.0 < bn_eps < math.inf):
        return False
    channels, device = input.shape[1], input.device
    if channels % num_groups or (running_mean is None) != (running_var is None):
        return False
    if running_mean is None:
        if estimate or not training:
            return False
    elif not (is_plain_float_tensor(running_mean, (channels,), device)
              and is_plain_float_tensor(running_var, (channels,), device)
              and not (training and (running_mean.requires_grad or running_var.requires_grad))):
        return False
    if training and not estimate and input.numel() == channels:  # one value per channel: the full check's error
        return False
    if type(estimate_rate) is float:
        if not 0.0 <= estimate_rate <= 1.0:
            return False
    elif not (isinstance(estimate_rate, Tensor) and estimate_rate.numel() == 1
              and estimate_rate.dtype.is_floating_point):
        return False
    if num_batches_tracked is not None and not (
            isinstance(num_batches_tracked, Tensor) and num_batches_tracked.numel() == 1
            and not num_batches_tracked.dtype.is_floating_point and num_batches_tracked.dtype != torch.bool
            and num_batches_tracked.device == device):
        return False
    return ((bn_weight is None or is_plain_float_tensor(bn_weight, (channels,), device))
            and (bn_bias is None or is_plain_float_tensor(bn_bias, (channels,), device))
            and all(t is None or (isinstance(t, Tensor) and t.dtype in FLOAT_DTYPE_SET and t.numel() == num_groups
                                  and t.device == device) for t in (weight, bias)))


def batch_channel_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                       bn_weight: Optional[Tensor] = None, bn_bias: Optional[Tensor] = None,
                       weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, training: bool = False,
                       momentum: Optional[float] = 0.1, eps: float = 1e-5, num_groups: int = 32,
                       bn_eps: float = 1e-5, *, estimate: bool = False, estimate_rate: Union[float, Tensor] = 0.0,
                       num_batches_tracked: Optional[Tensor] = None, sync_stats: bool = False,
                       process_group: Optional[Any] = None) -> Tensor:
    r"""Batch-Channel Normalization (Qiao et al., arXiv 1903.10520): a batch stage, then GroupNorm, then a group affine.

    .. math::
        u = \frac{x - \mu_c}{\sqrt{\sigma^2_c + \epsilon_{bn}}} \cdot \gamma^{bn}_c + \beta^{bn}_c, \qquad
        y = \frac{u - \mathrm{E}_{n,g}[u]}{\sqrt{\mathrm{Var}_{n,g}[u] + \epsilon}} \cdot \gamma_g + \beta_g

    where ``(μ_c, σ²_c)`` are the batch statistics over ``(N, H, W)`` in training and ``running_mean``/``running_var``
    in eval, as :func:`torch.nn.functional.batch_norm`; with ``estimate=True`` they are the running *estimates*
    (EstBN), first moved towards the batch at ``estimate_rate`` in training (variance centred at the old mean estimate,
    no gradient through them). ``E_{n,g}``/``Var_{n,g}`` (biased) run over each sample's group of ``C/G`` contiguous
    channels and ``H·W`` positions, in training and eval alike. Statistics in fp32 (fp64 for fp64 input); the output
    has the input's dtype.

    Args:
        input: ``(N, C, H, W)``.
        running_mean, running_var: ``(C,)`` buffers, updated in place in training (see below). May be ``None`` only
            with ``training=True, estimate=False``.
        bn_weight, bn_bias: the batch stage's per-channel affine, ``(C,)`` (the official ``bn.weight``/``bn.bias``).
        weight, bias: the per-group affine, ``G`` values (officially of shape ``(1, G, 1)``).
        training: batch statistics (and running updates) when ``True``. Default: ``False``.
        momentum: the running-statistics rate, as ``F.batch_norm``; ``None`` is a cumulative average
            (needs ``num_batches_tracked``). Unused with ``estimate=True``. Default: ``0.1``.
        eps: the channel (group) stage's epsilon. Default: ``1e-5``.
        num_groups: ``G``; must divide ``C``. Default: ``32``.
        bn_eps: the batch stage's epsilon. Default: ``1e-5``.
        estimate: EstBN instead of BatchNorm in the batch stage (the authors' ``EstBN``, BCN README).
            Default: ``False``.
        estimate_rate: EstBN's update rate ``r`` (a float in [0, 1], or a one-element tensor such as the official
            ``estbn_moving_speed`` buffer). Default: ``0.0``, which freezes the estimates (the official default).
        num_batches_tracked: incremented in place in training with ``estimate=False``, as ``nn.BatchNorm2d`` does.
        sync_stats, process_group: in training, with ``torch.distributed`` initialized and more than one rank in
            ``process_group`` (default: the world), take the batch stage's statistics over the global batch
            (:mod:`normlayers.distributed`); every rank must then call this, also with an empty batch. On CPU
            such a call (and one with ``momentum=None``) runs the reference rather than the CPU tier.
            Default: ``False``.

    Running updates (training): with ``estimate=False``, ``running ← (1 − m)·running + m·batch`` with the unbiased
    batch variance (PyTorch semantics); with ``estimate=True``, ``mean ← (1 − r)·mean + r·E[x]`` and
    ``var ← (1 − r)·var + r·E[(x − mean_old)²]``. All on device, computed in fp32, stored in the buffers' dtype.
    An input with no values (``N = 0``) gives an empty output and changes no statistic; ``num_batches_tracked`` still
    counts it in training, as ``nn.BatchNorm2d`` does.
    """
    sync = moment_sync(sync_stats, process_group, training) if sync_stats else None  # no sync: no call
    if not (sync is None and _is_plain_batch_channel_call(
            input, running_mean, running_var, bn_weight, bn_bias, weight, bias, training, momentum, eps, bn_eps,
            num_groups, estimate, estimate_rate, num_batches_tracked)):
        _check_batch_channel_args(input, running_mean, running_var, bn_weight, bn_bias, weight, bias, training,
                                  momentum, eps, bn_eps, num_groups, estimate, estimate_rate, num_batches_tracked,
                                  local_batch=sync is None)
    if input.numel() == 0 and sync is None:
        if training and not estimate and num_batches_tracked is not None:
            num_batches_tracked.add_(1)  # nn.BatchNorm2d counts an empty batch too (and updates nothing else)
        return empty_batch_output(input, bn_weight, bn_bias, weight, bias)
    implementation = tier(input)
    if implementation == "cpu" and _cpu_batch_channel.supports(momentum, sync):
        return _cpu_batch_channel.batch_channel_norm(
            input, running_mean, running_var, bn_weight, bn_bias, weight, bias, training=training, momentum=momentum,
            eps=eps, num_groups=int(num_groups), bn_eps=bn_eps, estimate=estimate, estimate_rate=estimate_rate,
            num_batches_tracked=num_batches_tracked)
    if implementation == "triton":
        return _ops_batch_channel.batch_channel_norm(
            input, running_mean, running_var, bn_weight, bn_bias, weight, bias, training=training, momentum=momentum,
            eps=eps, num_groups=int(num_groups), bn_eps=bn_eps, estimate=estimate, estimate_rate=estimate_rate,
            num_batches_tracked=num_batches_tracked, sync=sync)
    return _ref_batch_channel.batch_channel_norm(
        input, running_mean, running_var, bn_weight, bn_bias, weight, bias, training=training, momentum=momentum,
        eps=eps, num_groups=int(num_groups), bn_eps=bn_eps, estimate=estimate, estimate_rate=estimate_rate,
        num_batches_tracked=num_batches_tracked, sync=sync)
