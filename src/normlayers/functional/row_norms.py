"""Functional row norms: LayerNorm, RMSNorm, CRMSNorm and their fused residual-add forms."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from normlayers._checks import (
    FLOAT_DTYPE_SET,
    ShapeLike,
    as_shape,
    check_epsilon,
    check_float_tensor,
    check_real,
    check_same_device,
    is_plain_float_tensor,
)
from normlayers._dtypes import compute_dtype
from normlayers.backends import tier
from normlayers.cpu import row_norms as _cpu_row
from normlayers.ops import row_norms as _ops_row
from normlayers.reference import row_norms as _ref_row

__all__ = ["layer_norm", "rms_norm", "crms_norm", "add_layer_norm", "add_rms_norm", "add_crms_norm"]


def _check_row_norm_args(
    input: Tensor,
    normalized_shape: ShapeLike,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
    residual: Optional[Tensor] = None,
) -> tuple[int, ...]:
    if _is_plain_row_norm_call(input, normalized_shape, weight, bias, eps, residual):
        return normalized_shape
    check_float_tensor("input", input)
    shape = as_shape(normalized_shape)
    if input.dim() < len(shape) or tuple(input.shape[input.dim() - len(shape):]) != shape:
        raise ValueError(
            f"input's trailing dims must equal normalized_shape {list(shape)}, got input of shape {list(input.shape)}")
    for name, param in (("weight", weight), ("bias", bias)):
        if param is None:
            continue
        check_float_tensor(name, param)
        if tuple(param.shape) != shape:
            raise ValueError(f"{name} must have shape normalized_shape {list(shape)}, got {list(param.shape)}")
        check_same_device(name, param, input)
    if residual is not None:
        check_float_tensor("residual", residual)
        if residual.shape != input.shape:
            raise ValueError(f"residual must have the input's shape {list(input.shape)} (no broadcasting), "
                             f"got {list(residual.shape)}")
        check_same_device("residual", residual, input)
    check_epsilon("eps", eps)
    return shape


def _is_plain_row_norm_call(input: object, normalized_shape: object, weight: object, bias: object, eps: object,
                            residual: object) -> bool:
    """Whether the arguments are valid in the plain form every model's call passes (tensors, a one-int tuple, a
    ``float`` eps): it passes only calls that the full checks of :func:`_check_row_norm_args` pass too, in about a
    microsecond of their eight."""
    if not (isinstance(input, Tensor) and input.dtype in FLOAT_DTYPE_SET and type(normalized_shape) is tuple
            and len(normalized_shape) == 1 and type(normalized_shape[0]) is int and input.dim() > 0
            and input.shape[-1] == normalized_shape[0] and type(eps) is float and 0.0 <= eps < math.inf):
        return False
    device = input.device
    return ((weight is None or is_plain_float_tensor(weight, normalized_shape, device))
            and (bias is None or is_plain_float_tensor(bias, normalized_shape, device))
            and (residual is None or is_plain_float_tensor(residual, input.shape, device)))


def _resolve_rms_eps(eps: Optional[float], dtype: torch.dtype) -> float:
    """``eps=None`` means the machine epsilon of the computation dtype: fp32's for fp16/bf16/fp32 inputs, fp64's for
    fp64, as ``torch.nn.functional.rms_norm`` documents (pytorch/pytorch#159317)."""
    if eps is not None:
        return eps
    return torch.finfo(compute_dtype(dtype)).eps


# torch runs layer_norm in fp32 under CUDA autocast, and rms_norm too since 2.12 (the fp32 cast policy of
# aten/src/ATen/autocast_mode.h; docs/row_norms.md); the row norms follow
# the installed torch, so swapping a torch norm for ours keeps a model's dtypes.
_RMS_AUTOCASTS_TO_FP32 = torch.torch_version.TorchVersion(torch.__version__) >= (2, 12)


def _autocasts_to_fp32(kind: str, input: Tensor) -> bool:
    if not input.is_cuda or not torch.is_autocast_enabled("cuda"):
        return False
    return kind == "layer" or _RMS_AUTOCASTS_TO_FP32


def _to_fp32(t: Optional[Tensor]) -> Optional[Tensor]:
    return t.to(compute_dtype(t.dtype)) if t is not None else t


def _row_norm(kind: str, input: Tensor, shape: tuple[int, ...], weight: Optional[Tensor], bias: Optional[Tensor],
              eps: float, residual: Optional[Tensor], residual_in_fp32: bool,
              weight_offset: float) -> tuple[Tensor, Optional[Tensor]]:
    if _autocasts_to_fp32(kind, input):
        input, residual, weight, bias = (_to_fp32(t) for t in (input, residual, weight, bias))
    residual_dtype = None
    if residual is not None:
        residual_dtype = compute_dtype(residual.dtype) if residual_in_fp32 else residual.dtype
    implementation = tier(input)
    if implementation == "triton":
        return _ops_row.row_norm(input, shape, weight, bias, kind, eps, residual=residual,
                                 residual_dtype=residual_dtype, weight_offset=weight_offset)
    if implementation == "cpu":
        return _cpu_row.row_norm(kind, input, shape, weight, bias, eps, residual, residual_dtype, weight_offset)
    h = _ref_row.residual_add(input, residual, residual_dtype) if residual is not None else input
    if kind == "layer":
        y = _ref_row.layer_norm(h, shape, weight, bias, eps, out_dtype=input.dtype)
    elif kind == "rms":
        y = _ref_row.rms_norm(h, shape, weight, eps, weight_offset=weight_offset, out_dtype=input.dtype)
    else:
        y = _ref_row.crms_norm(h, shape, weight, eps, out_dtype=input.dtype)
    return y, h if residual is not None else None


def _check_weight_offset(weight_offset: float, weight: Optional[Tensor]) -> float:
    weight_offset = check_real("weight_offset", weight_offset)
    if weight_offset != 0 and weight is None:
        raise ValueError("weight_offset scales the weight (weight + weight_offset); it needs a weight")
    return weight_offset


def layer_norm(input: Tensor, normalized_shape: ShapeLike, weight: Optional[Tensor] = None,
               bias: Optional[Tensor] = None, eps: float = 1e-5) -> Tensor:
    r"""Layer normalization over the last ``len(normalized_shape)`` dims, as :func:`torch.nn.functional.layer_norm`.

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \cdot \gamma + \beta

    with the biased variance, statistics in fp32 (fp64 for fp64 input), output in the input dtype.
    """
    shape = _check_row_norm_args(input, normalized_shape, weight, bias, eps)
    return _row_norm("layer", input, shape, weight, bias, eps, None, False, 0.0)[0]


def rms_norm(input: Tensor, normalized_shape: ShapeLike, weight: Optional[Tensor] = None,
             eps: Optional[float] = None, *, weight_offset: float = 0.0) -> Tensor:
    r"""RMS normalization over the last ``len(normalized_shape)`` dims, as :func:`torch.nn.functional.rms_norm`.

    .. math:: y = \frac{x}{\sqrt{\mathrm{mean}(x^2) + \epsilon}} \cdot (\gamma + \text{weight\_offset})

    ``eps=None`` is fp32's machine epsilon (fp64's for fp64 input), as in torch. ``weight_offset=1.0`` gives the
    Gemma-style ``(1 + w)`` scale; it requires ``weight``.
    """
    shape = _check_row_norm_args(input, normalized_shape, weight, None, 0.0 if eps is None else eps)
    offset = _check_weight_offset(weight_offset, weight)
    return _row_norm("rms", input, shape, weight, None, _resolve_rms_eps(eps, input.dtype), None, False, offset)[0]


def crms_norm(input: Tensor, normalized_shape: ShapeLike, weight: Optional[Tensor] = None,
              eps: Optional[float] = None) -> Tensor:
    r"""Compressed RMS normalization (Jiang et al., "Pre-RMSNorm and Pre-CRMSNorm Transformers", NeurIPS 2023).

    ``input`` holds the first ``d − 1`` coordinates ``x'`` of a zero-mean vector of width ``d``; the dropped
    coordinate is ``−Σx'``. With ``n = d − 1 = prod(normalized_shape)``:

    .. math:: y = \frac{x'}{\sqrt{\left(\sum_i x_i'^2 + (\sum_i x'_i)^2\right) / (n + 1) + \epsilon}} \cdot \gamma

    which equals the first ``n`` outputs of RMSNorm on the restored vector ``[x', −Σx']``. ``eps`` as in
    :func:`rms_norm`.
    """
    shape = _check_row_norm_args(input, normalized_shape, weight, None, 0.0 if eps is None else eps)
    return _row_norm("crms", input, shape, weight, None, _resolve_rms_eps(eps, input.dtype), None, False, 0.0)[0]


def add_layer_norm(x: Tensor, residual: Tensor, normalized_shape: ShapeLike, weight: Optional[Tensor] = None,
                   bias: Optional[Tensor] = None, eps: float = 1e-5, *,
                   residual_in_fp32: bool = False) -> tuple[Tensor, Tensor]:
    """Fused ``h = x + residual; return layer_norm(h), h`` for pre-norm blocks.

    ``h`` is computed in fp32 and stored in ``residual``'s dtype, or in fp32 when ``residual_in_fp32`` (an fp32
    residual stream under bf16 activations); the norm is applied to that stored ``h``. The normalized output has
    ``x``'s dtype. Gradients flow to ``x``, ``residual`` (both receive ``dh``) and the parameters.
    """
    shape = _check_row_norm_args(x, normalized_shape, weight, bias, eps, residual)
    return _row_norm("layer", x, shape, weight, bias, eps, residual, residual_in_fp32, 0.0)


def add_rms_norm(x: Tensor, residual: Tensor, normalized_shape: ShapeLike, weight: Optional[Tensor] = None,
                 eps: Optional[float] = None, *, weight_offset: float = 0.0,
                 residual_in_fp32: bool = False) -> tuple[Tensor, Tensor]:
    """Fused ``h = x + residual; return rms_norm(h), h``; see :func:`add_layer_norm` and :func:`rms_norm`."""
    shape = _check_row_norm_args(x, normalized_shape, weight, None, 0.0 if eps is None else eps, residual)
    offset = _check_weight_offset(weight_offset, weight)
    return _row_norm("rms", x, shape, weight, None, _resolve_rms_eps(eps, x.dtype), residual, residual_in_fp32, offset)


def add_crms_norm(x: Tensor, residual: Tensor, normalized_shape: ShapeLike, weight: Optional[Tensor] = None,
                  eps: Optional[float] = None, *, residual_in_fp32: bool = False) -> tuple[Tensor, Tensor]:
    """Fused ``h = x + residual; return crms_norm(h), h``; see :func:`add_layer_norm` and :func:`crms_norm`."""
    shape = _check_row_norm_args(x, normalized_shape, weight, None, 0.0 if eps is None else eps, residual)
    return _row_norm("crms", x, shape, weight, None, _resolve_rms_eps(eps, x.dtype), residual, residual_in_fp32, 0.0)

