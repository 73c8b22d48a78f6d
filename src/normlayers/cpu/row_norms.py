"""CPU tier of the row norms: LayerNorm, RMSNorm and CRMSNorm as one closed-form ``autograd.Function``, and the
fused residual add.

torch's own ``F.rms_norm`` is no fused kernel on CPU (it runs ``pow``, ``mean``, ``rsqrt`` and two multiplies, and
autograd through them), and ATen's ``native_layer_norm`` takes a single ``eps`` for all rows, where the statistics
here are those of each row scaled by a power of two ``s`` with ``eps·s²`` (as the reference and the kernels:
:func:`normlayers.reference.row_norms.power_of_two_scale`, docs/reliability.md). So every kind gets the closed form
on the scaled row ``z = s·x``: with ``r = rsqrt(σ² + eps·s²)`` per row and ``gw = dy·w``,

    LayerNorm:  ẑ = (z − mean z)·r,    dx = s·r·(gw − mean(gw) − ẑ·mean(gw·ẑ))
    RMSNorm:    dx = s·(r·gw − r³·(Σ gw·z)/d·(z + c))

where RMSNorm has ``σ² = Σz²/n``, ``d = n``, ``c = 0`` and CRMSNorm (the compressed vector ``x′`` of width
``n = d − 1``, Jiang et al., NeurIPS 2023) ``σ² = (Σz′² + (Σz′)²)/d``, ``c = Σz′``; ``dw = Σ_rows dy·ẑ``,
``db = Σ_rows dy``.
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


def _scaled_stats(xf: Tensor, kind: str, eps: float) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """``(z, r, s, c)`` per row of the 2-D ``xf``: the scaled row ``z = s·x`` (centred for LayerNorm), ``r`` and ``s``
    as ``(M, 1)``, and ``c = Σz`` for CRMSNorm (else ``None``)."""
    scale = _ref_row.power_of_two_scale(xf, (-1,), eps)
    z = xf * scale
    eps_s = eps * scale * scale
    if kind == "layer":
        z = z - z.mean(-1, keepdim=True)
        return z, torch.rsqrt(z.square().mean(-1, keepdim=True) + eps_s), scale, None
    if kind == "rms":  # mean of squares, the op order of torch's, timm's and Hugging Face's RMSNorms: bit for bit
        return z, torch.rsqrt(z.square().mean(-1, keepdim=True) + eps_s), scale, None
    sum_sq = torch.linalg.vecdot(z, z).unsqueeze(-1)
    row_sum = z.sum(-1, keepdim=True)
    return z, torch.rsqrt((sum_sq + row_sum.square()) / (z.shape[-1] + 1) + eps_s), scale, row_sum


class _RowNormFunction(torch.autograd.Function):
    """``y = ẑ·(w + offset) + b`` over the last dim of a 2-D ``x``, computed in ``x``'s opmath dtype; see the module
    docstring for the backward. ``weight`` and ``bias`` may be ``None``."""

    @staticmethod
    def forward(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, weight_offset: float,
                kind: str, out_dtype: torch.dtype) -> Tensor:
        z, rstd, _, _ = _scaled_stats(opmath(x), kind, eps)
        y = z * rstd
        if weight is not None:
            y = y.mul_(weight.to(y.dtype) + weight_offset) if weight_offset else y.mul_(weight.to(y.dtype))
        if bias is not None:
            y = y.add_(bias.to(y.dtype))
        return y.to(out_dtype)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        x, weight, bias, eps, weight_offset, kind, _ = inputs
        ctx.save_for_backward(x, weight)
        ctx.eps, ctx.weight_offset, ctx.kind, ctx.bias_dtype = eps, weight_offset, kind, getattr(bias, "dtype", None)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], ...]:
        x, weight = ctx.saved_tensors
        gf = grad.to(compute_dtype(x.dtype))
        z, rstd, scale, row_sum = _scaled_stats(opmath(x), ctx.kind, ctx.eps)  # recomputed: saves (M, 1) buffers
        xhat = z * rstd
        gw = gf if weight is None else gf * (weight.to(gf.dtype) + ctx.weight_offset)
        # out of place: in a double backward these ops are themselves differentiated
        if ctx.kind == "layer":
            dz = rstd * (gw - gw.mean(-1, keepdim=True) - xhat * (gw * xhat).mean(-1, keepdim=True))
        else:
            width = z.shape[-1] + (1 if row_sum is not None else 0)
            coef = rstd.pow(3) * torch.linalg.vecdot(gw, z).unsqueeze(-1) / width
            dz = gw * rstd - (z if row_sum is None else z + row_sum) * coef
        dweight = dbias = None
        if weight is not None and ctx.needs_input_grad[1]:
            dweight = (gf * xhat).sum(0).to(weight.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            dbias = gf.sum(0).to(ctx.bias_dtype)
        return (dz * scale).to(x.dtype), dweight, dbias, None, None, None, None


# Below this magnitude a row's sum of squares cannot overflow fp32 ((2**50)²·n < 2**128 for rows of n < 2**28 values),
# so ATen's native_layer_norm, which does not scale, gives the scaled closed form's answer to rounding.
_NATIVE_MAX_ABS = 2.0 ** 50


def _fits_native_layer_norm(h: Tensor, eps: float) -> bool:
    """Whether ATen's fused ``native_layer_norm`` gives the scaled statistics' answer for ``h`` (eager only: one pass
    of ``abs().amax()``; under ``torch.compile`` the closed form runs and inductor fuses it). With ``eps = 0`` a tiny
    row's variance underflows unscaled, so only ``eps > 0`` qualifies; a NaN or inf input takes the closed form,
    whose NaN pattern is the reference's."""
    if torch.compiler.is_compiling() or eps <= 0 or h.numel() == 0:
        return False
    return bool(h.detach().abs().amax() < _NATIVE_MAX_ABS)


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
    # Width 1 takes the closed form: there x − E[x] is exactly 0, and ATen's backward leaves rounding noise in dx.
    if kind == "layer" and math.prod(shape) > 1 and _fits_native_layer_norm(h, eps):
        # In fp32 for bf16/fp16: ATen's reduced-precision layer norm backward sums the weight and bias gradients
        # with bf16 roundings (an error of 0.04 in a bias gradient of 12 rows), even beside fp32 parameters.
        normed = opmath(h) if h.dtype in LOW_PRECISION else h
        weight, bias = params_like(normed, weight, bias)
        return F.layer_norm(normed, shape, weight, bias, eps).to(input.dtype), h if residual is not None else None
    width = math.prod(shape)
    flat_weight = None if weight is None else weight.reshape(width)
    flat_bias = None if bias is None else bias.reshape(width)
    y = _RowNormFunction.apply(h.reshape(-1, width), flat_weight, flat_bias, eps, weight_offset, kind,
                               input.dtype).reshape(h.shape)
    return y, h if residual is not None else None
