"""CPU tier of Weight Standardization: the weight transform as one ATen ``F.batch_norm`` over each filter's fan-in
(timm's ``StdConv2d`` trick: the weight viewed as a batch of one, ``O`` channels of ``I`` values each), whose
fused forward and backward replace the reference's half-dozen passes.

``F.batch_norm`` normalizes with the biased variance and ``eps`` inside the square root. The unbiased variants fit
too: with ``σ²_u = σ²·I/(I − 1)``,

    (W − μ) / sqrt(σ²_u + eps) = sqrt((I − 1)/I) · (W − μ) / sqrt(σ² + eps·(I − 1)/I),

so the factor becomes part of the per-filter scale (with Scaled WS's ``gain·γ/sqrt(I)``). Eps *outside* the square
root (variant ``"qiao"``) has no such form and runs the reference.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from normlayers._dtypes import compute_dtype

__all__ = ["supports", "weight_standardize"]


def supports(weight: Tensor, eps_inside: bool) -> bool:
    """Eps inside the square root, at least one filter, and more than one value per filter (``F.batch_norm`` refuses
    a single one in training; the reference standardizes it to 0, and returns a weight without filters as it is)."""
    return eps_inside and weight.shape[0] > 0 and weight[0].numel() > 1


def weight_standardize(weight: Tensor, *, correction: int, eps: float, gain: Optional[Tensor] = None,
                       scale: float = 1.0) -> Tensor:
    """As :func:`normlayers.reference.weight_std.weight_standardize` with ``eps_inside=True``."""
    filters, fan_in = weight.shape[0], weight[0].numel()
    ratio = (fan_in - correction) / fan_in
    per_filter_scale = scale * math.sqrt(ratio)
    dtype = compute_dtype(weight.dtype)
    if gain is not None:
        bn_weight = gain.to(dtype).reshape(filters) * per_filter_scale
    elif per_filter_scale != 1.0:
        bn_weight = torch.full((filters,), per_filter_scale, dtype=dtype, device=weight.device)
    else:
        bn_weight = None
    # A bf16/fp16 weight goes in as it is, beside an fp32 ``bn_weight``: ATen's mixed-type batch norm computes the
    # statistics and the output in fp32 and rounds once (the fp64 reference's error exactly, checked in
    # tests/cpu/test_weight_std.py), and its backward sums the per-filter gain gradient in fp32. Without a weight it
    # takes the pure bf16 path, whose rounded statistics give 4-5x the error (0.072 against 0.016 on 256x2304 bf16
    # values near 1), hence fp32 ones.
    if bn_weight is None and weight.dtype != dtype:
        bn_weight = torch.ones(filters, dtype=dtype, device=weight.device)
    out = F.batch_norm(weight.reshape(1, filters, fan_in), None, None, bn_weight, None, True, 0.0, eps * ratio)
    return out.reshape(weight.shape)
