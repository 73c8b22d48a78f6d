"""CPU tier of the channels-first norms: LayerNorm2d on ATen's fused ``native_layer_norm`` over the channels-last view
(timm's own math; centred for pixels far from zero, :mod:`normlayers.cpu._centred_layer_norm`), RMSNorm2d as one
closed-form ``autograd.Function`` reducing over ``dim=1`` in place.

RMSNorm2d's backward, with ``r = rsqrt(mean_c(x²) + eps)`` per pixel, ``x̂ = x·r`` and ``g = dy·w``:

    dx = r·(g − x̂·mean_c(x̂·g)),    dw = Σ_{n,h,w} dy·x̂

(a handful of passes where autograd through timm's ``pow``, ``mean``, ``rsqrt`` and two broadcast multiplies takes
about twice as many). Statistics in fp32 (fp64 for fp64 input), the result rounded once to the input's dtype, as in
:mod:`normlayers.reference.channel_norms`; argument checks live in :mod:`normlayers.functional`.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from normlayers._dtypes import compute_dtype
from normlayers.cpu._centred_layer_norm import layer_norm_last_dim

__all__ = ["layer_norm2d", "rms_norm2d"]


def _in_compute_dtype(input: Tensor, *params: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
    dtype = compute_dtype(input.dtype)
    return tuple(None if p is None else p.to(dtype) for p in params)


def layer_norm2d(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Tensor:
    """timm's ``LayerNorm2d`` in the compute dtype: for fp32/fp64 input exactly its ops (one copy of an NCHW input,
    none of a channels-last one). fp16/bf16 input is normalized in fp32, parameters included: ATen's CPU backward
    accumulates the gradients of bf16 parameters in bf16, which loses them over many pixels."""
    rows = input.permute(0, 2, 3, 1).to(compute_dtype(input.dtype), memory_format=torch.contiguous_format)
    y = layer_norm_last_dim(rows, *_in_compute_dtype(input, weight, bias), eps)
    return y.to(input.dtype).permute(0, 3, 1, 2)


class _RMSNorm2dFunction(torch.autograd.Function):
    """``y = x·r·w`` over dim 1 of an ``(N, C, H, W)`` ``x``, in its compute dtype; backward in the module docstring.
    ``weight`` may be ``None``."""

    @staticmethod
    def forward(x: Tensor, weight: Optional[Tensor], eps: float) -> tuple[Tensor, Tensor]:
        # timm's reduction (a mean over dim 1, which ATen vectorizes along the pixels of NCHW), in the compute dtype.
        xf = x.to(compute_dtype(x.dtype))
        rstd = torch.rsqrt(xf.square().mean(1, keepdim=True).add_(eps))
        y = xf * rstd
        if weight is not None:
            y.mul_(weight.to(y.dtype)[:, None, None])
        return y.to(x.dtype), rstd

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple[Tensor, Tensor]) -> None:
        x, weight, _ = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(x, weight, output[1])

    @staticmethod
    def backward(ctx: Any, grad: Tensor, _grad_rstd: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
        x, weight, rstd = ctx.saved_tensors
        xhat = x * rstd
        dweight = None
        if weight is not None and ctx.needs_input_grad[1]:
            dweight = (grad * xhat).sum((0, 2, 3)).to(weight.dtype)
        g = grad * weight.to(rstd.dtype)[:, None, None] if weight is not None else grad.to(rstd.dtype)
        mean_xg = (xhat * g).mean(1, keepdim=True)
        dx = g.sub_(xhat.mul_(mean_xg)).mul_(rstd)
        return dx.to(x.dtype), dweight, None


def rms_norm2d(input: Tensor, weight: Optional[Tensor], eps: float) -> Tensor:
    """``x / sqrt(mean_c(x²) + eps) · w`` at each pixel: :class:`_RMSNorm2dFunction`."""
    return _RMSNorm2dFunction.apply(input, weight, eps)[0]
