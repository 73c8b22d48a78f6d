"""``torch.library`` custom ops for Group Normalization with a fused activation: ``normlayers::group_norm_fwd`` /
``_bwd`` (three Triton launches forward, four backward; :mod:`normlayers.kernels.group_norm`), and
``normlayers::group_norm_inference``, the forward of a call that needs no backward (evaluation, ``torch.no_grad``):
two launches, the normalize pass finalizing the statistics itself, none returned.

The ops take the ``(N, C, *spatial)`` input as it is (NCHW, channels-last or a channel slice; no layout copy); the
outputs have the input's memory format when it is dense (``torch.empty_like``), in the kernels and in
``register_fake`` alike. The backward saves only the input, the parameters and the ``(N, G)`` statistics; with
``create_graph=True`` it is autograd of the reference formula instead (double backward).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from normlayers._autograd import differentiable_backward, wants_double_backward
from normlayers._dtypes import compute_dtype
from normlayers.reference import group_norm as _ref_group_norm

__all__ = ["group_norm", "group_norm_fwd", "group_norm_bwd", "group_norm_inference"]


def _kernels():
    # Triton is imported lazily: the reference path and the package import must work without it.
    from normlayers.kernels import group_norm

    return group_norm


@torch.library.custom_op("normlayers::group_norm_fwd", mutates_args=())
def group_norm_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], num_groups: int, eps: float,
                   act: Optional[str]) -> tuple[Tensor, Tensor, Tensor]:
    """Returns ``(y, mean, rstd)``, ``y = act(group_norm(x))``, ``mean``/``rstd`` ``(N, G)`` in the compute dtype."""
    return _kernels().group_norm_fwd(x, num_groups, weight, bias, eps, act)


@group_norm_fwd.register_fake
def _group_norm_fwd_fake(x, weight, bias, num_groups, eps, act):
    stats = x.new_empty((x.shape[0], num_groups), dtype=compute_dtype(x.dtype))
    return torch.empty_like(x), stats, torch.empty_like(stats)


@torch.library.custom_op("normlayers::group_norm_inference", mutates_args=())
def group_norm_inference(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], num_groups: int, eps: float,
                         act: Optional[str]) -> Tensor:
    """``y = act(group_norm(x))`` without the statistics (no autograd: for calls that need no backward)."""
    return _kernels().group_norm_fwd(x, num_groups, weight, bias, eps, act, statistics=False)[0]


@group_norm_inference.register_fake
def _group_norm_inference_fake(x, weight, bias, num_groups, eps, act):
    return torch.empty_like(x)


@torch.library.custom_op("normlayers::group_norm_bwd", mutates_args=())
def group_norm_bwd(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor,
                   rstd: Tensor, num_groups: int, act: Optional[str]) -> tuple[Tensor, Tensor, Tensor]:
    """Returns ``(dx, dweight, dbias)``; ``dweight``/``dbias`` are empty when there is no such parameter."""
    return _kernels().group_norm_bwd(dy, x, weight, bias, mean, rstd, num_groups, act)


@group_norm_bwd.register_fake
def _group_norm_bwd_fake(dy, x, weight, bias, mean, rstd, num_groups, act):
    c = x.shape[1]
    return (torch.empty_like(x), *(x.new_empty(c, dtype=p.dtype) if p is not None else x.new_empty(0)
                                   for p in (weight, bias)))


def _setup_context(ctx, inputs, output):
    x, weight, bias, num_groups, eps, act = inputs
    _y, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)  # no zero gradients made for mean/rstd (two launches of nothing)
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.num_groups, ctx.eps, ctx.act = num_groups, eps, act


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    if dy is None:  # (grads are not materialized: y took no part in the loss)
        return None, None, None, None, None, None
    if wants_double_backward():
        def formula(x, weight, bias):
            return _ref_group_norm.group_norm(x, ctx.num_groups, weight, bias, ctx.eps, ctx.act)

        return (*differentiable_backward(formula, (x, weight, bias), (dy,), ctx.needs_input_grad[:3]),
                None, None, None)
    dx, dweight, dbias = group_norm_bwd(dy, x, weight, bias, mean, rstd, ctx.num_groups, ctx.act)
    return dx, dweight if weight is not None else None, dbias if bias is not None else None, None, None, None


group_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


def group_norm(x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
               act: Optional[str]) -> Tensor:
    """Run Group Normalization (+ ``act``) through the Triton ops (:func:`group_norm_inference` when no gradient is
    needed); arguments are assumed validated (``normlayers.functional`` does that)."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return group_norm_fwd(x, weight, bias, num_groups, float(eps), act)[0]
    return group_norm_inference(x, weight, bias, num_groups, float(eps), act)
