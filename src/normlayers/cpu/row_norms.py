"""CPU tier of the row norms: LayerNorm on ATen's fused ``native_layer_norm`` (forward and backward), RMSNorm and
CRMSNorm as one closed-form ``autograd.Function``, and the fused residual add.

torch's own ``F.rms_norm`` is no fused kernel on CPU (it runs ``pow``, ``mean``, ``rsqrt`` and two multiplies, and
autograd through them), so RMSNorm gets the closed form: with ``r = rsqrt(ms + eps)`` per row, ``gw = dy·w``,

    dx = r·gw − c·r³·(Σ gw·x)/d·(x + s),    dw = Σ_rows dy·x·r

where RMSNorm has ``ms = Σx²/n``, ``d = n``, ``s = 0`` and CRMSNorm (the compressed vector ``x′`` of width
``n = d − 1``, Jiang et al., NeurIPS 2023) ``ms = (Σx′² + (Σx′)²)/d``, ``s = Σx′``.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from normlayers._dtypes import compute_dtype
from normlayers.cpu._common import LOW_PRECISION, opmath, params_like
from normlayers.reference import row_norms as _ref_row

__all__ = ["row_norm"]


def _rms_rstd(xf: Tensor, compressed: bool, eps: float) -> tuple[Tensor, Optional[Tensor]]:
    """``(r, s)`` per row of the 2-D ``xf``: ``r = rsqrt(ms + eps)`` as ``(M, 1)``; ``s = Σx`` for CRMSNorm."""
    sum_sq = torch.linalg.vecdot(xf, xf).unsqueeze(-1)
    if not compressed:
        return torch.rsqrt(sum_sq / xf.shape[-1] + eps), None
    row_sum = xf.sum(-1, keepdim=True)
    return torch.rsqrt((sum_sq + row_sum.square()) / (xf.shape[-1] + 1) + eps), row_sum


class _RMSNormFunction(torch.autograd.Function):
    """``y = x·r·(w + offset)`` over the last dim of a 2-D ``x``, computed in ``x``'s opmath dtype; see the module
    docstring for the backward. ``weight`` may be ``None``."""

    @staticmethod
    def forward(x: Tensor, weight: Optional[Tensor], eps: float, weight_offset: float, compressed: bool,
                out_dtype: torch.dtype) -> Tensor:
        xf = opmath(x)
        rstd, _ = _rms_rstd(xf, compressed, eps)
        y = xf * rstd
        if weight is not None:
            y = y.mul_(weight.to(y.dtype) + weight_offset) if weight_offset else y.mul_(weight.to(y.dtype))
        return y.to(out_dtype)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        x, weight, eps, weight_offset, compressed, _ = inputs
        ctx.save_for_backward(x, weight)
        ctx.eps, ctx.weight_offset, ctx.compressed = eps, weight_offset, compressed

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], ...]:
        x, weight = ctx.saved_tensors
        xf, gf = opmath(x), grad.to(compute_dtype(x.dtype))
        rstd, row_sum = _rms_rstd(xf, ctx.compressed, ctx.eps)  # recomputed: one pass, saves an (M, 1) buffer
        gw = gf if weight is None else gf * (weight.to(gf.dtype) + ctx.weight_offset)
        width = xf.shape[-1] + (1 if ctx.compressed else 0)
        # out of place: in a double backward these ops are themselves differentiated
        coef = rstd.pow(3) * torch.linalg.vecdot(gw, xf).unsqueeze(-1) / width
        centre = xf if row_sum is None else xf + row_sum
        dx = gw * rstd - centre * coef
        dweight = None
        if weight is not None and ctx.needs_input_grad[1]:
            dweight = (gf * xf).transpose(0, 1).mv(rstd.squeeze(-1)).to(weight.dtype)
        return dx.to(x.dtype), dweight, None, None, None, None


def _residual_add(x: Tensor, residual: Tensor, residual_dtype: torch.dtype) -> Tensor:
    if x.dtype == residual.dtype == residual_dtype:
        return x + residual  # ATen adds in opmath and rounds once: the reference's value, one pass
    return _ref_row.residual_add(x, residual, residual_dtype)


def row_norm(kind: str, input: Tensor, shape: tuple[int, ...], weight: Optional[Tensor], bias: Optional[Tensor],
             eps: float, residual: Optional[Tensor], residual_dtype: Optional[torch.dtype],
             weight_offset: float) -> tuple[Tensor, Optional[Tensor]]:
    """``(y, h)`` as :func:`normlayers.functional.add_layer_norm` and friends (``h = None`` without ``residual``);
    ``kind`` is ``"layer"``, ``"rms"`` or ``"crms"``. Arguments are assumed valid."""
    h = input if residual is None else _residual_add(input, residual, residual_dtype)
    if kind == "layer":
        # In fp32 for bf16/fp16: ATen's reduced-precision layer norm backward sums the weight and bias gradients
        # with bf16 roundings (an error of 0.04 in a bias gradient of 12 rows), even beside fp32 parameters.
        normed = opmath(h) if h.dtype in LOW_PRECISION else h
        weight, bias = params_like(normed, weight, bias)
        y = F.layer_norm(normed, shape, weight, bias, eps).to(input.dtype)
    else:
        width = math.prod(shape)
        flat_weight = None if weight is None else weight.reshape(width)
        y = _RMSNormFunction.apply(h.reshape(-1, width), flat_weight, eps, weight_offset, kind == "crms",
                                   input.dtype).reshape(h.shape)
    return y, h if residual is not None else None
