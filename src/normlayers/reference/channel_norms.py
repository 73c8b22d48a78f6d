"""Plain-PyTorch reference of the channels-first norms LayerNorm2d and RMSNorm2d: the ground truth of their tests.

Both normalize an ``(N, C, H, W)`` input over its ``C`` channels at each pixel, as timm's ``LayerNorm2d`` and
``RmsNorm2d`` do (timm/layers/norm.py), the statistics in fp32 (fp64 for fp64 input) and the result rounded once to
the input's dtype. Gradients come from autograd, an independent check of the hand-written backward kernels.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from normlayers._dtypes import compute_dtype

__all__ = ["layer_norm2d", "rms_norm2d"]


def _per_channel(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t.to(dtype)[:, None, None]


def layer_norm2d(x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                 eps: float = 1e-6) -> Tensor:
    """``y = (x − E_c[x]) / sqrt(Var_c[x] + eps) · γ_c + β_c``, mean and biased variance over ``C`` per pixel."""
    xf = x.to(compute_dtype(x.dtype))
    mean = xf.mean(1, keepdim=True)
    var = (xf - mean).square().mean(1, keepdim=True)
    y = (xf - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * _per_channel(weight, y.dtype)
    if bias is not None:
        y = y + _per_channel(bias, y.dtype)
    return y.to(x.dtype)


def rms_norm2d(x: Tensor, weight: Optional[Tensor] = None, eps: float = 1e-6) -> Tensor:
    """``y = x / sqrt(mean_c(x²) + eps) · γ_c``, the mean square over ``C`` per pixel."""
    xf = x.to(compute_dtype(x.dtype))
    y = xf * torch.rsqrt(xf.square().mean(1, keepdim=True) + eps)
    if weight is not None:
        y = y * _per_channel(weight, y.dtype)
    return y.to(x.dtype)
