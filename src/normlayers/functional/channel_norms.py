"""Functional channels-first norms: LayerNorm2d and RMSNorm2d, normalizing an ``(N, C, H, W)`` input over ``C`` at
each pixel (timm's ``LayerNorm2d`` and ``RmsNorm2d``, timm/layers/norm.py)."""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from normlayers._checks import check_channel_vectors, check_epsilon, check_nchw_input
from normlayers.backends import get_backend, use_triton
from normlayers.cpu import channel_norms as _cpu_channel
from normlayers.functional.row_norms import _autocasts_to_fp32, _to_fp32
from normlayers.ops import channel_norms as _ops_channel
from normlayers.reference import channel_norms as _ref_channel

__all__ = ["layer_norm2d", "rms_norm2d"]


def _check_channel_norm_args(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> float:
    check_nchw_input(input)
    check_channel_vectors(input, {"weight": weight, "bias": bias})
    return check_epsilon("eps", eps)


def _runs_cpu_tier(input: Tensor) -> bool:
    return get_backend() == "auto" and input.device.type == "cpu"


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
    if _runs_cpu_tier(input):
        return _cpu_channel.layer_norm2d(input, weight, bias, eps)
    return _ref_channel.layer_norm2d(input, weight, bias, eps)


def rms_norm2d(input: Tensor, weight: Optional[Tensor] = None, eps: float = 1e-6) -> Tensor:
    r"""RMS normalization over the channels of an ``(N, C, H, W)`` input, at each pixel.

    .. math:: y_{n,:,h,w} = \frac{x_{n,:,h,w}}{\sqrt{\mathrm{mean}_c(x_{n,:,h,w}^2) + \epsilon}} \cdot \gamma

    statistics in fp32 (fp64 for fp64 input) where timm's ``rms_norm2d`` computes in the input's dtype, the output
    in the input's dtype. ``weight`` is ``(C,)``. See docs/channel_norms.md.
    """
    eps = _check_channel_norm_args(input, weight, None, eps)
    if _autocasts_to_fp32("rms", input):
        input, weight = _to_fp32(input), _to_fp32(weight)
    if use_triton(input):
        return _ops_channel.channel_norm(input, weight, None, "rms", eps)
    if _runs_cpu_tier(input):
        return _cpu_channel.rms_norm2d(input, weight, eps)
    return _ref_channel.rms_norm2d(input, weight, eps)
