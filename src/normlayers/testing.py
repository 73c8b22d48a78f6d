"""Tolerances and assert helpers shared by the tests (and usable by anyone checking a layer against its reference).

Two rules, from DESIGN.md:

* **fp32 / fp64** results are compared with :func:`torch.testing.assert_close` against a reference computed in the
  same or a wider dtype, with the tolerances of :data:`TOLERANCES`.
* **fp16 / bf16** results follow the relative rule of :func:`assert_lowprec_close`: our error against an fp64
  reference may be at most twice PyTorch's own low-precision error (``max|ours − ref64| ≤ 2·max|torch − ref64| +
  atol``). That keeps us honest without guessing how wrong a bf16 norm is allowed to be.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["TOLERANCES", "tolerance", "assert_close", "assert_lowprec_close", "max_abs_error"]

# dtype -> (rtol, atol). Each entry widens torch.testing's default only with the reason written beside it.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    # torch.testing defaults for fp64 are (1e-7, 1e-7); fp64 kernels receive eps and weight_offset as fp32 scalars
    # (Triton types Python floats as fp32), a relative change of up to ~1e-8 in the result.
    torch.float64: (1e-7, 1e-7),
    # torch.testing's fp32 defaults (1.3e-6, 1e-5): kernels and reference both accumulate in fp32, in different orders.
    torch.float32: (1.3e-6, 1e-5),
    # Used only as the atol of the low-precision rule (one ulp near 1.0; fp16 ~1e-3, bf16 ~8e-3).
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1.6e-2, 1e-2),
}


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(rtol, atol) for results of ``dtype``."""
    return TOLERANCES[dtype]


def max_abs_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual − expected| computed in fp64 (0 for empty tensors)."""
    if actual.numel() == 0:
        return 0.0
    return (actual.double() - expected.double()).abs().max().item()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, dtype: Optional[torch.dtype] = None,
                 msg: str = "") -> None:
    """:func:`torch.testing.assert_close` with the tolerance of ``dtype`` (default: ``actual.dtype``); ``expected``
    may be wider (it is cast to ``actual``'s dtype for the comparison)."""
    rtol, atol = tolerance(dtype or actual.dtype)
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=rtol, atol=atol,
                               msg=(lambda m: f"{msg}\n{m}") if msg else None)


def assert_lowprec_close(actual: torch.Tensor, torch_lowprec: torch.Tensor, reference64: torch.Tensor, *,
                         atol: Optional[float] = None, msg: str = "") -> None:
    """The low-precision rule: ``max|actual − ref64| ≤ 2·max|torch_lowprec − ref64| + atol``.

    ``torch_lowprec`` is the same computation done by PyTorch in the low-precision dtype (e.g. ``F.layer_norm`` on
    the bf16 input), ``reference64`` the fp64 result. ``atol`` defaults to the table's entry for ``actual.dtype``.
    """
    if actual.shape != reference64.shape:
        raise AssertionError(f"{msg} shape {tuple(actual.shape)} != reference shape {tuple(reference64.shape)}")
    ours = max_abs_error(actual, reference64)
    theirs = max_abs_error(torch_lowprec, reference64)
    bound = 2.0 * theirs + (atol if atol is not None else tolerance(actual.dtype)[1])
    if not ours <= bound:  # also fails on NaN
        raise AssertionError(f"{msg} max error {ours:.3e} vs fp64 exceeds 2 x torch's {theirs:.3e} + atol "
                             f"(bound {bound:.3e}) for dtype {actual.dtype}")
