"""The dtypes every tier agrees on: which inputs are accepted, and the dtype statistics are computed in."""

from __future__ import annotations

from typing import Optional

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def compute_dtype(dtype: Optional[torch.dtype]) -> torch.dtype:
    """The dtype of the statistics and arithmetic for data of ``dtype`` (``None``: the default fp32): fp64 for fp64
    data, so that ops can be gradcheck-ed in fp64, else fp32 — fp16/bf16 data are normalized in fp32 and rounded once,
    as torch's own norms do (``at::opmath_type``)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
