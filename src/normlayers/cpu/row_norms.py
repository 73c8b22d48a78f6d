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


class _LowPrecisionLayerNorm(torch.autograd.Function):
    """ATen's fused layer norm on bf16/fp16 ``x`` beside fp32 parameters: its forward computes the statistics and the
    output in fp32 and rounds the output once (the reference's math; checked against fp64 in
    tests/cpu/test_row_norms.py), with no fp32 copy of ``x``. Its reduced-precision backward sums the weight and bias
    gradients with bf16 roundings (an error of 0.04 in a bias gradient of 12 rows), so the backward runs ATen's
    fp32 kernel on upcast ``x`` and ``dy`` with the forward's fp32 statistics."""

    @staticmethod
    def forward(x: Tensor, shape: list[int], weight: Optional[Tensor], bias: Optional[Tensor], eps: float
                ) -> tuple[Tensor, Tensor, Tensor]:
        return torch.ops.aten.native_layer_norm(x, shape, weight, bias, eps)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        x, shape, weight, bias, eps = inputs
        _, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.shape, ctx.eps = shape, eps

    @staticmethod
    def backward(ctx: Any, grad: Tensor, *unused: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
        x, weight, bias, mean, rstd = ctx.saved_tensors
        xf, gf = opmath(x), opmath(grad)
        needed = [ctx.needs_input_grad[i] for i in (0, 2, 3)]  # x, weight, bias
        if torch.is_grad_enabled():  # a double backward: the saved statistics hold no graph, so autograd from x
            leaves = [t for t, need in zip((xf, weight, bias), needed) if need]
            grads = iter(torch.autograd.grad(F.layer_norm(xf, ctx.shape, weight, bias, ctx.eps), leaves, gf,
                                             create_graph=True))
            dx, dweight, dbias = (next(grads) if need else None for need in needed)
        else:
            dx, dweight, dbias = torch.ops.aten.native_layer_norm_backward(gf, xf, ctx.shape, mean, rstd, weight,
                                                                           bias, needed)
        return None if dx is None else dx.to(x.dtype), None, dweight, dbias, None


def _native_layer_norm(h: Tensor, input_dtype: torch.dtype, shape: tuple[int, ...], weight: Optional[Tensor],
                       bias: Optional[Tensor], eps: float) -> Optional[Tensor]:
    """ATen's fused layer norm of ``h`` where it gives the scaled statistics' answer, else ``None`` (eager only; under
    ``torch.compile`` the closed form runs and inductor fuses it).

    Unscaled statistics differ from the scaled ones only where they overflow or underflow: with ``eps = 0`` a tiny
    row's variance underflows (so only ``eps > 0`` qualifies), and a row whose squared deviations overflow gets an
    infinite variance, i.e. ``rstd = 0`` — as does a NaN or inf row (``rstd`` NaN), whose NaN pattern the closed form
    reproduces. So one check of the per-row ``rstd > 0`` after the call (M values, one host sync) replaces a pass of
    ``abs().amax()`` over the input before it."""
    if torch.compiler.is_compiling() or eps <= 0 or h.numel() == 0:
        return None
    weight, bias = params_like(h, weight, bias)
    if h.dtype in LOW_PRECISION and input_dtype == h.dtype:  # the output is rounded to h's dtype
        y, _, rstd = _LowPrecisionLayerNorm.apply(h, list(shape), weight, bias, eps)
    else:  # e.g. fp32 input with a bf16 residual stream: the output stays fp32
        y, _, rstd = torch.ops.aten.native_layer_norm(opmath(h), list(shape), weight, bias, eps)
    return y.to(input_dtype) if bool((rstd > 0).all()) else None


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
    y = _native_layer_norm(h, input.dtype, shape, weight, bias, eps) if kind == "layer" and math.prod(shape) > 1 \
        else None
    if y is not None:
        return y, h if residual is not None else None
    width = math.prod(shape)
    flat_weight = None if weight is None else weight.reshape(width)
    flat_bias = None if bias is None else bias.reshape(width)
    y = _RowNormFunction.apply(h.reshape(-1, width), flat_weight, flat_bias, eps, weight_offset, kind,
                               input.dtype).reshape(h.shape)
    return y, h if residual is not None else None
