"""CPU tier of Weight Standardization (Qiao et al., arXiv 1903.10520, Eq. 5; Scaled WS: Brock et al., arXiv
2101.08692, Eq. 4): each output filter standardized over its fan-in ``I`` by one fused ATen norm.

Without a per-filter gain the weight, viewed as ``O`` rows of ``I`` values, goes through ATen's layer norm over the
rows (``torch.layer_norm``, the C++ binding below ``F.layer_norm``'s wrapper, and its backward, centred for filters
far from zero by :mod:`normlayers.cpu._centred_layer_norm`: a vectorized pass
per row, about half the time of timm's ``StdConv2d`` trick, ``F.batch_norm`` over the weight viewed as a batch of one,
in fp32 on this tier's CPUs; ``torch.ops.aten.native_layer_norm`` is the same kernel behind ~2 µs more of Python
dispatch per call). With a gain (Scaled WS) the per-filter factor is ``F.batch_norm``'s per-channel weight, timm's
``ScaledStdConv2d`` exactly.

Both normalize with the biased variance and ``eps`` inside the square root. The unbiased variants fit too: with
``σ²_u = σ²·I/(I − 1)``,

    (W − μ) / sqrt(σ²_u + eps) = sqrt((I − 1)/I) · (W − μ) / sqrt(σ² + eps·(I − 1)/I),

so the factor becomes a constant scale (with Scaled WS's ``gain·γ/sqrt(I)``). Eps *outside* the square root (variant
``"qiao"``) has no such form and runs the reference.

A bf16/fp16 weight goes in as it is, beside an fp32 norm weight (the constant scale, ones without one): ATen's
mixed-type norms then compute the statistics, the output and the gradient in fp32 and round once (the fp64
reference's error; checked in tests/cpu/test_weight_std.py). Without it the pure bf16 paths round along the way:
``F.batch_norm``'s statistics (0.072 against 0.016 on 256x2304 bf16 values near 1) and ``F.layer_norm``'s gradient
(twice the one-rounding error); ``F.layer_norm``'s bf16 forward is the mixed-type one bit for bit, so with no
gradient to compute the ones are left out.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from normlayers._dtypes import compute_dtype
from normlayers.cpu._centred_layer_norm import layer_norm_last_dim

__all__ = ["supports", "weight_standardize"]


def supports(weight: Tensor, eps_inside: bool) -> bool:
    """Eps inside the square root, at least one filter, and more than one value per filter (``F.batch_norm`` refuses
    a single one in training; the reference standardizes it to 0, and returns a weight without filters as it is)."""
    return eps_inside and weight.shape[0] > 0 and weight.numel() > weight.shape[0]


def weight_standardize(weight: Tensor, *, correction: int, eps: float, gain: Optional[Tensor] = None,
                       scale: float = 1.0) -> Tensor:
    """As :func:`normlayers.reference.weight_std.weight_standardize` with ``eps_inside=True``."""
    filters = weight.shape[0]
    fan_in = weight.numel() // filters  # not weight[0].numel(): an indexing op per call
    ratio = (fan_in - correction) / fan_in
    constant_scale = scale * math.sqrt(ratio)
    dtype = compute_dtype(weight.dtype)
    if gain is None:
        norm_weight = None
        needs_grad = weight.requires_grad and torch.is_grad_enabled()
        if constant_scale != 1.0 or (weight.dtype != dtype and needs_grad):  # the bf16 forward is the same without it
            norm_weight = torch.full((fan_in,), constant_scale, dtype=dtype, device=weight.device)
        out = layer_norm_last_dim(weight.reshape(filters, fan_in), norm_weight, None, eps * ratio)
    else:
        per_filter_scale = gain.to(dtype).reshape(filters) * constant_scale
        out = F.batch_norm(weight.reshape(1, filters, fan_in), None, None, per_filter_scale, None, True, 0.0,
                           eps * ratio)
    return out.reshape(weight.shape)
