"""Plain-PyTorch reference of the row norms: the ground truth the kernels are tested against.

Written for reading, not speed. Arithmetic is in the "opmath" dtype (fp32 for fp16/bf16/fp32 inputs, fp64 for fp64),
results are cast back to the input dtype, as ``torch.nn.functional`` does. Statistics are taken of the row scaled by
a power of two (:func:`power_of_two_scale`), so rows near the dtype's range limits normalize correctly
(docs/reliability.md). Gradients come from autograd, so they are an independent check of the hand-written backward
kernels.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from normlayers._dtypes import compute_dtype

__all__ = ["layer_norm", "rms_norm", "crms_norm", "residual_add", "power_of_two_scale", "power_of_two_scale_of_max",
           "scale_exponent_cap",
           "overflow_to_nan"]


def _max_scale_exponent(dtype: torch.dtype) -> int:
    return math.frexp(torch.finfo(dtype).max)[1] - 2  # 126 for fp32, 1022 for fp64: 2^±k and its square are safe


def scale_exponent_cap(eps: float, dtype: torch.dtype) -> int:
    """The largest ``k`` for which ``2^k`` is a safe statistics scale in ``dtype`` with this ``eps``: ``eps·4^k ≤ 1``,
    so scaling a tiny row up never lets the scaled ``eps`` overflow (where ``eps`` dominates, scaling is moot)."""
    k = _max_scale_exponent(dtype)
    return k if eps <= 0 else min(k, math.floor(-math.log2(eps) / 2))


def power_of_two_scale(xf: Tensor, dims: Sequence[int], eps: float) -> Tensor:
    """``s = 2^−e`` per row, with ``max |x|`` of the row in ``[2^(e−1), 2^e)``, so that ``x·s`` has its largest
    magnitude in ``[1/2, 1)`` and the statistics of ``x·s`` neither overflow nor underflow (the scaling of BLAS
    ``nrm2``). Normalization is scale invariant once ``eps`` is scaled by ``s²``, and a power of two scales exactly, so
    ordinary inputs give the very same result (and autograd the same gradient: ``s`` is piecewise constant in ``x``).
    Kept in ``[2^−k, 2^cap]`` (:func:`scale_exponent_cap`)."""
    return power_of_two_scale_of_max(xf.detach().abs().amax(dim=tuple(dims), keepdim=True), eps)


def power_of_two_scale_of_max(max_abs: Tensor, eps: float) -> Tensor:
    """:func:`power_of_two_scale` from the largest magnitudes ``max_abs`` themselves."""
    # 2^−e = mantissa / max|x|, exactly; in floating point throughout (inductor's C++ codegen fails on the integer
    # exponent's clamp). A zero, infinite or NaN row keeps s = 1.
    mantissa, _ = torch.frexp(max_abs)
    scale = torch.where(torch.isfinite(max_abs) & (max_abs > 0), mantissa / max_abs, 1.0)
    return scale.clamp(2.0 ** -_max_scale_exponent(max_abs.dtype), 2.0 ** scale_exponent_cap(eps, max_abs.dtype))


def overflow_to_nan(statistic: Tensor) -> Tensor:
    """A second moment that overflowed to ``inf`` (its value exceeds the dtype's range), reported as NaN: every
    output computed from it is then NaN, as in torch, where ``inf`` would give a silently wrong ``x·rsqrt(inf) = 0``.
    For the statistics kept in running buffers, which cannot hold such a value, scaling cannot help."""
    return torch.where(torch.isinf(statistic), torch.nan, statistic)


def _scaled(xf: Tensor, dims: Sequence[int], eps: float) -> tuple[Tensor, Tensor]:
    """``(x·s, eps·s²)`` with ``s`` from :func:`power_of_two_scale`: the row and epsilon the statistics are taken of."""
    scale = power_of_two_scale(xf, dims, eps)
    return xf * scale, eps * scale * scale  # not eps·s²: s² may overflow where eps = 0


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
    xs, eps_s = _scaled(x.to(compute_dtype(x.dtype)), dims, eps)
    mean = xs.mean(dims, keepdim=True)
    var = (xs - mean).square().mean(dims, keepdim=True)
    return _affine((xs - mean) * torch.rsqrt(var + eps_s), weight, bias).to(out_dtype or x.dtype)


def rms_norm(x: Tensor, normalized_shape: Sequence[int], weight: Optional[Tensor] = None, eps: float = 1.1920929e-07,
             *, weight_offset: float = 0.0, out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """``y = x / sqrt(mean(x²) + eps) · (γ + weight_offset)`` (as torch's). ``eps`` is already resolved
    (``None`` handling lives in ``normlayers.functional``). Rounded once, to ``out_dtype`` (default: ``x.dtype``)."""
    xs, eps_s = _scaled(x.to(compute_dtype(x.dtype)), _dims(normalized_shape), eps)
    ms = xs.square().mean(_dims(normalized_shape), keepdim=True)
    return _affine(xs * torch.rsqrt(ms + eps_s), weight, None, weight_offset).to(out_dtype or x.dtype)


def crms_norm(x: Tensor, normalized_shape: Sequence[int], weight: Optional[Tensor] = None,
              eps: float = 1.1920929e-07, *, out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """CRMSNorm of a compressed zero-mean vector ``x′`` of width ``n = d − 1`` (docs/row_norms.md):
    ``y = x′ / sqrt((Σx′² + (Σx′)²) / d + eps) · γ`` — the first ``d − 1`` outputs of RMSNorm applied to the
    restored vector ``[x′, −Σx′]``. Rounded once, to ``out_dtype`` (default: ``x.dtype``)."""
    dims = _dims(normalized_shape)
    xs, eps_s = _scaled(x.to(compute_dtype(x.dtype)), dims, eps)
    d = math.prod(normalized_shape) + 1
    ms = (xs.square().sum(dims, keepdim=True) + xs.sum(dims, keepdim=True).square()) / d
    return _affine(xs * torch.rsqrt(ms + eps_s), weight, None).to(out_dtype or x.dtype)


def residual_add(x: Tensor, residual: Tensor, residual_dtype: torch.dtype) -> Tensor:
    """``x + residual`` computed in ``x``'s opmath dtype and rounded to ``residual_dtype``: the value the fused norms
    normalize and return (for ``residual_dtype == x.dtype`` exactly what an unfused ``x + residual`` gives)."""
    return (x.to(compute_dtype(x.dtype)) + residual.to(compute_dtype(x.dtype))).to(residual_dtype)
