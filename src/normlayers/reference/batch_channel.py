"""Plain-PyTorch reference of Batch-Channel Normalization (BCN): the ground truth the kernels are tested against.

It follows the official code (joe-siyuan-qiao/Batch-Channel-Normalization @ 0244c3e, README ``BCNorm`` and
``EstBN``; docs/batch_channel.md). For an input ``x`` of shape ``(N, C, H, W)`` and ``G`` groups:

1. **Batch stage**, per channel ``c``: ``y = (x − μ_c) / sqrt(σ²_c + bn_eps) · γ_c + β_c`` where ``(μ, σ²)`` are

   * training, ``estimate=False``: the batch mean and biased batch variance over ``(N, H, W)``, with gradient
     (``F.batch_norm(training=True)``); the running statistics are updated with the *unbiased* variance;
   * eval, ``estimate=False``: the running statistics;
   * ``estimate=True`` (EstBN, README L40–67): the running estimates, first updated (training only, outside autograd) at
     the rate ``r``, then used to normalize the current batch.

2. **Channel stage**, per sample ``n`` and group ``g``: GroupNorm without affine (biased variance, ``eps`` inside the
   sqrt), the same in training and eval (README ``BCNorm``).

3. **Group affine**: one scalar ``weight_g``, ``bias_g`` per group (README ``BCNorm``), not per channel.

Written for reading, not speed. Arithmetic is in the "opmath" dtype (fp32 for fp16/bf16/fp32 inputs, fp64 for fp64);
the output is rounded once, to the input's dtype. Gradients come from autograd, so they are an independent check of
hand-written backward kernels. Argument checks live in :mod:`normlayers.functional`.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from normlayers._dtypes import compute_dtype
from normlayers.distributed import MomentSync

__all__ = ["batch_channel_norm", "batch_stage_statistics", "estimate_update_", "update_batch_running_stats_"]

# Reduction dims of the batch stage (every dim but channels) and the broadcast shape of a per-channel vector.
_BATCH_DIMS = (0, 2, 3)
_PER_CHANNEL = (1, -1, 1, 1)


def _update_running_(buffer: Tensor, value: Tensor, rate: Union[float, Tensor]) -> None:
    """``buffer ← (1 − rate)·buffer + rate·value`` in place, computed in ``value``'s (opmath) dtype and stored in the
    buffer's dtype. ``rate`` may be a tensor (EstBN's ``estbn_moving_speed`` buffer, or ``1/num_batches_tracked``), so
    nothing is read back to the host."""
    buffer.copy_(buffer.to(value.dtype) * (1 - rate) + value * rate)


@torch.no_grad()
def estimate_update_(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor,
                     rate: Union[float, Tensor]) -> None:
    """EstBN's training-time update from the batch's per-channel ``mean`` and biased ``var``: the variance
    is centred at the *old* estimate of the mean, ``E[(x − mean_old)²] = var + (mean − mean_old)²``, biased, and both
    estimates move at rate ``r``; there is no Bessel correction."""
    centred_at_old = var + (mean - running_mean.to(mean.dtype)).square()
    _update_running_(running_mean, mean, rate)
    _update_running_(running_var, centred_at_old, rate)


@torch.no_grad()
def update_batch_running_stats_(running_mean: Tensor, running_var: Tensor, num_batches_tracked: Optional[Tensor],
                                mean: Tensor, var: Tensor, *, count: Union[int, Tensor],
                                momentum: Optional[float]) -> None:
    """PyTorch's BatchNorm running update from a batch's per-channel ``mean`` and biased ``var`` over ``count``
    values: ``num_batches_tracked += 1``; the rate is ``momentum``, or ``1 / num_batches_tracked`` (a cumulative
    average) when ``momentum is None``; the running variance receives the unbiased ``var · count/(count − 1)``."""
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    rate = (1.0 / num_batches_tracked) if momentum is None else momentum
    _update_running_(running_mean, mean, rate)
    _update_running_(running_var, var * (count / (count - 1)), rate)


def batch_stage_statistics(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor], *,
                           training: bool, momentum: Optional[float], estimate: bool = False,
                           estimate_rate: Union[float, Tensor] = 0.0,
                           num_batches_tracked: Optional[Tensor] = None,
                           sync: Optional[MomentSync] = None) -> tuple[Tensor, Tensor]:
    """The per-channel ``(mean, var)`` that normalize ``x`` (already in opmath) in the batch stage, shapes ``(C,)``.

    Updates the running buffers in place, as ``F.batch_norm`` does, when ``training``:

    * ``estimate=False``: PyTorch's BatchNorm semantics: ``num_batches_tracked += 1``; the rate is
      ``momentum``, or ``1 / num_batches_tracked`` (a cumulative average) when ``momentum is None``; the running
      variance receives the unbiased batch variance ``var · n/(n − 1)``, ``n = N·H·W``. The returned statistics are
      the batch's own (biased variance) and carry gradient.
    * ``estimate=True``: :func:`estimate_update_` at ``estimate_rate``; the returned statistics are the *updated*
      estimates, without gradient. ``num_batches_tracked`` is left alone (the official EstBN never uses it).

    ``sync`` (see :mod:`normlayers.distributed`) turns this rank's batch moments into the global batch's before they
    are used, in both modes.
    """
    if training:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not estimate):
            mean = x.mean(_BATCH_DIMS)
            var = (x - mean.view(_PER_CHANNEL)).square().mean(_BATCH_DIMS)
            count: Union[int, Tensor] = x.shape[0] * x.shape[2] * x.shape[3]
            if sync is not None:
                mean, var, count = sync(mean, var, count)
        if not estimate:
            if running_mean is not None and running_var is not None:
                update_batch_running_stats_(running_mean, running_var, num_batches_tracked, mean, var, count=count,
                                            momentum=momentum)
            return mean, var
        estimate_update_(running_mean, running_var, mean, var, estimate_rate)
    return running_mean.to(x.dtype), running_var.to(x.dtype)


def _group_affine(y: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], shape: tuple[int, ...]) -> Tensor:
    if weight is not None:
        y = y * weight.to(y.dtype).reshape(shape)
    if bias is not None:
        y = y + bias.to(y.dtype).reshape(shape)
    return y


def batch_channel_norm(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                       bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], weight: Optional[Tensor],
                       bias: Optional[Tensor], *, training: bool, momentum: Optional[float], eps: float,
                       num_groups: int, bn_eps: float = 1e-5, estimate: bool = False,
                       estimate_rate: Union[float, Tensor] = 0.0,
                       num_batches_tracked: Optional[Tensor] = None, sync: Optional[MomentSync] = None) -> Tensor:
    """BCN of a 4-D ``x``: batch stage, then per-(sample, group) standardization, then the group affine.

    ``bn_weight``/``bn_bias`` are per channel ``(C,)``; ``weight``/``bias`` hold one value per group (any shape with
    ``G`` elements, officially ``(1, G, 1)``). ``eps`` belongs to the channel stage, ``bn_eps`` to the batch stage.
    Running buffers are updated in place (see :func:`batch_stage_statistics`). Output: ``x``'s dtype and shape, in
    channels-last memory format when ``x`` is channels-last.
    """
    xf = x.to(compute_dtype(x.dtype))
    mean, var = batch_stage_statistics(xf, running_mean, running_var, training=training, momentum=momentum,
                                       estimate=estimate, estimate_rate=estimate_rate,
                                       num_batches_tracked=num_batches_tracked, sync=sync)
    y = (xf - mean.view(_PER_CHANNEL)) * torch.rsqrt(var.view(_PER_CHANNEL) + bn_eps)
    y = _group_affine(y, bn_weight, bn_bias, _PER_CHANNEL)

    # Channel stage: the channels of group g are the contiguous block g·C/G … (g+1)·C/G − 1 (as officially), so a
    # reshape to (N, G, C/G·H·W) puts each (sample, group) slice in one row.
    groups = y.reshape(x.shape[0], num_groups, x.numel() // max(x.shape[0] * num_groups, 1))  # explicit: N may be 0
    group_mean = groups.mean(-1, keepdim=True)
    group_var = (groups - group_mean).square().mean(-1, keepdim=True)
    z = (groups - group_mean) * torch.rsqrt(group_var + eps)
    z = _group_affine(z, weight, bias, (1, num_groups, 1))

    out = z.reshape(x.shape).to(x.dtype)
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        out = out.contiguous(memory_format=torch.channels_last)
    return out
