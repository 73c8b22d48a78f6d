"""Plain-PyTorch reference of the row norms: the ground truth the kernels are tested against.

Written for reading, not speed. Arithmetic is in the "opmath" dtype (fp32 for fp16/bf16/fp32 inputs, fp64 for fp64),
results are cast back to the input dtype, as ``torch.nn.functional`` does. Gradients come from
autograd, so they are an independent check of the hand-written backward kernels.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from normlayers._dtypes import compute_dtype

__all__ = ["layer_norm", "rms_norm", "crms_norm", "residual_add"]


def _dims(normalized_shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(range(-len(normalized_shape), 0))


def _affine(y: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], weight_offset: float = 0.0) -> Tensor:
    if weight is not None:
        y = y * (weight.to(y.dtype) + weight_offset)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y


def layer_norm(x: Tensor, normalized_shape: Sequence[int], weight: Optional[Tensor] = None,
               bias: Optional[Tensor] = None, eps: float = 1e-5, *,
               out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """``y = (x − E[x]) / sqrt(Var[x] + eps) · γ + β`` over the last ``len(normalized_shape)`` dims (biased
    variance, as torch's). The result is rounded once, to ``out_dtype`` (default: ``x.dtype``)."""
    dims = _dims(normalized_shape)
    xf = x.to(compute_dtype(x.dtype))
    mean = xf.mean(dims, keepdim=True)
    var = (xf - mean).square().mean(dims, keepdim=True)
    return _affine((xf - mean) * torch.rsqrt(var + eps), weight, bias).to(out_dtype or x.dtype)


def rms_norm(x: Tensor, normalized_shape: Sequence[int], weight: Optional[Tensor] = None, eps: float = 1.1920929e-07,
             *, weight_offset: float = 0.0, out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """``y = x / sqrt(mean(x²) + eps) · (γ + weight_offset)`` (as torch's). ``eps`` is already resolved
    (``None`` handling lives in ``normlayers.functional``). Rounded once, to ``out_dtype`` (default: ``x.dtype``)."""
    xf = x.to(compute_dtype(x.dtype))
    ms = xf.square().mean(_dims(normalized_shape), keepdim=True)
    return _affine(xf * torch.rsqrt(ms + eps), weight, None, weight_offset).to(out_dtype or x.dtype)


def crms_norm(x: Tensor, normalized_shape: Sequence[int], weight: Optional[Tensor] = None,
              eps: float = 1.1920929e-07, *, out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """CRMSNorm of a compressed zero-mean vector ``x′`` of width ``n = d − 1`` (docs/row_norms.md):
    ``y = x′ / sqrt((Σx′² + (Σx′)²) / d + eps) · γ`` — the first ``d − 1`` outputs of RMSNorm applied to the
    restored vector ``[x′, −Σx′]``. Rounded once, to ``out_dtype`` (default: ``x.dtype``)."""
    dims = _dims(normalized_shape)
    xf = x.to(compute_dtype(x.dtype))
    d = math.prod(normalized_shape) + 1
    ms = (xf.square().sum(dims, keepdim=True) + xf.sum(dims, keepdim=True).square()) / d
    return _affine(xf * torch.rsqrt(ms + eps), weight, None).to(out_dtype or x.dtype)


def residual_add(x: Tensor, residual: Tensor, residual_dtype: torch.dtype) -> Tensor:
    """``x + residual`` computed in ``x``'s opmath dtype and rounded to ``residual_dtype``: the value the fused norms
    normalize and return (for ``residual_dtype == x.dtype`` exactly what an unfused ``x + residual`` gives)."""
    return (x.to(compute_dtype(x.dtype)) + residual.to(compute_dtype(x.dtype))).to(residual_dtype)
