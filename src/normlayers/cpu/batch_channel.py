"""CPU tier of Batch-Channel Normalization: the batch stage on ATen's ``F.batch_norm`` and the channel stage on
``F.group_norm``, both run in fp32 (fp64 for fp64 input) so that the output is rounded once, as in the reference.

The batch stage is exactly ``F.batch_norm``'s math (biased variance to normalize, the unbiased one into the running
variance, the same ``momentum`` rule); EstBN's update (``estimate=True``) is the reference's, after which the batch
stage is ``F.batch_norm`` in eval mode on the updated estimates. The group affine (one value per group) is the
per-channel affine of ``F.group_norm`` with each value repeated over its group's channels.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from normlayers._dtypes import compute_dtype
from normlayers.reference import batch_channel as _ref_batch_channel

__all__ = ["batch_channel_norm", "supports"]


def supports(momentum: Optional[float], sync: object) -> bool:
    """Whether this tier runs the call: not with synced statistics (the reference gathers them) nor with
    ``momentum=None``, whose rate ``1/num_batches_tracked`` would have to be read back to the host for ATen."""
    return sync is None and momentum is not None


def _in(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return None if t is None else t.to(dtype)


def batch_channel_norm(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                       bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], weight: Optional[Tensor],
                       bias: Optional[Tensor], *, training: bool, momentum: float, eps: float, num_groups: int,
                       bn_eps: float, estimate: bool, estimate_rate: Union[float, Tensor],
                       num_batches_tracked: Optional[Tensor]) -> Tensor:
    """As :func:`normlayers.reference.batch_channel.batch_channel_norm`, for a call :func:`supports` accepts."""
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
