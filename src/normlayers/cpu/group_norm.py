"""CPU tier of Group Normalization: ATen's fused ``group_norm`` followed by the activation, eagerly.

For fp32 and fp64 input these are exactly the ops a model runs (``nn.GroupNorm`` then ``nn.SiLU``), bit for bit;
without autograd the SiLU or ReLU is applied in place to the norm's fresh output (one output buffer where eager
PyTorch allocates two). fp16/bf16 input is normalized and activated in fp32 and rounded once, as
the reference and the kernels do (eager bf16 rounds the norm's output before the activation). Argument checks live in
:mod:`normlayers.functional`.
"""

from __future__ import annotations

from functools import partial
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from normlayers.cpu._common import opmath, params_like
from normlayers.reference.group_norm import activation

__all__ = ["group_norm"]

_IN_PLACE_ACTIVATIONS = {"silu": partial(F.silu, inplace=True), "relu": F.relu_}


def _native(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> bool:
    """Whether ATen's group_norm takes these as they are: fp32/fp64 input, parameters of its dtype."""
    dtype = input.dtype
    return ((dtype is torch.float32 or dtype is torch.float64) and (weight is None or weight.dtype is dtype)
            and (bias is None or bias.dtype is dtype))


def group_norm(input: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
               act: Optional[str]) -> Tensor:
    """``act(F.group_norm(input, num_groups, weight, bias, eps))`` in the compute dtype, in ``input``'s dtype."""
    x = input
    if not _native(input, weight, bias):  # low-precision input or parameters of another dtype: the compute dtype
        x, (weight, bias) = opmath(input), params_like(input, weight, bias)
    # torch.group_norm is F.group_norm without its Python-side checks, which normlayers.functional has made (its
    # last argument, cudnn_enabled, is deprecated and unused by ATen: F.group_norm's read of the flag is skipped).
    y = torch.group_norm(x, num_groups, weight, bias, eps, True)
    if act in _IN_PLACE_ACTIVATIONS and not y.requires_grad:
        # Outside autograd nothing else reads the norm's output: activate it in place, saving a buffer and its
        # traffic.
        y = _IN_PLACE_ACTIVATIONS[act](y)
    elif act is not None:
        y = activation(y, act)
    return y if y.dtype is input.dtype else y.to(input.dtype)
