"""Plain-PyTorch reference of Group Normalization with an optional fused activation: the ground truth of its tests.

Group Normalization (Wu & He, 2018, "Group Normalization", eq. 1 and §3.1): the ``C`` channels of an
``(N, C, *spatial)`` input are split into ``G`` groups of ``C/G`` consecutive channels, and each (sample, group) is
normalized by the mean and biased variance of its ``C/G · H·W`` values, then scaled and shifted per channel. The
activation (SiLU, GELU, ReLU) is applied to the result, as diffusion UNets and timm's ``GroupNormAct`` do. Written
out with ``var_mean`` rather than calling ``F.group_norm``, so that the tests compare ATen's kernel and ours against
an independent formula; statistics and the activation in fp32 (fp64 for fp64 input), one rounding to the input's
dtype at the end. Gradients come from autograd.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from normlayers._dtypes import compute_dtype

__all__ = ["ACTIVATIONS", "activation", "group_norm"]

# The activations that can follow the norm, by the name `act` takes; GELU is the exact (erf) one, F.gelu's default.
ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}


def activation(y: Tensor, act: Optional[str]) -> Tensor:
    """``act`` (a key of :data:`ACTIVATIONS`, or ``None`` for none) applied to ``y``."""
    return y if act is None else ACTIVATIONS[act](y)


def _per_channel(t: Tensor, x: Tensor, dtype: torch.dtype) -> Tensor:
    return t.to(dtype).reshape(1, -1, *([1] * (x.dim() - 2)))


def group_norm(x: Tensor, num_groups: int, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               eps: float = 1e-5, act: Optional[str] = None) -> Tensor:
    """``act((x − E_g[x]) / sqrt(Var_g[x] + eps) · γ_c + β_c)``, moments over each (sample, group)'s values."""
    xf = x.to(compute_dtype(x.dtype))
    groups = xf.reshape(x.shape[0], num_groups, -1)
    var, mean = torch.var_mean(groups, dim=-1, correction=0, keepdim=True)
    y = ((groups - mean) * torch.rsqrt(var + eps)).reshape(x.shape)
    if weight is not None:
        y = y * _per_channel(weight, x, y.dtype)
    if bias is not None:
        y = y + _per_channel(bias, x, y.dtype)
    return activation(y, act).to(x.dtype)
