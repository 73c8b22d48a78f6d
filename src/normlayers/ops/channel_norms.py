"""``torch.library`` custom ops for the channels-first norm kernels: ``normlayers::channel_norm_fwd`` / ``_bwd``.

One op pair serves LayerNorm2d and RMSNorm2d (``kind`` = ``"layer"``, ``"rms"``), as one kernel pair does. The ops
take the ``(N, C, H, W)`` tensors as they are (NCHW, channels-last or a channel slice; no permute copy); the outputs
have the input's memory format when it is dense (``torch.empty_like``), in the kernels and in ``register_fake`` alike.
The ops are opaque to ``torch.compile`` and differentiable through ``register_autograd``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from normlayers._dtypes import compute_dtype

__all__ = ["channel_norm", "channel_norm_fwd", "channel_norm_bwd"]


def _kernels():
    # Triton is imported lazily: the reference path and the package import must work without it.
    from normlayers.kernels import channel_norms

    return channel_norms


@torch.library.custom_op("normlayers::channel_norm_fwd", mutates_args=())
def channel_norm_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], kind: str,
                     eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Returns ``(y, mean, rstd)``: ``mean`` and ``rstd`` are ``(N, H·W)``, ``mean`` empty unless
    ``kind == "layer"``."""
    return _kernels().channel_norm_fwd(x, weight, bias, kind, eps)


@channel_norm_fwd.register_fake
def _channel_norm_fwd_fake(x, weight, bias, kind, eps):
    n, _, h, w = x.shape
    stats = compute_dtype(x.dtype)
    return (torch.empty_like(x), x.new_empty((n, h * w) if kind == "layer" else 0, dtype=stats),
            x.new_empty((n, h * w), dtype=stats))


@torch.library.custom_op("normlayers::channel_norm_bwd", mutates_args=())
def channel_norm_bwd(dy: Tensor, x: Tensor, weight: Optional[Tensor], mean: Tensor, rstd: Tensor, kind: str,
                     has_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Returns ``(dx, dweight, dbias)``; ``dweight``/``dbias`` are empty when there is no such parameter."""
    return _kernels().channel_norm_bwd(dy, x, weight, mean, rstd, kind, has_bias)


@channel_norm_bwd.register_fake
def _channel_norm_bwd_fake(dy, x, weight, mean, rstd, kind, has_bias):
    param_dtype = weight.dtype if weight is not None else x.dtype
    c = x.shape[1]
    return (torch.empty_like(x), x.new_empty(c if weight is not None else 0, dtype=param_dtype),
            x.new_empty(c if has_bias else 0, dtype=param_dtype))


def _setup_context(ctx, inputs, output):
    x, weight, bias, kind, _eps = inputs
    _y, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.kind, ctx.has_bias = kind, bias is not None


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dweight, dbias = channel_norm_bwd(dy, x, weight, mean, rstd, ctx.kind, ctx.has_bias)
    return dx, dweight if weight is not None else None, dbias if ctx.has_bias else None, None, None


channel_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


def channel_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], kind: str, eps: float) -> Tensor:
    """Run a channels-first norm through the Triton op; arguments are assumed validated (``normlayers.functional``
    does that)."""
    return channel_norm_fwd(x, weight, bias, kind, float(eps))[0]
