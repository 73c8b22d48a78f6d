"""CPU tier of the row norms: LayerNorm, RMSNorm and CRMSNorm, plain or after a fused residual add.

On CPU every fresh ``M×N`` tensor costs about as much as a pass over the rows (its pages are faulted in on first
touch), so the tier is written around the number of fresh tensors and passes, with torch's fused reductions and ATen's
fused layer-norm kernels where they compute our math:

* statistics: RMSNorm the mean of the squares (torch's and Hugging Face's op order, so a swap is bit for bit; the
  squares go into the output's buffer, overwritten next), CRMSNorm ``torch.linalg.vector_norm`` (one vectorized
  pass, no temporary), LayerNorm ``native_layer_norm``;
* the output: one fresh tensor, the rest in place (and for bf16/fp16 one rounding, as the reference);
* the backward: ATen's fused ``native_layer_norm_backward`` with the forward's statistics (``mean = 0`` for the RMS
  kinds, whose backward differs from LayerNorm's only by a per-row constant, and for CRMSNorm a term in ``x``, added
  in place).

**Statistics.** The reference takes the statistics of each row scaled by a power of two ``s`` with ``eps·s²``
(:func:`normlayers.reference.row_norms.power_of_two_scale`, docs/reliability.md), which differs from the unscaled
statistics only where these overflow or underflow. An overflow shows in the per-row result (``rstd = 0``; NaN or
inf in a row gives ``rstd`` NaN or 0), and an underflow cannot matter while ``eps ≥ 2^-60`` (the lost ``x²`` terms are
below ``2^-149`` each, and ``rstd ≤ 2^30`` keeps the backward's ``rstd³`` finite). So eagerly, with such an ``eps``,
the statistics are taken unscaled and one check that every ``rstd`` is positive and finite (``M`` values, read from
their raw bytes: :func:`normlayers.cpu._common.all_positive_finite`) decides: when it fails, the scaled closed form
runs instead, with the same formulas on ``z = s·x``. Under ``torch.compile`` the scaled closed form always runs (no
host sync in the graph) and inductor fuses it.

**Backward** (``r = rstd``, ``gw = dy·(w + offset)``, ``n`` the width; ATen's LayerNorm backward with ``mean = μ``
is ``dx_LN = r·(gw − mean(gw) − x̂·mean(gw·x̂))`` with ``x̂ = (x − μ)·r``):

    LayerNorm:  dx = dx_LN(μ = mean x)
    RMSNorm:    dx = dx_LN(μ = 0) + r·Σgw/n
    CRMSNorm:   dx = dx_LN(μ = 0) + r·Σgw/n + r³·(Σgw·x)·(x/(n·d) − c/d)

where CRMSNorm (the compressed vector ``x′`` of width ``n = d − 1``, Jiang et al., NeurIPS 2023) has
``σ² = (Σx′² + (Σx′)²)/d`` and ``c = Σx′``; ``dw = Σ_rows dy·x̂`` and ``db = Σ_rows dy`` come from the same ATen call
(it sums them in fp32 when given fp32 rows; with bf16 rows it sums them with bf16 roundings, so bf16/fp16 rows are
upcast for the backward). For the scaled closed form ``x`` is ``z = s·x`` and ``dx = s·dz``. A double backward
(``create_graph=True``) differentiates the reference instead.
"""

from __future__ import annotations

import ctypes
import math
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from normlayers._dtypes import compute_dtype
from normlayers.cpu import _extension, _native
from normlayers.cpu._common import (
    LOW_PRECISION,
    MIN_UNSCALED_EPS,
    all_positive_finite,
    host_readable,
    opmath,
    params_like,
)
from normlayers.reference import row_norms as _ref_row

__all__ = ["row_norm"]


def _unscaled_allowed(rows: Tensor, eps: float) -> bool:
    return not torch.compiler.is_compiling() and eps >= MIN_UNSCALED_EPS and rows.numel() > 0


def _rms_stats(rows: Tensor, kind: str, eps: Any) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """``(rstd, row_sum, squares)``: ``rstd`` and ``row_sum`` (``Σx`` for CRMSNorm, else ``None``) as ``(M, 1)`` of the
    opmath rows, and for RMSNorm the fresh tensor of their squares, a buffer of the rows' shape the caller may
    overwrite (e.g. with its output); ``eps`` is a float or, scaled, an ``(M, 1)`` tensor."""
    if kind == "rms":
        # mean of the squares, the op order of torch's F.rms_norm and Hugging Face's LlamaRMSNorm: swapping theirs for
        # ours is bit for bit (tests/examples/test_transformer_examples.py); vector_norm rounds differently
        squares = rows.square()
        return squares.mean(-1, keepdim=True).add_(eps).rsqrt_(), None, squares
    mean_square = torch.linalg.vector_norm(rows, dim=-1, keepdim=True).square_()
    row_sum = rows.sum(-1, keepdim=True)
    mean_square.add_(row_sum.square())
    return mean_square.div_(rows.shape[-1] + 1).add_(eps).rsqrt_(), row_sum, None


class _Stats:
    """Per-row statistics, of the rows' shape with a last dim of 1: ``rstd``; ``mean`` (LayerNorm), ``row_sum``
    (CRMSNorm) and the power-of-two ``scale`` of the closed form, else ``None``."""

    __slots__ = ("rstd", "mean", "row_sum", "scale")

    def __init__(self, rstd: Tensor, mean: Optional[Tensor] = None, row_sum: Optional[Tensor] = None,
                 scale: Optional[Tensor] = None) -> None:
        self.rstd, self.mean, self.row_sum, self.scale = rstd, mean, row_sum, scale


def _scaled_stats(xf: Tensor, kind: str, eps: float) -> _Stats:
    """The closed form's statistics of the rows scaled by a power of two (the reference's)."""
    scale = _ref_row.power_of_two_scale(xf, (-1,), eps)
    z = xf * scale
    eps_s = eps * scale * scale
    if kind == "layer":
        mean = z.mean(-1, keepdim=True)
        centred = z.sub_(mean)
        return _Stats(torch.rsqrt(centred.square().mean(-1, keepdim=True) + eps_s), mean=mean, scale=scale)
    rstd, row_sum, _ = _rms_stats(z, kind, eps_s)
    return _Stats(rstd, row_sum=row_sum, scale=scale)


def _normalize(x: Tensor, xf: Tensor, stats: _Stats, weight: Optional[Tensor], bias: Optional[Tensor],
               weight_offset: float, out_dtype: torch.dtype, out: Optional[Tensor] = None) -> Tensor:
    """``y = ẑ·(w + offset) + b`` from the statistics, in one fresh opmath tensor (``xf`` itself where it is a fresh
    upcast of ``x``, else ``out`` if given), rounded once to ``out_dtype``."""
    target = xf if xf is not x else out  # where the first op may write; after it, its own result
    y = xf
    for op, factor in ((torch.mul, stats.scale), (torch.sub, stats.mean), (torch.mul, stats.rstd)):
        if factor is not None:
            y = op(y, factor) if target is None else op(y, factor, out=target)
            target = y
    if weight is not None:
        y = y.mul_(weight + weight_offset if weight_offset else weight)
    if bias is not None:
        y = y.add_(bias)
    return y if y.dtype is out_dtype else y.to(out_dtype)


def _backward(x: Tensor, grad: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], stats: _Stats, kind: str,
              weight_offset: float, needs: tuple[bool, bool, bool]
              ) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """``(dx, dweight, dbias)`` of the first-order backward (module docstring), each in its input's dtype."""
    if kind == "layer" and stats.scale is None and x.shape[-1] > 1:
        result = _native_layer_norm_backward(x, grad, weight, bias, stats, needs)
        if result is not None:
            return result
    xf, gf = opmath(x), opmath(grad)
    if stats.scale is not None:
        xf = xf * stats.scale
    weight_f, bias_f = params_like(xf, weight, bias)
    if weight_f is not None and weight_offset:
        weight_f = weight_f + weight_offset
    width = xf.shape[-1]
    mean = stats.mean if stats.mean is not None else torch.zeros_like(stats.rstd)
    dx, dweight, dbias = torch.ops.aten.native_layer_norm_backward(
        gf, xf, [width], mean, stats.rstd, weight_f, bias_f, [needs[0], needs[1], needs[2]])
    if dx is not None and kind == "layer" and width == 1:  # x − E[x] is exactly 0: so is dx (ATen's is noise)
        dx.zero_()
    elif dx is not None and kind != "layer":
        sum_gw = gf.sum(-1, keepdim=True) if weight_f is None else (gf @ weight_f).unsqueeze(-1)
        shift = stats.rstd * sum_gw / width
        if kind == "crms":
            gw = gf if weight_f is None else gf * weight_f
            coef = torch.linalg.vecdot(gw, xf).unsqueeze(-1).mul_(stats.rstd).mul_(stats.rstd).mul_(stats.rstd)
            dx.addcmul_(xf, coef, value=1.0 / (width * (width + 1)))
            shift = shift - coef * stats.row_sum / (width + 1)
        dx.add_(shift)
    if dx is not None:
        dx = (dx.mul_(stats.scale) if stats.scale is not None else dx).to(x.dtype)
    return (dx, None if dweight is None else dweight.to(weight.dtype),
            None if dbias is None else dbias.to(bias.dtype))


def _reference_rows(kind: str, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                    weight_offset: float) -> Tensor:
    """The reference's output (opmath) for the rows ``x`` (over the last dim): what a double backward differentiates."""
    shape, out_dtype = (x.shape[-1],), compute_dtype(x.dtype)
    if kind == "layer":
        return _ref_row.layer_norm(x, shape, weight, bias, eps, out_dtype=out_dtype)
    if kind == "rms":
        y = _ref_row.rms_norm(x, shape, weight, eps, weight_offset=weight_offset, out_dtype=out_dtype)
    else:
        y = _ref_row.crms_norm(x, shape, weight, eps, out_dtype=out_dtype)
    return y if bias is None else y + bias


_NATIVE_DTYPES = {torch.float32: 0, torch.bfloat16: 1}  # the C kernels' dtype flag


_ROW_NORM_SIGNATURE = (ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                       ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                       ctypes.c_int64, ctypes.c_float, ctypes.c_int, ctypes.c_int)


def _native_row_norm_kernel() -> Any:
    return _native.function("row_norms", "row_norm_fwd", *_ROW_NORM_SIGNATURE)


def _native_row_norm(rows: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, stats: bool,
                     kind: str = "layer", residual: Optional[Tensor] = None
                     ) -> Optional[tuple[Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]]]:
    """``(y, mean, rstd, h)`` of LayerNorm (``kind="layer"``, statistics as ``native_layer_norm`` gives them: fp32, of
    shape ``rows.shape[:-1] + (1,)``, or ``None`` without ``stats``) or RMSNorm (``"rms"``, a zero mean) over the last
    dim, from the compiled kernel (``csrc/row_norms.c``: one read of the rows, its trust check counted in it); with a
    ``residual`` of the rows' dtype and shape, of ``h = rows + residual``, written in the same pass (else ``h`` is
    ``None``). ``None`` where it does not take these tensors (fp32 or bf16 rows, contiguous; parameters contiguous, of
    one dtype, fp32 or the rows'; plain tensors: :mod:`._native`) or is unavailable; ``y`` is ``None`` where a row's
    ``rstd`` is not positive and finite."""
    kernel = _native_row_norm_kernel()
    if kernel is None or rows.dtype not in _NATIVE_DTYPES or not rows.is_contiguous() or not host_readable(
            rows, weight, bias, residual):
        return None
    param = weight if weight is not None else bias
    if param is not None and (param.dtype not in (torch.float32, rows.dtype) or not param.is_contiguous() or (
            weight is not None and bias is not None and (bias.dtype != weight.dtype or not bias.is_contiguous()))):
        return None
    if residual is not None and (residual.dtype != rows.dtype or not residual.is_contiguous()):
        return None
    y = torch.empty_like(rows)
    h = None if residual is None else torch.empty_like(rows)
    mean = rstd = None
    if stats:
        mean = torch.empty((*rows.shape[:-1], 1), dtype=torch.float32)
        rstd = torch.empty_like(mean)
    width = rows.shape[-1]
    bad = kernel(rows.data_ptr(), None if residual is None else residual.data_ptr(),
                 None if h is None else h.data_ptr(), _NATIVE_DTYPES[rows.dtype],
                 None if weight is None else weight.data_ptr(), None if bias is None else bias.data_ptr(),
                 param is not None and param.dtype is torch.bfloat16, y.data_ptr(),
                 None if mean is None else mean.data_ptr(), None if rstd is None else rstd.data_ptr(),
                 rows.numel() // width, width, eps, kind == "rms", torch.get_num_threads())
    if bad < 0:  # no memory for the bf16 parameters' fp32 copy
        return None
    return (None, None, None, h) if bad else (y, mean, rstd, h)


_LAYER_NORM_BACKWARD_SIGNATURE = (ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                                  ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                  ctypes.c_int64, ctypes.c_int64, ctypes.c_int)


def _native_layer_norm_available() -> bool:
    return _native_row_norm_kernel() is not None


def _layer_norm_kernel() -> Any:
    return _native.function("row_norms", "layer_norm_bwd", *_LAYER_NORM_BACKWARD_SIGNATURE)


def _native_layer_norm_backward(x: Tensor, grad: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                                stats: _Stats, needs: tuple[bool, bool, bool]
                                ) -> Optional[tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]]:
    """LayerNorm's ``(dx, dweight, dbias)`` from the compiled kernel (``csrc/row_norms.c``: one read of ``x`` and
    ``dy``, the parameters' gradients summed in the same pass), or ``None`` where it does not take these tensors
    (fp32 or bf16 ``x`` and ``dy`` of one dtype, contiguous; fp32 statistics; plain tensors) or is unavailable."""
    kernel = _layer_norm_kernel()
    mean, rstd = stats.mean, stats.rstd
    if (kernel is None or x.dtype not in _NATIVE_DTYPES or grad.dtype != x.dtype or mean is None
            or not (x.is_contiguous() and grad.is_contiguous() and mean.is_contiguous() and rstd.is_contiguous())
            or mean.dtype != torch.float32 or rstd.dtype != torch.float32
            or not host_readable(x, grad, weight, mean, rstd)):
        return None
    width = x.shape[-1]
    weight_f = weight
    if weight is not None and not (weight.dtype is torch.float32 and weight.is_contiguous()):
        weight_f = weight.to(torch.float32).contiguous()
    dx = torch.empty_like(x) if needs[0] else None
    dweight = torch.empty(width, dtype=torch.float32) if needs[1] else None
    dbias = torch.empty(width, dtype=torch.float32) if needs[2] and bias is not None else None
    status = kernel(x.data_ptr(), grad.data_ptr(), _NATIVE_DTYPES[x.dtype],
                    None if weight_f is None else weight_f.data_ptr(), mean.data_ptr(), rstd.data_ptr(),
                    None if dx is None else dx.data_ptr(), None if dweight is None else dweight.data_ptr(),
                    None if dbias is None else dbias.data_ptr(), x.numel() // width, width, torch.get_num_threads())
    if status != 0:
        return None
    # (a no-op .to() still costs a dispatch)
    if dweight is not None and weight.dtype is not torch.float32:
        dweight = dweight.to(weight.dtype)
    if dbias is not None and bias.dtype is not torch.float32:
        dbias = dbias.to(bias.dtype)
    return dx, dweight, dbias


def _aten_layer_norm(x: Tensor, shape: Sequence[int], weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                     weight_offset: float, out_dtype: torch.dtype, fp32_stats: bool, native: bool
                     ) -> Optional[tuple[Tensor, Tensor, Tensor]]:
    """``(y, mean, rstd)`` from the compiled LayerNorm (with ``native``: a result without an autograd graph, and
    without ``fp32_stats`` without the statistics) or ATen's fused LayerNorm forward, where the unscaled statistics
    are trusted, else ``None``. ATen reads bf16/fp16 rows as they are, computes in fp32 and rounds once. Parameters in
    the rows' own dtype give the bits of fp32 ones (checked, bf16 and fp16) and run a faster kernel, but then it
    returns statistics rounded to that dtype: not with ``fp32_stats`` (statistics for a backward)."""
    if math.prod(shape) <= 1 or not _unscaled_allowed(x, eps):  # width 1: see row_norm
        return None
    rows = x if out_dtype is x.dtype else opmath(x)  # e.g. bf16 rows of an fp32 input's residual stream
    # kept: parameters of the compute dtype, or of the rows' own where allowed; others cast to the compute dtype
    kept = (compute_dtype(rows.dtype), rows.dtype if not fp32_stats and not weight_offset else None)
    if weight is not None and weight.dtype not in kept:
        weight = weight.to(kept[0])
    if bias is not None and bias.dtype not in kept:
        bias = bias.to(kept[0])
    if weight is not None and bias is not None and weight.dtype != bias.dtype:  # ATen takes one parameter dtype
        weight, bias = weight.to(kept[0]), bias.to(kept[0])
    if weight_offset:
        weight = weight + weight_offset
    result = _native_row_norm(rows, weight, bias, eps, fp32_stats) if native and len(shape) == 1 else None
    if result is not None:
        y, mean, rstd, _ = result
        if y is None:  # untrusted statistics
            return None
        return y if y.dtype == out_dtype else y.to(out_dtype), mean, rstd
    y, mean, rstd = torch.native_layer_norm(rows, shape, weight, bias, eps)
    if not all_positive_finite(rstd):
        return None
    return y if y.dtype == out_dtype else y.to(out_dtype), mean, rstd


def _offset_weight(weight: Optional[Tensor], weight_offset: float) -> Optional[Tensor]:
    """``w + offset`` in fp32 (the reference's), or the weight itself without an offset."""
    return weight.to(torch.float32) + weight_offset if weight is not None and weight_offset else weight


def _native_fused_add(kind: str, x: Tensor, residual: Tensor, shape: tuple[int, ...], weight: Optional[Tensor],
                      bias: Optional[Tensor], eps: float, weight_offset: float) -> Optional[tuple[Tensor, Tensor]]:
    """``(y, h)`` of an inference call of ``add_layer_norm`` or ``add_rms_norm`` (``x``, ``residual`` and ``h`` of one
    dtype) from one compiled pass that writes ``h`` and normalizes it from cache, or ``None`` (then the caller adds
    and normalizes as usual)."""
    if kind == "crms" or len(shape) != 1 or not _unscaled_allowed(x, eps):
        return None
    result = _native_row_norm(x, _offset_weight(weight, weight_offset), bias, eps, False, kind=kind,
                              residual=residual)
    if result is None or result[0] is None:
        return None
    return result[0], result[3]


def _forward(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, weight_offset: float,
             kind: str, out_dtype: torch.dtype) -> tuple[Tensor, _Stats]:
    """``(y, statistics)`` of the rows ``x`` (over the last dim) for a backward: unscaled where trusted, else the
    scaled closed form."""
    if kind == "layer":
        result = _aten_layer_norm(x, (x.shape[-1],), weight, bias, eps, weight_offset, out_dtype, fp32_stats=True,
                                  native=True)
        if result is not None:
            return result[0], _Stats(result[2], mean=result[1])
    xf = opmath(x)
    stats = out = None
    if kind != "layer" and _unscaled_allowed(x, eps):
        rstd, row_sum, squares = _rms_stats(xf, kind, eps)
        out = squares if xf is x else None  # the output's buffer (a fresh upcast of x is normalized in place)
        stats = _Stats(rstd, row_sum=row_sum) if all_positive_finite(rstd) else None
    if stats is None:
        stats = _scaled_stats(xf, kind, eps)
    weight_f, bias_f = params_like(xf, weight, bias)
    return _normalize(x, xf, stats, weight_f, bias_f, weight_offset, out_dtype, out=out), stats


class _RowNormFunction(torch.autograd.Function):
    """``y = ẑ·(w + offset) + b`` over the last dim of the rows ``h`` (module docstring), with ``h = x`` or, given
    a ``residual`` of ``x``'s dtype, ``h = x + residual``, returned too: ``(y, h)``. Fused so that the backward adds the
    gradient of ``h`` in place. ``residual``, ``weight`` and ``bias`` may be ``None``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                eps: float, weight_offset: float, kind: str, out_dtype: torch.dtype) -> Any:
        h = x if residual is None else x + residual  # ATen adds in opmath and rounds once, as the reference
        y, stats = _forward(h, weight, bias, eps, weight_offset, kind, out_dtype)
        ctx.save_for_backward(h, weight, bias, stats.rstd, stats.mean, stats.row_sum, stats.scale)
        ctx.eps, ctx.weight_offset, ctx.kind, ctx.fused_add = eps, weight_offset, kind, residual is not None
        ctx.set_materialize_grads(False)
        return y if residual is None else (y, h)

    @staticmethod
    def backward(ctx: Any, grad: Optional[Tensor], grad_h: Optional[Tensor] = None) -> tuple[Optional[Tensor], ...]:
        h, weight, bias, rstd, mean, row_sum, scale = ctx.saved_tensors
        needs = (any(ctx.needs_input_grad[:2]), *ctx.needs_input_grad[2:4])
        if grad is None:
            dh, dweight, dbias = None, None, None
        elif torch.is_grad_enabled():  # a double backward: differentiate the reference, whose ops have derivatives
            hf = opmath(h)
            leaves = [t for t, need in zip((hf, weight, bias), needs) if need]
            y = _reference_rows(ctx.kind, hf, weight, bias, ctx.eps, ctx.weight_offset)
            grads = iter(torch.autograd.grad(y, leaves, opmath(grad), create_graph=True))
            dh, dweight, dbias = (next(grads) if need else None for need in needs)
            dh = None if dh is None else dh.to(h.dtype)
        else:
            dh, dweight, dbias = _backward(h, grad, weight, bias, _Stats(rstd, mean, row_sum, scale), ctx.kind,
                                           ctx.weight_offset, needs)
        if grad_h is not None and needs[0]:
            dh = grad_h if dh is None else (dh + grad_h if torch.is_grad_enabled() else dh.add_(grad_h))
        return dh, dh if ctx.fused_add else None, dweight, dbias, None, None, None, None


def _residual_add(x: Tensor, residual: Tensor, residual_dtype: torch.dtype) -> Tensor:
    if x.dtype == residual.dtype == residual_dtype:
        return x + residual  # ATen adds in opmath and rounds once: the reference's value, one pass
    return _ref_row.residual_add(x, residual, residual_dtype)


def row_norm(kind: str, input: Tensor, shape: tuple[int, ...], weight: Optional[Tensor], bias: Optional[Tensor],
             eps: float, residual: Optional[Tensor], residual_dtype: Optional[torch.dtype],
             weight_offset: float) -> tuple[Tensor, Optional[Tensor]]:
    """``(y, h)`` as :func:`normlayers.functional.add_layer_norm` and friends (``h = None`` without ``residual``);
    ``kind`` is ``"layer"``, ``"rms"`` or ``"crms"``. Arguments are assumed valid."""
    differentiable = torch.is_grad_enabled() and (  # (no generator: this runs on every call)
        input.requires_grad or (residual is not None and residual.requires_grad)
        or (weight is not None and weight.requires_grad) or (bias is not None and bias.requires_grad))
    same_dtype = residual is not None and input.dtype == residual.dtype == residual_dtype
    fused_add = same_dtype and differentiable
    if same_dtype and not differentiable:
        result = _native_fused_add(kind, input, residual, shape, weight, bias, eps, weight_offset)
        if result is not None:
            return result
    h = input if residual is None or fused_add else _residual_add(input, residual, residual_dtype)
    # LayerNorm: the compiled kernel, else ATen's fused kernel and, for fp32/fp64, its own autograd, where trusted.
    # (bf16/fp16 rows with gradients take the Function: ATen's reduced-precision backward sums dW and dB in bf16; so
    # do the rows the compiled kernels take, whose forward runs there and whose backward reads x and dy once, where
    # ATen's reads them again for dW and dB.) Width 1 takes the closed form: there x − E[x] is exactly 0, and ATen's
    # backward leaves rounding noise in dx.
    if kind == "layer" and not fused_add and not (differentiable and (
            h.dtype in LOW_PRECISION or (h.dtype in _NATIVE_DTYPES and _native_layer_norm_available()
                                         and host_readable(h, weight, bias)))):
        result = _aten_layer_norm(h, shape, weight, bias, eps, weight_offset, input.dtype, fp32_stats=False,
                                  native=not differentiable)
        if result is not None:
            return result[0], h if residual is not None else None
    if len(shape) == 1:  # the rows as they are: every step works over the last dim (and a view op costs a dispatch)
        rows, residual_rows, flat_weight, flat_bias = h, residual, weight, bias
    else:
        width = math.prod(shape)
        rows = h.reshape(-1, width)
        residual_rows = None if residual is None else residual.reshape(-1, width)
        flat_weight = None if weight is None else weight.reshape(width)
        flat_bias = None if bias is None else bias.reshape(width)
    if (kind == "layer" and differentiable and residual is None and rows is input and not weight_offset
            and rows.dtype in _NATIVE_DTYPES and rows.shape[-1] > 1 and rows.is_contiguous()
            and _unscaled_allowed(rows, eps) and host_readable(rows, weight, bias)):
        extension = _extension.module()
        if extension is not None:  # the same Function's forward and backward, its autograd node in C++
            return extension.layer_norm(rows, weight, bias, eps, lambda: _RowNormFunction.apply(
                rows, None, weight, bias, eps, 0.0, kind, input.dtype)), None
    if fused_add:
        y, h = _RowNormFunction.apply(rows, residual_rows, flat_weight, flat_bias, eps, weight_offset, kind,
                                      input.dtype)
        return (y, h) if rows is input else (y.reshape(input.shape), h.reshape(input.shape))
    if differentiable:
        y = _RowNormFunction.apply(rows, None, flat_weight, flat_bias, eps, weight_offset, kind, input.dtype)
    else:  # inference: the same forward without the Function's overhead
        y = _forward(rows, flat_weight, flat_bias, eps, weight_offset, kind, input.dtype)[0]
    return y if rows is h else y.reshape(h.shape), h if residual is not None else None
