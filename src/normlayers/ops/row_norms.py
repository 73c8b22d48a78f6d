"""``torch.library`` custom ops for the row-norm kernels: ``normlayers::row_norm_fwd`` / ``row_norm_bwd``.

One op pair serves LayerNorm, RMSNorm and CRMSNorm (``kind`` = ``"layer"``, ``"rms"``, ``"crms"``), as one kernel
pair does. The ops take 2-D ``(M, N)`` tensors; :func:`row_norm` flattens leading and normalized dims before the op
boundary, so ranks never change inside a compiled graph. The ops are opaque to ``torch.compile`` (``register_fake``
gives their shapes) and differentiable through ``register_autograd``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from normlayers._autograd import differentiable_backward, wants_double_backward
from normlayers._dtypes import compute_dtype
from normlayers.reference import row_norms as _ref_row

__all__ = ["row_norm", "row_norm_fwd", "row_norm_bwd"]


def _kernels():
    # Triton is imported lazily: the reference path and the package import must work without it.
    from normlayers.kernels import row_norms

    return row_norms


@torch.library.custom_op("normlayers::row_norm_fwd", mutates_args=())
def row_norm_fwd(
    x: Tensor,
    residual: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    kind: str,
    eps: float,
    weight_offset: float,
    residual_dtype: Optional[torch.dtype],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(y, residual_out, mean, rstd)``; ``residual_out`` is empty without a residual, ``mean`` unless
    ``kind == "layer"``."""
    return _kernels().row_norm_fwd(x, residual, weight, bias, kind, eps, weight_offset, residual_dtype)


@row_norm_fwd.register_fake
def _row_norm_fwd_fake(x, residual, weight, bias, kind, eps, weight_offset, residual_dtype):
    m, n = x.shape
    stats = compute_dtype(x.dtype)
    residual_out = x.new_empty((m, n), dtype=residual_dtype) if residual is not None else x.new_empty(0)
    return (x.new_empty((m, n)), residual_out, x.new_empty(m if kind == "layer" else 0, dtype=stats),
            x.new_empty(m, dtype=stats))


@torch.library.custom_op("normlayers::row_norm_bwd", mutates_args=())
def row_norm_bwd(
    dy: Tensor,
    h: Tensor,
    dresidual_out: Optional[Tensor],
    weight: Optional[Tensor],
    mean: Tensor,
    rstd: Tensor,
    kind: str,
    weight_offset: float,
    has_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns ``(dh, dweight, dbias)``; ``dweight``/``dbias`` are empty when there is no such parameter."""
    return _kernels().row_norm_bwd(dy, h, dresidual_out, weight, mean, rstd, kind, weight_offset, has_bias)


@row_norm_bwd.register_fake
def _row_norm_bwd_fake(dy, h, dresidual_out, weight, mean, rstd, kind, weight_offset, has_bias):
    param_dtype = weight.dtype if weight is not None else h.dtype
    n = h.shape[1]
    return (h.new_empty(h.shape), h.new_empty(n if weight is not None else 0, dtype=param_dtype),
            h.new_empty(n if has_bias else 0, dtype=param_dtype))


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, kind, eps, weight_offset, _residual_dtype = inputs
    _y, residual_out, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    # Outputs that get no gradient (the statistics, an unused residual sum) arrive as None, not as zero-filled tensors
    # (autograd would materialize them as plain zero tensors even for DTensor outputs, which DTensor then refuses to
    # mix with the other, DTensor, arguments of row_norm_bwd).
    ctx.set_materialize_grads(False)
    # Save the values that were normalized: x, or the residual sum (an output, so no extra memory).
    ctx.save_for_backward(residual_out if residual is not None else x, weight, mean, rstd)
    ctx.kind, ctx.eps, ctx.weight_offset, ctx.has_bias = kind, eps, weight_offset, bias is not None
    ctx.x_dtype = x.dtype
    ctx.residual_dtype = residual.dtype if residual is not None else None


def _reference_formula(ctx):
    """The op's normalization (without bias) as reference torch ops, in the compute dtype: what double backward
    differentiates."""
    def formula(h: Tensor, weight: Optional[Tensor]) -> Tensor:
        shape, out_dtype = (h.shape[1],), compute_dtype(h.dtype)
        if ctx.kind == "layer":
            return _ref_row.layer_norm(h, shape, weight, None, ctx.eps, out_dtype=out_dtype)
        if ctx.kind == "rms":
            return _ref_row.rms_norm(h, shape, weight, ctx.eps, weight_offset=ctx.weight_offset, out_dtype=out_dtype)
        return _ref_row.crms_norm(h, shape, weight, ctx.eps, out_dtype=out_dtype)

    return formula


def _backward(ctx, dy, dresidual_out, _dmean, _drstd):
    h, weight, mean, rstd = ctx.saved_tensors
    if ctx.residual_dtype is None:
        dresidual_out = None
    if dy is None:  # only the residual sum reached the loss: the norm adds nothing
        dh, dweight, dbias = dresidual_out, None, None
    elif wants_double_backward():
        # create_graph=True: the backward kernel's op has no derivative, so differentiate the reference formula.
        needs_dh = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        dh, dweight = differentiable_backward(_reference_formula(ctx), (h, weight), (dy,),
                                              (needs_dh, weight is not None and ctx.needs_input_grad[2]))
        if dh is not None and dresidual_out is not None:
            dh = dh + dresidual_out.to(dh.dtype)
        dbias = dy.sum(0) if ctx.has_bias else None
    else:
        dh, dweight, dbias = row_norm_bwd(_row_major(dy), h, _row_major(dresidual_out), weight, mean, rstd, ctx.kind,
                                          ctx.weight_offset, ctx.has_bias)
    # x and the residual both receive dh (as for an unfused `x + residual`), each in its own dtype.
    dx = dh.to(ctx.x_dtype) if dh is not None else None
    dresidual = dh.to(ctx.residual_dtype) if dh is not None and ctx.residual_dtype is not None else None
    return (dx, dresidual, dweight if weight is not None else None, dbias if ctx.has_bias else None,
            None, None, None, None)


row_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


def _row_major(t: Optional[Tensor]) -> Optional[Tensor]:
    """The kernels need unit stride along a row; any row stride is fine."""
    if t is None or t.stride(-1) == 1:
        return t
    return t.contiguous()


def row_norm(
    x: Tensor,
    normalized_shape: Sequence[int],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    kind: str,
    eps: float,
    *,
    residual: Optional[Tensor] = None,
    residual_dtype: Optional[torch.dtype] = None,
    weight_offset: float = 0.0,
) -> tuple[Tensor, Optional[Tensor]]:
    """Run a row norm through the Triton op on inputs of any rank; returns ``(y, residual_out or None)``.

    Arguments are assumed validated (``normlayers.functional`` does that).
    """
    n = math.prod(normalized_shape)
    m = x.numel() // n if n > 0 else math.prod(x.shape[: x.dim() - len(normalized_shape)])
    # reshape is a view whenever the leading dims collapse to one row stride, so strided rows are not copied.
    x2 = _row_major(x.reshape(m, n))
    r2 = _row_major(residual.reshape(m, n)) if residual is not None else None
    y, residual_out, _mean, _rstd = row_norm_fwd(
        x2, r2, weight.reshape(n) if weight is not None else None, bias.reshape(n) if bias is not None else None,
        kind, float(eps), float(weight_offset), residual_dtype if residual is not None else None)
    return y.view(x.shape), residual_out.view(x.shape) if residual is not None else None
