"""Dtype rules and numeric thresholds the CPU-tier families share."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from normlayers._dtypes import compute_dtype

LOW_PRECISION = (torch.float16, torch.bfloat16)

# Below this eps a family does not take its statistics unscaled (the reference takes them of values scaled by a power
# of two, docs/reliability.md): from it up, the x² terms an underflow loses (each below 2^-149) are negligible beside
# eps, and 1/sqrt(· + eps) ≤ 2^30, so its cube stays finite in fp32.
MIN_UNSCALED_EPS = 2.0 ** -60


def opmath(t: Tensor) -> Tensor:
    dtype = compute_dtype(t.dtype)
    return t if t.dtype == dtype else t.to(dtype)  # a no-op .to() still costs a dispatch (0.8 us here)


def params_like(input: Tensor, *params: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
    """Parameters in the dtype an ATen norm should see next to ``input``: its opmath dtype. For fp32/fp64 input that
    is ``input``'s dtype; beside bf16/fp16 input it is fp32, ATen's "mixed type" path, which also sums the weight and
    bias gradients in fp32 (with bf16 parameters it sums them in bf16, rounding at every row). The casts are exact,
    or for a wider parameter the rounding the reference applies; their gradients are rounded once, on the way back."""
    dtype = compute_dtype(input.dtype)
    return tuple(p if p is None or p.dtype == dtype else p.to(dtype) for p in params)


def var_mean(x: Tensor, dim: Union[int, Sequence[int]], keepdim: bool = False) -> tuple[Tensor, Tensor]:
    """The biased variance and the mean of ``x`` over ``dim``, in two passes: the mean, then the mean of squared
    deviations. ``torch.var_mean`` (a Welford reduction) is 10–30× slower on CPU in torch 2.13 (fp32, one thread:
    9–14 ms against 0.5 ms for 8x256x14x14 over (2, 3) or (0, 2, 3)), and the two-pass form is as accurate."""
    mean = x.mean(dim, keepdim=True)
    centred = x - mean
    var = (centred * centred).mean(dim, keepdim=keepdim)
    return var, mean if keepdim else mean.squeeze(dim)
