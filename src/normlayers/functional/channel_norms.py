"""Functional channels-first norms: LayerNorm2d and RMSNorm2d, normalizing an ``(N, C, H, W)`` input over ``C`` at
each pixel (timm's ``LayerNorm2d`` and ``RmsNorm2d``, timm/layers/norm.py)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from normlayers._checks import check_channel_vectors, check_epsilon, check_nchw_input
from normlayers._dtypes import compute_dtype
from normlayers.backends import get_backend, use_triton
from normlayers.functional.row_norms import _autocasts_to_fp32, _to_fp32
from normlayers.ops import channel_norms as _ops_channel
from normlayers.reference import channel_norms as _ref_channel

__all__ = ["layer_norm2d", "rms_norm2d"]


def _check_channel_norm_args(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> float:
    check_nchw_input(input)
    check_channel_vectors(input, {"weight": weight, "bias": bias})
    return check_epsilon("eps", eps)


def _aten_layer_norm2d(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Tensor:
    """The CPU tier: timm's math, ATen's fused layer norm (forward and backward) on the channels-last view, in the
    compute dtype. For fp32/fp64 input this is exactly timm's ``LayerNorm2d`` (one copy of an NCHW input, none of a
    channels-last one). fp16/bf16 input is normalized in fp32, parameters included: ATen's CPU backward accumulates
    the weight and bias gradients of bf16 parameters in bf16, which loses them over many pixels."""
    compute = compute_dtype(input.dtype)
    rows = input.permute(0, 2, 3, 1).to(compute, memory_format=torch.contiguous_format)
    params = (t.to(compute) if t is not None else None for t in (weight, bias))
    return F.layer_norm(rows, input.shape[1:2], *params, eps).to(input.dtype).permute(0, 3, 1, 2)


def layer_norm2d(input: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                 eps: float = 1e-6) -> Tensor:
    r"""Layer normalization over the channels of an ``(N, C, H, W)`` input, at each pixel.

    .. math:: y_{n,:,h,w} = \frac{x_{n,:,h,w} - \mathrm{E}_c[x_{n,:,h,w}]}
              {\sqrt{\mathrm{Var}_c[x_{n,:,h,w}] + \epsilon}} \cdot \gamma + \beta

    with the biased variance over the ``C`` channels, statistics in fp32 (fp64 for fp64 input), the output in the
    input's dtype: ``F.layer_norm(x.permute(0, 2, 3, 1), (C,), ...).permute(0, 3, 1, 2)``, as timm's ``LayerNorm2d``
    computes it, without the permute copy on CUDA. ``weight`` and ``bias`` are ``(C,)``. See docs/channel_norms.md.
    """
    eps = _check_channel_norm_args(input, weight, bias, eps)
    if _autocasts_to_fp32("layer", input):
        input, weight, bias = (_to_fp32(t) for t in (input, weight, bias))
    if use_triton(input):
        return _ops_channel.channel_norm(input, weight, bias, "layer", eps)
    if get_backend() == "auto" and input.device.type == "cpu":
        return _aten_layer_norm2d(input, weight, bias, eps)
    return _ref_channel.layer_norm2d(input, weight, bias, eps)


def rms_norm2d(input: Tensor, weight: Optional[Tensor] = None, eps: float = 1e-6) -> Tensor:
    r"""RMS normalization over the channels of an ``(N, C, H, W)`` input, at each pixel.

    .. math:: y_{n,:,h,w} = \frac{x_{n,:,h,w}}{\sqrt{\mathrm{mean}_c(x_{n,:,h,w}^2) + \epsilon}} \cdot \gamma

    statistics in fp32 (fp64 for fp64 input) where timm's ``rms_norm2d`` computes in the input's dtype, the output
    in the input's dtype. ``weight`` is ``(C,)``. On CPU the reference runs: it is timm's eager math (a reduction
    over ``dim=1``, no permute) in fp32. See docs/channel_norms.md.
    """
    eps = _check_channel_norm_args(input, weight, None, eps)
    if _autocasts_to_fp32("rms", input):
        input, weight = _to_fp32(input), _to_fp32(weight)
    if use_triton(input):
        return _ops_channel.channel_norm(input, weight, None, "rms", eps)
    return _ref_channel.rms_norm2d(input, weight, eps)
