"""The accuracy gate: a provider's outputs and gradients against an fp64 reference.

The bound follows the project rule (docs/testing.md; :mod:`normlayers.testing`): a result may be at most twice
as wrong as PyTorch's own computation in the same dtype, plus the tolerance table's slack,

    max|provider − ref64| ≤ 2 · max|eager_lowprec − ref64| + atol[dtype] (+ rtol[dtype] · max|ref64| for fp32)

where ``eager_lowprec`` is the eager reference run on the benchmark's inputs in the benchmark dtype, and (rtol, atol)
come from :data:`normlayers.testing.TOLERANCES` (whose fp16/bf16 entries are only the atol of the low-precision
rule). The check is per tensor (``y``, ``h``, ``dx``, ``dweight``, ...), since gradients and outputs differ in scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from normlayers.testing import tolerance

__all__ = ["ErrorReport", "RULE", "check_errors", "error_bounds", "max_abs_error"]

LOW_PRECISION = (torch.float16, torch.bfloat16)

RULE = ("max|err| <= 2*max|eager same-dtype err| + atol (+ rtol*max|ref64| for fp32), per output and gradient; "
        "(rtol, atol) from normlayers.testing.TOLERANCES")


def max_abs_error(actual: Tensor, expected: Tensor) -> float:
    """``max|actual − expected|`` computed in fp64; ``inf`` for a shape mismatch or a non-finite value."""
    if actual.shape != expected.shape:
        return float("inf")
    if actual.numel() == 0:
        return 0.0
    error = float((actual.double() - expected.double()).abs().max())
    return error if math.isfinite(error) else float("inf")


def error_bounds(baseline: dict[str, Tensor], expected: dict[str, Tensor], dtype: torch.dtype) -> dict[str, float]:
    """The allowed error of every result tensor, from the eager same-dtype ``baseline`` and the fp64 ``expected``."""
    rtol, atol = tolerance(dtype)
    if dtype in LOW_PRECISION:
        rtol = 0.0  # the table's low-precision entries are only the atol of the 2x rule
    return {
        name: 2 * max_abs_error(baseline[name], ref) + atol + rtol * float(ref.abs().max())
        for name, ref in expected.items()
    }


@dataclass(frozen=True)
class ErrorReport:
    """The worst tensor of one provider's results: the one with the largest error relative to its bound."""

    tensor: str
    max_abs_error: float
    bound: float

    @property
    def within_bound(self) -> bool:
        return self.max_abs_error <= self.bound


def check_errors(actual: dict[str, Tensor], expected: dict[str, Tensor], bounds: dict[str, float]) -> ErrorReport:
    """Compare every expected tensor; a missing one counts as an infinite error."""
    reports = [
        ErrorReport(name, max_abs_error(actual[name], ref) if name in actual else float("inf"), bounds[name])
        for name, ref in expected.items()
    ]
    return max(reports, key=lambda r: r.max_abs_error / r.bound)
