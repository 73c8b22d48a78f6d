"""``torch.library`` custom ops for EvoNorm's fused elementwise pass (``kernels/evo_norm.py``).

Both take ``x`` of shape ``(N, C, *spatial)`` in any memory format and ``(N, C)`` per-plane coefficients:

* ``plane_swish_affine(x, slope, scale, shift) -> y = x·sigmoid(slope·x)·scale + shift`` (EvoNorm S0; S1/S2 with
  SiLU, ``slope = 1``);
* ``plane_max_div_affine(x, left, slope, offset, scale, shift) -> y = x / max(left, slope·x + offset)·scale + shift``
  (EvoNorm B0/B1/B2), whose gradient splits half/half at ties as :func:`torch.maximum`'s.

Arithmetic in fp32 (fp64 for fp64 ``x``); ``y`` in ``x``'s dtype and memory format. Each is differentiable
(``register_autograd``) through its backward op, which returns ``dx`` and every coefficient's gradient (``(N, C)``,
in the coefficient's dtype), and opaque to ``torch.compile`` (``register_fake``). The statistics feeding the
coefficients come from ``normlayers::plane_moments`` and small torch ops: :func:`evo_norm_b` and :func:`evo_norm_s`
below compose them into the layers.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from torch import Tensor

from normlayers._autograd import differentiable_backward, wants_double_backward
from normlayers.distributed import MomentSync
from normlayers.ops.channel_stats import _per_plane, batch_moments_from_planes, plane_affine, plane_moments
from normlayers.reference import evo_norm as _ref_evo

__all__ = ["plane_swish_affine", "plane_max_div_affine", "evo_norm_b", "evo_norm_s"]


def _kernels():
    # Triton is imported lazily: the reference path and the package import must work without it.
    from normlayers.kernels import evo_norm

    return evo_norm


def _fake_grads(x: Tensor, like: Tensor, count: int) -> tuple[Tensor, ...]:
    return (torch.empty_like(x), *(like.new_empty(x.shape[:2]) for _ in range(count)))


def _cast_grads(grads: tuple[Tensor, ...], dtypes: tuple[torch.dtype, ...]) -> tuple[Tensor, ...]:
    return tuple(g.to(dtype) for g, dtype in zip(grads, dtypes))


@torch.library.custom_op("normlayers::plane_swish_affine", mutates_args=())
def plane_swish_affine(x: Tensor, slope: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``y = x·sigmoid(slope[n, c]·x)·scale[n, c] + shift[n, c]``."""
    kernels = _kernels()
    return kernels.evo_plane_fwd(x, kernels.MODE_SWISH, slope=slope, scale=scale, shift=shift)


@plane_swish_affine.register_fake
def _plane_swish_affine_fake(x, slope, scale, shift):
    return torch.empty_like(x)


@torch.library.custom_op("normlayers::plane_swish_affine_bwd", mutates_args=())
def plane_swish_affine_bwd(dy: Tensor, x: Tensor, slope: Tensor, scale: Tensor
                           ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dx, dslope, dscale, dshift)`` of :func:`plane_swish_affine`."""
    kernels = _kernels()
    return kernels.evo_plane_bwd(dy, x, kernels.MODE_SWISH, slope=slope, scale=scale)


@plane_swish_affine_bwd.register_fake
def _plane_swish_affine_bwd_fake(dy, x, slope, scale):
    return _fake_grads(x, scale, 3)


def _save_inputs_setup_context(ctx, inputs, output):
    # Both ops: every input but shift saved (the backward does not read it; its gradient is Σ dy), and the
    # coefficients' dtypes kept for their gradients.
    ctx.save_for_backward(*inputs[:-1])
    ctx.coefficient_dtypes = tuple(t.dtype for t in inputs[1:])


def _plane_swish_affine_formula(x: Tensor, slope: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    xf = x.to(scale.dtype if scale.dtype == torch.float64 else torch.float32)
    return xf * torch.sigmoid(_per_plane(slope, x) * xf) * _per_plane(scale, x) + _per_plane(shift, x)


def _plane_max_div_affine_formula(x: Tensor, left: Tensor, slope: Tensor, offset: Tensor, scale: Tensor,
                                  shift: Tensor) -> Tensor:
    xf = x.to(scale.dtype if scale.dtype == torch.float64 else torch.float32)
    denominator = torch.maximum(_per_plane(left, x), _per_plane(slope, x) * xf + _per_plane(offset, x))
    return xf / denominator * _per_plane(scale, x) + _per_plane(shift, x)


def _double_backward(formula, ctx, dy):
    """create_graph=True: autograd of the op's formula (the backward op has no derivative); shift, unsaved, enters
    additively, so a zero stand-in gives its gradient."""
    inputs = (*ctx.saved_tensors, torch.zeros_like(ctx.saved_tensors[-1]))
    return differentiable_backward(formula, inputs, (dy,), ctx.needs_input_grad)


def _plane_swish_affine_backward(ctx, dy):
    if wants_double_backward():
        return _double_backward(_plane_swish_affine_formula, ctx, dy)
    dx, *grads = plane_swish_affine_bwd(dy, *ctx.saved_tensors)
    return dx, *_cast_grads(grads, ctx.coefficient_dtypes)


plane_swish_affine.register_autograd(_plane_swish_affine_backward, setup_context=_save_inputs_setup_context)


@torch.library.custom_op("normlayers::plane_max_div_affine", mutates_args=())
def plane_max_div_affine(x: Tensor, left: Tensor, slope: Tensor, offset: Tensor, scale: Tensor, shift: Tensor
                         ) -> Tensor:
    """``y = x / max(left[n, c], slope[n, c]·x + offset[n, c])·scale[n, c] + shift[n, c]``."""
    kernels = _kernels()
    return kernels.evo_plane_fwd(x, kernels.MODE_MAX_DIV, left=left, slope=slope, offset=offset, scale=scale,
                                 shift=shift)


@plane_max_div_affine.register_fake
def _plane_max_div_affine_fake(x, left, slope, offset, scale, shift):
    return torch.empty_like(x)


@torch.library.custom_op("normlayers::plane_max_div_affine_bwd", mutates_args=())
def plane_max_div_affine_bwd(dy: Tensor, x: Tensor, left: Tensor, slope: Tensor, offset: Tensor, scale: Tensor
                             ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(dx, dleft, dslope, doffset, dscale, dshift)`` of :func:`plane_max_div_affine` (ties split half/half)."""
    kernels = _kernels()
    return kernels.evo_plane_bwd(dy, x, kernels.MODE_MAX_DIV, left=left, slope=slope, offset=offset, scale=scale)


@plane_max_div_affine_bwd.register_fake
def _plane_max_div_affine_bwd_fake(dy, x, left, slope, offset, scale):
    return _fake_grads(x, scale, 5)


def _plane_max_div_affine_backward(ctx, dy):
    if wants_double_backward():
        return _double_backward(_plane_max_div_affine_formula, ctx, dy)
    dx, *grads = plane_max_div_affine_bwd(dy, *ctx.saved_tensors)
    return dx, *_cast_grads(grads, ctx.coefficient_dtypes)


# Same context as the swish op: every input saved, the coefficients' dtypes kept for their gradients.
plane_max_div_affine.register_autograd(_plane_max_div_affine_backward, setup_context=_save_inputs_setup_context)


def _affine_coefficients(weight: Optional[Tensor], bias: Optional[Tensor], scale: Tensor) -> tuple[Tensor, Tensor]:
    """``(scale·γ, β)`` as ``(N, C)`` coefficients of the plane ops, from a per-plane ``scale`` (``(N, C)``)."""
    if weight is not None:
        scale = scale * weight.to(scale.dtype)
    shift = bias.to(scale.dtype).expand(scale.shape) if bias is not None else scale.new_zeros(scale.shape)
    return scale, shift


def evo_norm_b(variant: str, input: Tensor, running_var: Optional[Tensor], weight: Optional[Tensor],
               bias: Optional[Tensor], v: Optional[Tensor], training: bool, momentum: float,
               eps: float, sync: Optional[MomentSync]) -> Tensor:
    """The B family through the Triton ops: ``plane_moments``, then ``(N, C)`` torch ops, then one fused pass.

    Every statistic follows exactly from the planes' ``(mean, var)``: the batch variance of a channel is the mean of
    its planes' variances plus the variance of their means (equal counts); a plane's ``mean(x²)`` is ``var + mean²``.
    Each variant's right-hand side is affine in ``x`` within a plane — B0 ``v·x + std``, B1 ``rms·x + rms``,
    B2 ``−x + rms`` — which is what :func:`~normlayers.ops.evo_norm.plane_max_div_affine` takes. Autograd of the
    small ops links the fused pass's backward to ``plane_moments``'s. Same semantics as the reference, buffer included.
    """
    n, channels, height, width = input.shape
    plane_mean, plane_var = plane_moments(input)
    opmath = plane_mean.dtype
    if training:
        batch_mean, var = batch_moments_from_planes(plane_mean, plane_var)
        count: Union[int, Tensor] = n * height * width
        if sync is not None:
            _, var, count = sync(batch_mean, var, count)
        if running_var is not None:
            _ref_evo.update_running_var_(running_var, var, count, momentum)
    else:
        var = running_var.to(opmath)
    left = torch.sqrt(var + eps).expand(n, channels)
    if variant == "b0":
        slope, offset = v.to(opmath).expand(n, channels), torch.sqrt(plane_var + eps)
    else:
        rms = torch.sqrt(plane_var + plane_mean.square() + eps)
        slope, offset = (rms if variant == "b1" else torch.full_like(rms, -1.0)), rms
    scale, shift = _affine_coefficients(weight, bias, plane_mean.new_ones(n, channels))
    return plane_max_div_affine(input, left, slope, offset, scale, shift)


def _is_silu(activation: Optional[Callable[[Tensor], Tensor]]) -> bool:
    return activation is torch.nn.functional.silu or type(activation) is torch.nn.SiLU


def evo_norm_s(variant: str, input: Tensor, groups: int, weight: Optional[Tensor], bias: Optional[Tensor],
               v: Optional[Tensor], activation: Optional[Callable[[Tensor], Tensor]], eps: float,
               apply_act: bool) -> Tensor:
    """The S family through the Triton ops: ``plane_moments``, the group statistic by ``(N, C)`` torch ops (the mean
    of the planes' variances plus the variance of their means; S2: the mean of ``var + mean²``), then one fused pass.

    The numerator ``x·sigmoid(v·x)`` (S0, and SiLU, ``v = 1``) is fused into
    :func:`~normlayers.ops.evo_norm.plane_swish_affine`; the identity (no activation, or timm's "a" variants with
    ``apply_act=False``) is :func:`~normlayers.ops.channel_stats.plane_affine`; any other activation runs as torch ops
    on the fp32 (fp64) input and its result goes through ``plane_affine``.
    """
    n, channels = input.shape[:2]
    plane_mean, plane_var = plane_moments(input)
    per_group = (n, groups, channels // groups)
    group_mean, group_var = plane_mean.view(per_group), plane_var.view(per_group)
    if variant == "s2":
        statistic = (group_var + group_mean.square()).mean(-1, keepdim=True)
    else:
        statistic = group_var.mean(-1, keepdim=True) + (
            group_mean - group_mean.mean(-1, keepdim=True)).square().mean(-1, keepdim=True)
    inv_denominator = torch.rsqrt(statistic + eps).expand(per_group).reshape(n, channels)
    scale, shift = _affine_coefficients(weight, bias, inv_denominator)
    if apply_act and (variant == "s0" or _is_silu(activation)):
        slope = v.to(scale.dtype).expand(n, channels) if variant == "s0" else torch.ones_like(scale)
        return plane_swish_affine(input, slope, scale, shift)
    if apply_act and activation is not None:
        numerator = activation(input.to(scale.dtype))
        return plane_affine(numerator, torch.zeros_like(scale), scale, shift).to(input.dtype)
    return plane_affine(input, torch.zeros_like(scale), scale, shift)
