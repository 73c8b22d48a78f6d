"""Dtype rules the CPU-tier families share."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

LOW_PRECISION = (torch.float16, torch.bfloat16)


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics and arithmetic run in: fp64 for fp64, fp32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def opmath(t: Tensor) -> Tensor:
    return t.to(opmath_dtype(t.dtype))


def params_like(input: Tensor, *params: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
    """Parameters in a dtype an ATen norm accepts next to ``input``: unchanged when every one already has
    ``input``'s dtype, else all in ``input``'s opmath dtype (fp32 beside bf16/fp16 input is ATen's "mixed type"
    path, which computes in fp32). The cast is exact or, for a wider parameter, the rounding the reference applies."""
    if all(p is None or p.dtype == input.dtype for p in params):
        return params
    dtype = opmath_dtype(input.dtype)
    return tuple(None if p is None else p.to(dtype) for p in params)
