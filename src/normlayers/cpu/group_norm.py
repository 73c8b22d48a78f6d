"""CPU tier of Group Normalization: ATen's fused ``F.group_norm`` followed by the activation, eagerly.

For fp32 and fp64 input these are exactly the ops a model runs (``nn.GroupNorm`` then ``nn.SiLU``), so the CPU tier
costs what eager PyTorch costs, bit for bit. fp16/bf16 input is normalized and activated in fp32 and rounded once, as
the reference and the kernels do (eager bf16 rounds the norm's output before the activation). Argument checks live in
:mod:`normlayers.functional`.
"""

from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor

from normlayers.cpu._common import opmath, params_like
from normlayers.reference.group_norm import activation

__all__ = ["group_norm"]


def group_norm(input: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
               act: Optional[str]) -> Tensor:
    """``act(F.group_norm(input, num_groups, weight, bias, eps))`` in the compute dtype, in ``input``'s dtype."""
    y = activation(F.group_norm(opmath(input), num_groups, *params_like(input, weight, bias), eps), act)
    return y if y.dtype == input.dtype else y.to(input.dtype)
