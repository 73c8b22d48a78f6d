"""ATen's layer norm over the last dimension, with a centred backward for rows that sit far from zero.

ATen's CPU backward of ``native_layer_norm`` writes ``dx = rstd·γ·dy + b·x + c`` with
``b = (mean·Σγ·dy − Σγ·dy·x)·rstd³/D`` and ``c = −b·mean − rstd·Σγ·dy/D``: ``Σγ·dy·x`` and ``mean·Σγ·dy`` (and then
``b·x`` and ``c``) are each of the size of ``mean·rstd`` times the centred terms, and their difference keeps only the
centred part. On rows offset by 100-1000 standard deviations its ``dx`` is 1.1-2.8× over the fp32 bound against the
fp64 reference (tests/test_offset_inputs.py). Where ``max|mean·rstd|`` exceeds :data:`OFFSET_LIMIT` the backward here
centres first, ``x̂ = (x − mean − mean(x − mean))·rstd`` (the second term takes off the fp32 mean's rounding, of the
size of ``mean·2⁻²⁴``) and ``g = γ·dy``:

    dx = rstd·(g − mean(g) − x̂·mean(g·x̂)),    dγ = Σ dy·x̂,    dβ = Σ dy

and the forward writes ``y = x̂·γ + β``; below it ATen's forward and fused backward run as they are. Double backward
takes autograd of ``F.layer_norm`` (:func:`normlayers._autograd.recomputed_backward`).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from normlayers._autograd import recomputed_backward, wants_double_backward
from normlayers.cpu._common import host_readable
from normlayers.cpu import row_norms

__all__ = ["OFFSET_LIMIT", "layer_norm_last_dim"]

# max|mean·rstd| above which ATen's forward and backward are not used: their error grows with it (dx 1.1-1.4x the bound
# at 100 on rows of 32-36 values, 0.64x on 64), and the centred forms are a few ATen passes instead of one.
OFFSET_LIMIT = 16.0


class _LayerNormLastDim(torch.autograd.Function):
    """``F.layer_norm(x, (D,), weight, bias, eps)`` of rows far from zero, centred (module docstring)."""

    @staticmethod
    def forward(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor, rstd: Tensor,
                eps: float) -> Tensor:
        return _centred_forward(x, weight, bias, mean, rstd)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        x, weight, bias, mean, rstd, eps = inputs
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.eps = eps

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Optional[Tensor], ...]:
        x, weight, bias, mean, rstd = ctx.saved_tensors
        if wants_double_backward():
            return recomputed_backward(ctx, lambda x, w, b: F.layer_norm(x, x.shape[-1:], w, b, ctx.eps),
                                       (x, weight, bias), dy)
        needs = ctx.needs_input_grad
        xhat = _centred(x, mean).mul_(rstd)
        rows = tuple(range(x.dim() - 1))
        dweight = (dy * xhat).sum(rows) if weight is not None and needs[1] else None
        dbias = dy.sum(rows) if bias is not None and needs[2] else None
        dx = None
        if needs[0]:
            g = dy * weight if weight is not None else dy
            dx = g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True)
            dx.mul_(rstd)
        return dx, dweight, dbias, None, None, None


def _centred(x: Tensor, mean: Tensor) -> Tensor:
    """``x − mean`` (exact where a value is within 2× of its row's mean) less its row mean (the rounding of ``mean``,
    of the size of ``mean·2⁻²⁴``)."""
    centred = x - mean
    return centred.sub_(centred.mean(-1, keepdim=True))


def _centred_forward(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor, rstd: Tensor) -> Tensor:
    """``y`` from the centred rows, where ATen's ``x·rstd − mean·rstd`` (two terms of the size of ``mean·rstd``)
    leaves their difference's rounding in ``y``."""
    y = _centred(x, mean).mul_(rstd)
    if weight is not None:
        y.mul_(weight)
    if bias is not None:
        y.add_(bias)
    return y


def layer_norm_last_dim(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Tensor:
    """``F.layer_norm`` over ``x``'s last dimension: for inference the compiled kernel where it takes the tensors
    (:func:`normlayers.cpu.row_norms._native_row_norm`), else ATen's ``native_layer_norm`` and its backward, or, where
    ``max|mean·rstd| > OFFSET_LIMIT``, the centred forms (:class:`_LayerNormLastDim`). Those need ``x``, ``weight`` and
    ``bias`` fp32 or fp64 of one dtype (ATen's mixed-type norm, e.g. a bf16 ``x`` with an fp32 ``weight``, computes in
    fp32 already) and plain tensors, outside ``torch.compile`` and ``torch.func`` transforms (``max|mean·rstd|`` is
    read as a number)."""
    inference = not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)))
    if inference and not torch.compiler.is_compiling():
        # the compiled kernel where it takes these tensors; it centres every row (csrc/row_norms.c)
        result = row_norms._native_row_norm(x, weight, bias, eps, False)
        if result is not None and result[0] is not None:
            return result[0]
    plain = (x.dtype in (torch.float32, torch.float64) and not torch.compiler.is_compiling()
             and host_readable(x, weight, bias)
             and all(t is None or t.dtype == x.dtype for t in (weight, bias)))
    if not plain:
        return torch.layer_norm(x, x.shape[-1:], weight, bias, eps, False)
    y, mean, rstd = torch.native_layer_norm(x, x.shape[-1:], weight, bias, eps)
    mean, rstd = mean.detach(), rstd.detach()
    if mean.numel() == 0 or not float((mean * rstd).abs().max()) > OFFSET_LIMIT:
        return y
    return _LayerNormLastDim.apply(x, weight, bias, mean, rstd, eps)
