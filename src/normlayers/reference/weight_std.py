"""Plain-PyTorch reference of Weight Standardization (WS) and Scaled WS: the ground truth of the tests.

Each output filter ``W[o]`` of a conv weight of shape ``(O, I_g, kh, kw)`` is standardized over its fan-in
``I = I_g·kh·kw`` (Qiao et al., arXiv 1903.10520): ``Ŵ[o] = (W[o] − mean(W[o])) / D_o``, where the denominator
``D_o`` is what the published implementations disagree on (docs/weight_std.md). :data:`WS_VARIANTS` names each one
and its source.

Arithmetic is in the "opmath" dtype (fp32 for fp16/bf16/fp32 weights, fp64 for fp64); the standardized weight is
rounded once, to the weight's dtype. Gradients come from autograd, so they are an independent check of a hand-written
backward (the closed forms are in docs/weight_std.md, "Kernels").
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from normlayers._dtypes import compute_dtype

__all__ = ["WSVariant", "WS_VARIANTS", "fan_in", "fan_in_scale", "weight_standardize"]


class WSVariant(NamedTuple):
    """How one published implementation computes the denominator ``D_o`` of WS."""

    correction: int
    """0: biased variance (divide by ``I``); 1: unbiased (divide by ``I − 1``)."""
    eps_inside: bool
    """``True``: ``D = sqrt(var + eps)``; ``False``: ``D = sqrt(var) + eps``."""
    eps: float
    """The implementation's default eps."""
    source: str
    """Where the variant comes from."""


WS_VARIANTS: dict[str, WSVariant] = {
    # The layer of the WS README and the authors' GN+WS checkpoints: `weight.std(dim=1) + 1e-5` (torch.std's default
    # is unbiased).
    "qiao": WSVariant(1, False, 1e-5, "WS README PyTorch layer (joe-siyuan-qiao/WeightStandardization)"),
    # The WS conv of the BCN ImageNet models: `sqrt(weight.var(dim=1) + 1e-5)`, unbiased.
    "qiao_bcn": WSVariant(1, True, 1e-5, "Batch-Channel-Normalization imagenet/models/layers.py"),
    # timm StdConv2d / ScaledStdConv2d: F.batch_norm on the weight, biased variance, eps inside; the paper v2 form.
    "timm": WSVariant(0, True, 1e-6, "timm StdConv2d (timm/layers/std_conv.py)"),
    # BiT official (PyTorch/TF2/JAX). timm's BiT models use the same formula with eps=1e-8.
    "bit": WSVariant(0, True, 1e-10,
                     "BiT official code: big_transfer (google-research), bit_pytorch/models.py StdConv2d"),
}


def fan_in(weight: Tensor) -> int:
    """``I``: the number of elements each output filter is standardized over (every dim but the first)."""
    return math.prod(weight.shape[1:])


def fan_in_scale(weight: Tensor, gamma: float) -> float:
    """Scaled WS's constant ``γ / sqrt(I)`` (timm's ``ScaledStdConv2d.scale``, ``timm/layers/std_conv.py``), a
    Python float."""
    return gamma * fan_in(weight) ** -0.5


def weight_standardize(weight: Tensor, *, correction: int, eps_inside: bool, eps: float,
                       gain: Optional[Tensor] = None, scale: float = 1.0,
                       out_dtype: Optional[torch.dtype] = None) -> Tensor:
    r"""Standardize each output filter of ``weight`` (shape ``(O, ...)``) over all its other dims.

    .. math::
        \hat W_{o} = g_o \cdot s \cdot \frac{W_{o} - \mu_o}{D_o}, \qquad
        D_o = \sqrt{\sigma_o^2 + \epsilon}\ \text{(eps inside)} \quad\text{or}\quad
        D_o = \sigma_o + \epsilon\ \text{(eps outside)}

    with ``σ²_o = Σ_j (W_oj − μ_o)² / (I − correction)``, ``g = gain`` (shape ``(O, 1, ...)`` or
    ``(O,)``; omitted means 1) and ``s = scale``, the fan-in scale of Scaled WS (timm's ``ScaledStdConv2d``).

    Eps outside the square root goes through :func:`torch.std`, not ``sqrt(var)``: for an all-equal filter
    (``σ = 0``) PyTorch's ``std`` backward masks the gradient to zero where ``sqrt`` would give ``inf · 0 = NaN``
    (``std_backward`` in PyTorch's ``FunctionsManual.cpp``), so the reference keeps the gradient of the authors'
    ``weight.std(dim=1) + 1e-5`` layer.

    The result is rounded once, to ``out_dtype`` (default: ``weight.dtype``).
    """
    # The fan-in spelled out, not -1: a zero-size weight (no filters, or empty filters) has no -1 to infer.
    flat = weight.to(compute_dtype(weight.dtype)).reshape(weight.shape[0], math.prod(weight.shape[1:]))
    if eps_inside:
        var, mean = torch.var_mean(flat, dim=1, correction=correction, keepdim=True)
        denominator = torch.sqrt(var + eps)
    else:
        std, mean = torch.std_mean(flat, dim=1, correction=correction, keepdim=True)
        denominator = std + eps
    standardized = (flat - mean) / denominator
    if gain is not None:
        # one per-filter factor gain·scale, as timm's ScaledStdConv2d passes it to F.batch_norm as its weight
        standardized = standardized * (gain.to(flat.dtype).reshape(-1, 1) * scale)
    elif scale != 1.0:
        standardized = standardized * scale
    return standardized.reshape(weight.shape).to(out_dtype or weight.dtype)
